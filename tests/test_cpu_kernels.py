"""The CPU engine's kernels vs the NumPy reference, on every inner loop this CPU can run.

What is tested is what the engine calls: the block layout (``kernels.pack_u8`` / ``unpack_u8``,
the layout's reference), the product kernel ``program_kernels.linear_fwd`` (batch 1: ``gemv``;
batches: ``gemm`` or AMX; through ``kernels.qmatmul``), the LSTM layer kernel
``program_kernels.lstm_layer_fwd`` against ``targets.reference.lstm_layer_ref`` (packed as the
``lstm`` program packs it), and ``embed_fwd``.

Tolerance (docs/cpu-engine.md): ``max|Δ| ≤ 1e-3 · max(1, max|ref|)`` in float32. Integer sums
are exact on every loop, so the exactness tests use unit scales and activations that quantize to
themselves, where kernel and reference must agree bit for bit, including the extreme codes of
every width, K at the sub-byte limit and 8-bit sums that wrap.

Every kernel test runs on every loop of ``isa.host_loops()`` (on this project's x86 machines
amx-int8, avx512-vnni, avx-vnni, avx2 and portable where present; on AArch64 neon-dotprod, neon
and portable). This file imports no torch, so it also runs in the emulated AArch64 sandbox
(``tests/arm64/README.md``).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest
from numba import njit

from g2quant.targets import reference as ref
from g2quant.targets.cpu import isa
from g2quant.targets.cpu import kernels as K
from g2quant.targets.cpu import kernels_jit as J
from g2quant.targets.cpu import kernels_vnni as V
from g2quant.targets.cpu import program_kernels as pk
from g2quant.targets.cpu import programs
from g2quant.targets.qweights import QMatrix

HOST_LOOPS = isa.host_loops()
# (bits, scheme) covering every storage width: 1, 2, 4 (3 and 4 bits), 8 (5 and 8 bits)
KINDS = [(1, "binary"), (2, "ternary"), (2, "int"), (3, "int"), (4, "int"), (5, "int"), (8, "int")]
SHAPES = [(1, 1), (5, 3), (13, 127), (16, 16), (37, 129), (64, 300), (6, 520), (3, 1100)]
BATCHES = (1, 2, 7, 20, 33)             # gemv; gemm tails; AMX: one group of 16, two, a second group


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


# ----------------------------------------------------------------------------- layout

@pytest.mark.parametrize("bw", [1, 2, 4, 8])
def test_layout_byte_order(bw):
    """The documented formula, element by element: bits [p·bw, (p+1)·bw) of byte 4·r + j of line L
    of block blk hold the code of row 16·blk + r, column 4·(P·L + p) + j."""
    rng = np.random.default_rng(bw)
    rows, cols = 21, 75
    offset, mult = K.code_params(bw)
    q = (mult * rng.integers(0, 1 << bw, (rows, cols)) - offset).astype(np.int8)
    data, nlines = K.pack_u8(q, bw, offset, mult)
    P, kpad = 8 // bw, K.padded_cols(cols, bw)
    assert nlines == kpad // (4 * P) and kpad % V.k_unit(bw) == 0 and cols <= kpad < cols + V.k_unit(bw)
    assert data.size == 2 * nlines * 64                          # 21 rows -> 2 blocks of 16
    lines = data.reshape(2, nlines, 64)
    pad_code = offset // mult
    for blk in range(2):
        for r in range(16):
            for k in range(kpad):
                line, p, j = k // (4 * P), (k // 4) % P, k % 4
                u = (int(lines[blk, line, 4 * r + j]) >> (p * bw)) & ((1 << bw) - 1)
                row = 16 * blk + r
                want = (int(q[row, k]) + offset) // mult if row < rows and k < cols else pad_code
                assert u == want, (blk, r, k)


@pytest.mark.parametrize("bits,scheme", KINDS)
def test_prepare_round_trip(bits, scheme):
    rng = np.random.default_rng(bits)
    for rows, cols in SHAPES:
        m = random_qmatrix(rng, rows, cols, bits, scheme)
        km = K.prepare(m)
        np.testing.assert_array_equal(km.unpack(), m.q)
        assert (km.rows, km.cols, km.bits, km.scheme) == (rows, cols, bits, scheme)
        assert km.kpad % V.k_unit(km.bw) == 0 and km.kpad - cols < V.k_unit(km.bw)
        assert km.data.ctypes.data % 64 == 0 and km.scale.size % 16 == 0 and km.nblocks * 16 >= rows
        np.testing.assert_array_equal(km.scale[rows:], 0)
        if scheme == "binary":
            assert km.bw == (1 if cols >= K.BINARY_1BIT_MIN_COLS else 2)


def test_subbyte_column_limit():
    """Sub-byte matrices wider than ``MAX_COLS_SUBBYTE`` are refused (the programs then use the
    NumPy reference); 8-bit ones are not limited."""
    limit = V.MAX_COLS_SUBBYTE
    assert K.fits(4, "int", limit) and not K.fits(4, "int", limit + 1)
    assert K.fits(1, "binary", limit) and not K.fits(2, "ternary", limit + 1)
    assert K.fits(8, "int", 10 * limit) and not K.fits(32, "float", 10)
    wide = QMatrix(np.zeros((1, limit + 1), np.int8), np.ones(1, np.float32), 4)
    with pytest.raises(ValueError, match="limit"):
        K.prepare(wide)
    assert not programs.fast_matrix(wide)


# ----------------------------------------------------------------------------- products

@pytest.mark.parametrize("bits,scheme", KINDS + [(32, "float")])
def test_qmatmul_matches_reference(path, bits, scheme):
    rng = np.random.default_rng(100 + bits)
    for rows, cols in SHAPES:
        m = random_qmatrix(rng, rows, cols, bits, scheme)
        km = K.prepare(m)
        for batch in BATCHES:
            x = rng.normal(0, 1, (batch, cols)).astype(np.float32)
            x[0, : cols // 2] = 0.0                      # partly zero rows; all-zero when cols == 1
            for act_bits in (8, None):
                assert_close(K.qmatmul(km, x, act_bits), ref.qmatmul_ref(m, x, act_bits))
        out = np.empty((1, rows), np.float32)
        assert K.qmatmul(km, x[:1], 8, out=out) is out


def test_linear_fwd_bias_and_empty_batch(path):
    """``linear_fwd`` as the linear program calls it: bias added last, zero vectors allowed."""
    rng = np.random.default_rng(3)
    loop = isa.loop_id(path)
    m = random_qmatrix(rng, 45, 70, 4, "int")
    km = K.prepare(m)
    bias = rng.normal(size=45).astype(np.float32)
    for n in (0, 1, 5, 40):
        x = rng.normal(size=(n, 70)).astype(np.float32)
        out = np.full((n, 45), np.nan, np.float32)
        args = (km.data, km.nlines, km.scale, K.padded(bias, 45), True, x, out)
        pk.specialize(pk.linear_fwd, (loop, km.bw), args)(loop, km.bw, *args)
        assert_close(out, ref.qmatmul_ref(m, x) + bias)


# ----------------------------------------------------------------------------- exactness

# the full code range of each storage width as (bits, scheme, q_min, q_max): u = 0 ... 2^bw − 1
WIDTHS = [(8, "int", -128, 127), (4, "int", -8, 7), (2, "int", -2, 1), (1, "binary", -1, 1)]


def kmatrix(q: np.ndarray, bits: int, scheme: str = "int") -> K.KMatrix:
    """``K.prepare`` of ``q`` with unit scales, packed directly: ``QMatrix`` admits only the
    quantizers' narrow range, the layout takes every code ``u = 0 … 2^bw − 1``."""
    rows, cols = q.shape
    bw = K.storage_bits(bits, scheme, cols)
    offset, mult = K.code_params(bw)
    data, nlines = K.pack_u8(q, bw, offset, mult)
    km = K.KMatrix(rows, cols, bits, scheme, bw, offset, mult, nlines, data, K.padded(np.ones(rows, np.float32), rows))
    np.testing.assert_array_equal(km.unpack(), q)
    return km


