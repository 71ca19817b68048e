"""Export of a (quantized) ``g2quant.models.seq2seq.Seq2Seq``: its parts as six small graphs
(``g2quant.targets.seq2seq``) sharing one parameter table, checked against torch before writing.

    path = export_seq2seq(qmodel, "mt.g2q", src_vocab=..., tgt_vocab=..., bpe_codes=...)
    rt = g2quant.load("mt.g2q")          # a Seq2SeqRuntime: rt.beam_search(src_ids, beam=5)

Each part is lowered by the module lowerings (``g2quant.lower.LOWERINGS``), so the numerics are
those of every other artifact; the composition (attention, input feeding, the bidirectional
bridge, beam search) is the runtime's, written once in NumPy.
"""
from __future__ import annotations

import numpy as np
import torch

from .lower import ExportError, LowerContext, lowering_for
from .targets.graph import Graph, Node
from .targets.qweights import QMatrix

MODEL_KIND = "seq2seq"


class _Parts:
    def __init__(self):
        self.ctx = LowerContext()
        self.names: dict[int, str] = {}          # QMatrix identity -> its one parameter name (tied weights)

    def node(self, module, name: str, inputs: list[str]) -> tuple[Node, dict]:
        low = lowering_for(module)(module, self.ctx, name)
        roles, params = {}, {}
        for role, p in low.params.items():
            pname = self.names.get(id(p)) if isinstance(p, QMatrix) else None
            if pname is None:
                pname = f"{name}.{role}"
                if isinstance(p, QMatrix):
                    self.names[id(p)] = pname
            roles[role], params[pname] = pname, p
        return Node(low.op, name, inputs, low.attrs, roles), params

    def graph(self, inp: dict, chain: list) -> Graph:
        nodes, params, prev = [], {}, "input"
        for item in chain:
            if isinstance(item, Node):
                item.inputs = [prev]
                n, p = item, {}
            else:
                module, name = item
                n, p = self.node(module, name, [prev])
            nodes.append(n)
            params.update(p)
            prev = n.name
        return Graph(input=inp, nodes=nodes, output={"value": prev, "layout": "tb"}, params=params)


def lower_seq2seq(qmodel) -> tuple[dict[str, Graph], dict]:
    m = getattr(qmodel, "model", qmodel)
    c = m.config
    H, E = c.hidden_size, c.emb_size
    parts = _Parts()
    graphs = {
        "encoder": parts.graph({"kind": "tokens", "size": c.src_vocab_size, "layout": "tb"},
                               [(m.src_embedding, "src_embedding"), (m.encoder, "encoder")]),
        "attn_key": parts.graph({"kind": "features", "size": H, "layout": "tb"}, [(m.attn_key, "attn_key")]),
        "tgt_embedding": parts.graph({"kind": "tokens", "size": c.tgt_vocab_size, "layout": "tb"},
                                     [(m.tgt_embedding, "tgt_embedding")]),
        "decoder": parts.graph({"kind": "features", "size": E + H, "layout": "tb"}, [(m.decoder, "decoder")]),
        "attn_out": parts.graph({"kind": "features", "size": 2 * H, "layout": "tb"},
                                [(m.attn_out, "attn_out"), Node("activation", "attn_tanh", [], {"fn": "tanh"})]),
        "generator": parts.graph({"kind": "features", "size": H, "layout": "tb"}, [(m.generator, "generator")]),
    }
    model = {"kind": MODEL_KIND, "config": c.to_dict()}
    return graphs, model


@torch.no_grad()
def check_seq2seq(qmodel, runtime, *, steps: int = 6, batch: int = 3, seed: int = 0) -> float:
    """Largest relative logit difference between torch (its exact recurrence, see
    ``g2quant.nn.recurrence.exact_recurrence``) and ``runtime`` over a few decode steps."""
    from .lower import agreement
    from .nn.recurrence import exact_recurrence
    m = getattr(qmodel, "model", qmodel)
    was = qmodel.training
    qmodel.eval()
    try:
        with exact_recurrence():
            g = torch.Generator().manual_seed(seed)
            src = torch.randint(4, m.config.src_vocab_size, (7, batch), generator=g)
            memory, state = m.encode(src)
            feed = m.init_feed(batch)
            mem_r, st_r = runtime.encode(src.numpy())
            feed_r = runtime.init_feed(batch)
            prev = torch.full((batch,), m.config.bos_id, dtype=torch.long)
            worst = 0.0
            for _ in range(steps):
                logits, state, feed = m.decode_step(prev, state, feed, memory)
                lr, st_r, feed_r = runtime.decode_step(prev.numpy(), st_r, feed_r, mem_r)
                worst = max(worst, agreement(lr, logits.numpy()))
                prev = logits.argmax(-1)
    finally:
        qmodel.train(was)
    return worst


def export_seq2seq(qmodel, path, *, target: str = "cpu", src_vocab=None, tgt_vocab=None, bpe_codes: str | None = None,
                   validation: dict | None = None, check: bool = True):
    """Write a seq2seq artifact (``target`` "cpu" for now)."""
    from .export import AGREEMENT_RTOL
    from .targets.graphio import check_vocab
    from .targets.reference import ReferenceRuntime
    from .targets.seq2seq import Seq2SeqRuntime

    if target != "cpu":
        raise ExportError(f"seq2seq models export to the cpu target (its runtime runs the beam search); got {target!r}")
    graphs, model = lower_seq2seq(qmodel)
    val = dict(validation or {})
    if check:
        ref = Seq2SeqRuntime({k: ReferenceRuntime(g) for k, g in graphs.items()}, model)
        from .export import FLIP_RTOL, probes_agree
        errs = [check_seq2seq(qmodel, ref, seed=s) for s in range(3)]
        hard = any(getattr(m, "hard_gates", None) for m in qmodel.modules())
        if not probes_agree(errs, hard):
            raise ExportError(f"the exported seq2seq graphs do not reproduce the model: max |logit difference| "
                              f"{', '.join(f'{e:.3g}' for e in errs)} of the logit range on 3 probes (allowed "
                              f"{AGREEMENT_RTOL} on two; on the third "
                              f"{'any value with hard gates' if hard else FLIP_RTOL})")
        val["max_rel_diff_vs_torch"] = max(errs)
        val["rel_diff_vs_torch_probes"] = errs
    files = {}
    for name, vocab in (("src_vocab.txt", src_vocab), ("tgt_vocab.txt", tgt_vocab)):
        if vocab is not None:
            files[name] = ("\n".join(check_vocab(vocab)) + "\n").encode("utf-8")
    if bpe_codes is not None:
        files["bpe.codes"] = bpe_codes.encode("utf-8")
    from .targets.cpu.target import write_model
    return write_model(graphs, path, model=model, files=files, validation=val,
                       meta={"size_bytes": qmodel.size_bytes() if hasattr(qmodel, "size_bytes") else None})
