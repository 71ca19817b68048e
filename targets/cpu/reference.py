"""Plain NumPy reference of the quantized LSTM language model step: the readable truth.

Every optimized kernel in ``kernels.py`` is tested against these functions. The numeric
contract (weights W-low-bit with per-row scales, dynamic per-vector int8 activations,
gate order i, f, g, o, hard gates ``1[a > 0]``) is documented in ``docs/cpu-engine.md``.
"""
from __future__ import annotations

import numpy as np

from ..qweights import QMatrix, QuantLMWeights

ACT_QMAX = 127


def quantize_act(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of each row of ``x`` (shape ``[B, K]`` or ``[K]``).

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

    With ``act_bits=None`` (or a float matrix) the activations stay float:
    ``y = x @ (s[:, None] * q).T``.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    if m.scheme == "float" or act_bits is None:
        return (x @ m.dequantize().T).astype(np.float32)
    xq, sx = quantize_act(x)
    acc = xq.astype(np.int32) @ m.q.astype(np.int32).T          # exact integer sums
    return (acc.astype(np.float32) * m.scale[None, :] * sx[:, None]).astype(np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def _gate(z: np.ndarray, hard: bool) -> np.ndarray:
    return (z > 0).astype(np.float32) if hard else _sigmoid(z)


def lstm_cell_ref(a: np.ndarray, c: np.ndarray, hard_gates=()) -> tuple[np.ndarray, np.ndarray]:
    """Cell update from gate pre-activations ``a`` ``[B, 4H]`` (order i, f, g, o)."""
    i, f, g, o = np.split(a, 4, axis=-1)
    i = _gate(i, "i" in hard_gates)
    f = _gate(f, "f" in hard_gates)
    o = _gate(o, "o" in hard_gates)
    g = np.tanh(g).astype(np.float32)
    c_new = (f * c + i * g).astype(np.float32)
    h_new = (o * np.tanh(c_new)).astype(np.float32)
    return h_new, c_new


def initial_state(w: QuantLMWeights, batch: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (w.num_layers, batch, w.hidden_size)
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)


def lm_step_ref(w: QuantLMWeights, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
    """One time step for a batch of token ids ``[B]``; ``h``, ``c`` are ``[L, B, H]``.

    Returns ``(logits [B, V], h_new, c_new)``; the inputs are not modified.
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    emb = w.embedding
    x = (emb.scale[tokens, None] * emb.q[tokens].astype(np.float32)).astype(np.float32)
    h_new, c_new = np.empty_like(h), np.empty_like(c)
    for l, layer in enumerate(w.layers):
        a = qmatmul_ref(layer.w_ih, x, w.act_bits) + qmatmul_ref(layer.w_hh, h[l], w.act_bits) + layer.bias
        h_new[l], c_new[l] = lstm_cell_ref(a, c[l], w.hard_gates)
        x = h_new[l]
    dec = w.embedding if w.decoder is None else w.decoder
    logits = qmatmul_ref(dec, x, w.act_bits) + w.decoder_bias
    return logits.astype(np.float32), h_new, c_new


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=-1, keepdims=True))).astype(np.float32)