def exact_product(q: np.ndarray, bits: int, scheme: str, xq: np.ndarray):
    """``(kernel, reference)`` for codes ``q``, unit scales and activations that quantize to
    themselves (max |x| = 127 per row, so s_x = 1): both must be the float32 of the exact integer
    sum ``Σ_k q·x`` (evaluated here in int64)."""
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
    cols = 4100
    q = extreme_rows(36, cols, qmin, qmax, rng)
    assert kmatrix(q, bits, scheme).bw == bits
    for batch in (1, 2, 5, 8, 20, 36):
        got, want = exact_product(q, bits, scheme, extreme_acts(batch, cols, rng))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits,scheme,qmin,qmax", WIDTHS)
def test_random_codes_are_exact(path, bits, scheme, qmin, qmax):
    """Random codes over the full range of each width, random int8 activations, odd sizes."""
    rng = np.random.default_rng(10 + bits)
    for rows, cols in ((1, 1), (17, 129), (33, 1030), (5, 3001), (70, 65)):
        if scheme == "binary":
            q = rng.choice(np.array([-1, 1], np.int8), (rows, cols))
        else:
            q = rng.integers(qmin, qmax + 1, (rows, cols)).astype(np.int8)
        for batch in (1, 3, 4, 6, 17, 40):
            x = rng.integers(-127, 128, (batch, cols))
            x[:, 0] = 127                                # s_x = 1: x quantizes to itself
            got, want = exact_product(q, bits, scheme, x)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits,scheme,qmin,qmax", WIDTHS[1:])
