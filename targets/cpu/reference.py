"""Plain NumPy reference of one word-LM step (``QuantLMWeights``), for the kernel tests.

The per-op primitives (``quantize_act``, ``qmatmul_ref``, ``lstm_cell_ref``) are those of the
graph reference, ``g2quant.targets.reference``, which runs any lowered graph; the numeric contract
is ``docs/cpu-engine.md``.
"""
from __future__ import annotations

import numpy as np

from ..qweights import QuantLMWeights
from ..reference import ACT_QMAX, gate, lstm_cell_ref, log_softmax, qmatmul_ref, quantize_act, sigmoid

__all__ = ["ACT_QMAX", "gate", "initial_state", "lm_step_ref", "log_softmax", "lstm_cell_ref", "qmatmul_ref",
           "quantize_act", "sigmoid"]


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
