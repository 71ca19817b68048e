"""CPU programs: how each op of the lowered graph runs on the CPU engine's kernels.

``PROGRAMS[op](graph, node, ctx) -> fn(inputs, states) -> array`` is called once at load (it packs
the node's matrices into the kernel layout) and returns the per-call function (time-major arrays,
see ``g2quant.targets.runtime``). An op without a program here, or a node the kernels cannot run
(a float matrix, float activations), uses its NumPy reference (``g2quant.targets.reference``):
correct, slower. A new layer family registers its program with :func:`register_program`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..gru import gru_dims, gru_param_names
from ..ops import lstm_dims, lstm_param_names
from ..qweights import QMatrix
from ..reference import REFERENCE
from . import kernels, program_kernels as pk

PROGRAMS: dict[str, Callable] = {}


def register_program(op: str):
    """``@register_program("op")`` on ``make(graph, node, ctx) -> fn(inputs, states) -> array``."""
    def deco(make):
        PROGRAMS[op] = make
        return make
    return deco


class BuildContext:
    """Shared by the programs of one engine: the inner loop, and packed matrices by identity
    (tied weights are packed once)."""

    def __init__(self, loop):
        self.loop = loop
        self._packed: dict[tuple, tuple] = {}

    def pack(self, m: QMatrix, rows: np.ndarray | None = None, key: str = "") -> kernels.KMatrix:
        """``m`` (a parameter of the graph, alive as long as the engine) packed, with its rows
        reordered by ``rows`` when given (``key`` names that order in the cache)."""
        k = (id(m), key)
        hit = self._packed.get(k)
        if hit is None:
            src = m if rows is None else QMatrix(m.q[rows], m.scale[rows], m.bits, m.scheme)
            hit = self._packed[k] = (m, kernels.prepare(src))      # holding m keeps its id unique
        return hit[1]


_padded = kernels.padded


def fast_matrix(m: QMatrix) -> bool:
    """True when the kernels take ``m`` (integer codes within the kernels' column limit)."""
    return kernels.fits(m.bits, m.scheme, m.shape[1])


@register_program("embedding")
def _embedding(graph, node, ctx: BuildContext):
    w = graph.param(node, "weight")
    if not fast_matrix(w):
        return _reference(graph, node)
    km = ctx.pack(w)
    E = km.cols

    def fn(inputs, states):
        toks = inputs[0]
        out = np.empty(toks.shape + (E,), np.float32)
        pk.embed_fwd(km.data, km.nlines, km.bw, km.offset, km.mult, km.scale, toks.reshape(-1),
                     out.reshape(-1, E))
        return out
    return fn


@register_program("linear")
def _linear(graph, node, ctx: BuildContext):
    w = graph.param(node, "weight")
    if node.attrs.get("act_bits") != 8 or not fast_matrix(w):
        return _reference(graph, node)
    km = ctx.pack(w)
    has_bias = "bias" in node.params
    bias = _padded(graph.param(node, "bias") if has_bias else np.zeros(0, np.float32), km.rows)
    R, K, lits = km.rows, km.cols, (ctx.loop, km.bw)
    kernel = []

    def fn(inputs, states):
        x = inputs[0]
        lead = x.shape[:-1]
        x2 = np.ascontiguousarray(x.reshape(-1, K), dtype=np.float32)
        out = np.empty((x2.shape[0], R), np.float32)
        args = (km.data, km.nlines, km.scale, bias, has_bias, x2, out)
        if not kernel:
            kernel.append(pk.specialize(pk.linear_fwd, lits, args))
        kernel[0](*lits, *args)
        return out.reshape(lead + (R,))
    return fn


@register_program("lstm")
def _lstm(graph, node, ctx: BuildContext):
    H, L, D = lstm_dims(node)
    trios = [tuple(graph.param(node, r) for r in roles) for roles in lstm_param_names(L, D)]
    if node.attrs.get("act_bits") != 8 or not all(fast_matrix(m) for t in trios for m in t[:2]):
        return _reference(graph, node)
    layers = []
    for w_ih, w_hh, b in trios:
        layers.append((ctx.pack(w_ih), ctx.pack(w_hh), _padded(b, 4 * H)))
    hard = node.attrs.get("hard_gates", "")
    hi, hf, ho = ("i" in hard), ("f" in hard), ("o" in hard)
    kernels_ = [None] * len(layers)

    def fn(inputs, states):
        x = np.ascontiguousarray(inputs[0], dtype=np.float32)
        h, c = states[node.name]
        T, B = x.shape[0], x.shape[1]
        for layer in range(L):
            out = np.empty((T, B, D * H), np.float32)
            for d in range(D):
                k = layer * D + d
                ki, kh, bias = layers[k]
                lits = (ctx.loop, ki.bw, kh.bw)
                args = (ki.data, ki.nlines, ki.scale, kh.data, kh.nlines, kh.scale, bias, hi, hf, ho, d == 1,
                        x, h[k], c[k], out, d * H)
                if kernels_[k] is None:
                    kernels_[k] = pk.specialize(pk.lstm_layer_fwd, lits, args)
                kernels_[k](*lits, *args)
            x = out
        return x
    return fn


@register_program("gru")
def _gru(graph, node, ctx: BuildContext):
    H, L, D = gru_dims(node)
    quads = [tuple(graph.param(node, r) for r in roles) for roles in gru_param_names(L, D)]
    if node.attrs.get("act_bits") != 8 or not all(fast_matrix(m) for q in quads for m in q[:2]):
        return _reference(graph, node)
    layers = [(ctx.pack(w_ih), ctx.pack(w_hh), _padded(b_ih, 3 * H), _padded(b_hh, 3 * H))
              for w_ih, w_hh, b_ih, b_hh in quads]
    hard = node.attrs.get("hard_gates", "")
    hr, hz = ("r" in hard), ("z" in hard)
    kernels_ = [None] * len(layers)

    def fn(inputs, states):
        x = np.ascontiguousarray(inputs[0], dtype=np.float32)
        (h,) = states[node.name]
        T, B = x.shape[0], x.shape[1]
        for layer in range(L):
            out = np.empty((T, B, D * H), np.float32)
            for d in range(D):
                k = layer * D + d
                ki, kh, b_ih, b_hh = layers[k]
                lits = (ctx.loop, ki.bw, kh.bw)
                args = (ki.data, ki.nlines, ki.scale, kh.data, kh.nlines, kh.scale, b_ih, b_hh, hr, hz, d == 1,
                        x, h[k], out, d * H)
                if kernels_[k] is None:
                    kernels_[k] = pk.specialize(pk.gru_layer_fwd, lits, args)
                kernels_[k](*lits, *args)
            x = out
        return x
    return fn


def _reference(graph, node):
    """The NumPy reference of ``node``, marked as such (``Engine.info()["reference_nodes"]``)."""
    try:
        fn = REFERENCE[node.op](graph, node)
    except KeyError:
        raise NotImplementedError(f"op {node.op!r} has neither a CPU program nor a NumPy reference") from None
    fn.on_kernels = False
    return fn


def build(graph, node, ctx: BuildContext):
    """The per-call function of ``node``: its CPU program, or its NumPy reference (``fn.on_kernels``
    tells which)."""
    make = PROGRAMS.get(node.op)
    if make is None:
        return _reference(graph, node)
    fn = make(graph, node, ctx)
    if not hasattr(fn, "on_kernels"):
        fn.on_kernels = True
    return fn