def test_subbyte_limit_is_exact(path, bits, scheme, qmin, qmax):
    """K = MAX_COLS_SUBBYTE with the largest code against x = ±127: the in-place planes of the
    VNNI loops (up to 2^(8−bw)·(2^bw − 1) per byte) reach their largest sums without wrapping."""
    cols = V.MAX_COLS_SUBBYTE
    q = np.full((16, cols), qmax, np.int8)
    q[1::2] = qmin
    x = np.full((3, cols), 127, np.int16)
    x[1] = -127
    x[2, 1::2] = -127
    got, want = exact_product(q, bits, scheme, x)
    np.testing.assert_array_equal(got, want)


def test_8bit_long_k_wraps_exactly(path):
    """K = 70000 at u = 255, x = 127: Σ u·x exceeds 2^31 inside the u-code loops and wraps; the
    corrected sum Σ q·x (< 2^31) must still be exact."""
    cols = 70_000
    q = np.full((16, cols), 127, np.int8)
    q[1::2] = -128
    x = np.full((2, cols), 127, np.int16)
    got, want = exact_product(q, 8, "int", x)
    np.testing.assert_array_equal(got, want)
    assert want[0, 0] == np.float32(127 * 127 * cols)


def test_threads_give_the_same_result(path):
    """1 and 2 threads (the row blocks split between them; AMX tile state per thread) agree exactly."""
    rng = np.random.default_rng(9)
    m = random_qmatrix(rng, 300, 200, 4, "int")
    km = K.prepare(m)
    before = numba.get_num_threads()
    try:
        for batch in (1, 20):
            x = rng.normal(size=(batch, 200)).astype(np.float32)
            outs = []
            for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
                numba.set_num_threads(threads)
                outs.append(K.qmatmul(km, x))
            for o in outs[1:]:
                np.testing.assert_array_equal(o, outs[0])
    finally:
        numba.set_num_threads(before)


# ----------------------------------------------------------------------------- LSTM layer, embedding

def _lstm_layer(path, w_ih, w_hh, bias, hard, reverse, x, h, c):
    """``lstm_layer_fwd`` on matrices packed the way the lstm program packs them."""
    H = h.shape[1]
    ctx = programs.BuildContext(isa.loop_id(path))
    ki, kh = ctx.pack(w_ih), ctx.pack(w_hh)
    out = np.full((x.shape[0], x.shape[1], H + 3), np.nan, np.float32)
    lits = (ctx.loop, ki.bw, kh.bw)
    args = (ki.data, ki.nlines, ki.scale, kh.data, kh.nlines, kh.scale, K.padded(bias, 4 * H),
            "i" in hard, "f" in hard, "o" in hard, reverse, x, h, c, out, 2)
    pk.specialize(pk.lstm_layer_fwd, lits, args)(*lits, *args)
    assert np.isnan(out[..., :2]).all() and np.isnan(out[..., 2 + H:]).all()
    return out[..., 2:2 + H]


