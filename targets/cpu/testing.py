"""Random ``QuantLMWeights`` for tests and benchmarks (numpy only, deterministic by seed).

The integers are uniform over the full narrow range of each width and the per-row scales
are chosen so that pre-activations stay O(1), which keeps sigmoid/tanh away from
saturation and exercises both sides of hard gates.
"""
from __future__ import annotations

import numpy as np

from ..qweights import QLSTMLayer, QMatrix, QuantLMWeights


def random_qmatrix(rows: int, cols: int, bits: int, rng: np.random.Generator, *,
                   scheme: str | None = None, gain: float = 1.0) -> QMatrix:
    """A random ``[rows, cols]`` QMatrix; ``scheme`` defaults to binary (1), int (2..8), float (32)."""
    if scheme is None:
        scheme = {1: "binary", 32: "float"}.get(bits, "int")
    std = gain / np.sqrt(max(cols, 1))
    if scheme == "float":
        q = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
        return QMatrix(q, np.ones(rows, np.float32), 32, "float")
    if scheme == "binary":
        q = np.where(rng.random((rows, cols)) < 0.5, -1, 1).astype(np.int8)
        qmax = 1
    elif scheme == "ternary":
        q = rng.integers(-1, 2, size=(rows, cols)).astype(np.int8)
        qmax = 1
    else:
        qmax = 2 ** (bits - 1) - 1
        q = rng.integers(-qmax, qmax + 1, size=(rows, cols)).astype(np.int8)
    # uniform integers have std ~ qmax/sqrt(3): rescale to the wanted std, jitter per row
    scale = (std * np.sqrt(3.0) / qmax * rng.uniform(0.5, 1.5, size=rows)).astype(np.float32)
    return QMatrix(q, scale, bits, scheme)


def random_lm_weights(vocab: int, hidden: int, layers: int = 2, bits: int = 4, *,
                      emb: int | None = None, tied: bool = False, hard_gates=(),
                      act_bits: int | None = 8, scheme: str | None = None,
                      emb_bits: int | None = None, dec_bits: int | None = None,
                      seed: int = 0) -> QuantLMWeights:
    """A random word-LM ``QuantLMWeights``.

    ``bits`` applies to the LSTM matrices (1 = binary, 2..8 = int, 32 = float; ``scheme``
    may force ``"ternary"``); ``emb_bits``/``dec_bits`` default to ``bits``. A tied model
    needs ``emb == hidden`` (``emb`` defaults to ``hidden``).
    """
    rng = np.random.default_rng(seed)
    emb = hidden if emb is None else emb
    if tied and emb != hidden:
        raise ValueError(f"a tied model needs emb == hidden, got {emb} != {hidden}")
    emb_bits = bits if emb_bits is None else emb_bits
    dec_bits = bits if dec_bits is None else dec_bits
    embedding = random_qmatrix(vocab, emb, emb_bits, rng, scheme=scheme if emb_bits == bits else None,
                               gain=np.sqrt(emb))
    lstm = []
    for l in range(layers):
        d_in = emb if l == 0 else hidden
        lstm.append(QLSTMLayer(
            w_ih=random_qmatrix(4 * hidden, d_in, bits, rng, scheme=scheme, gain=1.5),
            w_hh=random_qmatrix(4 * hidden, hidden, bits, rng, scheme=scheme, gain=1.5),
            bias=(rng.standard_normal(4 * hidden) * 0.3).astype(np.float32)))
    decoder = None if tied else random_qmatrix(
        vocab, hidden, dec_bits, rng, scheme=scheme if dec_bits == bits else None, gain=3.0)
    return QuantLMWeights(embedding=embedding, layers=lstm, decoder=decoder,
                          decoder_bias=(rng.standard_normal(vocab) * 0.1).astype(np.float32),
                          hard_gates=tuple(hard_gates), act_bits=act_bits,
                          extra={"random_seed": seed})
