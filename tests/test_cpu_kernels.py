"""Numba kernels vs the NumPy reference (``targets/cpu/reference.py``), on every inner loop.

Tolerance (docs/cpu-engine.md): ``max|Δ| ≤ 1e-3 · max(1, max|ref|)`` in float32. Integer sums
are exact on every loop, so the only differences are float rounding of scales and of the
nonlinearities (sigmoid/tanh), which the bound covers with a wide margin; the exactness tests
use unit scales and activations that quantize to themselves, where kernel and reference must
agree bit for bit.

Every kernel test runs on every loop this CPU can execute (``isa.host_loops()``: on this
project's x86 machines avx512-vnni, avx-vnni, avx2 and portable where present, on AArch64
neon-dotprod, neon and portable). This file imports no torch, so it also runs in the emulated
AArch64 sandbox (``tests/arm64/README.md``).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from g2quant.targets.cpu import isa
from g2quant.targets.cpu import kernels as K
from g2quant.targets.cpu import kernels_jit as J
from g2quant.targets.cpu import kernels_vnni as V
from g2quant.targets.cpu import reference as ref
from g2quant.targets.qweights import QLSTMLayer, QMatrix, QuantLMWeights

HOST_LOOPS = isa.host_loops()
# (bits, scheme) covering every storage width: 1, 2, 4 (3 and 4 bits), 8 (5 and 8 bits)
KINDS = [(1, "binary"), (2, "ternary"), (2, "int"), (3, "int"), (4, "int"), (5, "int"), (8, "int")]
SHAPES = [(1, 1), (5, 3), (13, 127), (8, 128), (37, 129), (64, 300), (6, 520), (3, 1100)]


def assert_close(got, want):
    bound = 1e-3 * max(1.0, float(np.abs(want).max(initial=0.0)))
    assert got.shape == want.shape
    assert float(np.abs(got - want).max(initial=0.0)) <= bound


@pytest.fixture(params=HOST_LOOPS)
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


# ----------------------------------------------------------------------------- exactness

# the full code range of each storage width as (bits, scheme, q_min, q_max): u = 0 ... 2^bw − 1
WIDTHS = [(8, "int", -128, 127), (4, "int", -8, 7), (2, "int", -2, 1), (1, "binary", -1, 1)]


def kmatrix(q: np.ndarray, bits: int, scheme: str = "int") -> K.KMatrix:
    """``K.prepare`` of ``q`` with unit scales, packed directly: ``QMatrix`` admits only the
    quantizers' narrow range, the layout takes every code ``u = 0 … 2^bw − 1``."""
    rows, cols = q.shape
    bw = K.storage_bits(bits, scheme, cols)
    offset, mult = K.code_params(bw)
    data, nchunks = K.pack_u8(q, bw, offset, mult)
    scale = np.zeros(-(-rows // K.PANEL_ROWS) * K.PANEL_ROWS, np.float32)
    scale[:rows] = 1.0
    km = K.KMatrix(rows, cols, bits, scheme, bw, offset, mult, nchunks, data, scale)
    np.testing.assert_array_equal(km.unpack(), q)
    return km


def exact_product(q: np.ndarray, bits: int, scheme: str, xq: np.ndarray):
    """``(kernel, reference)`` for codes ``q``, unit scales and activations that quantize to
    themselves (max |x| = 127 per row, so s_x = 1): both must be the float32 of the exact integer
    sum ``Σ_k q·x`` (the reference's formula, ``reference.qmatmul_ref``, evaluated in int64)."""
    x = xq.astype(np.float32)
    x_q, s_x = ref.quantize_act(x)
    assert (s_x == 1).all() and (x_q == xq).all()
    want = (x_q.astype(np.int64) @ q.astype(np.int64).T).astype(np.float32)
    return K.qmatmul(kmatrix(q, bits, scheme), x), want


def extreme_rows(rows, cols, qmin, qmax, rng):
    """Rows of all-max codes, all-min codes, alternating, and random extremes."""
    q = np.empty((rows, cols), np.int8)
    q[0::4], q[1::4] = qmax, qmin
    q[2::4, 0::2], q[2::4, 1::2] = qmax, qmin
    q[3::4] = rng.choice(np.array([qmin, qmax], np.int8), q[3::4].shape)
    return q


def extreme_acts(batch, cols, rng):
    """±127 activations: all +127, all −127, alternating, random signs (then repeated)."""
    x = np.empty((batch, cols), np.int16)
    patterns = [np.full(cols, 127), np.full(cols, -127), np.where(np.arange(cols) % 2, -127, 127),
                rng.choice(np.array([-127, 127]), cols)]
    for b in range(batch):
        x[b] = patterns[b % 4]
    return x


@pytest.mark.parametrize("bits,scheme,qmin,qmax", WIDTHS)
def test_extreme_codes_are_exact(path, bits, scheme, qmin, qmax):
    """u = 0 and u = 2^bw − 1 against x = ±127 everywhere: no saturation in any loop (s16 pair sums,
    the sign trick of the 8-bit avx2 route, i16 products of the portable loop)."""
    rng = np.random.default_rng(bits)
    cols = 4100                                       # > 1024: binary takes the 1-bit storage
    q = extreme_rows(20, cols, qmin, qmax, rng)
    assert kmatrix(q, bits, scheme).bw == {8: 8, 4: 4, 2: 2, 1: 1}[bits]
    for batch in (1, 2, 5, 8):
        got, want = exact_product(q, bits, scheme, extreme_acts(batch, cols, rng))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits,scheme,qmin,qmax", WIDTHS)
def test_random_codes_are_exact(path, bits, scheme, qmin, qmax):
    """Random codes over the full range of each width, random int8 activations, odd sizes."""
    rng = np.random.default_rng(10 + bits)
    for rows, cols in ((1, 1), (17, 129), (33, 1030), (5, 3001)):
        if scheme == "binary":
            q = rng.choice(np.array([-1, 1], np.int8), (rows, cols))
        else:
            q = rng.integers(qmin, qmax + 1, (rows, cols)).astype(np.int8)
        for batch in (1, 3, 4, 6):
            x = rng.integers(-127, 128, (batch, cols))
            x[:, 0] = 127                                # s_x = 1: x quantizes to itself
            got, want = exact_product(q, bits, scheme, x)
            np.testing.assert_array_equal(got, want)


def test_8bit_long_k_wraps_exactly(path):
    """K = 70000 at u = 255, x = 127: Σ u·x exceeds 2^31 inside the u-code loops and wraps; the
    corrected sum Σ q·x (< 2^31) must still be exact."""
    cols = 70_000
    q = np.full((16, cols), 127, np.int8)
    q[1::2] = -128
    x = np.full((1, cols), 127, np.int16)
    got, want = exact_product(q, 8, "int", x)
    np.testing.assert_array_equal(got, want)
    assert want[0, 0] == np.float32(127 * 127 * cols)


def test_qmatmul_long_k_is_exact(path):
    """K far beyond one block, 8-bit extremes: the int32 sums must be exact."""
    rng = np.random.default_rng(7)
    m = QMatrix(rng.choice(np.array([-127, 127], np.int8), (9, 3000)), np.ones(9, np.float32), 8)
    x = rng.choice(np.array([-1.0, 1.0], np.float32), (2, 3000))
    assert_close(K.qmatmul(K.prepare(m), x), ref.qmatmul_ref(m, x))


# ----------------------------------------------------------------------------- LM step

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


# ----------------------------------------------------------------------------- loop selection

def test_isa_names_and_ids():
    assert isa.LOOPS == ("avx512-vnni", "avx-vnni", "avx2", "neon-dotprod", "neon", "portable")
    for i, name in enumerate(isa.LOOPS):
        assert isa.loop_id(name) == i and isa.loop_name(i) == name
    assert isa.loop_id("vnni") == isa.AVX512_VNNI and isa.loop_id("fallback") == isa.PORTABLE
    assert isa.loop_id(" AVX2 ") == isa.AVX2
    with pytest.raises(ValueError, match="avx512-vnni, avx-vnni, avx2, neon-dotprod, neon, portable"):
        isa.loop_id("sse4")
    with pytest.raises(ValueError):
        isa.loop_name(len(isa.LOOPS))


def test_host_loops_follow_the_features():
    loops, feats = isa.host_loops(), isa.host_features()
    assert loops[-1] == "portable" and len(set(loops)) == len(loops)
    assert list(loops) == sorted(loops, key=isa.LOOPS.index)            # best first
    if isa.machine() == "x86_64":
        assert ("avx2" in loops) == feats["avx2"]
        assert ("avx-vnni" in loops) == (feats["avx2"] and feats["avxvnni"])
        assert ("avx512-vnni" in loops) == (feats["avx512f"] and feats["avx512bw"] and feats["avx512vnni"])
        assert not {"neon", "neon-dotprod"} & set(loops)
    elif isa.machine() == "aarch64":
        assert feats["source"] in ("auxv", "llvm")
        assert ("neon" in loops) == feats["asimd"]
        assert ("neon-dotprod" in loops) == (feats["asimd"] and feats["asimddp"])
        assert not {"avx2", "avx-vnni", "avx512-vnni"} & set(loops)
    d = isa.describe()
    assert d["loop"] == isa.default_loop() and d["host_loops"] == list(loops) and d["cpu"]


def test_cpu_features_and_path_switch():
    feats = K.cpu_features()
    assert feats["path"] in K.PATHS and feats["loop"] == feats["path"] and isinstance(feats["avx512_vnni"], bool)
    with pytest.raises(ValueError, match="choose one of"):
        K.set_path("gpu")
    foreign = next(name for name in isa.LOOPS if name not in HOST_LOOPS)
    before = K.get_path()
    with pytest.raises(RuntimeError, match="portable"):
        K.set_path(foreign)
    assert K.get_path() == before
    K.set_path("fallback")
    try:
        assert K.get_path() == "portable"
    finally:
        K.set_path(before)


def _path_in_subprocess(value: str) -> subprocess.CompletedProcess:
    code = "from g2quant.targets.cpu import kernels as K; print(K.get_path())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, isa.ENV_VAR: value})


def test_env_var_selects_the_loop():
    for value, want in [("fallback", "portable"), (HOST_LOOPS[0], HOST_LOOPS[0]), (HOST_LOOPS[-1], "portable"),
                        ("", HOST_LOOPS[0])] + ([("vnni", "avx512-vnni")] if "avx512-vnni" in HOST_LOOPS else []):
        out = _path_in_subprocess(value)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == want


def test_env_var_errors_name_the_choices():
    out = _path_in_subprocess("avx9000")
    assert out.returncode != 0
    assert "ValueError" in out.stderr and "G2QUANT_KERNEL='avx9000'" in out.stderr
    assert all(name in out.stderr for name in isa.LOOPS)
    foreign = next(name for name in isa.LOOPS if name not in HOST_LOOPS)
    out = _path_in_subprocess(foreign)
    assert out.returncode != 0
    assert "RuntimeError" in out.stderr and f"cannot run the {foreign!r}" in out.stderr
    assert all(name in out.stderr for name in HOST_LOOPS)


# ----------------------------------------------------------------------------- generated code

def _panel_caller(loop):
    """A fresh (uncached) njit function calling ``panel_u4`` with a constant loop, for asm checks."""
    @njit
    def f(w, x, out, scale):
        V.panel_u4(w, 0, x, 0, 2, 0, np.float32(1.0), scale, 0, scale, 0, out, 0, 16, 0, loop)
    return f


@pytest.mark.parametrize("loop", HOST_LOOPS)
def test_generated_code_uses_the_loop_instructions(loop):
    """Each loop's kernel holds its own instructions and nothing wider: the avx2 and avx-vnni
    kernels no zmm (their functions switch AVX-512 off), avx-vnni the VEX encoding."""
    f = _panel_caller(isa.loop_id(loop))
    w, x = np.zeros(16 * 128, np.uint8), np.zeros(256, np.int8)
    out, scale = np.zeros(16, np.float32), np.ones(16, np.float32)
    f(w, x, out, scale)
    asm = f.inspect_asm(f.signatures[0])
    name = f"g2quant_panel_u4_{loop.replace('-', '_')}"
    body = re.split(r"\n(?=[A-Za-z_$][\w.$]*:\n)", asm[asm.index(f"\n{name}:\n") + 1:])[0]
    want = {"avx512-vnni": [r"vpdpbusd\s+%zmm"], "avx-vnni": [r"\{vex\}\s+vpdpbusd\s+%ymm"],
            "avx2": [r"vpmaddubsw\s+%ymm", r"vpmaddwd\s+%ymm"], "neon-dotprod": [r"sdot\s+v\d+\.4s"],
            "neon": [r"smull2?\s+v\d+\.8h", r"[su]adalp\s+v\d+\.4s|saddlp\s+v\d+\.4s"], "portable": []}[loop]
    for pattern in want:
        assert re.search(pattern, body), (loop, pattern)
    if loop in ("avx2", "avx-vnni"):
        assert "zmm" not in body
    if loop != "avx512-vnni":
        assert not re.search(r"vpdpbusd\s+%zmm", body)
    np.testing.assert_array_equal(out, 0)


def test_non_literal_loop_is_rejected():
    @njit
    def f(w, x, out, scale, loop):
        V.panel_u4(w, 0, x, 0, 2, 0, np.float32(1.0), scale, 0, scale, 0, out, 0, 16, 0, loop)

    @njit
    def g(w, x, out, scale, k):
        f(w, x, out, scale, k + 1)            # a computed loop id cannot become a literal

    args = (np.zeros(16 * 128, np.uint8), np.zeros(256, np.int8), np.zeros(16, np.float32), np.ones(16, np.float32))
    with pytest.raises(Exception, match="literal"):
        g(*args, 0)
    with pytest.raises(Exception, match="kernel loop"):
        f(*args[:4], 99)                      # literal, but no such loop


def test_vectorizable_exp_and_tanh():
    """The polynomial exp / tanh used by the cell update, against NumPy in float64."""
    z = np.linspace(-30, 30, 2001).astype(np.float32)
    e = np.array([J._exp(v) for v in z], np.float64)
    np.testing.assert_allclose(e, np.exp(z.astype(np.float64)), rtol=3e-7)
    t = np.array([J._tanh(v) for v in z / 4], np.float64)
    np.testing.assert_allclose(t, np.tanh(z.astype(np.float64) / 4), atol=3e-7)