@pytest.mark.parametrize("T,B", [(1, 1), (1, 3), (6, 1), (5, 20)])
@pytest.mark.parametrize("hard", ["", "if", "ifo"])
def test_lstm_layer_matches_reference(path, T, B, hard):
    rng = np.random.default_rng(T * 10 + B + len(hard))
    for In, H, bits_ih, bits_hh in ((30, 19, 4, 4), (70, 24, 8, 1)):
        w_ih = random_qmatrix(rng, 4 * H, In, bits_ih, "binary" if bits_ih == 1 else "int", 0.3)
        w_hh = random_qmatrix(rng, 4 * H, H, bits_hh, "binary" if bits_hh == 1 else "int", 0.3)
        bias = rng.normal(0, 0.3, 4 * H).astype(np.float32)
        x = rng.normal(0, 1, (T, B, In)).astype(np.float32)
        h0, c0 = rng.normal(0, 0.5, (B, H)).astype(np.float32), rng.normal(0, 0.5, (B, H)).astype(np.float32)
        for reverse in (False, True):
            want, h_ref, c_ref = ref.lstm_layer_ref(w_ih, w_hh, bias, x, h0, c0, hard, 8, reverse=reverse)
            h, c = h0.copy(), c0.copy()
            got = _lstm_layer(path, w_ih, w_hh, bias, hard, reverse, x, h, c)
            assert_close(got, want)
            assert_close(h, h_ref)
            assert_close(c, c_ref)


def _gru_layer(path, w_ih, w_hh, b_ih, b_hh, hard, reverse, x, h):
    """``gru_layer_fwd`` on matrices packed the way the gru program packs them."""
    H = h.shape[1]
    ctx = programs.BuildContext(isa.loop_id(path))
    ki, kh = ctx.pack(w_ih), ctx.pack(w_hh)
    out = np.full((x.shape[0], x.shape[1], H + 3), np.nan, np.float32)
    lits = (ctx.loop, ki.bw, kh.bw)
    args = (ki.data, ki.nlines, ki.scale, kh.data, kh.nlines, kh.scale, K.padded(b_ih, 3 * H), K.padded(b_hh, 3 * H),
            "r" in hard, "z" in hard, reverse, x, h, out, 2)
    pk.specialize(pk.gru_layer_fwd, lits, args)(*lits, *args)
    assert np.isnan(out[..., :2]).all() and np.isnan(out[..., 2 + H:]).all()
    return out[..., 2:2 + H]


@pytest.mark.parametrize("T,B", [(1, 1), (1, 3), (6, 1), (5, 20)])
@pytest.mark.parametrize("hard", ["", "r", "rz"])
def test_gru_layer_matches_reference(path, T, B, hard):
    """Tolerance as for the LSTM layer (1e-3 of the output range): the kernels' float32
    polynomial sigmoid/tanh against NumPy's."""
    from g2quant.targets.gru import gru_layer_ref
    rng = np.random.default_rng(T * 10 + B + len(hard))
    for In, H, bits_ih, bits_hh in ((30, 19, 4, 4), (70, 24, 8, 1), (17, 33, 2, 8)):
        kind = {1: "binary", 2: "ternary"}
        w_ih = random_qmatrix(rng, 3 * H, In, bits_ih, kind.get(bits_ih, "int"), 0.3)
        w_hh = random_qmatrix(rng, 3 * H, H, bits_hh, kind.get(bits_hh, "int"), 0.3)
        b_ih, b_hh = (rng.normal(0, 0.3, 3 * H).astype(np.float32) for _ in range(2))
        x = rng.normal(0, 1, (T, B, In)).astype(np.float32)
        h0 = rng.normal(0, 0.5, (B, H)).astype(np.float32)
        for reverse in (False, True):
            want, h_ref = gru_layer_ref(w_ih, w_hh, b_ih, b_hh, x, h0, hard, 8, reverse=reverse)
            h = h0.copy()
            got = _gru_layer(path, w_ih, w_hh, b_ih, b_hh, hard, reverse, x, h)
            assert_close(got, want)
            assert_close(h, h_ref)


@pytest.mark.parametrize("bits,scheme", [(1, "binary"), (2, "ternary"), (4, "int"), (8, "int")])
def test_embed_rows(bits, scheme):
    rng = np.random.default_rng(bits)
    m = random_qmatrix(rng, 37, 75, bits, scheme)
    km = K.prepare(m)
    tokens = np.array([0, 36, 5, 5, 17], np.int64)
    out = np.empty((tokens.size, 75), np.float32)
    pk.embed_fwd(km.data, km.nlines, km.bw, km.offset, km.mult, km.scale, tokens, out)
    np.testing.assert_array_equal(out, m.scale[tokens, None] * m.q[tokens].astype(np.float32))


# ----------------------------------------------------------------------------- loop selection

