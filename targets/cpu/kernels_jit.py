"""Numba (``@njit``) side of the CPU engine: activation quantization, the parallel product over
panels, the vectorized LSTM cell and the one-call LM step. The packed layout and the public
API are in ``kernels``; the inner loops (LLVM IR) in ``kernels_vnni``.

All functions take ``use_vnni`` (the inner loop; a compile-time constant from the entry points
at the bottom, so each path compiles on its own) and operate on a model's arenas: ``wbuf`` (uint8, packed matrices), ``fbuf`` (float32, scales and biases) and a matrix
table ``mats[m] = (w_off, nchunks, bw, offset, mult, scale_off)``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .isa import LOOPS
from .kernels_vnni import (BATCH_VECS, CHUNK_BYTES, PANEL_ROWS, PANEL_TILES, TILE_ROWS, batch_u1, batch_u2,
                           batch_u4, batch_u8, bits_to_f32, panel_u1, panel_u2, panel_u4, panel_u8)

ACT_QMAX = 127
TILE_BYTES = TILE_ROWS * CHUNK_BYTES


@njit(cache=True, inline="always")
def _panel(use_vnni, bw, w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off,
           out, out_off, nvalid, flags):
    """Rows ``[0, nvalid)`` (≤ 16) of the panel at byte ``w_off`` × the vector ``x[x_off:]``, scaled
    into ``out[out_off:]`` (``flags``: 1 add bias, 2 accumulate; see ``kernels_vnni``)."""
    if bw == 4:
        panel_u4(w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off, out, out_off,
                 nvalid, flags, use_vnni)
    elif bw == 8:
        panel_u8(w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off, out, out_off,
                 nvalid, flags, use_vnni)
    elif bw == 2:
        panel_u2(w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off, out, out_off,
                 nvalid, flags, use_vnni)
    else:
        panel_u1(w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off, out, out_off,
                 nvalid, flags, use_vnni)


@njit(cache=True, inline="always")
def _batch(use_vnni, bw, w, w_off, x, x_off, x_stride, nchunks, sumx, sx, b0, scale, scale_off, bias, bias_off,
           out, out_off, out_stride, nrows, nvec, flags):
    """One tile (4 rows) at byte ``w_off`` × the 4 vectors ``x[x_off + v·x_stride:]``, scaled into
    ``out[out_off + v·out_stride + r]`` for ``r < nrows``, ``v < nvec`` (``sumx``/``sx`` from ``b0``)."""
    if bw == 4:
        batch_u4(w, w_off, x, x_off, x_stride, nchunks, sumx, b0, sx, b0, scale, scale_off, bias, bias_off,
                 out, out_off, out_stride, nrows, nvec, flags, use_vnni)
    elif bw == 8:
        batch_u8(w, w_off, x, x_off, x_stride, nchunks, sumx, b0, sx, b0, scale, scale_off, bias, bias_off,
                 out, out_off, out_stride, nrows, nvec, flags, use_vnni)
    elif bw == 2:
        batch_u2(w, w_off, x, x_off, x_stride, nchunks, sumx, b0, sx, b0, scale, scale_off, bias, bias_off,
                 out, out_off, out_stride, nrows, nvec, flags, use_vnni)
    else:
        batch_u1(w, w_off, x, x_off, x_stride, nchunks, sumx, b0, sx, b0, scale, scale_off, bias, bias_off,
                 out, out_off, out_stride, nrows, nvec, flags, use_vnni)


@njit(cache=True)
def _quantize_into(x, xq, base, width):
    """``quantize_act`` of the float32 vector ``x`` into ``xq[base:base+len(x)]``, zeroing the rest
    of ``xq[base:base+width]``; returns ``(s_x, Σ x_q)``."""
    m = np.float32(0.0)
    for k in range(x.shape[0]):
        m = max(m, abs(x[k]))
    s = m / np.float32(ACT_QMAX) if m > 0 else np.float32(1.0)
    total = 0
    for k in range(x.shape[0]):
        v = min(max(np.rint(x[k] / s), np.float32(-ACT_QMAX)), np.float32(ACT_QMAX))
        xq[base + k] = np.int8(v)
        total += np.int64(v)
    xq[base + x.shape[0]:base + width] = 0
    return s, total


@njit(cache=True, inline="always")
def _panel_rows(use_vnni, pi, m, mats, wbuf, fbuf, rows, xq, width, sx, sumx, bias_off, flags, out):
    """Panel ``pi`` (rows ``16·pi …``) of matrix ``mats[m] = (w_off, nchunks, bw, offset, mult,
    scale_off)`` × every vector: ``out[b, r] (+)= s_r·s_x[b]·(mult·Σu·x_q − offset·Σx_q) (+ bias[r])``.

    ``flags`` bit 1 accumulates into ``out`` first, bit 0 adds ``fbuf[bias_off + r]`` last. For
    more than one vector, ``xq``, ``sx`` and ``sumx`` hold whole groups of 4 vectors (zero-padded;
    ``width`` bytes per quantized vector).
    """
    w_off, nchunks, bw, s_off = mats[m, 0], mats[m, 1], mats[m, 2], mats[m, 5]
    nb = out.shape[0]
    row0 = pi * PANEL_ROWS
    w_off += PANEL_TILES * pi * nchunks * TILE_BYTES
    if nb == 1:
        _panel(use_vnni, bw, wbuf, w_off, xq, 0, nchunks, sumx[0], sx[0], fbuf, s_off + row0, fbuf,
               bias_off + row0, out, row0, rows - row0, flags)
        return
    ostride = out.shape[1]
    for t in range(PANEL_TILES):
        row = row0 + t * TILE_ROWS
        if row >= rows:
            break
        for b0 in range(0, nb, BATCH_VECS):
            _batch(use_vnni, bw, wbuf, w_off + t * nchunks * TILE_BYTES, xq, b0 * width, width, nchunks, sumx, sx,
                   b0, fbuf, s_off + row, fbuf, bias_off + row, out, b0 * ostride + row, ostride, rows - row,
                   nb - b0, flags)


@njit(cache=True, parallel=True)
def _matmul(use_vnni, mats, wbuf, fbuf, width, out, m1, xq1, sx1, sumx1, bias1, flags1,
            m2, xq2, sx2, sumx2, bias2, flags2):
    """``out = M1·A8(x1) [+ M2·A8(x2)]`` over all panels in parallel (see ``_panel_rows``); the
    second matrix (``m2 >= 0``) accumulates, as the LSTM's ``W_ih·x + W_hh·h + bias`` needs.
    Every product of the engine runs through this one function, so its kernels compile once."""
    rows = out.shape[1]
    for pi in prange(-(-rows // PANEL_ROWS)):
        _panel_rows(use_vnni, pi, m1, mats, wbuf, fbuf, rows, xq1, width, sx1, sumx1, bias1, flags1, out)
        if m2 >= 0:
            _panel_rows(use_vnni, pi, m2, mats, wbuf, fbuf, rows, xq2, width, sx2, sumx2, bias2, flags2, out)


@njit(cache=True)
def _qmatmul_kernel(use_vnni, wbuf, fbuf, mats, x, out):
    """``out = M·A8(x)`` for the single matrix of table ``mats`` (data ``wbuf``, scales ``fbuf``)."""
    nb, rows = out.shape
    kpad = mats[0, 1] * CHUNK_BYTES * (8 // mats[0, 2])
    nvec = 1 if nb == 1 else -(-nb // BATCH_VECS) * BATCH_VECS      # whole groups of 4, zero-padded
    xq = np.zeros(nvec * kpad, np.int8)
    sx = np.ones(nvec, np.float32)
    sumx = np.zeros(nvec, np.int64)
    for b in range(nb):
        sx[b], sumx[b] = _quantize_into(x[b], xq, b * kpad, kpad)
    zero, no_matrix = np.int64(0), np.int64(-1)
    _matmul(use_vnni, mats, wbuf, fbuf, kpad, out, zero, xq, sx, sumx, zero, zero,
            no_matrix, xq, sx, sumx, zero, zero)


@njit(cache=True)
def _embed_row(w, w_off, nchunks, bw, offset, mult, scale, row, out):
    """``out = scale[row] · q[row, :]`` read straight from the packed tile layout."""
    planes, mask = 8 // bw, (1 << bw) - 1
    base = w_off + (row // TILE_ROWS) * nchunks * TILE_BYTES + (row % TILE_ROWS) * CHUNK_BYTES
    s = scale[row]
    for k in range(out.shape[0]):
        c, rem = divmod(k, CHUNK_BYTES * planes)
        p, t = divmod(rem, CHUNK_BYTES)
        u = (np.int32(w[base + c * TILE_BYTES + t]) >> (p * bw)) & mask
        out[k] = s * np.float32(mult * u - offset)


_ROUND = np.float32(1.5 * 2 ** 23)      # adding and subtracting it rounds a float32 to an integer


@njit(cache=True, inline="always", error_model="numpy")
def _exp(x):
    """float32 ``e**x`` (rel. error ~1e-7) from a polynomial and an exponent-bit scale: plain
    arithmetic, so the cell loop vectorizes (a libm ``expf`` call per element does not)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = (x * np.float32(1.4426950408889634) + _ROUND) - _ROUND        # round to nearest
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.0 / 720)
    for coef in (1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * r + np.float32(coef)
    return p * bits_to_f32((np.int32(n) + np.int32(127)) << 23)


@njit(cache=True, inline="always", error_model="numpy")
def _gate(z, hard):
    """``1[z > 0]`` for a hard gate, else ``sigmoid(z)``."""
    if hard:
        return np.float32(1.0) if z > 0 else np.float32(0.0)
    return np.float32(1.0) / (np.float32(1.0) + _exp(-z))


@njit(cache=True, inline="always", error_model="numpy")
def _tanh(z):
    """``tanh(z) = 1 − 2 / (e^{2z} + 1)`` (absolute error ~1e-7)."""
    return np.float32(1.0) - np.float32(2.0) / (_exp(np.float32(2.0) * z) + np.float32(1.0))


@njit(cache=True, error_model="numpy")       # no zero-division checks: the loop vectorizes
def _cells(a, l, hard_i, hard_f, hard_o, h, c):
    """Cell update of layer ``l`` from pre-activations ``a [B, 4H]`` (unit-major i, f, g, o)."""
    for b in range(a.shape[0]):
        ab, cl, hl = a[b], c[l, b], h[l, b]
        for j in range(cl.shape[0]):
            gi = _gate(ab[4 * j], hard_i)
            gf = _gate(ab[4 * j + 1], hard_f)
            gg = _tanh(ab[4 * j + 2])
            go = _gate(ab[4 * j + 3], hard_o)
            cn = gf * cl[j] + gi * gg
            cl[j] = cn
            hl[j] = go * _tanh(cn)


@njit(cache=True)
def _lm_step_kernel(use_vnni, wbuf, fbuf, mats, bias_off, hard, tokens, h, c,
                    xf, xq, hq, sx, sumx, sh, sumh, a, logits):
    """One LM step; ``mats[m] = (w_off, nchunks, bw, offset, mult, scale_off)`` for
    m = 0 embedding, 1 decoder, 2+2l / 3+2l the input / recurrent matrix of layer l; ``h``/``c``
    are updated in place and the logits written to ``logits``."""
    nl, nb, nh = h.shape
    width = xq.shape[0] // (1 if nb == 1 else -(-nb // BATCH_VECS) * BATCH_VECS)   # bytes per vector
    for b in range(nb):
        if tokens[b] < 0 or tokens[b] >= logits.shape[1]:
            raise ValueError("token id out of range")
    e = mats[0]
    for b in range(nb):
        _embed_row(wbuf, e[0], e[1], e[2], e[3], e[4], fbuf[e[5]:], tokens[b], xf[b])
        sx[b], sumx[b] = _quantize_into(xf[b], xq, b * width, width)
    for l in range(nl):
        if l > 0:
            for b in range(nb):
                sx[b], sumx[b] = _quantize_into(h[l - 1, b], xq, b * width, width)
        for b in range(nb):
            sh[b], sumh[b] = _quantize_into(h[l, b], hq, b * width, width)
        # gate pre-activations, rows unit-major (tile j = i_j, f_j, g_j, o_j); float order of the
        # reference: (W_ih·A8(x) + W_hh·A8(h)) + bias
        _matmul(use_vnni, mats, wbuf, fbuf, width, a, np.int64(2 + 2 * l), xq, sx, sumx, np.int64(0), np.int64(0),
                np.int64(3 + 2 * l), hq, sh, sumh, bias_off[l], np.int64(3))
        _cells(a, l, hard[0], hard[1], hard[2], h, c)
    for b in range(nb):
        sx[b], sumx[b] = _quantize_into(h[nl - 1, b], xq, b * width, width)
    _matmul(use_vnni, mats, wbuf, fbuf, width, logits, np.int64(1), xq, sx, sumx, bias_off[nl], np.int64(1),
            np.int64(-1), xq, sx, sumx, np.int64(0), np.int64(0))


# Entry points, one per inner loop (``isa.LOOPS``): each passes its loop id as a constant, which
# reaches the intrinsics as a Numba literal, so each entry compiles only its own loop (and a
# machine without VNNI never compiles VNNI). ``QMATMUL[name]`` / ``LM_STEP[name]`` map loop names
# to entries; the ``*_vnni`` / ``*_fallback`` names are the old ones (avx512-vnni / portable).

def _qmatmul_entry(loop):
    def qmatmul(wbuf, fbuf, mats, x, out):
        _qmatmul_kernel(loop, wbuf, fbuf, mats, x, out)
    qmatmul.__name__ = qmatmul.__qualname__ = f"qmatmul_{LOOPS[loop].replace('-', '_')}"
    return njit(cache=True)(qmatmul)


def _lm_step_entry(loop):
    def lm_step(wbuf, fbuf, mats, bias_off, hard, tokens, h, c, xf, xq, hq, sx, sumx, sh, sumh, a, logits):
        _lm_step_kernel(loop, wbuf, fbuf, mats, bias_off, hard, tokens, h, c, xf, xq, hq, sx, sumx, sh, sumh, a,
                        logits)
    lm_step.__name__ = lm_step.__qualname__ = f"lm_step_{LOOPS[loop].replace('-', '_')}"
    return njit(cache=True)(lm_step)


QMATMUL = {name: _qmatmul_entry(i) for i, name in enumerate(LOOPS)}
LM_STEP = {name: _lm_step_entry(i) for i, name in enumerate(LOOPS)}
qmatmul_vnni, qmatmul_fallback = QMATMUL["avx512-vnni"], QMATMUL["portable"]
lm_step_vnni, lm_step_fallback = LM_STEP["avx512-vnni"], LM_STEP["portable"]
