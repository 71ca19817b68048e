"""Numba kernels of the CPU programs (one per op family), on the packed layout of ``kernels``.

Every kernel takes the inner loop ``loop`` and the storage width(s) ``bw`` of its matrices as
compile-time literals: :func:`specialize` compiles (or loads from the on-disk cache) one entry
point per combination, so an artifact compiles only the widths and the loop it uses, and a call
costs no type dispatch (Numba's own literal dispatch costs milliseconds per call). A matrix is
passed as ``(data, nlines, scale)`` of a ``kernels.KMatrix`` (``scale`` and biases padded to
whole 16-row blocks).

- ``linear_fwd``: ``out[n] = Q(W)·A8(x[n]) (+ bias)`` for ``N`` vectors. One ``prange`` over
  groups of row blocks (static: each thread keeps the same rows call after call); batch 1 runs
  the ``gemv`` kernel (several blocks in flight), more vectors the ``gemm`` micro-kernel
  (blocks × vectors of accumulators) or, on ``amx-int8``, the AMX kernel (2 blocks × all
  vectors per call).
- ``lstm_layer_fwd``: one LSTM layer-direction over ``T`` steps. One step (streaming) runs
  ``W_ih·x + W_hh·h + bias`` as one parallel product; a sequence first computes the input
  projections of all ``T·B`` vectors as one product, then per step only ``W_hh·h``. Rows are
  unit-major (rows 4j…4j+3 = i_j, f_j, g_j, o_j), so the cell update reads 4 rows per unit.
- ``embed_fwd``: dequantized rows read straight from the packed table.
"""
from __future__ import annotations

import numpy as np
import numba
from numba import literally, njit, prange, types
from numba.core import errors
from numba.extending import overload

from .kernels_jit import _embed_row, _gate, _quantize_into, _tanh
from .kernels_vnni import _AMX_HEADER, AMX_BLOCKS, AMX_STEP, BLOCK_ROWS, GROUP_K, KERNELS, LINE_BYTES, gemm_group, \
    gemv_group, uses_amx

X_SLACK = 64             # bytes after the last quantized vector (AMX reads whole 64-byte K steps)


def _literal_int(v, what):
    if not isinstance(v, types.IntegerLiteral):
        raise errors.RequireLiteralValue(f"{what} must be a compile-time constant")
    return v.literal_value


def gemv(bw, w, w_off, nlines, nblocks, x, x_off, sumx, sx, scale, scale_off, bias, bias_off, out, out_off, nvalid,
         flags, loop):
    """Up to ``gemv_group`` blocks of ``bw``-bit codes × one int8 vector (``kernels_vnni.gemv_u{bw}``)."""


def gemm(bw, w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale, scale_off, bias,
         bias_off, out, out_off, out_stride, nvalid, flags, loop):
    """``gemm_group`` blocks × vectors (``kernels_vnni.gemm_u{bw}``)."""


def amx(bw, w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale, scale_off, bias,
        bias_off, out, out_off, out_stride, nvalid, flags, scratch, scratch_off, loop):
    """2 blocks × all vectors on AMX tiles (``kernels_vnni.amx_u{bw}``)."""


@overload(gemv, inline="always")
def _gemv_ov(bw, w, w_off, nlines, nblocks, x, x_off, sumx, sx, scale, scale_off, bias, bias_off, out, out_off, nvalid,
             flags, loop):
    fn = KERNELS["gemv", _literal_int(bw, "bw")]

    def impl(bw, w, w_off, nlines, nblocks, x, x_off, sumx, sx, scale, scale_off, bias, bias_off, out, out_off, nvalid,
             flags, loop):
        fn(w, w_off, nlines, nblocks, x, x_off, sumx, sx, scale, scale_off, bias, bias_off, out, out_off, nvalid, flags,
           loop)
    return impl


@overload(gemm, inline="always")
def _gemm_ov(bw, w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale, scale_off,
             bias, bias_off, out, out_off, out_stride, nvalid, flags, loop):
    fn = KERNELS["gemm", _literal_int(bw, "bw")]

    def impl(bw, w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale, scale_off,
             bias, bias_off, out, out_off, out_stride, nvalid, flags, loop):
        fn(w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale, scale_off, bias,
           bias_off, out, out_off, out_stride, nvalid, flags, loop)
    return impl


@overload(amx, inline="always")
def _amx_ov(bw, w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale, scale_off,
            bias, bias_off, out, out_off, out_stride, nvalid, flags, scratch, scratch_off, loop):
    fn = KERNELS["amx", _literal_int(bw, "bw")]

    def impl(bw, w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale, scale_off,
             bias, bias_off, out, out_off, out_stride, nvalid, flags, scratch, scratch_off, loop):
        fn(w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale, scale_off, bias,
           bias_off, out, out_off, out_stride, nvalid, flags, scratch, scratch_off, loop)
    return impl


