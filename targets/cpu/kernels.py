"""Packed weights of the CPU engine: low-bit codes × dynamic int8 activations.

Numbers follow ``docs/cpu-engine.md`` exactly (integer sums are exact; only float rounding of
scales and nonlinearities may differ from ``reference.py``).

Packed layout (``KMatrix``)
---------------------------
Each weight ``q`` is stored as an unsigned code ``u`` of ``bw`` bits (the storage width):

====================  ====  ================  =========================
bits / scheme          bw    code              q from code
====================  ====  ================  =========================
1 (binary ±1)          1     u = (q + 1) / 2   q = 2u − 1   (mult 2, offset 1)
2 (int, ternary)       2     u = q + 2         q = u − 2
3–4                    4     u = q + 8         q = u − 8
5–8                    8     u = q + 128       q = u − 128
====================  ====  ================  =========================

Rows are grouped in *blocks* of 16 (R padded to a multiple of 16, pad rows have scale 0) and
columns in *k-groups* of 4; ``P = 8 // bw`` k-groups share one 64-byte *line*:

    data[block, line, 4·r + j]  bits [p·bw, (p+1)·bw)  =  u[16·block + r, 4·(P·line + p) + j]

for ``r < 16``, ``j < 4``, ``p < P``: a line is 16 rows × 4 consecutive k per plane, the operand
of one ``vpdpbusd`` (16 row sums at once, x broadcast). ``data`` is ``[block][line][64]``, so a
block streams contiguously; K is padded to a multiple of ``k_unit(bw)`` (16 for 8/4/2-bit, 32
for 1-bit) with the code of q = 0 (q = −1 for binary: activations are zero there, so pads add
0). ``unpack_u8`` inverts ``pack_u8`` in NumPy: the layout's reference.

Product: ``Σ_k q·x_q = mult·Σ_k u·x_q − offset·Σ_k x_q``; the first sum is the kernels' stream
(``kernels_vnni``), the second is computed once per activation vector.

Inner loops ("paths"): one per instruction set, ``isa.LOOPS`` (avx512-vnni, avx-vnni, avx2,
neon-dotprod, neon, portable, amx-int8), all on this layout and all exact. The default is the
best loop the CPU can execute (``isa.default_loop()``), unless the environment sets
``G2QUANT_KERNEL`` to another one (old names: ``vnni``, ``fallback``); ``set_path`` switches at
run time. The products run through ``program_kernels`` (what the engine's programs call);
``qmatmul`` here is the same kernel for one matrix, for tests and benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..qweights import QMatrix
from . import isa
from .kernels_vnni import BLOCK_ROWS, GROUP_K, LINE_BYTES, code_params, k_unit, max_cols, planes

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

BINARY_1BIT_MIN_COLS = 0


def storage_bits(bits: int, scheme: str, cols: int) -> int:
    """Storage width ``bw`` in the kernel layout: 2 (2-bit, ternary), 4 (3–4), 8 (5–8 bits), and
    for binary 1, or 2 when rows are shorter than ``BINARY_1BIT_MIN_COLS`` (0: the 1-bit lines
    cost the same instructions per product as 2-bit ones and stream half the bytes)."""
    if scheme == "binary":
        return 1 if cols >= BINARY_1BIT_MIN_COLS else 2
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def fits(bits: int, scheme: str, cols: int) -> bool:
    """True when the kernels take a ``cols``-column matrix of this kind (sub-byte widths are
    limited to ``kernels_vnni.MAX_COLS_SUBBYTE`` columns, so that no accumulator wraps)."""
    if scheme == "float":
        return False
    limit = max_cols(storage_bits(bits, scheme, cols))
    return limit is None or cols <= limit


def _aligned_empty(nbytes: int, align: int = 64) -> np.ndarray:
    """Uninitialized uint8 array whose data starts on an ``align``-byte boundary."""
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


def padded_cols(cols: int, bw: int) -> int:
    """K after padding: a positive multiple of ``k_unit(bw)``."""
    unit = k_unit(bw)
    return max(1, -(-cols // unit)) * unit


def pack_u8(q: np.ndarray, bw: int, offset: int, mult: int) -> tuple[np.ndarray, int]:
    """Pack int8 ``q [R, K]`` into the block layout; returns ``(data uint8, nlines per block)``."""
    rows, cols = q.shape
    P = planes(bw)
    rpad, kpad = -(-max(rows, 1) // BLOCK_ROWS) * BLOCK_ROWS, padded_cols(cols, bw)
    u = np.full((rpad, kpad), offset // mult, np.uint8)           # the code of q = 0 (pad)
    u[:rows, :cols] = (q.astype(np.int16) + offset) // mult
    nlines = kpad // (GROUP_K * P)
    # [block, r, line, p, j] -> [block, line, r, j] with plane p in bits p·bw
    u = u.reshape(rpad // BLOCK_ROWS, BLOCK_ROWS, nlines, P, GROUP_K)
    lines = np.zeros((rpad // BLOCK_ROWS, nlines, BLOCK_ROWS, GROUP_K), np.uint8)
    for p in range(P):
        lines |= u[:, :, :, p, :].transpose(0, 2, 1, 3) << (p * bw)
    data = _aligned_empty(lines.size)
    data[:] = lines.ravel()
    return data, nlines


def unpack_u8(data: np.ndarray, rows: int, cols: int, bw: int, offset: int, mult: int,
              nlines: int) -> np.ndarray:
    """Inverse of ``pack_u8``: the int8 matrix ``q [rows, cols]``."""
    P = planes(bw)
    lines = data.reshape(-1, nlines, BLOCK_ROWS, GROUP_K)
    u = np.stack([(lines >> (p * bw)) & ((1 << bw) - 1) for p in range(P)], axis=3)   # [blk, line, r, p, j]
    u = u.transpose(0, 2, 1, 3, 4).reshape(lines.shape[0] * BLOCK_ROWS, nlines * P * GROUP_K)
    q = mult * u.astype(np.int16) - offset
    return q[:rows, :cols].astype(np.int8)


@dataclass(eq=False)
class KMatrix:
    """A weight matrix in the kernel layout (see the module docstring).

    ``data``/``nlines``/``bw``/``offset``/``mult`` describe the packed codes, ``scale`` is the
    per-row float32 scale padded with zeros to whole blocks. A ``scheme="float"`` matrix keeps
    its float32 weight in ``dense`` and no packed data.
    """

    rows: int
    cols: int
    bits: int
    scheme: str
    bw: int
    offset: int
    mult: int
    nlines: int
    data: np.ndarray
    scale: np.ndarray

    @property
    def kpad(self) -> int:
        return self.nlines * GROUP_K * planes(self.bw)

    @property
    def nblocks(self) -> int:
        return self.scale.size // BLOCK_ROWS

    def unpack(self) -> np.ndarray:
        """The int8 weight codes ``q [rows, cols]`` (NumPy, for checks and the float path)."""
        return unpack_u8(self.data, self.rows, self.cols, self.bw, self.offset, self.mult, self.nlines)

    @cached_property
    def dense(self) -> np.ndarray:
        """Dequantized float32 weight ``scale·q`` (built on first use; not the fast path)."""
        s = self.scale[:self.rows, None].astype(np.float32)
        return (s * self.unpack().astype(np.float32)).astype(np.float32)


def padded(v: np.ndarray, rows: int) -> np.ndarray:
    """``v`` as float32 padded with zeros to whole blocks of ``rows`` (scales, biases)."""
    out = np.zeros(-(-max(rows, 1) // BLOCK_ROWS) * BLOCK_ROWS, np.float32)
    out[:v.size] = v
    return out


def prepare(m: QMatrix) -> KMatrix:
    """Pack a ``QMatrix`` once, at load time (ValueError where ``fits`` says the kernels cannot
    take it)."""
    rows, cols = m.shape
    if m.scheme == "float":
        km = KMatrix(rows, cols, m.bits, m.scheme, 32, 0, 1, 0, np.zeros(0, np.uint8),
                     np.ones(rows, np.float32))
        km.dense = np.ascontiguousarray(m.q, np.float32)
        return km
    if not fits(m.bits, m.scheme, cols):
        raise ValueError(f"{cols} columns exceed the kernels' limit for {m.bits}-bit {m.scheme} matrices")
    bw = storage_bits(m.bits, m.scheme, cols)
    offset, mult = code_params(bw)
    data, nlines = pack_u8(m.q, bw, offset, mult)
    return KMatrix(rows, cols, m.bits, m.scheme, bw, offset, mult, nlines, data, padded(m.scale, rows))


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
    from . import program_kernels as pk
    lits = (isa.loop_id(_path), km.bw)
    args = (km.data, km.nlines, km.scale, km.scale, False, x, out)
    pk.specialize(pk.linear_fwd, lits, args)(*lits, *args)
    return out
