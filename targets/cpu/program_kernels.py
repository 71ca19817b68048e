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
  projections of all ``T·B`` vectors as one product, then per step only ``W_hh·h``. Rows keep
  torch's gate order (i, f, g, o blocks).
- ``gru_layer_fwd``: one GRU layer-direction over ``T`` steps. ``W_ih·x + b_ih`` of all ``T·B``
  vectors is one product; per step ``W_hh·h + b_hh`` is another, kept apart because ``r``
  multiplies its ``n`` block. Rows keep torch's gate order (r, z, n blocks).
- ``embed_fwd``: dequantized rows read straight from the packed table.
"""
from __future__ import annotations

import numpy as np
import numba
from numba import literally, njit, prange, types
from numba.core import errors
from numba.extending import overload

from .kernels_jit import _embed_row, _quantize_into, _sigmoid, _tanh
from .kernels_vnni import _AMX_HEADER, AMX_BLOCKS, AMX_STEP, BLOCK_ROWS, GROUP_K, KERNELS, LINE_BYTES, \
    gemm_group, gemv_group, uses_amx

X_SLACK = 64             # bytes after the last quantized vector (AMX reads whole 64-byte K steps)
AMX_TASK_BLOCKS = 4      # row blocks per prange iteration of the AMX path
AMX_MIN_VECS = 16        # fewer vectors run the VNNI micro-kernel (as fast there: AMX is bound by tile loads)


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
    return AMX_TASK_BLOCKS if uses_amx(loop) and nb >= AMX_MIN_VECS else gemm_group(loop, bw)[0]


@njit(cache=True, inline="always")
def _amx_steps(nlines, bw):
    return -(-nlines * (8 // bw) // (AMX_STEP // GROUP_K))


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
    elif uses_amx(loop) and nb >= AMX_MIN_VECS:
        nsteps = _amx_steps(nlines, bw)
        scratch = np.empty(_AMX_HEADER + AMX_BLOCKS * nsteps * 1024 + 64, np.uint8)
        soff = (-scratch.ctypes.data) % 64
        r0 = b0 * BLOCK_ROWS
        amx(bw, w, b0 * block_bytes, nlines, nblk, xq, 0, width, nb, sumx, 0, sx, 0, scale, r0, bias, r0, out,
            out_base + r0, out_stride, rows - r0, flags, scratch, soff, loop)
    else:
        RB, NV = gemm_group(loop, bw)
        for s in range(b0, end, RB):
            r0 = s * BLOCK_ROWS
            for v0 in range(0, nb, NV):
                gemm(bw, w, s * block_bytes, nlines, min(RB, end - s), xq, v0 * width, width, nb - v0, sumx, v0, sx,
                     v0, scale, r0, bias, r0, out, out_base + v0 * out_stride + r0, out_stride, rows - r0, flags,
                     loop)


@njit(cache=True)
def _act_buffers(n, width):
    """``(xq, sx, sumx)`` for ``n`` quantized vectors ``width`` bytes apart (zero) and
    ``X_SLACK`` zero bytes after the last one."""
    return np.zeros(n * width + X_SLACK, np.int8), np.ones(max(n, 1), np.float32), np.zeros(max(n, 1), np.int64)


@njit(cache=True)
def _quantize_rows(x, width):
    """A8 of every row of ``x [N, K]`` (see ``_act_buffers``)."""
    n = x.shape[0]
    xq, sx, sumx = _act_buffers(n, width)
    for b in range(n):
        sx[b], sumx[b] = _quantize_into(x[b], xq, b * width, width)
    return xq, sx, sumx


@njit(cache=True, parallel=True)
def _matmul(loop, bw1, w1, nl1, s1, xq1, width1, sx1, sumx1, flags1, bw2, w2, nl2, s2, xq2, width2, sx2, sumx2, flags2,
            two, bias, out, out_base, out_stride, nb, rows):
    """``out (+)= M1·A8(x1)`` and, when ``two`` (0/1), then ``+= M2·A8(x2)``, over all row blocks in one
    parallel loop (``flags`` as the kernels': with ``flags1 = 0, flags2 = 3`` the float order of
    the reference, ``(W_ih·x + W_hh·h) + bias``). Every product of the engine runs through this
    one function, so it compiles once per loop and pair of widths."""
    literally(loop)
    literally(bw1)
    literally(bw2)
    nblocks = -(-rows // BLOCK_ROWS)
    step = _blocks_per_task(loop, bw1, nb)
    if two:
        step = max(step, _blocks_per_task(loop, bw2, nb))
    for t in prange(-(-nblocks // step)):
        b0 = t * step
        n = min(step, nblocks - b0)
        _product_blocks(loop, bw1, b0, n, w1, nl1, s1, bias, flags1, xq1, width1, sx1, sumx1, out, out_base,
                        out_stride, nb, rows)
        if two:
            _product_blocks(loop, bw2, b0, n, w2, nl2, s2, bias, flags2, xq2, width2, sx2, sumx2, out, out_base,
                            out_stride, nb, rows)


@njit(cache=True, inline="always")
def _matmul1(loop, bw, w, nlines, scale, bias, flags, xq, width, sx, sumx, out, out_base, out_stride, nb, rows):
    """``out (+)= M·A8(x) (+ bias)`` (``_matmul`` with one matrix)."""
    _matmul(loop, bw, w, nlines, scale, xq, width, sx, sumx, flags, bw, w, nlines, scale, xq, width, sx, sumx, flags,
            np.int64(0), bias, out, out_base, out_stride, nb, rows)


_SPECIALIZED: dict = {}
_POOL_STARTED = False


def _start_pool() -> None:
    global _POOL_STARTED
    numba.get_num_threads()                 # launches the threading layer (public API)
    _POOL_STARTED = True


def specialize(kernel, literals: tuple, args: tuple):
    """The compiled entry point of ``kernel`` whose first ``len(literals)`` arguments are the
    given compile-time constants and whose other arguments have the types of ``args``.

    Starts Numba's thread pool first. A cached kernel that calls the parallel product, compiled
    in a process where that product itself came from the cache, is stored without the hook that
    starts the pool on load; run first in a new process it jumps into an unstarted pool and
    crashes (reproduced: cache linear_fwd in one process, lstm_layer_fwd in a second, run it in
    a third: SIGSEGV; ``tests/test_cpu_kernels.py::test_kernels_loaded_from_a_cache_built_in_steps_run``)."""
    if not _POOL_STARTED:
        _start_pool()
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
    width = nlines * GROUP_K * (8 // bw)
    xq, sx, sumx = _quantize_rows(x, width)
    _matmul1(loop, bw, w, nlines, scale, bias, np.int64(1 if has_bias else 0), xq, width, sx, sumx, out.reshape(-1),
             np.int64(0), out.shape[1], x.shape[0], out.shape[1])


@njit(cache=True, error_model="numpy")
def _cells(a, base, hard_i, hard_f, hard_o, h, c):
    """Cell update from the pre-activations at ``a[base:]`` (``[B, 4H]`` flat, gate order i, f,
    g, o); ``h``, ``c`` ``[B, H]`` in place. Hard gates select ``1[z > 0]`` instead of the
    sigmoid without a branch, so the unit loop vectorizes."""
    B, H = h.shape
    hi, hf, ho = np.float32(hard_i), np.float32(hard_f), np.float32(hard_o)
    one = np.float32(1.0)
    for b in range(B):
        r = base + b * 4 * H
        ai, af, ag, ao = a[r:r + H], a[r + H:r + 2 * H], a[r + 2 * H:r + 3 * H], a[r + 3 * H:r + 4 * H]
        hb, cb = h[b], c[b]
        for u in range(H):                      # (row views: LLVM proves them apart and vectorizes)
            zi, zf, zg, zo = ai[u], af[u], ag[u], ao[u]
            gi = hi * np.float32(zi > 0) + (one - hi) * _sigmoid(zi)
            gf = hf * np.float32(zf > 0) + (one - hf) * _sigmoid(zf)
            go = ho * np.float32(zo > 0) + (one - ho) * _sigmoid(zo)
            cn = gf * cb[u] + gi * _tanh(zg)
            cb[u] = cn
            hb[u] = go * _tanh(cn)


@njit(cache=True)
def _quantize_state(h, hq, sh, sumh, width):
    for b in range(h.shape[0]):
        sh[b], sumh[b] = _quantize_into(h[b], hq, b * width, width)


@njit(cache=True)
def _emit(out, t, h, col0):
    """``out[t, :, col0:col0 + H] = h``."""
    for b in range(h.shape[0]):
        ob, hb = out[t, b], h[b]
        for u in range(h.shape[1]):
            ob[col0 + u] = hb[u]


@njit(cache=True)
def lstm_layer_fwd(loop, bw_ih, bw_hh, w_ih, nl_ih, s_ih, w_hh, nl_hh, s_hh, bias, hard_i, hard_f, hard_o, reverse,
                   x, h, c, out, col0):
    """One layer-direction over ``x [T, B, In]`` (``bias`` padded to whole blocks); updates ``h``,
    ``c`` ``[B, H]`` in place and writes ``out[t, :, col0:col0 + H]``. ``loop``, ``bw_ih``,
    ``bw_hh`` must be literals."""
    T, B, H = x.shape[0], x.shape[1], h.shape[1]
    rows = 4 * H
    w1 = nl_ih * GROUP_K * (8 // bw_ih)
    w2 = nl_hh * GROUP_K * (8 // bw_hh)
    xq, sx, sumx = _act_buffers(T * B, w1)
    for t in range(T):
        for b in range(B):
            sx[t * B + b], sumx[t * B + b] = _quantize_into(x[t, b], xq, (t * B + b) * w1, w1)
    hq, sh, sumh = _act_buffers(B, w2)
    if T == 1:
        _quantize_state(h, hq, sh, sumh, w2)
        a = np.empty(B * rows, np.float32)
        _matmul(loop, bw_ih, w_ih, nl_ih, s_ih, xq, w1, sx, sumx, np.int64(0), bw_hh, w_hh, nl_hh, s_hh, hq, w2, sh,
                sumh, np.int64(3), np.int64(1), bias, a, np.int64(0), rows, B, rows)
        _cells(a, np.int64(0), hard_i, hard_f, hard_o, h, c)
        _emit(out, np.int64(0), h, col0)
        return
    zx = np.empty(T * B * rows, np.float32)
    _matmul1(loop, bw_ih, w_ih, nl_ih, s_ih, bias, np.int64(0), xq, w1, sx, sumx, zx, np.int64(0), rows, T * B, rows)
    for s in range(T):
        t = T - 1 - s if reverse else s
        _quantize_state(h, hq, sh, sumh, w2)
        _matmul1(loop, bw_hh, w_hh, nl_hh, s_hh, bias, np.int64(3), hq, w2, sh, sumh, zx, np.int64(t * B * rows), rows,
                 B, rows)
        _cells(zx, t * B * rows, hard_i, hard_f, hard_o, h, c)
        _emit(out, t, h, col0)


@njit(cache=True, error_model="numpy")
def _gru_cells(gx, base, gh, hard_r, hard_z, h):
    """GRU update from ``gx[base:]`` (``W_ih·x + b_ih``, ``[B, 3H]`` flat, gate order r, z, n) and
    ``gh`` (``W_hh·h + b_hh``, ``[B, 3H]``); ``h [B, H]`` in place. Branch-free hard gates as in
    ``_cells``."""
    B, H = h.shape
    hr, hz = np.float32(hard_r), np.float32(hard_z)
    one = np.float32(1.0)
    for b in range(B):
        p = base + b * 3 * H
        q = b * 3 * H
        xr, xz, xn = gx[p:p + H], gx[p + H:p + 2 * H], gx[p + 2 * H:p + 3 * H]
        yr, yz, yn = gh[q:q + H], gh[q + H:q + 2 * H], gh[q + 2 * H:q + 3 * H]
        hb = h[b]
        for u in range(H):
            ar = xr[u] + yr[u]
            az = xz[u] + yz[u]
            r = hr * np.float32(ar > 0) + (one - hr) * _sigmoid(ar)
            z = hz * np.float32(az > 0) + (one - hz) * _sigmoid(az)
            n = _tanh(xn[u] + r * yn[u])
            hb[u] = (one - z) * n + z * hb[u]


@njit(cache=True)
def gru_layer_fwd(loop, bw_ih, bw_hh, w_ih, nl_ih, s_ih, w_hh, nl_hh, s_hh, b_ih, b_hh, hard_r, hard_z, reverse,
                  x, h, out, col0):
    """One GRU layer-direction over ``x [T, B, In]`` (biases padded to whole blocks); updates ``h
    [B, H]`` in place and writes ``out[t, :, col0:col0 + H]``. ``loop``, ``bw_ih``, ``bw_hh`` must
    be literals."""
    T, B, H = x.shape[0], x.shape[1], h.shape[1]
    rows = 3 * H
    w1 = nl_ih * GROUP_K * (8 // bw_ih)
    w2 = nl_hh * GROUP_K * (8 // bw_hh)
    xq, sx, sumx = _quantize_rows(x.reshape(T * B, x.shape[2]), w1)
    gx = np.empty(T * B * rows, np.float32)
    _matmul1(loop, bw_ih, w_ih, nl_ih, s_ih, b_ih, np.int64(1), xq, w1, sx, sumx, gx, np.int64(0), rows, T * B, rows)
    hq, sh, sumh = _act_buffers(B, w2)
    gh = np.empty(B * rows, np.float32)
    for s in range(T):
        t = T - 1 - s if reverse else s
        _quantize_state(h, hq, sh, sumh, w2)
        _matmul1(loop, bw_hh, w_hh, nl_hh, s_hh, b_hh, np.int64(1), hq, w2, sh, sumh, gh, np.int64(0), rows, B, rows)
        _gru_cells(gx, t * B * rows, gh, hard_r, hard_z, h)
        _emit(out, t, h, col0)


@njit(cache=True)
def embed_fwd(w, nlines, bw, offset, mult, scale, tokens, out):
    """``out[n] = scale[t]·q[t, :]`` for ``t = tokens[n]``, read from the packed table."""
    for n in range(tokens.shape[0]):
        _embed_row(w, nlines, bw, offset, mult, scale, tokens[n], out[n])
