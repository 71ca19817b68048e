"""How much product work hard LSTM gates could let the CPU engine skip (measured on a trained G2-LSTM).

    G2QUANT_DATA=../shared/data python benchmarks/lstm_skip.py runs/ptb_small/g2/best.safetensors
    G2QUANT_DATA=../shared/data python benchmarks/lstm_skip.py runs/mt_multi30k/g2-from-baseline/best.safetensors

With hard input gates a unit whose input gate is closed (i = 0) does not use its candidate ``g``,
so its ``g`` rows of ``W_ih·x`` and ``W_hh·h`` need not be computed (the every-CPU issue's gate
skipping); with a hard output gate too, ``o = 0`` makes ``h = 0`` for that unit (a zero column of
the next products: the packed kernels stream whole k-groups, so that saves no weight bytes). The
engine's kernels work on 16-row blocks, so a ``g`` block can be skipped in a step only when all 16
of its units have ``i = 0``; the ``i`` rows must be computed first, so skipping costs a second
parallel pass per step. This measures per layer, with hard i and f gates on the model's own data
(PTB valid for a word LM; Multi30k valid, teacher forcing, for a translation model: encoder and
decoder layers): the share of closed input gates, of 16-unit ``g`` blocks entirely skippable per
step (stored unit order, and units sorted by how often they are skippable: the best a fixed unit
permutation of the layout could do), and the fraction of the step's product rows (8H) skipped.
Writes ``benchmarks/results/lstm_skip.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gru_skip import block_share  # noqa: E402  (the 16-row block rule is the same)


class _Recorder:
    """Collects the i gate values ``[T·B, H]`` of every call, per (module, layer)."""

    def __init__(self, names: dict):
        self.names, self.steps = names, {}

    def observe(self, module, layer, gates):
        H = module.hidden_size
        key = f"{self.names[id(module)]}.l{layer}"
        self.steps.setdefault(key, []).append(gates[..., :H].reshape(-1, H).numpy().copy())   # i is first

    def observe_gates(self, module, layer, gates):                                    # GRU API: not used
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--tokens", type=int, default=20_000, help="validation tokens (word LM)")
    ap.add_argument("--sentences", type=int, default=300, help="validation sentences (translation model)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lstm_skip.json"))
    args = ap.parse_args(argv)
    from g2quant.checkpoint import load_model
    from g2quant.nn.g2lstm import G2LSTM
    model, rec = load_model(args.checkpoint)
    model.eval()
    lstms = {name or "rnn": m for name, m in model.named_modules() if isinstance(m, G2LSTM)}
    if not lstms:
        print(f"{args.checkpoint}: no G2LSTM layer in this model", file=sys.stderr)
        return 1
    r = _Recorder({id(m): n for n, m in lstms.items()})
    for m in lstms.values():
        m.hard_gates = frozenset("if")
        m.gate_recorder = r
    with torch.no_grad():
        if rec.get("kind") == "seq2seq":
            from g2quant.data.translation import load_multi30k
            from g2quant.evaluate_mt import valid_loss
            data = load_multi30k(None)
            metric = {"valid_loss_hard_if_on_these": valid_loss(model, data.valid.subset(args.sentences))["loss"]}
        else:
            from g2quant.data.ptb import load_ptb
            from g2quant.evaluate import lm_perplexity
            metric = {"valid_ppl_hard_if_on_these": lm_perplexity(model, load_ptb(None).valid[:args.tokens])["ppl"]}
    for m in lstms.values():
        m.gate_recorder = None
    out = {"checkpoint": args.checkpoint, "kind": rec.get("kind", "lm"), **metric, "layers": {}}
    for key, parts in sorted(r.steps.items()):
        closed = np.concatenate(parts) == 0
        H = closed.shape[1]
        order = np.argsort(-closed.mean(0))
        blocks, blocks_sorted = block_share(closed), block_share(closed[:, order])
        out["layers"][key] = {
            "hidden": H, "steps_x_batch": int(closed.shape[0]), "i_closed": float(closed.mean()),
            "units_i_always_closed": int(closed.all(0).sum()), "g_blocks_skippable": blocks,
            "g_blocks_skippable_sorted_units": blocks_sorted,
            # g rows of W_ih and W_hh: 2H of the step's 8H rows
            "product_rows_skipped": blocks * 2 * H / (8 * H),
            "product_rows_skipped_sorted_units": blocks_sorted * 2 * H / (8 * H)}
        print(f"{key}: i closed {closed.mean():.1%} ({int(closed.all(0).sum())} units always); g 16-blocks "
              f"skippable {blocks:.2%} (sorted units {blocks_sorted:.2%}); product rows skipped "
              f"{blocks * 0.25:.2%} (sorted {blocks_sorted * 0.25:.2%})")
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
