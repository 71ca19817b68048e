"""Numba kernels of the CPU engine: packed low-bit weights × dynamic int8 activations.

Numbers follow ``docs/cpu-engine.md`` exactly (integer sums are exact; only float rounding of
scales and nonlinearities may differ from ``reference.py``).

Packed layout (``KMatrix``)
---------------------------
Each weight ``q`` is stored as an unsigned code ``u`` of ``bw`` bits (the storage width):

====================  ====  ================  =========================
bits / scheme          bw    code              q from code
====================  ====  ================  =========================
1 (binary ±1)          1     u = (q + 1) / 2   q = 2u − 1   (mult 2, offset 1)
2 (int, ternary)       2     u = q + 2         q = u − 2    (also binary, K < 1024)
3–4                    4     u = q + 8         q = u − 8
5–8                    8     u = q + 128       q = u − 128
====================  ====  ================  =========================

Rows are grouped in tiles of 4 (R padded to a multiple of 16 = one *panel* of 4 tiles; pad rows
have scale 0) and K is padded to a multiple of ``k_block(bw)`` (128, 128, 256, 512 for bw 8, 4,
2, 1) with the code of q = 0 (q = −1 for binary); activations are zero there, so pads add 0.
A row is cut into 64-byte *chunks*; byte ``t`` of chunk ``c`` holds ``P = 8 // bw`` codes, code
``p`` (bits ``[p·bw, (p+1)·bw)``) for column ``k = c·64·P + p·64 + t`` ("block-planar": a shift
and a mask give 64 consecutive columns). ``data`` is ``[tile, chunk, row-in-tile, 64]`` so a
tile streams contiguously. ``unpack_u8`` inverts ``pack_u8`` in NumPy.

Product: ``Σ_k q·x_q = mult·Σ_k u·x_q − offset·Σ_k x_q``; the first sum is one ``vpdpbusd``
stream (``kernels_vnni``), the second is computed once per activation vector.

Kernels
-------
Every product goes through ``_matmul`` (one ``prange`` over panels): batch 1 uses the ``panel``
kernel (16 rows × 1 vector, scale/bias epilogue in vector IR, masked store), B > 1 the ``batch``
kernel (4 rows × 4 vectors, so each unpacked weight register feeds 4 products). ``lm_step`` is
one Numba call: embedding row read from the packed table, then per layer one ``_matmul`` for
``W_ih·A8(x) + W_hh·A8(h) + bias`` into a pre-activation buffer whose rows are unit-major
(tile j = i_j, f_j, g_j, o_j), then a vectorized cell update (polynomial exp, no libm calls),
then the decoder. Hard gates are exact ``1[a > 0]``, and a closed ``o`` gives ``h = 0``; the ``g``
rows are still computed where ``i = 0``: at hidden ≥ 650 the step is bound by streaming weight
bytes, and skipping ``g`` rows only saves bytes with a separate, gathered ``g`` layout (≤ 1/8 of
the layer bytes at a 50 % closed input gate) — not worth a second pass in this version.

Inner loops ("paths"): one per instruction set, ``isa.LOOPS`` = avx512-vnni, avx-vnni, avx2,
neon-dotprod, neon, portable, all on the same layout and all exact. The default is the best loop
the CPU can execute (``isa.default_loop()``), unless the environment sets ``G2QUANT_KERNEL`` to
another one (old names: ``vnni``, ``fallback``); ``set_path`` switches at run time. Each loop has
its own Numba entry points (``kernels_jit.QMATMUL`` / ``LM_STEP``), compiled on first use and
cached (``cache=True``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..qweights import QMatrix, QuantLMWeights
from . import isa, kernels_jit
from .kernels_vnni import BATCH_VECS, CHUNK_BYTES, PANEL_ROWS, TILE_ROWS, code_params, k_block

PATHS = isa.LOOPS

_path = isa.default_loop()


def set_path(path: str) -> None:
    """Select the inner loop by name (``isa.LOOPS``, or the old ``"vnni"`` / ``"fallback"``);
    ValueError for an unknown name, RuntimeError for a loop this CPU cannot execute."""
    global _path
    _path = isa.check_host(path)


def get_path() -> str:
    """The active inner loop (a name in ``isa.LOOPS``)."""
    return _path


def cpu_features() -> dict:
    """``isa.describe()`` for the active loop (machine, CPU name, features, the loops this CPU can
    run, ``loop``), plus ``path`` (= ``loop``) and the old x86 flag keys."""
    out = isa.describe(_path)
    feats = out["features"]
    for key, name in (("avx2", "avx2"), ("avx512f", "avx512f"), ("avx512bw", "avx512bw"),
                      ("avx512_vnni", "avx512vnni"), ("avx_vnni", "avxvnni")):
        out[key] = bool(feats.get(name, False))
    out["path"] = _path
    return out


# ----------------------------------------------------------------------------- packing (NumPy)

BINARY_1BIT_MIN_COLS = 1024


def storage_bits(bits: int, scheme: str, cols: int) -> int:
    """Storage width ``bw`` in the kernel layout: 2 (2-bit, ternary), 4 (3–4), 8 (5–8 bits), and
    for binary 1, or 2 when rows are shorter than ``BINARY_1BIT_MIN_COLS``: the 1-bit route
    unpacks 8 planes per byte and pads K to 512, which costs more than the extra bytes there
    (``benchmarks/kernels.py``, µs/token 1-bit vs 2-bit: hidden 200 62 vs 38, 650 179 vs 157,
    1500 397 vs 515)."""
    if scheme == "binary":
        return 1 if cols >= BINARY_1BIT_MIN_COLS else 2
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def _aligned_empty(nbytes: int, align: int = 64) -> np.ndarray:
    """Uninitialized uint8 array whose data starts on an ``align``-byte boundary."""
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


def pack_u8(q: np.ndarray, bw: int, offset: int, mult: int) -> tuple[np.ndarray, int]:
    """Pack int8 ``q [R, K]`` into the tile layout; returns ``(data uint8, nchunks per row)``."""
    rows, cols = q.shape
    planes, kb = 8 // bw, k_block(bw)
    rpad, kpad = -(-rows // PANEL_ROWS) * PANEL_ROWS, max(1, -(-cols // kb)) * kb
    u = np.full((rpad, kpad), offset // mult, np.uint8)           # the code of q = 0 (pad)
    u[:rows, :cols] = (q.astype(np.int16) + offset) // mult
    u = u.reshape(rpad, kpad // (CHUNK_BYTES * planes), planes, CHUNK_BYTES)
    chunks = np.zeros(u[:, :, 0].shape, np.uint8)
    for p in range(planes):
        chunks |= u[:, :, p] << (p * bw)
    nchunks = chunks.shape[1]
    tiled = chunks.reshape(rpad // TILE_ROWS, TILE_ROWS, nchunks, CHUNK_BYTES).transpose(0, 2, 1, 3)
    data = _aligned_empty(tiled.size)
    data[:] = tiled.ravel()
    return data, nchunks


def unpack_u8(data: np.ndarray, rows: int, cols: int, bw: int, offset: int, mult: int,
              nchunks: int) -> np.ndarray:
    """Inverse of ``pack_u8``: the int8 matrix ``q [rows, cols]``."""
    planes = 8 // bw
    tiled = data.reshape(-1, nchunks, TILE_ROWS, CHUNK_BYTES).transpose(0, 2, 1, 3)
    chunks = tiled.reshape(-1, nchunks, CHUNK_BYTES)
    u = np.stack([(chunks >> (p * bw)) & ((1 << bw) - 1) for p in range(planes)], axis=2)
    q = mult * u.reshape(chunks.shape[0], -1).astype(np.int16) - offset
    return q[:rows, :cols].astype(np.int8)


@dataclass(eq=False)
class KMatrix:
    """A weight matrix in the kernel layout (see the module docstring).

    ``data``/``nchunks``/``bw``/``offset``/``mult`` describe the packed codes, ``scale`` is the
    per-row float32 scale padded with zeros to whole panels. A ``scheme="float"`` matrix keeps
    its float32 weight in ``dense`` and no packed data.
    """

    rows: int
    cols: int
    bits: int
    scheme: str
    bw: int
    offset: int
    mult: int
    nchunks: int
    data: np.ndarray
    scale: np.ndarray

    @cached_property
    def table(self) -> np.ndarray:
        """This matrix alone as a kernel matrix table ``[[w_off, nchunks, bw, offset, mult, scale_off]]``."""
        return np.array([[0, self.nchunks, self.bw, self.offset, self.mult, 0]], np.int64)

    @property
    def kpad(self) -> int:
        return self.nchunks * CHUNK_BYTES * (8 // self.bw)

    def unpack(self) -> np.ndarray:
        """The int8 weight codes ``q [rows, cols]`` (NumPy, for checks and the float path)."""
        return unpack_u8(self.data, self.rows, self.cols, self.bw, self.offset, self.mult, self.nchunks)

    @cached_property
    def dense(self) -> np.ndarray:
        """Dequantized float32 weight ``scale·q`` (built on first use; not the fast path)."""
        s = self.scale[:self.rows, None].astype(np.float32)
        return (s * self.unpack().astype(np.float32)).astype(np.float32)


def prepare(m: QMatrix) -> KMatrix:
    """Pack a ``QMatrix`` once, at load time."""
    rows, cols = m.shape
    if m.scheme == "float":
        km = KMatrix(rows, cols, m.bits, m.scheme, 32, 0, 1, 0, np.zeros(0, np.uint8),
                     np.ones(rows, np.float32))
        km.dense = np.ascontiguousarray(m.q, np.float32)
        return km
    bw = storage_bits(m.bits, m.scheme, cols)
    offset, mult = code_params(bw)
    data, nchunks = pack_u8(m.q, bw, offset, mult)
    scale = np.zeros(-(-rows // PANEL_ROWS) * PANEL_ROWS, np.float32)
    scale[:rows] = m.scale
    return KMatrix(rows, cols, m.bits, m.scheme, bw, offset, mult, nchunks, data, scale)


# ----------------------------------------------------------------------------- products

def qmatmul(km: KMatrix, x: np.ndarray, act_bits: int | None = 8, out: np.ndarray | None = None) -> np.ndarray:
    """``y [B, R] = Q(W) · A8(x)`` for ``x [B, K]`` (= ``reference.qmatmul_ref``).

    ``act_bits=None``: float product with the dequantized weight; a float matrix: the float weight
    times the dequantized A8 activations (slow path, NumPy).
    """
    x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    if x.shape[1] != km.cols:
        raise ValueError(f"x has {x.shape[1]} columns, the matrix {km.cols}")
    if km.scheme == "float" or act_bits is None:
        if act_bits is not None:            # A8 activations times a float weight, as the torch model computes
            from ..reference import quantize_act
            xq, sx = quantize_act(x)
            x = xq.astype(np.float32) * sx[:, None]
        y = x @ km.dense.T
        if out is None:
            return y
        out[...] = y
        return out
    if act_bits != 8:
        raise ValueError(f"act_bits must be 8 or None, got {act_bits}")
    if out is None:
        out = np.empty((x.shape[0], km.rows), np.float32)
    elif out.shape != (x.shape[0], km.rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(x.shape[0], km.rows)}")
    kernels_jit.QMATMUL[_path](km.data, km.scale, km.table, x, out)
    return out


# ----------------------------------------------------------------------------- LSTM LM step

def _gate_major_perm(hidden: int) -> np.ndarray:
    """Row order ``[i_0, f_0, g_0, o_0, i_1, …]`` of a ``[4H, K]`` gate matrix (torch order i, f, g, o)."""
    return (np.arange(hidden)[:, None] + hidden * np.arange(4)[None, :]).ravel()


def _gate_major(m: QMatrix, hidden: int) -> QMatrix:
    """Reorder rows from (i-block, f-block, g-block, o-block) to one tile per hidden unit:
    rows ``4j..4j+3`` = (i_j, f_j, g_j, o_j), so one tile yields everything unit j needs."""
    perm = _gate_major_perm(hidden)
    return QMatrix(m.q[perm], m.scale[perm], m.bits, m.scheme)


class KModel:
    """A prepared LSTM LM: every matrix packed into one 64-byte aligned arena ``wbuf``, scales and
    biases in ``fbuf``, a matrix table ``mats`` and per-batch-size scratch buffers.

    The fast path (all matrices integer-quantized and ``act_bits == 8``) runs a whole step in one
    Numba call. Otherwise (a float matrix, or ``act_bits=None``) ``lm_step`` falls back to a
    NumPy loop over ``qmatmul`` with the same numbers as the reference.
    """

    def __init__(self, w: QuantLMWeights):
        self.vocab_size, self.hidden_size, self.num_layers = w.vocab_size, w.hidden_size, w.num_layers
        self.emb_dim = w.embedding.shape[1]
        self.act_bits = w.act_bits
        self.hard_gates = tuple(w.hard_gates)
        self.hard = np.array([g in w.hard_gates for g in ("i", "f", "o")], np.bool_)
        dec = w.embedding if w.decoder is None else w.decoder
        mats = [w.embedding, dec] + [m for layer in w.layers for m in (layer.w_ih, layer.w_hh)]
        self.fast = w.act_bits == 8 and all(m.scheme != "float" for m in mats)
        self._scratch: dict[int, tuple] = {}
        if not self.fast:
            self.embedding, self.decoder = prepare(w.embedding), prepare(dec)
            self.layers = [(prepare(layer.w_ih), prepare(layer.w_hh), layer.bias) for layer in w.layers]
            self.decoder_bias = w.decoder_bias
            return
        hidden = self.hidden_size
        kms = [prepare(w.embedding)]
        kms.append(kms[0] if w.decoder is None else prepare(w.decoder))
        kms += [prepare(_gate_major(m, hidden)) for layer in w.layers for m in (layer.w_ih, layer.w_hh)]
        biases = [layer.bias[_gate_major_perm(hidden)] for layer in w.layers] + [w.decoder_bias]
        unique = list({id(k): k for k in kms}.values())
        w_offs, f_offs, nbytes, nfloats = {}, {}, 0, 0
        for k in unique:
            w_offs[id(k)], f_offs[id(k)] = nbytes, nfloats
            nbytes, nfloats = nbytes + k.data.size, nfloats + k.scale.size
        self.bias_off = np.zeros(len(biases), np.int64)
        for i, bvec in enumerate(biases):
            self.bias_off[i], nfloats = nfloats, nfloats + bvec.size
        self.wbuf = _aligned_empty(max(nbytes, 1))
        self.fbuf = np.empty(nfloats, np.float32)
        for k in unique:
            o, f = w_offs[id(k)], f_offs[id(k)]
            self.wbuf[o:o + k.data.size] = k.data
            k.data = self.wbuf[o:o + k.data.size]            # the arena is the only copy
            self.fbuf[f:f + k.scale.size] = k.scale
        for i, bvec in enumerate(biases):
            self.fbuf[self.bias_off[i]:self.bias_off[i] + bvec.size] = bvec
        self.mats = np.array([[w_offs[id(k)], k.nchunks, k.bw, k.offset, k.mult, f_offs[id(k)]] for k in kms],
                             np.int64)
        self.kmatrices = kms
        self.width = max(k.kpad for k in kms)

    def scratch(self, batch: int) -> tuple:
        """Buffers for one batch size, allocated once: (xf, xq, hq, sx, sumx, sh, sumh, a, logits)."""
        bufs = self._scratch.get(batch)
        if bufs is None:
            nvec = 1 if batch == 1 else -(-batch // BATCH_VECS) * BATCH_VECS    # whole groups of 4
            bufs = (np.zeros((batch, self.emb_dim), np.float32), np.zeros(nvec * self.width, np.int8),
                    np.zeros(nvec * self.width, np.int8), np.ones(nvec, np.float32), np.zeros(nvec, np.int64),
                    np.ones(nvec, np.float32), np.zeros(nvec, np.int64),
                    np.zeros((batch, 4 * self.hidden_size), np.float32),
                    np.zeros((batch, self.vocab_size), np.float32))
            self._scratch[batch] = bufs
        return bufs


def prepare_lm(w: QuantLMWeights) -> KModel:
    """Pack a whole LM once, at load time."""
    return KModel(w)


def lm_step(km: KModel, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> np.ndarray:
    """One time step for token ids ``[B]``; updates ``h``, ``c`` (float32 ``[L, B, H]``,
    C-contiguous) in place and returns the logits ``[B, V]``.

    On the fast path the logits array is a buffer owned by ``km`` and overwritten by the next
    call with the same batch size: copy it if you keep it.
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    nb = tokens.shape[0]
    shape = (km.num_layers, nb, km.hidden_size)
    for name, s in (("h", h), ("c", c)):
        if s.shape != shape or s.dtype != np.float32 or not s.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous float32 array of shape {shape}")
    if not km.fast:
        return _lm_step_generic(km, tokens, h, c)
    bufs = km.scratch(nb)
    kernels_jit.LM_STEP[_path](km.wbuf, km.fbuf, km.mats, km.bias_off, km.hard, tokens, h, c, *bufs)
    return bufs[-1]


def _lm_step_generic(km: KModel, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> np.ndarray:
    """NumPy loop over ``qmatmul`` for models with float matrices or float activations."""
    if tokens.size and (tokens.min() < 0 or tokens.max() >= km.vocab_size):
        raise ValueError("token id out of range")
    x = km.embedding.dense[tokens]
    for l, (w_ih, w_hh, bias) in enumerate(km.layers):
        a = qmatmul(w_ih, x, km.act_bits) + qmatmul(w_hh, h[l], km.act_bits) + bias
        i, f, g, o = np.split(a, 4, axis=-1)
        i, f, o = ((z > 0).astype(np.float32) if name in km.hard_gates else 1 / (1 + np.exp(-z))
                   for z, name in ((i, "i"), (f, "f"), (o, "o")))
        c[l] = f * c[l] + i * np.tanh(g)
        h[l] = o * np.tanh(c[l])
        x = h[l]
    return qmatmul(km.decoder, x, km.act_bits) + km.decoder_bias
