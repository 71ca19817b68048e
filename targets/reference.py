"""Plain NumPy reference of every op of the lowered graph: the readable truth.

Every optimized runtime (the CPU engine's Numba kernels, later GPU and ONNX targets) is tested
against these functions. The numeric contract is ``docs/cpu-engine.md``: weights W-low-bit with
per-row scales, dynamic per-vector int8 activations on every input of a matrix product
(``act_bits=8``; ``None`` keeps them float), float32 biases and nonlinearities, LSTM gate order
i, f, g, o and hard gates ``1[a > 0]``.

    rt = ReferenceRuntime(graph)
    y, state = rt.run(x)

An op registers its reference with :func:`register_reference`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .graph import Graph, Node
from .ops import lstm_dims, lstm_param_names
from .qweights import QMatrix
from .runtime import Runtime

ACT_QMAX = 127


def quantize_act(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of each row (last axis) of ``x``.

    Returns ``(x_q int8, s_x float32)`` with ``x ≈ s_x[..., None] * x_q``;
    ``s_x = max|x| / 127`` (1.0 for an all-zero row), ``x_q = clip(rint(x / s_x), ±127)``.
    """
    x = np.asarray(x, dtype=np.float32)
    m = np.abs(x).max(axis=-1)
    s = np.where(m > 0, m / np.float32(ACT_QMAX), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(x / s[..., None]), -ACT_QMAX, ACT_QMAX).astype(np.int8)
    return q, s


