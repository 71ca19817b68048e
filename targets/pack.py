"""Bit packing of small signed integer matrices: exact, symmetric ``pack_*`` / ``unpack_*`` pairs.

Every packer takes an ``np.int8`` matrix ``q`` of shape ``[R, K]`` and returns an unsigned
matrix ``[R, W]`` of words (``uint8`` by default, or ``uint32`` / ``uint64`` with
``word=``). Every unpacker takes that matrix and the logical ``shape=(R, K)`` and returns
the identical ``int8`` matrix.

Stored codes (unsigned, ``b`` bits each):

==========  ==============  =========================  ==========================
packer      bits per value  accepted values            stored code ``u``
==========  ==============  =========================  ==========================
1bit        1               {-1, +1}                   ``1`` if ``q > 0`` else ``0``
2bit        2               [-2, 1]                    ``q + 2``
ternary     2               {-1, 0, +1}                ``q + 2`` (same as 2bit)
4bit        4               [-8, 7]                    ``q + 8``
8bit        8               [-128, 127]                ``q + 128``
==========  ==============  =========================  ==========================

The narrow ranges used by g2quant weights (``±(2^(b-1)-1)``) are subsets of these.

Layout (the same for every width and word type): row ``r`` is packed independently.
Value ``k`` of a row goes to bits ``[j*b, (j+1)*b)`` of byte ``k // (8/b)`` of that row,
where ``j = k % (8/b)`` -- i.e. least significant bits first. Words wider than a byte are
the row's bytes read **little-endian** (byte 0 is the least significant byte of word 0),
so value ``k`` sits at bit ``(k % (Wb/b)) * b`` of word ``k // (Wb/b)`` for a ``Wb``-bit
word, on any host. Each row is padded with zero bits up to a whole number of words:
``W = ceil(K * b / Wb)``; unpack ignores the padding (a zero code would decode to
``-2^(b-1)``, which is why the logical ``K`` must be passed back in).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "pack_1bit", "unpack_1bit", "pack_2bit", "unpack_2bit", "pack_4bit", "unpack_4bit",
    "pack_8bit", "unpack_8bit", "pack_ternary", "unpack_ternary", "packed_shape",
    "pack_bits", "unpack_bits",
]

_WORDS = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def _word_bits(word) -> int:
    """Accept ``np.uint8/uint32/uint64`` (dtype-like) or a bit count 8/32/64."""
    if isinstance(word, (int, np.integer)) and not isinstance(word, bool):
        bits = int(word)
    else:
        try:
            dt = np.dtype(word)
        except TypeError as exc:
            raise ValueError(f"word must be np.uint8, np.uint16, np.uint32 or np.uint64, got {word!r}") from exc
        if dt.kind != "u":
            raise ValueError(f"word must be an unsigned integer dtype, got {dt}")
        bits = dt.itemsize * 8
    if bits not in _WORDS:
        raise ValueError(f"word must be 8, 16, 32 or 64 bits, got {bits}")
    return bits


def packed_shape(shape: tuple[int, int], bits: int, word=np.uint8) -> tuple[int, int]:
    """Shape ``[R, W]`` of the packed matrix for a logical ``[R, K]`` matrix."""
    r, k = (int(s) for s in shape)
    wb = _word_bits(word)
    return r, -(-k * bits // wb)


def _check_q(q, lo: int, hi: int, what: str) -> np.ndarray:
    if not isinstance(q, np.ndarray):
        raise ValueError(f"{what}: expected a numpy int8 array, got {type(q).__name__}")
    if q.dtype != np.int8:
        raise ValueError(f"{what}: expected dtype int8, got {q.dtype}")
    if q.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D matrix [R, K], got shape {q.shape}")
    if q.size:
        mn, mx = int(q.min()), int(q.max())
        if mn < lo or mx > hi:
            bad = mn if mn < lo else mx
            raise ValueError(f"{what}: value {bad} is out of range [{lo}, {hi}]")
    return q


def _pack_codes(u: np.ndarray, bits: int, word) -> np.ndarray:
    """Pack unsigned codes ``u`` (uint8 ``[R, K]``, each < 2^bits) into ``[R, W]`` words."""
    wb = _word_bits(word)
    r, k = u.shape
    _, nwords = packed_shape((r, k), bits, wb)
    nbytes = nwords * (wb // 8)
    per = 8 // bits                                   # values per byte
    padded = np.zeros((r, nbytes * per), dtype=np.uint8)
    padded[:, :k] = u
    if bits == 8:
        out8 = padded
    else:
        groups = padded.reshape(r, nbytes, per)
        out8 = np.zeros((r, nbytes), dtype=np.uint8)
        for j in range(per):
            out8 |= (groups[:, :, j] << np.uint8(j * bits)).astype(np.uint8)
    if wb == 8:
        return np.ascontiguousarray(out8)
    le = np.dtype(_WORDS[wb]).newbyteorder("<")
    return np.ascontiguousarray(out8).view(le).reshape(r, nwords).astype(_WORDS[wb])


def _unpack_codes(packed, shape, bits: int, what: str) -> np.ndarray:
    """Inverse of ``_pack_codes``: uint8 codes ``[R, K]``."""
    if not isinstance(packed, np.ndarray):
        raise ValueError(f"{what}: expected a numpy array, got {type(packed).__name__}")
    if packed.dtype.kind != "u" or packed.dtype.itemsize * 8 not in _WORDS:
        raise ValueError(f"{what}: packed data must be uint8/uint16/uint32/uint64, got {packed.dtype}")
    try:
        r, k = (int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: shape must be (R, K), got {shape!r}") from exc
    if r < 0 or k < 0:
        raise ValueError(f"{what}: shape must be non-negative, got {(r, k)}")
    wb = packed.dtype.itemsize * 8
    expected = packed_shape((r, k), bits, wb)
    if packed.shape != expected:
        raise ValueError(f"{what}: packed shape {packed.shape} does not match logical shape {(r, k)} "
                         f"({bits}-bit in {wb}-bit words needs {expected})")
    le = packed.dtype.newbyteorder("<")
    nbytes = expected[1] * (wb // 8)
    b8 = np.ascontiguousarray(packed.astype(le, copy=False)).view(np.uint8).reshape(r, nbytes)
    if bits == 8:
        return b8[:, :k]
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    codes = (b8[:, :, None] >> shifts[None, None, :]) & mask
    return codes.reshape(r, nbytes * per)[:, :k]


def _make_pair(bits: int, lo: int, hi: int, name: str):
    offset = 1 << (bits - 1)

    def pack(q: np.ndarray, *, word=np.uint8) -> np.ndarray:
        q = _check_q(q, lo, hi, f"pack_{name}")
        u = (q.astype(np.int16) + offset).astype(np.uint8)
        return _pack_codes(u, bits, word)

    def unpack(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        u = _unpack_codes(packed, shape, bits, f"unpack_{name}")
        return (u.astype(np.int16) - offset).astype(np.int8)

    pack.__name__, unpack.__name__ = f"pack_{name}", f"unpack_{name}"
    pack.__doc__ = (f"Pack int8 ``[R, K]`` with values in [{lo}, {hi}] as {bits}-bit codes ``q + {offset}`` "
                    f"into ``[R, ceil(K*{bits}/word_bits)]`` words (see the module docstring).")
    unpack.__doc__ = f"Inverse of ``pack_{name}``: the int8 ``[R, K]`` matrix for ``shape=(R, K)``."
    return pack, unpack


pack_2bit, unpack_2bit = _make_pair(2, -2, 1, "2bit")
pack_4bit, unpack_4bit = _make_pair(4, -8, 7, "4bit")
pack_8bit, unpack_8bit = _make_pair(8, -128, 127, "8bit")
pack_ternary, unpack_ternary = _make_pair(2, -1, 1, "ternary")
pack_ternary.__doc__ = ("Pack a ternary int8 ``[R, K]`` matrix (values {-1, 0, +1}) as 2-bit codes ``q + 2`` "
                        "(identical bits to ``pack_2bit``).")


def pack_1bit(q: np.ndarray, *, word=np.uint8) -> np.ndarray:
    """Pack a binary int8 ``[R, K]`` matrix (values {-1, +1}) one bit per value: ``1`` for +1."""
    q = _check_q(q, -1, 1, "pack_1bit")
    if q.size and np.any(q == 0):
        raise ValueError("pack_1bit: value 0 is not binary (expected only -1 and +1)")
    return _pack_codes((q > 0).astype(np.uint8), 1, word)


def unpack_1bit(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of ``pack_1bit``: int8 ``[R, K]`` with values {-1, +1}."""
    u = _unpack_codes(packed, shape, 1, "unpack_1bit")
    return (u.astype(np.int8) * np.int8(2) - np.int8(1)).astype(np.int8)


_BY_BITS = {
    1: (pack_1bit, unpack_1bit), 2: (pack_2bit, unpack_2bit),
    4: (pack_4bit, unpack_4bit), 8: (pack_8bit, unpack_8bit),
}


def pack_bits(q: np.ndarray, bits: int, *, word=np.uint8) -> np.ndarray:
    """Dispatch to ``pack_{bits}bit`` for a storage width of 1, 2, 4 or 8 bits."""
    if bits not in _BY_BITS:
        raise ValueError(f"storage width must be one of {sorted(_BY_BITS)} bits, got {bits}")
    return _BY_BITS[bits][0](q, word=word)


def unpack_bits(packed: np.ndarray, shape: tuple[int, int], bits: int) -> np.ndarray:
    """Dispatch to ``unpack_{bits}bit`` for a storage width of 1, 2, 4 or 8 bits."""
    if bits not in _BY_BITS:
        raise ValueError(f"storage width must be one of {sorted(_BY_BITS)} bits, got {bits}")
    return _BY_BITS[bits][1](packed, shape)
