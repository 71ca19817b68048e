"""Numba kernels of the CPU programs (one per op family), on the packed layout of ``kernels``.

Every kernel takes the inner loop ``loop`` and the storage width(s) ``bw`` of its matrices as
compile-time literals: :func:`specialize` compiles (or loads from the on-disk cache) one entry
point per combination, so an artifact compiles only the widths and the loop it uses, and a call
costs no type dispatch (Numba's own literal dispatch costs milliseconds per call). A matrix is
passed as ``(data, nchunks, scale)`` of a ``kernels.KMatrix``.

- ``linear_fwd``: ``out[n] = Q(W)·A8(x[n]) (+ bias)`` for ``N`` vectors (batch 1: the 16-row
  panel kernel; more: tiles of 4 rows × groups of 4 vectors).
- ``lstm_layer_fwd``: one LSTM layer-direction over ``T`` steps. One step (streaming) runs
  ``W_ih·x + W_hh·h + bias`` as one parallel product; a sequence first computes the input
  projections of all ``T·B`` vectors as one product, then per step only ``W_hh·h``. Rows are
  unit-major (tile j = i_j, f_j, g_j, o_j), so the cell update reads one tile per unit.
- ``embed_fwd``: dequantized rows read straight from the packed table.
"""
from __future__ import annotations

import numpy as np
import numba
from numba import literally, njit, prange, types
from numba.core import errors
from numba.extending import overload

from .kernels_jit import _embed_row, _gate, _quantize_into, _tanh
from .kernels_vnni import (BATCH_VECS, CHUNK_BYTES, PANEL_ROWS, PANEL_TILES, TILE_ROWS, batch_u1, batch_u2,
                           batch_u4, batch_u8, panel_u1, panel_u2, panel_u4, panel_u8)

TILE_BYTES = TILE_ROWS * CHUNK_BYTES
_PANELS = {1: panel_u1, 2: panel_u2, 4: panel_u4, 8: panel_u8}
_BATCHES = {1: batch_u1, 2: batch_u2, 4: batch_u4, 8: batch_u8}


def _literal_int(v, what):
    if not isinstance(v, types.IntegerLiteral):
        raise errors.RequireLiteralValue(f"{what} must be a compile-time constant")
    return v.literal_value


def panel(bw, w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off, out, out_off, nvalid, flags,
          loop):
    """16 rows of ``bw``-bit codes × one int8 vector (``kernels_vnni.panel_u{bw}``)."""


def batch(bw, w, w_off, x, x_off, x_stride, nchunks, sumx, sumx_off, sx, sx_off, scale, scale_off, bias, bias_off,
          out, out_off, out_stride, nrows, nvec, flags, loop):
    """One tile of ``bw``-bit codes × 4 int8 vectors (``kernels_vnni.batch_u{bw}``)."""


@overload(panel, inline="always")
def _panel_ov(bw, w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off, out, out_off, nvalid,
              flags, loop):
    fn = _PANELS[_literal_int(bw, "bw")]

    def impl(bw, w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off, out, out_off, nvalid,
             flags, loop):
        fn(w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off, out, out_off, nvalid, flags, loop)
    return impl


@overload(batch, inline="always")
def _batch_ov(bw, w, w_off, x, x_off, x_stride, nchunks, sumx, sumx_off, sx, sx_off, scale, scale_off, bias,
              bias_off, out, out_off, out_stride, nrows, nvec, flags, loop):
    fn = _BATCHES[_literal_int(bw, "bw")]

    def impl(bw, w, w_off, x, x_off, x_stride, nchunks, sumx, sumx_off, sx, sx_off, scale, scale_off, bias,
             bias_off, out, out_off, out_stride, nrows, nvec, flags, loop):
        fn(w, w_off, x, x_off, x_stride, nchunks, sumx, sumx_off, sx, sx_off, scale, scale_off, bias, bias_off,
           out, out_off, out_stride, nrows, nvec, flags, loop)
    return impl


@njit(cache=True, inline="always")
def _panel_rows(loop, bw, pi, w, nchunks, scale, bias, flags, xq, width, sx, sumx, out, out_base, out_stride, nb,
                rows):
    """Panel ``pi`` (rows ``16·pi …``) of one matrix × ``nb`` quantized vectors (``xq``: groups of
    4 vectors of ``width`` bytes when ``nb > 1``) into ``out[out_base + v·out_stride + r]``."""
    row0 = pi * PANEL_ROWS
    w_off = PANEL_TILES * pi * nchunks * TILE_BYTES
    if nb == 1:
        panel(bw, w, w_off, xq, 0, nchunks, sumx[0], sx[0], scale, row0, bias, row0, out, out_base + row0,
              rows - row0, flags, loop)
        return
    for t in range(PANEL_TILES):
        row = row0 + t * TILE_ROWS
        if row >= rows:
            break
        for b0 in range(0, nb, BATCH_VECS):
            batch(bw, w, w_off + t * nchunks * TILE_BYTES, xq, b0 * width, width, nchunks, sumx, b0, sx, b0, scale,
                  row, bias, row, out, out_base + b0 * out_stride + row, out_stride, rows - row, nb - b0, flags, loop)


