"""How much product work hard GRU gates could let the CPU engine skip (measured on a trained G2-GRU).

    G2QUANT_DATA=../shared/data python benchmarks/gru_skip.py runs/ptb_small/gru-g2/best.safetensors

With hard gates, a unit whose reset gate is closed (r = 0) does not use its row of ``W_hn·h``, and
a unit whose update gate is saturated (z = 1) keeps ``h`` and uses neither its ``W_in·x`` nor its
``W_hn·h`` row. The engine's kernels work on blocks of 16 rows, so a block of ``W_hn`` can be
skipped in a step only when all 16 of its units are unused. This measures, on PTB valid with hard
r and z gates, per layer: the share of closed r and saturated z, the share of 16-unit blocks that
are entirely skippable per step in the stored unit order, and the same with units sorted by how
often they are skippable (the best a fixed unit permutation of the layout could do), and the
fraction of the step's product rows (``W_ih`` and ``W_hh``, 6H rows) that would be skipped. Writes
``benchmarks/results/gru_skip.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16


class _Recorder:
    def __init__(self):
        self.steps: dict[int, dict[str, list]] = {}

    def observe_gates(self, module, layer, gates):
        d = self.steps.setdefault(layer, {"r": [], "z": []})
        for g in ("r", "z"):
            d[g].append(gates[g].reshape(-1, gates[g].shape[-1]).numpy().copy())


def block_share(mask: np.ndarray) -> float:
    """Share of 16-unit blocks whose units are all set in ``mask [N, H]`` (a trailing partial block counts)."""
    N, H = mask.shape
    nb = -(-H // BLOCK)
    pad = np.ones((N, nb * BLOCK), bool)
    pad[:, :H] = mask
    return float(pad.reshape(N, nb, BLOCK).all(axis=2).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--tokens", type=int, default=20_000, help="validation tokens")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gru_skip.json"))
    args = ap.parse_args(argv)
    from g2quant.checkpoint import load_model
    from g2quant.data.ptb import load_ptb
    from g2quant.evaluate import lm_perplexity
    model, rec = load_model(args.checkpoint)
    if getattr(model.config, "cell", "lstm") != "gru":
        print(f"{args.checkpoint}: not a GRU language model", file=sys.stderr)
        return 1
    corpus = load_ptb(None)
    model.eval()
    model.rnn.hard_gates = frozenset("rz")
    r = _Recorder()
    model.rnn.gate_recorder = r
    with torch.no_grad():
        ppl = lm_perplexity(model, corpus.valid[:args.tokens])["ppl"]
    model.rnn.gate_recorder = None
    out = {"checkpoint": args.checkpoint, "tokens": args.tokens, "valid_ppl_hard_rz_on_these": ppl, "layers": {}}
    for layer, d in sorted(r.steps.items()):
        R, Z = np.concatenate(d["r"]) == 0, np.concatenate(d["z"]) == 1
        H = R.shape[1]
        skip_hn = R | Z                       # W_hn row unused
        skip_in = Z                           # W_in row unused
        order = np.argsort(-skip_hn.mean(0))
        rows_skipped = (block_share(skip_hn) + block_share(skip_in)) * H / (6 * H)
        rows_sorted = (block_share(skip_hn[:, order]) + block_share(skip_in[:, np.argsort(-skip_in.mean(0))])) * H / (6 * H)
        out["layers"][str(layer)] = {
            "r_closed": float(R.mean()), "z_saturated": float(Z.mean()),
            "units_r_always_closed": int(R.all(0).sum()), "units_z_always_one": int(Z.all(0).sum()),
            "hn_unit_skippable": float(skip_hn.mean()), "hn_blocks_skippable": block_share(skip_hn),
            "hn_blocks_skippable_sorted_units": block_share(skip_hn[:, order]),
            "in_blocks_skippable": block_share(skip_in),
            "product_rows_skipped": rows_skipped, "product_rows_skipped_sorted_units": rows_sorted, "hidden": H}
        print(f"layer {layer}: r closed {R.mean():.1%}, z = 1 {Z.mean():.1%}; W_hn units skippable "
              f"{skip_hn.mean():.1%}, 16-blocks {block_share(skip_hn):.2%} (sorted units "
              f"{block_share(skip_hn[:, order]):.2%}); product rows skipped {rows_skipped:.2%} "
              f"(sorted {rows_sorted:.2%})")
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