def test_isa_names_and_ids():
    assert isa.LOOPS == ("avx512-vnni", "avx-vnni", "avx2", "neon-dotprod", "neon", "portable", "amx-int8")
    assert sorted(isa.PREFERENCE) == sorted(isa.LOOPS) and isa.PREFERENCE[-1] == "portable"
    for i, name in enumerate(isa.LOOPS):
        assert isa.loop_id(name) == i and isa.loop_name(i) == name
    assert isa.loop_id("vnni") == isa.AVX512_VNNI and isa.loop_id("fallback") == isa.PORTABLE
    assert isa.loop_id(" AVX2 ") == isa.AVX2 and isa.loop_id("amx-int8") == isa.AMX_INT8
    with pytest.raises(ValueError, match="avx512-vnni, avx-vnni, avx2, neon-dotprod, neon, portable, amx-int8"):
        isa.loop_id("sse4")
    with pytest.raises(ValueError):
        isa.loop_name(len(isa.LOOPS))


def test_cpu_model_tells_generic_vm_names_apart():
    zen1 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
    zen4 = zen1.replace(": 23", ": 25").replace("model\t\t: 1", "model\t\t: 17")
    assert isa.cpu_model(zen1) == "AMD EPYC (family 23, model 1)"
    assert isa.cpu_model(zen4) == "AMD EPYC (family 25, model 17)"
    named = "cpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
    assert isa.cpu_model(named) == "Intel(R) Xeon(R) Platinum 8480+"      # a real model number: as it is
    assert isa.cpu_model(named + "\nprocessor\t: 1\nmodel name\t: other\n").endswith("8480+")   # the first CPU's
    assert isa.cpu_model("")                                              # no cpuinfo: platform's answer


def test_host_loops_follow_the_features():
    loops, feats = isa.host_loops(), isa.host_features()
    assert loops[-1] == "portable" and len(set(loops)) == len(loops)
    assert list(loops) == sorted(loops, key=isa.PREFERENCE.index)        # best first
    if isa.machine() == "x86_64":
        assert ("avx2" in loops) == feats["avx2"]
        assert ("avx-vnni" in loops) == (feats["avx2"] and feats["avxvnni"])
        vnni = feats["avx512f"] and feats["avx512bw"] and feats["avx512vnni"]
        assert ("avx512-vnni" in loops) == vnni
        assert ("amx-int8" in loops) == (vnni and feats["amx-tile"] and feats["amx-int8"] and feats["amx-permitted"])
        assert feats["amx-permitted"] == (feats["amx-tile"] and feats["amx-int8"] and isa.amx_permitted())
        assert not {"neon", "neon-dotprod"} & set(loops)
    elif isa.machine() == "aarch64":
        assert feats["source"] in ("auxv", "llvm")
        assert ("neon" in loops) == feats["asimd"]
        assert ("neon-dotprod" in loops) == (feats["asimd"] and feats["asimddp"])
        assert not {"avx2", "avx-vnni", "avx512-vnni", "amx-int8"} & set(loops)
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

def _callers(loop):
    """Fresh (uncached) njit functions calling each 4-bit kernel with a constant loop."""
    gemv, gemm, amx = V.KERNELS["gemv", 4], V.KERNELS["gemm", 4], V.KERNELS["amx", 4]

    @njit
    def f(w, x, out, scale, sumx, sx, scratch, n):
        gemv(w, 0, n, n, x, 0, sumx[0], sx[0], scale, 0, scale, 0, out, 0, 16 * n, 0, loop)
        gemm(w, 0, n, n, x, 0, 16, n, sumx, 0, sx, 0, scale, 0, scale, 0, out, 0, 16, 16 * n, 0, loop)
        if n > 2:                 # never at run time: the kernels' code is generated all the same
            amx(w, 0, n, n, x, 0, 16, n, sumx, 0, sx, 0, scale, 0, scale, 0, out, 0, 16, 16 * n, 0, scratch, 0,
                loop)
    return f


