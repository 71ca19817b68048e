"""The GRU layer family's torch-free parts: the ``gru`` op (shape rules, gate alphabet "rz") and
its NumPy reference. Gate order r, z, n as ``torch.nn.GRU``; ``r`` multiplies ``W_hn·h + b_hn``, so
the two bias vectors stay separate::

    gx = Q(W_ih)·A8(x_t) + b_ih          gh = Q(W_hh)·A8(h) + b_hh
    r = gate_r(gx_r + gh_r)   z = gate_z(gx_z + gh_z)   n = tanh(gx_n + r·gh_n)   h = (1 − z)·n + z·h

``gate(a)`` is ``sigmoid(a)``, or ``1[a > 0]`` for the gates in ``hard_gates``.
"""
from __future__ import annotations

import numpy as np

from .graph import OpSpec, ValueInfo, act_bits_attr, bool_attr, gate_attr, int_attr, need, register_op, shape_of
from .reference import gate, qmatmul_ref, register_reference

GRU_GATES = "rz"


def gru_dims(node) -> tuple[int, int, int]:
    H = int_attr(node, "hidden_size")
    L = int_attr(node, "num_layers", 1, 64)
    D = 2 if bool_attr(node, "bidirectional", False) else 1
    return H, L, D


def gru_param_names(L: int, D: int):
    return [(f"l{k}.w_ih", f"l{k}.w_hh", f"l{k}.b_ih", f"l{k}.b_hh") for k in range(L * D)]


def _gru(node, inputs, params):
    need(len(inputs) == 1 and inputs[0].kind == "seq", f"node {node.name!r} (gru) takes one sequence")
    x = inputs[0]
    H, L, D = gru_dims(node)
    gate_attr(node, "hard_gates", GRU_GATES)
    act_bits_attr(node)
    want = {r for quad in gru_param_names(L, D) for r in quad}
    need(set(params) == want, f"node {node.name!r}: gru parameters must be {sorted(want)}, got {sorted(params)}")
    for k, (ih, hh, bi, bh) in enumerate(gru_param_names(L, D)):
        d_in = x.features if k < D else D * H
        need(shape_of(node, params, ih, 2, "qmatrix") == (3 * H, d_in), f"node {node.name!r}: {ih} must be [{3 * H}, {d_in}]")
        need(shape_of(node, params, hh, 2, "qmatrix") == (3 * H, H), f"node {node.name!r}: {hh} must be [{3 * H}, {H}]")
        for b in (bi, bh):
            need(shape_of(node, params, b, 1, "array") == (3 * H,), f"node {node.name!r}: {b} must have shape [{3 * H}]")
    return ValueInfo("seq", D * H, (("h", L * D, H),))


def _gru_state_shapes(node, batch: int):
    H, L, D = gru_dims(node)
    return ((L * D, batch, H),)


register_op(OpSpec("gru", _gru, params=("*",), recurrent=True, state_shapes=_gru_state_shapes,
                   streamable=lambda node: not node.attrs.get("bidirectional", False), gates=GRU_GATES))


def gru_layer_ref(w_ih, w_hh, b_ih, b_hh, x: np.ndarray, h: np.ndarray, hard: str, act_bits, reverse: bool = False):
    """One GRU layer-direction over ``x [T, B, In]`` from ``h [B, H]``: ``(out [T, B, H], h_T)``."""
    T, H = x.shape[0], h.shape[-1]
    out = np.empty((T, x.shape[1], H), np.float32)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        gx = qmatmul_ref(w_ih, x[t], act_bits) + b_ih
        gh = qmatmul_ref(w_hh, h, act_bits) + b_hh
        r = gate(gx[:, :H] + gh[:, :H], "r" in hard)
        z = gate(gx[:, H:2 * H] + gh[:, H:2 * H], "z" in hard)
        n = np.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:]).astype(np.float32)
        h = ((1 - z) * n + z * h).astype(np.float32)
        out[t] = h
    return out, h


@register_reference("gru")
def _gru_reference(graph, node):
    H, L, D = gru_dims(node)
    mats = [tuple(graph.param(node, r) for r in quad) for quad in gru_param_names(L, D)]
    hard, act = node.attrs.get("hard_gates", ""), node.attrs.get("act_bits")

    def fn(inputs, states):
        (h0,) = states[node.name]
        h_n = np.empty_like(h0)
        x = inputs[0]
        for layer in range(L):
            outs = []
            for d in range(D):
                k = layer * D + d
                out, h_n[k] = gru_layer_ref(*mats[k], x, h0[k], hard, act, reverse=d == 1)
                outs.append(out)
            x = outs[0] if D == 1 else np.concatenate(outs, axis=-1)
        states[node.name] = (h_n,)
        return x
    return fn
