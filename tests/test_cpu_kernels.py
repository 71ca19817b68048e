"""Numba kernels vs the NumPy reference (``targets/cpu/reference.py``).

Tolerance (docs/cpu-engine.md): ``max|Δ| ≤ 1e-3 · max(1, max|ref|)`` in float32. Integer sums
are exact on both paths, so the only differences are float rounding of scales and of the
nonlinearities (sigmoid/tanh), which the bound covers with a wide margin.

Every kernel test runs on both inner-loop paths: ``"fallback"`` (portable vector IR) always,
``"vnni"`` only where the CPU has AVX512-VNNI (skipped cleanly otherwise).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from g2quant.targets.cpu import kernels as K
from g2quant.targets.cpu import kernels_jit as J
from g2quant.targets.cpu import reference as ref
from g2quant.targets.qweights import QLSTMLayer, QMatrix, QuantLMWeights

PATHS = [pytest.param("fallback"),
         pytest.param("vnni", marks=pytest.mark.skipif(not K.cpu_features()["avx512_vnni"],
                                                       reason="CPU lacks AVX512-VNNI"))]
# (bits, scheme) covering every storage width: 1, 2, 4 (3 and 4 bits), 8 (5 and 8 bits)
KINDS = [(1, "binary"), (2, "ternary"), (2, "int"), (3, "int"), (4, "int"), (5, "int"), (8, "int")]
SHAPES = [(1, 1), (5, 3), (13, 127), (8, 128), (37, 129), (64, 300), (6, 520), (3, 1100)]


def assert_close(got, want):
    bound = 1e-3 * max(1.0, float(np.abs(want).max(initial=0.0)))
    assert got.shape == want.shape
    assert float(np.abs(got - want).max(initial=0.0)) <= bound


@pytest.fixture(params=PATHS)
def path(request):
    before = K.get_path()
    K.set_path(request.param)
    yield request.param
    K.set_path(before)


def random_qmatrix(rng, rows, cols, bits, scheme, scale=0.05):
    """Random weights whose dequantized values are about ``±scale``."""
    if scheme == "float":
        return QMatrix(rng.normal(0, scale, (rows, cols)).astype(np.float32), np.ones(rows, np.float32), 32, "float")
    qmax = 1 if scheme in ("binary", "ternary") else 2 ** (bits - 1) - 1
    if scheme == "binary":
        q = rng.choice(np.array([-1, 1], np.int8), (rows, cols))
    else:
        q = rng.integers(-qmax, qmax + 1, (rows, cols)).astype(np.int8)
    s = rng.uniform(0.5, 1.5, rows).astype(np.float32) * np.float32(scale / qmax)
    return QMatrix(q, s, bits, scheme)


@pytest.mark.parametrize("bits,scheme", KINDS)
def test_prepare_round_trip(bits, scheme):
    rng = np.random.default_rng(bits)
    for rows, cols in SHAPES:
        m = random_qmatrix(rng, rows, cols, bits, scheme)
        km = K.prepare(m)
        np.testing.assert_array_equal(km.unpack(), m.q)
        assert (km.rows, km.cols, km.bits, km.scheme) == (rows, cols, bits, scheme)
        assert km.kpad % K.k_block(km.bw) == 0 and km.data.ctypes.data % 64 == 0
        if scheme == "binary":             # both binary routes: 1-bit codes for long rows, else 2-bit
            assert km.bw == (1 if cols >= K.BINARY_1BIT_MIN_COLS else 2)


@pytest.mark.parametrize("bits,scheme", KINDS + [(32, "float")])
def test_qmatmul_matches_reference(path, bits, scheme):
    rng = np.random.default_rng(100 + bits)
    for rows, cols in SHAPES:
        m = random_qmatrix(rng, rows, cols, bits, scheme)
        km = K.prepare(m)
        for batch in (1, 7):
            x = rng.normal(0, 1, (batch, cols)).astype(np.float32)
            x[0, : cols // 2] = 0.0                      # partly zero rows; all-zero when cols == 1
            for act_bits in (8, None):
                assert_close(K.qmatmul(km, x, act_bits), ref.qmatmul_ref(m, x, act_bits))
        out = np.empty((1, rows), np.float32)
        assert K.qmatmul(km, x[:1], 8, out=out) is out


def test_qmatmul_long_k_is_exact(path):
    """K far beyond one block, 8-bit extremes: the int32 sums must be exact."""
    rng = np.random.default_rng(7)
    m = QMatrix(rng.choice(np.array([-127, 127], np.int8), (9, 3000)), np.ones(9, np.float32), 8)
    x = rng.choice(np.array([-1.0, 1.0], np.float32), (2, 3000))
    assert_close(K.qmatmul(K.prepare(m), x), ref.qmatmul_ref(m, x))


def random_lm(rng, vocab=50, hidden=24, layers=2, bits=4, tied=False, hard_gates=(), act_bits=8,
              emb_scheme="int"):
    scheme = "binary" if bits == 1 else "int"
    emb = (random_qmatrix(rng, vocab, hidden, 32, "float", 0.3) if emb_scheme == "float"
           else random_qmatrix(rng, vocab, hidden, bits, scheme, 0.3))
    lstm = [QLSTMLayer(random_qmatrix(rng, 4 * hidden, hidden, bits, scheme, 0.3),
                       random_qmatrix(rng, 4 * hidden, hidden, bits, scheme, 0.3),
                       rng.normal(0, 0.3, 4 * hidden).astype(np.float32)) for _ in range(layers)]
    dec = None if tied else random_qmatrix(rng, vocab, hidden, bits, scheme, 0.1)
    return QuantLMWeights(emb, lstm, dec, rng.normal(0, 0.1, vocab).astype(np.float32),
                          tuple(hard_gates), act_bits)


def run_steps(w, batch, steps=5, seed=0):
    rng = np.random.default_rng(seed)
    km = K.prepare_lm(w)
    h_ref, c_ref = ref.initial_state(w, batch)
    h, c = h_ref.copy(), c_ref.copy()
    for _ in range(steps):
        tokens = rng.integers(0, w.vocab_size, batch)
        logits_ref, h_ref, c_ref = ref.lm_step_ref(w, tokens, h_ref, c_ref)
        logits = K.lm_step(km, tokens, h, c)
        assert_close(logits, logits_ref)
        assert_close(h, h_ref)
        assert_close(c, c_ref)
    return km


@pytest.mark.parametrize("hard_gates", [(), ("i", "f"), ("i", "f", "o")])
@pytest.mark.parametrize("tied", [False, True])
def test_lm_step_matches_reference(path, hard_gates, tied):
    rng = np.random.default_rng(len(hard_gates) + 10 * tied)
    for bits in (1, 2, 4, 8):
        w = random_lm(rng, bits=bits, tied=tied, hard_gates=hard_gates)
        for batch in (1, 3):
            assert run_steps(w, batch).fast


def test_lm_step_mixed_widths_and_odd_sizes(path):
    """Embedding wider than hidden (untied; binary wide enough for 1-bit storage), layers with
    different bit widths, 1 and 3 layers."""
    rng = np.random.default_rng(3)
    for layers in (1, 3):
        w = random_lm(rng, vocab=37, hidden=19, layers=layers, bits=4)
        w.embedding = random_qmatrix(rng, 37, 1100, 1, "binary", 0.3)
        w.layers[0].w_ih = random_qmatrix(rng, 76, 1100, 2, "ternary", 0.1)
        w.layers[-1].w_hh = random_qmatrix(rng, 76, 19, 1, "binary", 0.1)
        run_steps(w, batch=2)


@pytest.mark.parametrize("act_bits,emb_scheme", [(None, "int"), (8, "float")])
def test_lm_step_generic_path(act_bits, emb_scheme):
    w = random_lm(np.random.default_rng(5), hard_gates=("i",), act_bits=act_bits, emb_scheme=emb_scheme)
    assert not run_steps(w, batch=2).fast


def test_lm_step_rejects_bad_state():
    w = random_lm(np.random.default_rng(6))
    km = K.prepare_lm(w)
    h, c = ref.initial_state(w, 2)
    with pytest.raises(ValueError):
        K.lm_step(km, np.array([1, 2, 3]), h, c)
    for bad in (-1, w.vocab_size):
        with pytest.raises(ValueError):
            K.lm_step(km, np.array([0, bad]), h, c)


def test_cpu_features_and_path_switch():
    feats = K.cpu_features()
    assert feats["path"] in K.PATHS and isinstance(feats["avx512_vnni"], bool)
    with pytest.raises(ValueError):
        K.set_path("gpu")


def test_env_var_selects_fallback():
    code = "from g2quant.targets.cpu import kernels as K; print(K.get_path())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "G2QUANT_KERNEL": "fallback"})
    assert out.stdout.strip() == "fallback"


def test_vectorizable_exp_and_tanh():
    """The polynomial exp / tanh used by the cell update, against NumPy in float64."""
    z = np.linspace(-30, 30, 2001).astype(np.float32)
    e = np.array([J._exp(v) for v in z], np.float64)
    np.testing.assert_allclose(e, np.exp(z.astype(np.float64)), rtol=3e-7)
    t = np.array([J._tanh(v) for v in z / 4], np.float64)
    np.testing.assert_allclose(t, np.tanh(z.astype(np.float64) / 4), atol=3e-7)