@pytest.mark.parametrize("loop", HOST_LOOPS)
def test_generated_code_uses_the_loop_instructions(loop):
    """Each loop's kernels hold its own instructions and nothing wider: the avx2 and avx-vnni
    kernels no zmm (their functions switch AVX-512 off), avx-vnni the VEX encoding, neon-dotprod
    ``sdot`` by element, amx-int8 ``tdpbsud`` in its batch kernel."""
    f = _callers(isa.loop_id(loop))
    w, x = np.zeros(64 * 64, np.uint8), np.zeros(16 * 64, np.int8)
    out, scale = np.zeros(16 * 64, np.float32), np.ones(64, np.float32)
    f(w, x, out, scale, np.zeros(16, np.int64), np.ones(16, np.float32), np.zeros(1, np.uint8), 2)
    asm = f.inspect_asm(f.signatures[0])
    tag = loop.replace("-", "_")

    def body(kind):
        name = f"g2quant_{kind}_u4_{tag}"
        return re.split(r"\n(?=[A-Za-z_$][\w.$]*:\n)", asm[asm.index(f"\n{name}:\n") + 1:])[0]

    want = {"avx512-vnni": [r"vpdpbusd\s+.*%zmm"], "amx-int8": [r"vpdpbusd\s+.*%zmm"],
            "avx-vnni": [r"\{vex\}\s+vpdpbusd\s+.*%ymm"], "avx2": [r"vpmaddubsw\s+.*%ymm", r"vpmaddwd\s+.*%ymm"],
            "neon-dotprod": [r"sdot\s+v\d+\.4s, v\d+\.16b, v\d+\.4b\[\d\]"],
            "neon": [r"smull2?\s+v\d+\.8h", r"[su]adalp\s+v\d+\.4s|saddlp\s+v\d+\.4s"], "portable": []}[loop]
    for kind in ("gemv", "gemm"):
        code = body(kind)
        for pattern in want:
            assert re.search(pattern, code), (loop, kind, pattern)
        if loop in ("avx2", "avx-vnni"):
            assert "zmm" not in code
        if loop not in ("avx512-vnni", "amx-int8"):
            assert not re.search(r"vpdpbusd\s+.*%zmm", code)
    if loop == "amx-int8":
        assert re.search(r"tdpbsud\s+%tmm", body("amx")) and "tilerelease" in body("amx")
    np.testing.assert_array_equal(out, 0)


def test_non_literal_loop_is_rejected():
    gemv = V.KERNELS["gemv", 4]

    @njit
    def f(w, x, out, scale, loop):
        gemv(w, 0, 2, 1, x, 0, 0, np.float32(1.0), scale, 0, scale, 0, out, 0, 16, 0, loop)

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


_CACHE_STEPS = r"""
import sys
import numpy as np
from g2quant.targets.cpu import isa, program_kernels as pk, programs
from g2quant.targets.cpu import kernels as K
from g2quant.targets.cpu.testing import random_qmatrix
stage = sys.argv[1]
rng = np.random.default_rng(0)
H, In = 24, 30
ctx = programs.BuildContext(isa.loop_id(isa.default_loop()))
w_ih, w_hh = (random_qmatrix(4 * H, k, 4, rng) for k in (In, H))
ki, kh = ctx.pack(w_ih), ctx.pack(w_hh)
if stage == "linear":                    # compiles (and caches) the parallel product and linear_fwd
    x = rng.normal(size=(2, In)).astype(np.float32)
    out = np.empty((2, ki.rows), np.float32)
    lits = (ctx.loop, ki.bw)
    args = (ki.data, ki.nlines, ki.scale, K.padded(np.zeros(4 * H, np.float32), 4 * H), False, x, out)
    pk.specialize(pk.linear_fwd, lits, args)(*lits, *args)
else:                                    # "compile": the LSTM kernel with the product from the cache; "run": all cached
    x = rng.normal(size=(3, 1, In)).astype(np.float32)
    h, c = np.zeros((1, H), np.float32), np.zeros((1, H), np.float32)
    out = np.empty((3, 1, H), np.float32)
    lits = (ctx.loop, ki.bw, kh.bw)
    args = (ki.data, ki.nlines, ki.scale, kh.data, kh.nlines, kh.scale, K.padded(np.zeros(4 * H, np.float32), 4 * H),
            False, False, False, False, x, h, c, out, 0)
    pk.specialize(pk.lstm_layer_fwd, lits, args)(*lits, *args)
print("ok", stage)
"""


def test_kernels_loaded_from_a_cache_built_in_steps_run(tmp_path):
    """A user's cache fills over several processes: the parallel product cached with linear_fwd in
    one, the LSTM kernel (linking the cached product) in a second, run from the cache in a third.
    Numba stores that LSTM kernel without its thread-pool start hook; before the engine started
    the pool itself the third process died with SIGSEGV."""
    script = tmp_path / "step.py"
    script.write_text(_CACHE_STEPS)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    for stage in ("linear", "compile", "run"):
        r = subprocess.run([sys.executable, str(script), stage], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and f"ok {stage}" in r.stdout, (stage, r.returncode, r.stderr[-2000:])