@njit(cache=True)
def _quantize_rows(x, width):
    """A8 of every row of ``x [N, K]``: ``(xq, sx, sumx)`` with rows ``width`` bytes apart, padded
    to a whole group of 4 vectors when ``N > 1`` (pad vectors are zero with scale 1)."""
    n = x.shape[0]
    nvec = 1 if n == 1 else -(-n // BATCH_VECS) * BATCH_VECS
    xq = np.zeros(nvec * width, np.int8)
    sx = np.ones(nvec, np.float32)
    sumx = np.zeros(nvec, np.int64)
    for b in range(n):
        sx[b], sumx[b] = _quantize_into(x[b], xq, b * width, width)
    return xq, sx, sumx


@njit(cache=True, parallel=True)
def _matmul1(loop, bw, w, nchunks, scale, bias, flags, xq, width, sx, sumx, out, out_base, out_stride, nb, rows):
    literally(loop)
    literally(bw)
    for pi in prange(-(-rows // PANEL_ROWS)):
        _panel_rows(loop, bw, pi, w, nchunks, scale, bias, flags, xq, width, sx, sumx, out, out_base, out_stride, nb,
                    rows)


@njit(cache=True, parallel=True)
def _matmul2(loop, bw1, w1, nch1, s1, xq1, width1, sx1, sumx1, bw2, w2, nch2, s2, xq2, width2, sx2, sumx2, bias, out,
             nb, rows):
    """``out = M1·A8(x1)`` then ``+= M2·A8(x2) + bias`` panel by panel in one parallel loop (the
    float order of the reference: ``(W_ih·x + W_hh·h) + bias``)."""
    literally(loop)
    literally(bw1)
    literally(bw2)
    for pi in prange(-(-rows // PANEL_ROWS)):
        _panel_rows(loop, bw1, pi, w1, nch1, s1, bias, 0, xq1, width1, sx1, sumx1, out, 0, rows, nb, rows)
        _panel_rows(loop, bw2, pi, w2, nch2, s2, bias, 3, xq2, width2, sx2, sumx2, out, 0, rows, nb, rows)


def _kpad(nchunks, bw):
    return nchunks * CHUNK_BYTES * (8 // bw)


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
def linear_fwd(loop, bw, w, nchunks, scale, bias, has_bias, x, out):
    """``out [N, R] = Q(W)·A8(x [N, K]) (+ bias)``; ``scale``/``bias`` padded to whole panels.
    ``loop`` and ``bw`` must be literals (:func:`specialize`)."""
    width = nchunks * CHUNK_BYTES * (8 // bw)
    xq, sx, sumx = _quantize_rows(x, width)
    _matmul1(loop, bw, w, nchunks, scale, bias, np.int64(1 if has_bias else 0), xq, width, sx, sumx, out.reshape(-1), 0,
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
def lstm_layer_fwd(loop, bw_ih, bw_hh, w_ih, nch_ih, s_ih, w_hh, nch_hh, s_hh, bias, hard_i, hard_f, hard_o, reverse,
                   x, h, c, out, col0):
    """One layer-direction over ``x [T, B, In]`` (unit-major packed ``W_ih`` / ``W_hh``, ``bias``
    in unit-major order padded to whole panels); updates ``h``, ``c`` ``[B, H]`` in place and
    writes ``out[t, :, col0:col0 + H]``. ``loop``, ``bw_ih``, ``bw_hh`` must be literals."""
    T, B, H = x.shape[0], x.shape[1], h.shape[1]
    rows = 4 * H
    w1 = nch_ih * CHUNK_BYTES * (8 // bw_ih)
    w2 = nch_hh * CHUNK_BYTES * (8 // bw_hh)
    if T == 1:
        xq, sx, sumx = _quantize_rows(x[0], w1)
        hq, sh, sumh = _quantize_rows(h, w2)
        a = np.empty((B, rows), np.float32)
        _matmul2(loop, bw_ih, w_ih, nch_ih, s_ih, xq, w1, sx, sumx, bw_hh, w_hh, nch_hh, s_hh, hq, w2, sh, sumh,
                 bias, a.reshape(-1), B, rows)
        _cells(a, hard_i, hard_f, hard_o, h, c)
        out[0, :, col0:col0 + H] = h
        return
    xs = x.reshape(T * B, x.shape[2])
    xq, sx, sumx = _quantize_rows(xs, w1)
    zx = np.empty((T * B, rows), np.float32)
    zflat = zx.reshape(-1)
    _matmul1(loop, bw_ih, w_ih, nch_ih, s_ih, bias, np.int64(0), xq, w1, sx, sumx, zflat, 0, rows, T * B, rows)
    for s in range(T):
        t = T - 1 - s if reverse else s
        hq, sh, sumh = _quantize_rows(h, w2)
        _matmul1(loop, bw_hh, w_hh, nch_hh, s_hh, bias, np.int64(3), hq, w2, sh, sumh, zflat, t * B * rows, rows, B,
                 rows)
        _cells(zx[t * B:(t + 1) * B], hard_i, hard_f, hard_o, h, c)
        out[t, :, col0:col0 + H] = h


@njit(cache=True)
def embed_fwd(w, nchunks, bw, offset, mult, scale, tokens, out):
    """``out[n] = scale[t]·q[t, :]`` for ``t = tokens[n]``, read from the packed table."""
    for n in range(tokens.shape[0]):
        _embed_row(w, 0, nchunks, bw, offset, mult, scale, tokens[n], out[n])