def qmatmul_ref(m: QMatrix, x: np.ndarray, act_bits: int | None = 8) -> np.ndarray:
    """``y[b, r] = s[r] · s_x[b] · Σ_k q[r, k] · x_q[b, k]`` for ``x`` of shape ``[B, K]``.

    ``act_bits=None`` keeps the activations float: ``y = x @ (s[:, None] * q).T``. A float matrix
    (``scheme="float"``) with ``act_bits=8`` multiplies the *dequantized* int8 activations
    ``s_x · x_q`` with the float weight, as the torch model does.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    if act_bits is None:
        return (x @ m.dequantize().T).astype(np.float32)
    xq, sx = quantize_act(x)
    if m.scheme == "float":
        return ((xq.astype(np.float32) * sx[:, None]) @ m.q.T).astype(np.float32)
    acc = xq.astype(np.int32) @ m.q.astype(np.int32).T          # exact integer sums
    return (acc.astype(np.float32) * m.scale[None, :] * sx[:, None]).astype(np.float32)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def gate(z: np.ndarray, hard: bool) -> np.ndarray:
    return (z > 0).astype(np.float32) if hard else sigmoid(z)


def lstm_cell_ref(a: np.ndarray, c: np.ndarray, hard_gates="") -> tuple[np.ndarray, np.ndarray]:
    """Cell update from gate pre-activations ``a`` ``[B, 4H]`` (order i, f, g, o)."""
    i, f, g, o = np.split(a, 4, axis=-1)
    i, f, o = gate(i, "i" in hard_gates), gate(f, "f" in hard_gates), gate(o, "o" in hard_gates)
    g = np.tanh(g).astype(np.float32)
    c_new = (f * c + i * g).astype(np.float32)
    h_new = (o * np.tanh(c_new)).astype(np.float32)
    return h_new, c_new


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=-1, keepdims=True))).astype(np.float32)


def apply_activation(fn: str, x: np.ndarray) -> np.ndarray:
    if fn == "relu":
        return np.maximum(x, np.float32(0))
    if fn == "tanh":
        return np.tanh(x).astype(np.float32)
    if fn == "sigmoid":
        return sigmoid(x)
    if fn == "log_softmax":
        return log_softmax(x)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _positionwise(fn, x: np.ndarray) -> np.ndarray:
    """Apply ``fn([N, F]) -> [N, F']`` to every position of a ``[..., F]`` array."""
    lead = x.shape[:-1]
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(*lead, y.shape[-1])


# ----------------------------------------------------------------------------- per-op references

REFERENCE: dict[str, Callable] = {}


def register_reference(op: str):
    """``@register_reference("op")`` on ``make(graph, node) -> fn(inputs, states) -> array``."""
    def deco(make):
        REFERENCE[op] = make
        return make
    return deco


@register_reference("embedding")
def _embedding(graph: Graph, node: Node):
    w = graph.param(node, "weight")
    table = w.dequantize()
    return lambda inputs, states: table[inputs[0]]


@register_reference("linear")
def _linear(graph: Graph, node: Node):
    w = graph.param(node, "weight")
    bias = graph.param(node, "bias") if "bias" in node.params else None
    act = node.attrs.get("act_bits")

    def fn(inputs, states):
        y = _positionwise(lambda x: qmatmul_ref(w, x, act), inputs[0])
        return y if bias is None else (y + bias).astype(np.float32)
    return fn


@register_reference("activation")
def _activation(graph: Graph, node: Node):
    return lambda inputs, states: apply_activation(node.attrs["fn"], inputs[0])


@register_reference("select_step")
def _select_step(graph: Graph, node: Node):
    return lambda inputs, states: np.ascontiguousarray(inputs[0][node.attrs["index"]])


@register_reference("state_select")
def _state_select(graph: Graph, node: Node):
    source = node.inputs[0]
    k = 0 if node.attrs["state"] == "h" else 1
    return lambda inputs, states: states[source][k][node.attrs["index"]].copy()


@register_reference("concat")
def _concat(graph: Graph, node: Node):
    return lambda inputs, states: np.concatenate(inputs, axis=-1)


def lstm_layer_ref(w_ih: QMatrix, w_hh: QMatrix, bias: np.ndarray, x: np.ndarray, h: np.ndarray, c: np.ndarray,
                   hard_gates: str, act_bits, reverse: bool = False):
    """One LSTM layer-direction over ``x [T, B, In]`` from ``(h, c) [B, H]``:
    ``a_t = Q(W_ih)·A8(x_t) + Q(W_hh)·A8(h_{t-1}) + bias``; returns ``(out [T, B, H], h, c)``."""
    T = x.shape[0]
    out = np.empty((T, x.shape[1], h.shape[-1]), np.float32)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        a = qmatmul_ref(w_ih, x[t], act_bits) + qmatmul_ref(w_hh, h, act_bits) + bias
        h, c = lstm_cell_ref(a, c, hard_gates)
        out[t] = h
    return out, h, c


@register_reference("lstm")
def _lstm(graph: Graph, node: Node):
    H, L, D = lstm_dims(node)
    mats = [tuple(graph.param(node, r) for r in roles) for roles in lstm_param_names(L, D)]
    hard, act = node.attrs.get("hard_gates", ""), node.attrs.get("act_bits")

    def fn(inputs, states):
        h0, c0 = states[node.name]
        h_n, c_n = np.empty_like(h0), np.empty_like(c0)
        x = inputs[0]
        for layer in range(L):
            outs = []
            for d in range(D):
                k = layer * D + d
                w_ih, w_hh, b = mats[k]
                out, h_n[k], c_n[k] = lstm_layer_ref(w_ih, w_hh, b, x, h0[k], c0[k], hard, act, reverse=d == 1)
                outs.append(out)
            x = outs[0] if D == 1 else np.concatenate(outs, axis=-1)
        states[node.name] = (h_n, c_n)
        return x
    return fn


class ReferenceRuntime(Runtime):
    """Runs any valid graph with the NumPy references above (slow; always available)."""

    backend = "reference"

    def _node_fn(self, node: Node):
        try:
            make = REFERENCE[node.op]
        except KeyError:
            raise NotImplementedError(f"op {node.op!r} has no NumPy reference") from None
        return make(self.graph, node)