@njit(cache=True, inline="always")
def _blocks_per_task(loop, bw, nb):
    """Row blocks per ``prange`` iteration: one kernel call's worth."""
    if nb == 1:
        return gemv_group(loop, bw)
    return AMX_BLOCKS if uses_amx(loop) else gemm_group(loop, bw)[0]


@njit(cache=True, inline="always")
def _product_blocks(loop, bw, b0, nblk, w, nlines, scale, bias, flags, xq, width, sx, sumx, out, out_base,
                    out_stride, nb, rows):
    """Blocks ``b0 … b0+nblk`` (rows ``16·b0 …``) of one matrix × the ``nb`` quantized vectors
    (``width`` bytes apart in ``xq``) into ``out[out_base + v·out_stride + r]``."""
    block_bytes = nlines * LINE_BYTES
    end = b0 + nblk
    if nb == 1:
        G = gemv_group(loop, bw)
        for s in range(b0, end, G):
            r0 = s * BLOCK_ROWS
            gemv(bw, w, s * block_bytes, nlines, min(G, end - s), xq, 0, sumx[0], sx[0], scale, r0, bias, r0, out,
                 out_base + r0, rows - r0, flags, loop)
    elif uses_amx(loop):
        sbytes = _AMX_HEADER + AMX_BLOCKS * (-(-nlines * (8 // bw) // (AMX_STEP // GROUP_K))) * 1024
        scratch = np.empty(sbytes + 64, np.uint8)
        soff = (-scratch.ctypes.data) % 64
        for s in range(b0, end, AMX_BLOCKS):
            r0 = s * BLOCK_ROWS
            amx(bw, w, s * block_bytes, nlines, min(AMX_BLOCKS, end - s), xq, 0, width, nb, sumx, 0, sx, 0, scale, r0,
                bias, r0, out, out_base + r0, out_stride, rows - r0, flags, scratch, soff, loop)
    else:
        RB, NV = gemm_group(loop, bw)
        for s in range(b0, end, RB):
            r0 = s * BLOCK_ROWS
            for v0 in range(0, nb, NV):
                gemm(bw, w, s * block_bytes, nlines, min(RB, end - s), xq, v0 * width, width, nb - v0, sumx, v0, sx,
                     v0, scale, r0, bias, r0, out, out_base + v0 * out_stride + r0, out_stride, rows - r0, flags,
                     loop)


@njit(cache=True)
def _quantize_rows(x, width):
    """A8 of every row of ``x [N, K]``: ``(xq, sx, sumx)`` with rows ``width`` bytes apart (zero
    padded) and ``X_SLACK`` zero bytes after the last one."""
    n = x.shape[0]
    xq = np.zeros(n * width + X_SLACK, np.int8)
    sx = np.ones(max(n, 1), np.float32)
    sumx = np.zeros(max(n, 1), np.int64)
    for b in range(n):
        sx[b], sumx[b] = _quantize_into(x[b], xq, b * width, width)
    return xq, sx, sumx


@njit(cache=True, parallel=True)
def _matmul1(loop, bw, w, nlines, scale, bias, flags, xq, width, sx, sumx, out, out_base, out_stride, nb, rows):
    """``out (+)= M·A8(x) (+ bias)`` over all row blocks in parallel (``flags`` as the kernels')."""
    literally(loop)
    literally(bw)
    nblocks = -(-rows // BLOCK_ROWS)
    step = _blocks_per_task(loop, bw, nb)
    for t in prange(-(-nblocks // step)):
        b0 = t * step
        _product_blocks(loop, bw, b0, min(step, nblocks - b0), w, nlines, scale, bias, flags, xq, width, sx, sumx, out,
                        out_base, out_stride, nb, rows)


@njit(cache=True, parallel=True)
def _matmul2(loop, bw1, w1, nl1, s1, xq1, width1, sx1, sumx1, bw2, w2, nl2, s2, xq2, width2, sx2, sumx2, bias, out,
             nb, rows):
    """``out = M1·A8(x1)`` then ``+= M2·A8(x2) + bias`` block group by block group in one parallel
    loop (the float order of the reference: ``(W_ih·x + W_hh·h) + bias``)."""
    literally(loop)
    literally(bw1)
    literally(bw2)
    nblocks = -(-rows // BLOCK_ROWS)
    step = max(_blocks_per_task(loop, bw1, nb), _blocks_per_task(loop, bw2, nb))
    for t in prange(-(-nblocks // step)):
        b0 = t * step
        n = min(step, nblocks - b0)
        _product_blocks(loop, bw1, b0, n, w1, nl1, s1, bias, 0, xq1, width1, sx1, sumx1, out, 0, rows, nb, rows)
        _product_blocks(loop, bw2, b0, n, w2, nl2, s2, bias, 3, xq2, width2, sx2, sumx2, out, 0, rows, nb, rows)


_SPECIALIZED: dict = {}


def specialize(kernel, literals: tuple, args: tuple):
    """The compiled entry point of ``kernel`` whose first ``len(literals)`` arguments are the
    given compile-time constants and whose other arguments have the types of ``args``."""
    key = (kernel, literals, tuple(numba.typeof(a) for a in args))
    fn = _SPECIALIZED.get(key)
    if fn is None:
        sig = tuple(types.literal(v) for v in literals) + key[2]
        fn = _SPECIALIZED[key] = kernel.compile(sig)
    return fn


@njit(cache=True)
def linear_fwd(loop, bw, w, nlines, scale, bias, has_bias, x, out):
    """``out [N, R] = Q(W)·A8(x [N, K]) (+ bias)``; ``scale``/``bias`` padded to whole blocks.
    ``loop`` and ``bw`` must be literals (:func:`specialize`)."""
    width = nlines * LINE_BYTES // BLOCK_ROWS * (8 // bw)
    xq, sx, sumx = _quantize_rows(x, width)
    _matmul1(loop, bw, w, nlines, scale, bias, np.int64(1 if has_bias else 0), xq, width, sx, sumx, out.reshape(-1), 0,
             out.shape[1], x.shape[0], out.shape[1])


@njit(cache=True, error_model="numpy")
def _cells(a, hard_i, hard_f, hard_o, h, c):
    """Cell update from unit-major pre-activations ``a [B, 4H]``; ``h``, ``c`` ``[B, H]`` in place."""
    for b in range(a.shape[0]):
        ab, cb, hb = a[b], c[b], h[b]
        for j in range(cb.shape[0]):
            gi = _gate(ab[4 * j], hard_i)
            gf = _gate(ab[4 * j + 1], hard_f)
            gg = _tanh(ab[4 * j + 2])
            go = _gate(ab[4 * j + 3], hard_o)
            cn = gf * cb[j] + gi * gg
            cb[j] = cn
            hb[j] = go * _tanh(cn)


@njit(cache=True)
def lstm_layer_fwd(loop, bw_ih, bw_hh, w_ih, nl_ih, s_ih, w_hh, nl_hh, s_hh, bias, hard_i, hard_f, hard_o, reverse,
                   x, h, c, out, col0):
    """One layer-direction over ``x [T, B, In]`` (unit-major packed ``W_ih`` / ``W_hh``, ``bias``
    in unit-major order padded to whole blocks); updates ``h``, ``c`` ``[B, H]`` in place and
    writes ``out[t, :, col0:col0 + H]``. ``loop``, ``bw_ih``, ``bw_hh`` must be literals."""
    T, B, H = x.shape[0], x.shape[1], h.shape[1]
    rows = 4 * H
    w1 = nl_ih * LINE_BYTES // BLOCK_ROWS * (8 // bw_ih)
    w2 = nl_hh * LINE_BYTES // BLOCK_ROWS * (8 // bw_hh)
    if T == 1:
        xq, sx, sumx = _quantize_rows(x[0], w1)
        hq, sh, sumh = _quantize_rows(h, w2)
        a = np.empty((B, rows), np.float32)
        _matmul2(loop, bw_ih, w_ih, nl_ih, s_ih, xq, w1, sx, sumx, bw_hh, w_hh, nl_hh, s_hh, hq, w2, sh, sumh,
                 bias, a.reshape(-1), B, rows)
        _cells(a, hard_i, hard_f, hard_o, h, c)
        out[0, :, col0:col0 + H] = h
        return
    xs = x.reshape(T * B, x.shape[2])
    xq, sx, sumx = _quantize_rows(xs, w1)
    zx = np.empty((T * B, rows), np.float32)
    zflat = zx.reshape(-1)
    _matmul1(loop, bw_ih, w_ih, nl_ih, s_ih, bias, np.int64(0), xq, w1, sx, sumx, zflat, 0, rows, T * B, rows)
    for s in range(T):
        t = T - 1 - s if reverse else s
        hq, sh, sumh = _quantize_rows(h, w2)
        _matmul1(loop, bw_hh, w_hh, nl_hh, s_hh, bias, np.int64(3), hq, w2, sh, sumh, zflat, t * B * rows, rows, B,
                 rows)
        _cells(zx[t * B:(t + 1) * B], hard_i, hard_f, hard_o, h, c)
        out[t, :, col0:col0 + H] = h


@njit(cache=True)
def embed_fwd(w, nlines, bw, offset, mult, scale, tokens, out):
    """``out[n] = scale[t]·q[t, :]`` for ``t = tokens[n]``, read from the packed table."""
    for n in range(tokens.shape[0]):
        _embed_row(w, nlines, bw, offset, mult, scale, tokens[n], out[n])
