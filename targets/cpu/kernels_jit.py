"""Numba (``@njit``) helpers of the CPU kernels: activation quantization, reading one row of a
packed matrix, and the vectorizable exp/sigmoid/tanh of the cell update. The packed layout is in
``kernels``; the inner loops (LLVM IR) in ``kernels_vnni``; the op kernels in ``program_kernels``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .kernels_vnni import BLOCK_ROWS, GROUP_K, LINE_BYTES, bits_to_f32

ACT_QMAX = 127


@njit(cache=True, error_model="numpy")       # no zero-division checks: both loops vectorize
def _quantize_into(x, xq, base, width):
    """``quantize_act`` of the float32 vector ``x`` into ``xq[base:base+len(x)]``, zeroing the rest
    of ``xq[base:base+width]``; returns ``(s_x, Σ x_q)``. ``max|x|`` is taken on the bit patterns
    (``|x|`` as int32 orders like the floats, and a NaN wins as in NumPy)."""
    n = x.shape[0]
    bits = x.view(np.int32)
    m = np.int32(0)
    for k in range(n):
        m = max(m, bits[k] & np.int32(0x7FFFFFFF))
    mf = bits_to_f32(m)
    s = mf / np.float32(ACT_QMAX) if mf > 0 else np.float32(1.0)
    total = np.int32(0)
    for k in range(n):
        v = np.int32(min(max(np.rint(x[k] / s), np.float32(-ACT_QMAX)), np.float32(ACT_QMAX)))
        xq[base + k] = np.int8(v)
        total += v
    xq[base + n:base + width] = 0
    return s, np.int64(total)


@njit(cache=True)
def _embed_row(w, nlines, bw, offset, mult, scale, row, out):
    """``out = scale[row] · q[row, :]`` read straight from the packed block layout: the row's 4
    bytes of each line hold ``P`` k-groups."""
    planes, mask = 8 // bw, (1 << bw) - 1
    base = (row // BLOCK_ROWS) * nlines * LINE_BYTES + (row % BLOCK_ROWS) * GROUP_K
    s = scale[row]
    K = out.shape[0]
    for line in range(nlines):
        for p in range(planes):
            k0 = GROUP_K * (planes * line + p)
            for j in range(min(GROUP_K, K - k0)):
                u = (np.int32(w[base + line * LINE_BYTES + j]) >> (p * bw)) & mask
                out[k0 + j] = s * np.float32(mult * u - offset)


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
def _sigmoid(z):
    """``1 / (1 + e^{−z})``."""
    return np.float32(1.0) / (np.float32(1.0) + _exp(-z))


@njit(cache=True, inline="always", error_model="numpy")
def _tanh(z):
    """``tanh(z) = 1 − 2 / (e^{2z} + 1)`` (absolute error ~1e-7)."""
    return np.float32(1.0) - np.float32(2.0) / (_exp(np.float32(2.0) * z) + np.float32(1.0))
