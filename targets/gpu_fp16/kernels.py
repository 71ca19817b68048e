"""Triton kernels of the ``gpu-fp16`` target: low-bit weights dequantized inside the kernels,
fp16 activations into the dot products, fp32 accumulation, fp32 state.

Weight layout (``pack_words``): each row's unsigned codes ``u`` (storage width ``BW`` = 1, 2, 4, 8;
``q = MULT·u − OFFSET`` as in the CPU engine) packed ``32 // BW`` per int32 word, value ``k`` at bits
``[(k % VPW)·BW, …)`` of word ``k // VPW`` — so a kernel streams ``BW/16`` of the bytes of an fp16
weight and unpacks with a shift and a mask. One fp32 scale per row multiplies the integer dot.

- ``qlinear``: ``y [N, R] = (x [N, K] · q^T) · s + b``: a grid over row blocks × vector blocks,
  ``tl.dot`` on fp16 tiles (N padded to a block of 16 in the kernel, not in memory).
- ``lstm_step``: one LSTM layer-direction step fused: ``a = zx + (W_ih·x) + W_hh·h + b`` for the
  four gates of a block of units, the gates (sigmoid, or ``a > 0`` for hard gates) and the cell
  update, in one launch; ``zx`` comes from one ``qlinear`` over all time steps in ``run`` and is
  absent in streaming, where ``W_ih·x`` is fused instead.
- ``embed``: dequantized rows of the packed table.

Tested on CPU tensors with ``TRITON_INTERPRET=1`` (the interpreter runs the same kernels).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


def code_params(bw: int) -> tuple[int, int]:
    """``(offset, mult)``: ``q = mult·u − offset`` (binary bw 1: ±1; else ``u = q + 2^(bw−1)``)."""
    return (1, 2) if bw == 1 else (1 << (bw - 1), 1)


def pack_words(q: np.ndarray, bw: int) -> np.ndarray:
    """int8 codes ``q [R, K]`` -> int32 words ``[R, ceil(K / (32 // bw))]`` (see the module docstring)."""
    offset, mult = code_params(bw)
    R, K = q.shape
    vpw = 32 // bw
    kw = -(-K // vpw)
    u = np.zeros((R, kw * vpw), np.uint64)
    u[:, :K] = ((q.astype(np.int64) + offset) // mult).astype(np.uint64)
    u = u.reshape(R, kw, vpw) << (np.arange(vpw, dtype=np.uint64) * np.uint64(bw))
    return u.sum(axis=2).astype(np.uint32).view(np.int32)


def unpack_words(words: np.ndarray, K: int, bw: int) -> np.ndarray:
    """Inverse of ``pack_words``."""
    offset, mult = code_params(bw)
    vpw = 32 // bw
    w = words.view(np.uint32).astype(np.uint64)
    u = (w[:, :, None] >> (np.arange(vpw, dtype=np.uint64) * np.uint64(bw))) & np.uint64((1 << bw) - 1)
    return (mult * u.reshape(words.shape[0], -1)[:, :K].astype(np.int64) - offset).astype(np.int8)


@triton.jit
def _codes(w_ptr, rows, ks, R, K, KW, BW: tl.constexpr, OFFSET: tl.constexpr, MULT: tl.constexpr):
    """fp16 integer weights ``q [len(rows), len(ks)]`` (0 outside the matrix)."""
    VPW: tl.constexpr = 32 // BW
    m = (rows[:, None] < R) & (ks[None, :] < K)
    words = tl.load(w_ptr + rows[:, None] * KW + ks[None, :] // VPW, mask=m, other=0)
    u = (words >> ((ks[None, :] % VPW) * BW)) & ((1 << BW) - 1)
    q = u * MULT - OFFSET
    return tl.where(m, q, 0).to(tl.float16)


@triton.jit
def qlinear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, R, K, KW, stride_x, stride_y,
                   HAS_BIAS: tl.constexpr, BW: tl.constexpr, OFFSET: tl.constexpr, MULT: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        q = _codes(w_ptr, rows, ks, R, K, KW, BW, OFFSET, MULT)
        x = tl.load(x_ptr + ns[:, None] * stride_x + ks[None, :], mask=(ns[:, None] < N) & (ks[None, :] < K),
                    other=0.0).to(tl.float16)
        acc += tl.dot(x, tl.trans(q))
    rmask = rows < R
    y = acc * tl.load(s_ptr + rows, mask=rmask, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0)[None, :]
    tl.store(y_ptr + ns[:, None] * stride_y + rows[None, :], y, mask=(ns[:, None] < N) & rmask[None, :])


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _gate_dots(acc_i, acc_f, acc_g, acc_o, v_ptr, stride_v, bs, B, w_ptr, units, H, K, KW, BW: tl.constexpr,
               OFFSET: tl.constexpr, MULT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Add ``v · W[g·H + units]^T`` for the four gate blocks g of a ``[4H, K]`` matrix."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(v_ptr + bs[:, None] * stride_v + ks[None, :], mask=(bs[:, None] < B) & (ks[None, :] < K),
                    other=0.0).to(tl.float16)
        acc_i += tl.dot(v, tl.trans(_codes(w_ptr, units, ks, H, K, KW, BW, OFFSET, MULT)))
        acc_f += tl.dot(v, tl.trans(_codes(w_ptr + H * KW, units, ks, H, K, KW, BW, OFFSET, MULT)))
        acc_g += tl.dot(v, tl.trans(_codes(w_ptr + 2 * H * KW, units, ks, H, K, KW, BW, OFFSET, MULT)))
        acc_o += tl.dot(v, tl.trans(_codes(w_ptr + 3 * H * KW, units, ks, H, K, KW, BW, OFFSET, MULT)))
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _scaled(acc, s_ptr, b_ptr, zx_ptr, stride_zx, bs, B, units, H, g: tl.constexpr, HAS_ZX: tl.constexpr):
    um = units < H
    a = acc * tl.load(s_ptr + g * H + units, mask=um, other=0.0)[None, :] + \
        tl.load(b_ptr + g * H + units, mask=um, other=0.0)[None, :]
    if HAS_ZX:
        a += tl.load(zx_ptr + bs[:, None] * stride_zx + g * H + units[None, :],
                     mask=(bs[:, None] < B) & um[None, :], other=0.0)
    return a


@triton.jit
def lstm_step_kernel(zx_ptr, stride_zx, x_ptr, stride_x, K_IN, wi_ptr, KW_IN, si_ptr,
                     h_ptr, c_ptr, wh_ptr, KW_H, sh_ptr, b_ptr, h_out_ptr, c_out_ptr, out_ptr, stride_out,
                     B, H,
                     HAS_ZX: tl.constexpr, HAS_X: tl.constexpr, HARD_I: tl.constexpr, HARD_F: tl.constexpr,
                     HARD_O: tl.constexpr, BW_IN: tl.constexpr, OFF_IN: tl.constexpr, MULT_IN: tl.constexpr,
                     BW_H: tl.constexpr, OFF_H: tl.constexpr, MULT_H: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_h, pid_b = tl.program_id(0), tl.program_id(1)
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    hi, hf, hg, ho = _gate_dots(z, z, z, z, h_ptr, H, bs, B, wh_ptr, units, H, H, KW_H, BW_H, OFF_H, MULT_H, BLOCK_K)
    a_i = _scaled(hi, sh_ptr, b_ptr, zx_ptr, stride_zx, bs, B, units, H, 0, HAS_ZX)
    a_f = _scaled(hf, sh_ptr, b_ptr, zx_ptr, stride_zx, bs, B, units, H, 1, HAS_ZX)
    a_g = _scaled(hg, sh_ptr, b_ptr, zx_ptr, stride_zx, bs, B, units, H, 2, HAS_ZX)
    a_o = _scaled(ho, sh_ptr, b_ptr, zx_ptr, stride_zx, bs, B, units, H, 3, HAS_ZX)
    if HAS_X:                                   # streaming: W_ih·x fused into the same launch
        xi, xf, xg, xo = _gate_dots(z, z, z, z, x_ptr, stride_x, bs, B, wi_ptr, units, H, K_IN, KW_IN, BW_IN, OFF_IN,
                                    MULT_IN, BLOCK_K)
        um = units < H
        a_i += xi * tl.load(si_ptr + units, mask=um, other=0.0)[None, :]
        a_f += xf * tl.load(si_ptr + H + units, mask=um, other=0.0)[None, :]
        a_g += xg * tl.load(si_ptr + 2 * H + units, mask=um, other=0.0)[None, :]
        a_o += xo * tl.load(si_ptr + 3 * H + units, mask=um, other=0.0)[None, :]
    if HARD_I:
        gi = tl.where(a_i > 0, 1.0, 0.0)
    else:
        gi = tl.sigmoid(a_i)
    if HARD_F:
        gf = tl.where(a_f > 0, 1.0, 0.0)
    else:
        gf = tl.sigmoid(a_f)
    if HARD_O:
        go = tl.where(a_o > 0, 1.0, 0.0)
    else:
        go = tl.sigmoid(a_o)
    m = (bs[:, None] < B) & (units[None, :] < H)
    offs = bs[:, None] * H + units[None, :]
    c = tl.load(c_ptr + offs, mask=m, other=0.0)
    c_new = gf * c + gi * _tanh(a_g)
    h_new = go * _tanh(c_new)
    tl.store(c_out_ptr + offs, c_new, mask=m)
    tl.store(h_out_ptr + offs, h_new, mask=m)
    tl.store(out_ptr + bs[:, None] * stride_out + units[None, :], h_new, mask=m)


@triton.jit
def _gru_dots(acc_r, acc_z, acc_n, v_ptr, stride_v, bs, B, w_ptr, units, H, K, KW, BW: tl.constexpr,
              OFFSET: tl.constexpr, MULT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Add ``v · W[g·H + units]^T`` for the three gate blocks (r, z, n) of a ``[3H, K]`` matrix."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(v_ptr + bs[:, None] * stride_v + ks[None, :], mask=(bs[:, None] < B) & (ks[None, :] < K),
                    other=0.0).to(tl.float16)
        acc_r += tl.dot(v, tl.trans(_codes(w_ptr, units, ks, H, K, KW, BW, OFFSET, MULT)))
        acc_z += tl.dot(v, tl.trans(_codes(w_ptr + H * KW, units, ks, H, K, KW, BW, OFFSET, MULT)))
        acc_n += tl.dot(v, tl.trans(_codes(w_ptr + 2 * H * KW, units, ks, H, K, KW, BW, OFFSET, MULT)))
    return acc_r, acc_z, acc_n


@triton.jit
def _row(ptr, g: tl.constexpr, H, units):
    return tl.load(ptr + g * H + units, mask=units < H, other=0.0)[None, :]


@triton.jit
def gru_step_kernel(gx_ptr, stride_gx, x_ptr, stride_x, K_IN, wi_ptr, KW_IN, si_ptr, bi_ptr,
                    h_ptr, wh_ptr, KW_H, sh_ptr, bh_ptr, h_out_ptr, out_ptr, stride_out, B, H,
                    HAS_GX: tl.constexpr, HARD_R: tl.constexpr, HARD_Z: tl.constexpr,
                    BW_IN: tl.constexpr, OFF_IN: tl.constexpr, MULT_IN: tl.constexpr,
                    BW_H: tl.constexpr, OFF_H: tl.constexpr, MULT_H: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One GRU layer-direction step: ``gh = W_hh·h + b_hh`` (kept apart: r multiplies its n part),
    ``gx`` = precomputed ``W_ih·x + b_ih`` (``run``) or fused here (streaming)."""
    pid_h, pid_b = tl.program_id(0), tl.program_id(1)
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    z0 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    hr, hz, hn = _gru_dots(z0, z0, z0, h_ptr, H, bs, B, wh_ptr, units, H, H, KW_H, BW_H, OFF_H, MULT_H, BLOCK_K)
    hr = hr * _row(sh_ptr, 0, H, units) + _row(bh_ptr, 0, H, units)
    hz = hz * _row(sh_ptr, 1, H, units) + _row(bh_ptr, 1, H, units)
    hn = hn * _row(sh_ptr, 2, H, units) + _row(bh_ptr, 2, H, units)
    m = (bs[:, None] < B) & (units[None, :] < H)
    if HAS_GX:
        xr = tl.load(gx_ptr + bs[:, None] * stride_gx + units[None, :], mask=m, other=0.0)
        xz = tl.load(gx_ptr + bs[:, None] * stride_gx + H + units[None, :], mask=m, other=0.0)
        xn = tl.load(gx_ptr + bs[:, None] * stride_gx + 2 * H + units[None, :], mask=m, other=0.0)
    else:
        xr, xz, xn = _gru_dots(z0, z0, z0, x_ptr, stride_x, bs, B, wi_ptr, units, H, K_IN, KW_IN, BW_IN, OFF_IN,
                               MULT_IN, BLOCK_K)
        xr = xr * _row(si_ptr, 0, H, units) + _row(bi_ptr, 0, H, units)
        xz = xz * _row(si_ptr, 1, H, units) + _row(bi_ptr, 1, H, units)
        xn = xn * _row(si_ptr, 2, H, units) + _row(bi_ptr, 2, H, units)
    if HARD_R:
        r = tl.where(xr + hr > 0, 1.0, 0.0)
    else:
        r = tl.sigmoid(xr + hr)
    if HARD_Z:
        zg = tl.where(xz + hz > 0, 1.0, 0.0)
    else:
        zg = tl.sigmoid(xz + hz)
    n = _tanh(xn + r * hn)
    offs = bs[:, None] * H + units[None, :]
    h = tl.load(h_ptr + offs, mask=m, other=0.0)
    h_new = (1.0 - zg) * n + zg * h
    tl.store(h_out_ptr + offs, h_new, mask=m)
    tl.store(out_ptr + bs[:, None] * stride_out + units[None, :], h_new, mask=m)


@triton.jit
def embed_kernel(tok_ptr, w_ptr, s_ptr, out_ptr, N, V, E, KW, BW: tl.constexpr, OFFSET: tl.constexpr,
                 MULT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid_n, pid_e = tl.program_id(0), tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    es = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    tok = tl.load(tok_ptr + ns, mask=ns < N, other=0)
    q = _codes(w_ptr, tok, es, V, E, KW, BW, OFFSET, MULT).to(tl.float32)
    s = tl.load(s_ptr + tok, mask=ns < N, other=0.0)
    tl.store(out_ptr + ns[:, None] * E + es[None, :], q * s[:, None], mask=(ns[:, None] < N) & (es[None, :] < E))


# ----------------------------------------------------------------------------- launchers

BLOCK_N, BLOCK_R, BLOCK_K, BLOCK_H = 16, 32, 32, 16


class GMatrix:
    """A weight matrix on the device: int32 words, fp32 row scales, storage width and code params."""

    def __init__(self, words: torch.Tensor, scale: torch.Tensor, rows: int, cols: int, bw: int):
        self.words, self.scale, self.rows, self.cols, self.bw = words, scale, rows, cols, bw
        self.kw = words.shape[1]
        self.offset, self.mult = code_params(bw)


def qlinear(m: GMatrix, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, K] -> [N, R]`` float32."""
    x = x.contiguous()
    N = x.shape[0]
    y = torch.empty((N, m.rows), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m.rows, BLOCK_R), triton.cdiv(N, BLOCK_N))
    qlinear_kernel[grid](x, m.words, m.scale, bias if bias is not None else m.scale, y, N, m.rows, m.cols, m.kw,
                         x.stride(0), y.stride(0), HAS_BIAS=bias is not None, BW=m.bw, OFFSET=m.offset, MULT=m.mult,
                         BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return y


def lstm_step(w_ih: GMatrix, w_hh: GMatrix, bias: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
              h_out: torch.Tensor, c_out: torch.Tensor, out: torch.Tensor, hard: str, *, zx: torch.Tensor | None = None,
              x: torch.Tensor | None = None) -> None:
    """One step of one layer-direction: ``zx`` (precomputed ``W_ih·x``, ``[B, 4H]``) or ``x`` (fused)."""
    B, H = h.shape
    dummy = bias
    grid = (triton.cdiv(H, BLOCK_H), triton.cdiv(B, BLOCK_N))
    lstm_step_kernel[grid](
        zx if zx is not None else dummy, zx.stride(0) if zx is not None else 0,
        x if x is not None else dummy, x.stride(0) if x is not None else 0, w_ih.cols, w_ih.words, w_ih.kw, w_ih.scale,
        h, c, w_hh.words, w_hh.kw, w_hh.scale, bias, h_out, c_out, out, out.stride(0), B, H,
        HAS_ZX=zx is not None, HAS_X=x is not None, HARD_I="i" in hard, HARD_F="f" in hard, HARD_O="o" in hard,
        BW_IN=w_ih.bw, OFF_IN=w_ih.offset, MULT_IN=w_ih.mult, BW_H=w_hh.bw, OFF_H=w_hh.offset, MULT_H=w_hh.mult,
        BLOCK_B=BLOCK_N, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)


def gru_step(w_ih: GMatrix, w_hh: GMatrix, b_ih: torch.Tensor, b_hh: torch.Tensor, h: torch.Tensor,
             h_out: torch.Tensor, out: torch.Tensor, hard: str, *, gx: torch.Tensor | None = None,
             x: torch.Tensor | None = None) -> None:
    """One GRU step of one layer-direction: ``gx`` (``W_ih·x + b_ih``, ``[B, 3H]``) or ``x`` (fused)."""
    B, H = h.shape
    grid = (triton.cdiv(H, BLOCK_H), triton.cdiv(B, BLOCK_N))
    gru_step_kernel[grid](
        gx if gx is not None else b_ih, gx.stride(0) if gx is not None else 0,
        x if x is not None else b_ih, x.stride(0) if x is not None else 0, w_ih.cols, w_ih.words, w_ih.kw, w_ih.scale,
        b_ih, h, w_hh.words, w_hh.kw, w_hh.scale, b_hh, h_out, out, out.stride(0), B, H,
        HAS_GX=gx is not None, HARD_R="r" in hard, HARD_Z="z" in hard,
        BW_IN=w_ih.bw, OFF_IN=w_ih.offset, MULT_IN=w_ih.mult, BW_H=w_hh.bw, OFF_H=w_hh.offset, MULT_H=w_hh.mult,
        BLOCK_B=BLOCK_N, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)


def embed(m: GMatrix, tokens: torch.Tensor) -> torch.Tensor:
    N = tokens.numel()
    out = torch.empty((N, m.cols), dtype=torch.float32, device=tokens.device)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(m.cols, BLOCK_R))
    embed_kernel[grid](tokens.reshape(-1).contiguous(), m.words, m.scale, out, N, m.rows, m.cols, m.kw, BW=m.bw,
                       OFFSET=m.offset, MULT=m.mult, BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_R)
    return out
