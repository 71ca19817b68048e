"""Inner loops of the CPU engine, written in LLVM IR and exposed to Numba as ``@intrinsic``.

Numba has no vector types and LLVM emits no ``vpdpbusd`` from any plain loop, so the whole
inner loop is built here with llvmlite and called from ``@njit`` code (``program_kernels``).

Layout ("interleaved k-groups", produced by ``kernels.pack_u8``)
-----------------------------------------------------------------
Rows come in *blocks* of ``BLOCK_ROWS = 16``; K in *k-groups* of 4 consecutive columns. A
block is ``nlines`` 64-byte *lines*; byte ``4·r + j`` of line ``L`` holds, for row ``r`` of the
block and ``P = 8 // bw`` *planes* ``p``, the unsigned ``bw``-bit code of column
``k = 4·(P·L + p) + j`` in bits ``[p·bw, (p+1)·bw)``. So one plane of a line is 16 rows × 4 k
(64 bytes = one zmm: the 4 bytes of each row side by side), and
``vpdpbusd(acc[16 rows], plane, broadcast(x[4g:4g+4]))`` adds 16 row sums at once: no
horizontal reduction, ever. The data of a matrix is ``[block][line][64]`` (each block one
contiguous stream). K is padded to ``k_unit(bw)`` (16 for 8/4/2-bit, 32 for 1-bit: a whole
loop iteration), R to 16; pads hold the code of q = 0.

Kernels (per storage width ``bw`` and loop; the last intrinsic argument is the loop id as a
Numba *literal*, so only that loop's IR is emitted):
- ``gemv_u{bw}``: up to ``gemv_blocks`` row blocks × one vector (batch 1). Several blocks are
  in flight (independent streams and accumulator chains; no software prefetch: the hardware
  streamers do better, an explicit one a group ahead thrashed L1 for 8-bit rows). On the VNNI
  loops the sub-byte planes are isolated with one ``and`` each, left in place (plane p of a line
  is ``2^(p·bw)``·code), each plane has its own accumulator and the epilogue shifts it back
  (exact: no accumulator can wrap while ``K ≤ MAX_COLS_SUBBYTE``).
- ``gemm_u{bw}``: a register-blocked micro-kernel, ``gemm_shape = (RB blocks, NV vectors)`` of
  accumulators; each line is loaded and unpacked once per call and feeds all NV vectors, the
  x dword is a broadcast operand.
- ``amx_u{bw}`` (loop ``amx-int8``, batches of ≥ 16 vectors): block pairs × all vectors on AMX
  tiles. The layout is the AMX B-tile layout already (16 k-groups × 16 rows × 4 bytes); the
  kernel unpacks a pair's codes once into a scratch buffer, then runs ``tdpbsud`` (signed x ×
  unsigned codes) over vector groups of 2 × 16 (4 int32 C tiles), one K step of 64 columns at a
  time.
All store ``out[r] (+)= s_r·s_x·(mult·Σu·x − offset·Σx) (+ bias[r])`` straight from the 16
lanes of a block's accumulator (``flags`` bit 1: add to out first, bit 0: add bias last).

Loops (``isa.LOOPS``). Each combines 16-row blocks from its own vector width: zmm = one line,
ymm = two halves (8 rows), NEON q = four quarters (4 rows). All exact (integer sums):
- ``avx512-vnni``: ``vpdpbusd`` zmm with an embedded-broadcast x operand.
- ``avx-vnni``: VEX ``vpdpbusd`` ymm (the function has AVX-VNNI and no AVX-512).
- ``avx2``: ``vpmaddubsw`` (codes u8 × x s8 -> s16 pairs: ≤ 2·15·127 for 1–4-bit codes, so up to
  8 add up in s16) then ``vpmaddwd`` with ones; 8-bit codes take ``q = u − 128`` and the sign
  trick ``vpmaddubsw(|q|, sign(q)·x)`` (pair ≤ 2·128·127 = 32512).
- ``neon-dotprod``: ``sdot v.4s, w.16b, x.4b[lane]`` (one 16-byte x load serves 4 k-groups);
  codes ≤ 15 are valid signed bytes, 8-bit codes use ``q = u − 128``.
- ``neon``: ``smull``/``smull2`` (s8 × s8 -> s16) summed in s16 as far as the bound allows, then
  ``sadalp``; one ``addp`` per block at the end.
- ``portable``: plain vector IR (i16 products, pairwise widening): compiles anywhere.
- ``amx-int8``: ``avx512-vnni`` for batch 1, AMX tiles for batches.
Where a loop uses the signed code ``q = u − 128`` its sums are ``Σ q·x`` and the epilogue's
correction changes accordingly (``_Loop.code_bias``).

Each kernel function carries the target features of its loop (``"target-features"``, appended
to Numba's), so it compiles whatever ``NUMBA_CPU_NAME`` says, and the avx2/avx-vnni kernels
contain no AVX-512 instruction even on an AVX-512 host.
"""
from __future__ import annotations

import llvmlite.ir as ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

from . import isa

BLOCK_ROWS = 16          # rows per block: the 16 i32 lanes of one accumulator
LINE_BYTES = 64          # one line = 16 rows × 4 bytes
GROUP_K = 4              # columns per k-group (the 4 bytes of one vpdpbusd lane)
S16_MAX = 2 ** 15 - 1
ACT_QMAX = 127
MAX_COLS_SUBBYTE = 1 << 17   # K limit of 1/2/4-bit matrices: the in-place planes cannot wrap
AMX_BLOCKS = 2           # row blocks per AMX call (2 B tiles)
AMX_ROWS = 16            # vectors per A tile
AMX_STEP = 64            # columns per AMX K step (one A row, 16 B rows)
_AMX_HEADER = 64 + 4 * 1024   # tile config + the 4 C tiles

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()
V16I32, V16F32 = ir.VectorType(I32, 16), ir.VectorType(F32, 16)
PTR = ir.PointerType()


def planes(bw: int) -> int:
    """Codes per byte (k-groups per line) at storage width ``bw``."""
    return 8 // bw


def lines_per_iter(bw: int) -> int:
    """Lines per loop iteration: 4 k-groups per block (8 for 1-bit), enough independent work."""
    return {8: 4, 4: 2, 2: 1, 1: 1}[bw]


def k_unit(bw: int) -> int:
    """K is padded to a multiple of this: the columns of one loop iteration (16, 16, 16, 32)."""
    return GROUP_K * planes(bw) * lines_per_iter(bw)


def code_params(bw: int) -> tuple[int, int]:
    """``(offset, mult)`` of the unsigned ``bw``-bit weight code: ``q = mult·u − offset``
    (bw 1 is binary ±1: u = (q + 1) / 2; otherwise u = q + 2^(bw−1))."""
    return (1, 2) if bw == 1 else (1 << (bw - 1), 1)


def max_cols(bw: int) -> int | None:
    """Largest K a ``bw``-bit matrix may have (None: any; 8-bit sums wrap harmlessly)."""
    return None if bw == 8 else MAX_COLS_SUBBYTE


def amx_steps(nlines: int, bw: int) -> int:
    """AMX K steps (64 columns each) of a matrix of ``nlines`` lines."""
    return -(-nlines * planes(bw) // (AMX_STEP // GROUP_K))


def amx_scratch_bytes(nlines: int, bw: int) -> int:
    """Bytes of scratch one AMX call needs: config, 4 C tiles, 2 blocks of unpacked codes."""
    return _AMX_HEADER + AMX_BLOCKS * amx_steps(nlines, bw) * 1024



# ----------------------------------------------------------------------------- IR helpers

def _c(ty, v):
    return ir.Constant(ty, v)


def _i64(v: int):
    return ir.Constant(I64, v)


def _splat(ty: ir.VectorType, value: int) -> ir.Constant:
    if isinstance(ty.element, ir.IntType) and value >= 1 << (ty.element.width - 1):
        value -= 1 << ty.element.width
    return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)


def _broadcast(b: ir.IRBuilder, value, vty: ir.VectorType):
    zero = ir.Constant(vty, None)
    return b.shuffle_vector(b.insert_element(zero, value, _c(I32, 0)), zero,
                            ir.Constant(ir.VectorType(I32, vty.count), [_c(I32, 0)] * vty.count))


def _declare(module, name, ret, args):
    return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)


def _shuffle(b: ir.IRBuilder, vec, idx, other=None):
    return b.shuffle_vector(vec, vec if other is None else other,
                            ir.Constant(ir.VectorType(I32, len(idx)), [_c(I32, k) for k in idx]))


def _concat(b: ir.IRBuilder, vecs: list):
    """Concatenate a power-of-two list of equal vectors."""
    while len(vecs) > 1:
        n = vecs[0].type.count
        vecs = [_shuffle(b, vecs[k], list(range(2 * n)), vecs[k + 1]) for k in range(0, len(vecs), 2)]
    return vecs[0]


def _tree_sum(b: ir.IRBuilder, values: list):
    while len(values) > 1:
        values = [b.add(values[k], values[k + 1]) if k + 1 < len(values) else values[k]
                  for k in range(0, len(values), 2)]
    return values[0]


def _gep(b: ir.IRBuilder, ptr, offset, ty=I8):
    return b.gep(ptr, [_i64(offset) if isinstance(offset, int) else offset], source_etype=ty)


def _load(b: ir.IRBuilder, ptr, offset, ty, align):
    return b.load(_gep(b, ptr, offset), typ=ty, align=align)


def _emit_loop(b: ir.IRBuilder, count, init: list, body) -> list:
    """``for i in range(count): values = body(b, i, values)`` as a run-time loop (``count`` an
    i64 value; ``body`` may emit blocks); returns the values after the loop (``init`` if it
    ran zero times). The builder ends after the loop."""
    fn, pre = b.function, b.block
    head, done = fn.append_basic_block("loop"), fn.append_basic_block("loop_done")
    b.cbranch(b.icmp_signed(">", count, _i64(0)), head, done)
    b.position_at_end(head)
    i = b.phi(I64, "i")
    phis = [b.phi(v.type) for v in init]
    new = body(b, i, phis)
    i_next = b.add(i, _i64(1))
    end = b.block
    b.cbranch(b.icmp_signed("<", i_next, count), head, done)
    i.add_incoming(_i64(0), pre)
    i.add_incoming(i_next, end)
    for phi, v0, v1 in zip(phis, init, new):
        phi.add_incoming(v0, pre)
        phi.add_incoming(v1, end)
    b.position_at_end(done)
    exits = []
    for v0, v1 in zip(init, new):
        e = b.phi(v0.type)
        e.add_incoming(v0, pre)
        e.add_incoming(v1, end)
        exits.append(e)
    return exits


def _min(b, x, y):
    return b.select(b.icmp_signed("<", x, y), x, y)


def _max(b, x, y):
    return b.select(b.icmp_signed(">", x, y), x, y)


# ----------------------------------------------------------------------------- the loops

class _Acc:
    """One accumulator chain: its IR values (what the loop keeps per chain) and s16 partial sums
    not yet widened (loops that multiply into s16)."""

    __slots__ = ("values", "pending", "count")

    def __init__(self, values):
        self.values, self.pending, self.count = list(values), None, 0


class _Loop:
    """One inner loop: how a part of a line (``part_bytes``: 64 zmm, 32 ymm, 16 NEON, i.e.
    ``part_bytes // 4`` rows × 4 k) meets one k-group of x.

    ``gemv_blocks[bw]``: blocks in flight in the batch-1 kernel; ``gemv_chains[bw]``: accumulator
    chains per (block, part); ``scaled[bw]``: planes isolated in place with one ``and`` (only
    where the multiply takes codes up to 255 unsigned); ``gemm_shape[bw]``: (blocks, vectors) of
    the batch kernel; ``features``: LLVM target features its kernels need.
    ``dot(b, acc, codes, xop, bw)`` adds ``Σ_j codes[4r+j]·x[j]`` per row to ``acc``."""

    name = ""
    features = ""
    part_bytes = 64
    gemv_blocks = {8: 4, 4: 4, 2: 4, 1: 2}
    gemv_chains = {8: 4, 4: 4, 2: 4, 1: 8}
    scaled = {8: False, 4: False, 2: False, 1: False}
    gemm_shape = {8: (2, 10), 4: (2, 10), 2: (2, 10), 1: (2, 10)}
    amx = False

    @property
    def rows_per_part(self) -> int:
        return self.part_bytes // 4

    @property
    def parts(self) -> int:
        return LINE_BYTES // self.part_bytes

    def code_bias(self, bw: int) -> int:
        return 0

    def acc_zero(self) -> list:
        return [ir.Constant(ir.VectorType(I32, self.rows_per_part), None)]

    def x_operand(self, b, x_it, g: int, cache: dict):
        """The form of k-group ``g`` of the vector at ``x_it`` that ``dot`` takes (once per
        (vector, k-group), shared by all blocks and parts); default: the dword broadcast."""
        n = self.rows_per_part
        return _broadcast(b, _load(b, x_it, 4 * g, I32, 4), ir.VectorType(I32, n))

    def unpack(self, b, word, bw: int, p: int, scaled: bool):
        """Plane ``p`` of ``word`` (``<part_bytes x i8>``): ``(codes, shift)``, the codes times
        ``2^shift``."""
        if bw == 8:
            return word, 0
        mask = (1 << bw) - 1
        if scaled:
            return b.and_(word, _splat(word.type, mask << (p * bw))), p * bw
        u = word if p == 0 else b.lshr(word, _splat(word.type, p * bw))
        return (b.and_(u, _splat(word.type, mask)) if p < planes(bw) - 1 else u), 0

    def dot(self, b, acc: _Acc, codes, xop, bw: int) -> None:
        raise NotImplementedError

    def flush(self, b, acc: _Acc) -> None:
        """Widen pending s16 sums into the accumulator (no-op for loops without them)."""

    def finish(self, b, acc: _Acc):
        """The ``<rows_per_part x i32>`` row sums of a chain."""
        return acc.values[0]

    def _signed(self, b, u, bw):
        """Codes as signed bytes: as they are for bw ≤ 4 (u ≤ 15), ``u − 128`` for bw 8."""
        return b.xor(u, _splat(u.type, 0x80)) if self.code_bias(bw) else u

    def _max_code(self, bw):
        """Largest |code| the products see: 128 for the signed 8-bit code, else 2^bw − 1."""
        return 128 if self.code_bias(bw) else (1 << bw) - 1


class _Avx512Vnni(_Loop):
    name, features, part_bytes = "avx512-vnni", "+avx512f,+avx512bw,+avx512vnni", 64
    scaled = {8: True, 4: True, 2: True, 1: True}

    def dot(self, b, acc, codes, xop, bw):
        fn = _declare(b.module, "llvm.x86.avx512.vpdpbusd.512", V16I32, [V16I32] * 3)
        acc.values[0] = b.call(fn, [acc.values[0], b.bitcast(codes, V16I32), xop])


class _AmxInt8(_Avx512Vnni):
    name, amx = "amx-int8", True
    features = "+avx512f,+avx512bw,+avx512vnni,+amx-tile,+amx-int8"


class _AvxVnni(_Loop):
    name, features, part_bytes = "avx-vnni", "+avx2,+avxvnni,-avx512f", 32
    gemv_blocks = {8: 4, 4: 2, 2: 1, 1: 2}
    gemv_chains = {8: 1, 4: 1, 2: 4, 1: 2}
    scaled = {8: True, 4: True, 2: True, 1: False}
    gemm_shape = {8: (1, 6), 4: (1, 6), 2: (1, 6), 1: (1, 6)}

    def dot(self, b, acc, codes, xop, bw):
        v8 = ir.VectorType(I32, 8)
        fn = _declare(b.module, "llvm.x86.avx512.vpdpbusd.256", v8, [v8] * 3)
        acc.values[0] = b.call(fn, [acc.values[0], b.bitcast(codes, v8), xop])


class _Avx2(_Loop):
    name, features, part_bytes = "avx2", "+avx2,-avx512f,-avxvnni,-gfni", 32
    gemv_blocks = {8: 4, 4: 4, 2: 4, 1: 4}
    gemv_chains = {8: 1, 4: 1, 2: 1, 1: 1}
    gemm_shape = {8: (1, 4), 4: (1, 4), 2: (1, 4), 1: (1, 4)}

    def code_bias(self, bw):
        return 128 if bw == 8 else 0

    def x_operand(self, b, x_it, g, cache):
        return b.bitcast(super().x_operand(b, x_it, g, cache), ir.VectorType(I8, 32))

    def dot(self, b, acc, codes, xop, bw):
        v32i8, v16i16 = ir.VectorType(I8, 32), ir.VectorType(I16, 16)
        maddubs = _declare(b.module, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
        if self.code_bias(bw):              # sign trick: |q| (u8, ≤ 128) × sign(q)·x
            q = self._signed(b, codes, bw)
            absq = b.call(_declare(b.module, "llvm.abs.v32i8", v32i8, [v32i8, I1]), [q, _c(I1, 0)])
            sx = b.call(_declare(b.module, "llvm.x86.avx2.psign.b", v32i8, [v32i8, v32i8]), [xop, q])
            prod = b.call(maddubs, [absq, sx])
        else:
            prod = b.call(maddubs, [codes, xop])
        acc.pending = prod if acc.pending is None else b.add(acc.pending, prod)
        acc.count += 1
        if acc.count >= S16_MAX // (2 * self._max_code(bw) * ACT_QMAX):
            self.flush(b, acc)

    def flush(self, b, acc):
        if acc.pending is not None:
            v16i16, v8i32 = ir.VectorType(I16, 16), ir.VectorType(I32, 8)
            maddwd = _declare(b.module, "llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
            acc.values[0] = b.add(acc.values[0], b.call(maddwd, [acc.pending, _splat(v16i16, 1)]))
            acc.pending, acc.count = None, 0


class _NeonDotprod(_Loop):
    name, features, part_bytes = "neon-dotprod", "+neon,+dotprod", 16
    gemv_blocks = {8: 2, 4: 2, 2: 2, 1: 2}
    gemv_chains = {8: 2, 4: 2, 2: 2, 1: 2}
    gemm_shape = {8: (1, 4), 4: (1, 4), 2: (1, 4), 1: (1, 4)}

    def code_bias(self, bw):
        return 128 if bw == 8 else 0

    def x_operand(self, b, x_it, g, cache):
        key = (id(x_it), g // 4)            # one 16-byte load serves 4 k-groups (sdot by element)
        quad = cache.get(key)
        if quad is None:
            quad = cache[key] = b.bitcast(_load(b, x_it, 4 * (g - g % 4), ir.VectorType(I8, 16), 4),
                                          ir.VectorType(I32, 4))
        return b.bitcast(_shuffle(b, quad, [g % 4] * 4), ir.VectorType(I8, 16))

    def dot(self, b, acc, codes, xop, bw):
        v16i8, v4i32 = ir.VectorType(I8, 16), ir.VectorType(I32, 4)
        fn = _declare(b.module, "llvm.aarch64.neon.sdot.v4i32.v16i8", v4i32, [v4i32, v16i8, v16i8])
        acc.values[0] = b.call(fn, [acc.values[0], self._signed(b, codes, bw), xop])


class _Neon(_Loop):
    name, features, part_bytes = "neon", "+neon", 16
    gemv_blocks = {8: 2, 4: 2, 2: 2, 1: 2}
    gemv_chains = {8: 1, 4: 1, 2: 1, 1: 1}
    gemm_shape = {8: (1, 2), 4: (1, 2), 2: (1, 2), 1: (1, 2)}

    def code_bias(self, bw):
        return 128 if bw == 8 else 0

    def acc_zero(self):
        z = ir.Constant(ir.VectorType(I32, 4), None)
        return [z, z]                       # rows 0-1 and rows 2-3, lanes (row, pair of k)

    def x_operand(self, b, x_it, g, cache):
        return b.bitcast(_broadcast(b, _load(b, x_it, 4 * g, I32, 4), ir.VectorType(I32, 2)), ir.VectorType(I8, 8))

    def dot(self, b, acc, codes, xop, bw):
        v8i8, v8i16 = ir.VectorType(I8, 8), ir.VectorType(I16, 8)
        smull = _declare(b.module, "llvm.aarch64.neon.smull.v8i16", v8i16, [v8i8, v8i8])
        q = self._signed(b, codes, bw)
        prods = [b.call(smull, [_shuffle(b, q, list(range(h, h + 8))), xop]) for h in (0, 8)]
        acc.pending = prods if acc.pending is None else [b.add(s, p) for s, p in zip(acc.pending, prods)]
        acc.count += 1
        if acc.count >= S16_MAX // (self._max_code(bw) * ACT_QMAX):
            self.flush(b, acc)

    def flush(self, b, acc):
        if acc.pending is not None:
            v8i16, v4i32 = ir.VectorType(I16, 8), ir.VectorType(I32, 4)
            saddlp = _declare(b.module, "llvm.aarch64.neon.saddlp.v4i32.v8i16", v4i32, [v8i16])
            acc.values = [b.add(a, b.call(saddlp, [s])) for a, s in zip(acc.values, acc.pending)]
            acc.pending, acc.count = None, 0

    def finish(self, b, acc):
        v4i32 = ir.VectorType(I32, 4)
        addp = _declare(b.module, "llvm.aarch64.neon.addp.v4i32", v4i32, [v4i32, v4i32])
        return b.call(addp, acc.values)


class _Portable(_Loop):
    name, part_bytes = "portable", 32
    gemv_blocks = {8: 2, 4: 2, 2: 2, 1: 2}
    gemv_chains = {8: 1, 4: 1, 2: 1, 1: 1}
    gemm_shape = {8: (1, 4), 4: (1, 4), 2: (1, 4), 1: (1, 4)}

    def acc_zero(self):
        return [ir.Constant(ir.VectorType(I32, 16), None)]     # lanes (row, pair of k)

    def x_operand(self, b, x_it, g, cache):
        v = b.bitcast(super().x_operand(b, x_it, g, cache), ir.VectorType(I8, 32))
        return b.sext(v, ir.VectorType(I16, 32))

    def dot(self, b, acc, codes, xop, bw):
        if bw == 8:                 # one i16 product per lane fits: widen pairs at once (x86: vpmaddwd)
            v16i32 = ir.VectorType(I32, 16)
            c16 = b.zext(codes, ir.VectorType(I16, 32))
            ev, od = list(range(0, 32, 2)), list(range(1, 32, 2))
            pair = b.add(b.mul(b.sext(_shuffle(b, c16, ev), v16i32), b.sext(_shuffle(b, xop, ev), v16i32)),
                         b.mul(b.sext(_shuffle(b, c16, od), v16i32), b.sext(_shuffle(b, xop, od), v16i32)))
            acc.values[0] = b.add(acc.values[0], pair)
            return
        prod = b.mul(b.zext(codes, ir.VectorType(I16, 32)), xop)
        acc.pending = prod if acc.pending is None else b.add(acc.pending, prod)
        acc.count += 1
        if acc.count >= S16_MAX // (self._max_code(bw) * ACT_QMAX):
            self.flush(b, acc)

    def flush(self, b, acc):
        if acc.pending is not None:
            v16i32 = ir.VectorType(I32, 16)
            s = acc.pending
            pair = b.add(b.sext(_shuffle(b, s, list(range(0, 32, 2))), v16i32),
                         b.sext(_shuffle(b, s, list(range(1, 32, 2))), v16i32))
            acc.values[0] = b.add(acc.values[0], pair)
            acc.pending, acc.count = None, 0

    def finish(self, b, acc):
        a = acc.values[0]
        return b.add(_shuffle(b, a, list(range(0, 16, 2))), _shuffle(b, a, list(range(1, 16, 2))))


_LOOP_IMPLS = {impl.name: impl for impl in (_Avx512Vnni(), _AvxVnni(), _Avx2(), _NeonDotprod(), _Neon(),
                                             _Portable(), _AmxInt8())}
assert tuple(_LOOP_IMPLS) == isa.LOOPS


def loop_impl(loop) -> _Loop:
    """The ``_Loop`` of a loop id or name."""
    return _LOOP_IMPLS[isa.loop_name(loop) if isinstance(loop, int) else isa.canonical(loop)]


def gemv_group(loop, bw: int) -> int:
    """Row blocks per call of the batch-1 kernel of ``loop`` (id or name) at width ``bw``."""
    return loop_impl(loop).gemv_blocks[bw]


def gemm_group(loop, bw: int) -> tuple[int, int]:
    """``(blocks, vectors)`` per call of the register-blocked batch kernel (``gemm``)."""
    return loop_impl(loop).gemm_shape[bw]


def uses_amx(loop) -> bool:
    """True when batches run on AMX tiles in ``loop``."""
    return loop_impl(loop).amx


# ----------------------------------------------------------------------------- kernel bodies

def _gemv_classes(loop: _Loop, bw: int):
    """Accumulator chains of one (block, part) in the batch-1 kernel: ``(class_of[(l, p)],
    shift per class)``; scaled loops keep one class per plane (its own shift)."""
    P, lpi, chains = planes(bw), lines_per_iter(bw), loop.gemv_chains[bw]
    if loop.scaled[bw]:
        per_plane = max(1, chains // P)
        keys = {(l, p): (p, l % per_plane) for l in range(lpi) for p in range(P)}
    else:
        keys = {(l, p): (0, (l * P + p) % chains) for l in range(lpi) for p in range(P)}
    order = sorted(set(keys.values()))
    shift = [p * bw if loop.scaled[bw] else 0 for p, _ in order]
    return {lp: order.index(k) for lp, k in keys.items()}, shift


def _gemv_sums(b: ir.IRBuilder, w, nlines, nblocks, x, bw: int, loop: _Loop) -> list:
    """``<16 x i32>`` row sums of each of the ``gemv_blocks`` blocks at ``w`` against ``x``
    (blocks at or beyond ``nblocks`` alias block 0)."""
    G, P, lpi, nparts = loop.gemv_blocks[bw], planes(bw), lines_per_iter(bw), loop.parts
    class_of, shifts = _gemv_classes(loop, bw)
    ncls = len(shifts)
    block_bytes = b.mul(nlines, _i64(LINE_BYTES))
    ptrs = [w] + [b.select(b.icmp_signed(">", nblocks, _i64(j)), b.gep(w, [b.mul(block_bytes, _i64(j))],
                                                                       source_etype=I8), w) for j in range(1, G)]
    zeros = loop.acc_zero()
    nval = len(zeros)
    init = zeros * (G * nparts * ncls)
    vty = ir.VectorType(I8, loop.part_bytes)

    def body(b, i, vals):
        accs = [_Acc(vals[k:k + nval]) for k in range(0, len(vals), nval)]     # [j][part][cls]
        w_off = b.mul(i, _i64(lpi * LINE_BYTES))
        x_it = b.gep(x, [b.mul(i, _i64(k_unit(bw)))], source_etype=I8)
        xcache, xs = {}, {}
        for j in range(G):
            for l in range(lpi):
                line = b.gep(ptrs[j], [b.add(w_off, _i64(l * LINE_BYTES))], source_etype=I8)
                for part in range(nparts):
                    word = _load(b, line, part * loop.part_bytes, vty, 1)
                    for p in range(P):
                        codes, _ = loop.unpack(b, word, bw, p, loop.scaled[bw])
                        g = l * P + p
                        if g not in xs:
                            xs[g] = loop.x_operand(b, x_it, g, xcache)
                        loop.dot(b, accs[(j * nparts + part) * ncls + class_of[l, p]], codes, xs[g], bw)
        for a in accs:
            loop.flush(b, a)
        return [v for a in accs for v in a.values]

    niter = b.udiv(nlines, _i64(lpi))
    vals = _emit_loop(b, niter, init, body)
    accs = [_Acc(vals[k:k + nval]) for k in range(0, len(vals), nval)]
    sums = []
    for j in range(G):
        parts = []
        for part in range(nparts):
            rows = []
            for c in range(ncls):
                v = loop.finish(b, accs[(j * nparts + part) * ncls + c])
                rows.append(b.ashr(v, _splat(v.type, shifts[c])) if shifts[c] else v)
            parts.append(_tree_sum(b, rows))
        sums.append(_concat(b, parts))
    return sums


def _gemm_sums(b: ir.IRBuilder, w, nlines, nblocks, x, x_stride, nvec, bw: int, loop: _Loop) -> list:
    """``sums[j][v]`` (``<16 x i32>``) of ``gemm_shape`` blocks × vectors (blocks beyond
    ``nblocks`` alias block 0, vectors beyond ``nvec`` vector 0): each line is loaded and
    unpacked once and feeds every vector."""
    RB, NV = loop.gemm_shape[bw]
    P, lpi, nparts = planes(bw), lines_per_iter(bw), loop.parts
    block_bytes = b.mul(nlines, _i64(LINE_BYTES))
    ptrs = [w] + [b.select(b.icmp_signed(">", nblocks, _i64(j)), b.gep(w, [b.mul(block_bytes, _i64(j))],
                                                                       source_etype=I8), w) for j in range(1, RB)]
    xptrs = [x] + [b.select(b.icmp_signed(">", nvec, _i64(v)), b.gep(x, [b.mul(x_stride, _i64(v))],
                                                                     source_etype=I8), x) for v in range(1, NV)]
    zeros = loop.acc_zero()
    nval = len(zeros)
    init = zeros * (RB * NV * nparts)
    vty = ir.VectorType(I8, loop.part_bytes)

    def body(b, i, vals):
        accs = [_Acc(vals[k:k + nval]) for k in range(0, len(vals), nval)]     # [j][v][part]
        w_off = b.mul(i, _i64(lpi * LINE_BYTES))
        x_off = b.mul(i, _i64(k_unit(bw)))
        x_its = [b.gep(xp, [x_off], source_etype=I8) for xp in xptrs]
        xcache = {}
        for l in range(lpi):
            words = []
            for j in range(RB):
                line = b.gep(ptrs[j], [b.add(w_off, _i64(l * LINE_BYTES))], source_etype=I8)
                words.append([_load(b, line, part * loop.part_bytes, vty, 1)
                              for part in range(nparts)])
            for p in range(P):
                codes = [[loop.unpack(b, wd, bw, p, False)[0] for wd in row] for row in words]
                for v in range(NV):
                    xop = loop.x_operand(b, x_its[v], l * P + p, xcache)
                    for j in range(RB):
                        for part in range(nparts):
                            loop.dot(b, accs[(j * NV + v) * nparts + part], codes[j][part], xop, bw)
        for a in accs:
            loop.flush(b, a)
        return [v for a in accs for v in a.values]

    vals = _emit_loop(b, b.udiv(nlines, _i64(lpi)), init, body)
    accs = [_Acc(vals[k:k + nval]) for k in range(0, len(vals), nval)]
    return [[_concat(b, [loop.finish(b, accs[(j * NV + v) * nparts + part]) for part in range(nparts)])
             for v in range(NV)] for j in range(RB)]


def _masked(b: ir.IRBuilder, nrows):
    """The ``<16 x i1>`` mask of lanes below ``min(nrows, 16)``."""
    vi = ir.VectorType(I32, 16)
    nv = b.trunc(_min(b, nrows, _i64(16)), I32)
    return b.icmp_signed("<", ir.Constant(vi, [_c(I32, k) for k in range(16)]), _broadcast(b, nv, vi))


def _store_block(b: ir.IRBuilder, sums, bw: int, loop: _Loop, sumx, sx, scale, bias, out, nrows, flags):
    """``out[r] (+)= s_r·s_x·(mult·sum_r − offset·Σx) (+ bias[r])`` for rows ``r < nrows`` (≤ 16
    used) of one block: float order of the reference, ``(float(acc)·s_r)·s_x`` then
    ``(out + y) + bias``. ``sumx`` an i64, ``sx`` a float, the rest pointers. Branch-free but for
    the partial block: the flags select, ``out`` and ``bias`` are read either way."""
    offset, mult = code_params(bw)
    offset -= mult * loop.code_bias(bw)
    t = b.shl(sums, _splat(V16I32, 1)) if mult == 2 else sums
    if offset:
        t = b.sub(t, b.mul(_broadcast(b, b.trunc(sumx, I32), V16I32), _splat(V16I32, offset)))
    y0 = b.sitofp(t, V16F32)
    add_out = b.icmp_signed("!=", b.and_(flags, _i64(2)), _i64(0))
    add_bias = b.icmp_signed("!=", b.and_(flags, _i64(1)), _i64(0))
    sxv = _broadcast(b, sx, V16F32)
    vb = ir.VectorType(I1, 16)
    mload = _declare(b.module, "llvm.masked.load.v16f32.p0", V16F32, [PTR, I32, vb, V16F32])
    mstore = _declare(b.module, "llvm.masked.store.v16f32.p0", ir.VoidType(), [V16F32, PTR, I32, vb])
    with b.if_else(b.icmp_signed(">=", nrows, _i64(16))) as (then, otherwise):
        for masked in (False, True):
            with (otherwise if masked else then):
                mask = _masked(b, nrows) if masked else None

                def load(ptr):
                    if masked:
                        return b.call(mload, [ptr, _c(I32, 4), mask, ir.Constant(V16F32, None)])
                    return b.load(ptr, typ=V16F32, align=4)

                y = b.fmul(b.fmul(y0, load(scale)), sxv)
                y = b.select(add_out, b.fadd(load(out), y), y)
                y = b.select(add_bias, b.fadd(y, load(bias)), y)
                if masked:
                    b.call(mstore, [y, out, _c(I32, 4), mask])
                else:
                    b.store(y, out, align=4)


def _block_epilogues(b: ir.IRBuilder, sums: list, count, bw, loop, operands) -> None:
    """Run the epilogue of ``sums[k]`` for ``k < count`` as a run-time loop over one copy of it:
    the sums go to a stack array, ``operands(b, k)`` gives ``(sumx, sx, scale, bias, out, nrows,
    flags)`` of entry ``k`` (an i64)."""
    slots = cgutils.alloca_once(b, ir.ArrayType(V16I32, len(sums)))
    for k, s in enumerate(sums):
        b.store(s, b.gep(slots, [_i64(0), _i64(k)]))

    def body(b, k, vals):
        sumx, sx, scale, bias, out, nrows, flags = operands(b, k)
        with b.if_then(b.icmp_signed(">", nrows, _i64(0))):
            s = b.load(b.gep(slots, [_i64(0), k]), typ=V16I32)
            _store_block(b, s, bw, loop, sumx, sx, scale, bias, out, nrows, flags)
        return []

    _emit_loop(b, count, [], body)


def _emit_gemv(b, args, bw, loop):
    w, nlines, nblocks, x, sumx, sx, scale, bias, out, nvalid, flags = args
    sums = _gemv_sums(b, w, nlines, nblocks, x, bw, loop)

    def operands(b, j):
        r0 = b.mul(j, _i64(BLOCK_ROWS))
        return (sumx, sx, _gep(b, scale, r0, F32), _gep(b, bias, r0, F32), _gep(b, out, r0, F32),
                b.sub(nvalid, r0), flags)

    _block_epilogues(b, sums, _min(b, nblocks, _i64(len(sums))), bw, loop, operands)


def _emit_gemm(b, args, bw, loop):
    w, nlines, nblocks, x, x_stride, nvec, sumx, sx, scale, bias, out, out_stride, nvalid, flags = args
    sums = _gemm_sums(b, w, nlines, nblocks, x, x_stride, nvec, bw, loop)
    RB, NV = loop.gemm_shape[bw]
    flat = [sums[j][v] for v in range(NV) for j in range(RB)]          # k = v·RB + j

    def operands(b, k):
        v, j = b.udiv(k, _i64(RB)), b.urem(k, _i64(RB))
        r0 = b.mul(j, _i64(BLOCK_ROWS))
        nrows = b.select(b.icmp_signed("<", v, nvec), b.sub(nvalid, r0), _i64(0))
        nrows = b.select(b.icmp_signed("<", j, nblocks), nrows, _i64(0))
        return (b.load(_gep(b, sumx, v, I64), typ=I64), b.load(_gep(b, sx, v, F32), typ=F32),
                _gep(b, scale, r0, F32), _gep(b, bias, r0, F32),
                _gep(b, out, b.add(b.mul(v, out_stride), r0), F32), nrows, flags)

    _block_epilogues(b, flat, _i64(len(flat)), bw, loop, operands)


# ----------------------------------------------------------------------------- AMX

def _amx(b, name, *tiles_and_args):
    """Call the AMX intrinsic ``llvm.x86.<name>`` (tile numbers as i8 immediates)."""
    args = [(_c(I8, a) if isinstance(a, int) else a) for a in tiles_and_args]
    fn = _declare(b.module, f"llvm.x86.{name}", ir.VoidType(), [a.type for a in args])
    b.call(fn, args)


def _emit_amx(b, args, bw, loop):
    """``nblocks`` blocks × ``nvec`` vectors on AMX tiles, two blocks at a time. Tiles: C 0-3
    (int32, [vector][row]), A 4-5 (x of vectors v0…v0+15 and v0+16…v0+31), B 6-7 (the two
    blocks' codes of one K step: 16 k-groups × 64 bytes, the layout's own line format with one
    code per byte). The codes are unpacked once per block pair into the scratch buffer. With at
    most 16 vectors the K steps alternate between C 0-1 and C 2-3 (A 4 and A 5 alternate, so a
    tile load need not wait for the previous step's products), summed in the epilogue. Tile
    loads bound this kernel (about one per product on this project's machine), so each loaded
    tile feeds two products."""
    w, nlines, nblocks, x, x_stride, nvec, sumx, sx, scale, bias, out, out_stride, nvalid, flags, scratch = args
    P = planes(bw)
    nsteps = b.udiv(b.add(b.mul(nlines, _i64(P)), _i64(15)), _i64(16))
    tile_bytes = b.mul(nsteps, _i64(1024))              # one block's B tiles
    cfg, cbuf = scratch, _gep(b, scratch, 64)
    scratch_b = _gep(b, scratch, _AMX_HEADER)
    current = cgutils.alloca_once_value(b, _i64(-1))   # the loaded tile configuration (m0·64 + m1)
    v64 = ir.VectorType(I8, 64)

    def config(b, m0, m1, ksplit):
        for off in range(0, 64, 8):
            b.store(_i64(0), _gep(b, cfg, off), align=8)
        b.store(_c(I8, 1), cfg)
        m_hi = b.select(ksplit, m0, m1)
        for t, rows in ((0, m0), (1, m0), (4, m0), (2, m_hi), (3, m_hi), (5, m_hi), (6, None), (7, None)):
            r = _i64(16) if rows is None else rows
            b.store(b.trunc(r, I8), _gep(b, cfg, 48 + t))
            colsb = _i64(64) if rows is None else b.select(b.icmp_signed(">", rows, _i64(0)), _i64(64), _i64(0))
            b.store(b.trunc(colsb, I16), _gep(b, cfg, 16 + 2 * t), align=2)
        _amx(b, "ldtilecfg", cfg)

    def pair(b, pi, vals):
        j0 = b.mul(pi, _i64(2))
        j1 = _min(b, b.add(j0, _i64(1)), b.sub(nblocks, _i64(1)))
        has1 = b.icmp_signed("<", b.add(j0, _i64(1)), nblocks)
        src = [b.gep(w, [b.mul(j, b.mul(nlines, _i64(LINE_BYTES)))], source_etype=I8) for j in (j0, j1)]
        bsrc = [scratch_b, b.gep(scratch_b, [tile_bytes], source_etype=I8)]

        def unpack_line(b, L, vals):               # B row g (k-group g) = plane g % P of line g // P
            for k in range(AMX_BLOCKS):
                word = b.load(b.gep(src[k], [b.mul(L, _i64(LINE_BYTES))], source_etype=I8), typ=v64, align=1)
                for p in range(P):
                    codes, _ = loop.unpack(b, word, bw, p, False)
                    row = b.add(b.mul(L, _i64(P)), _i64(p))
                    b.store(codes, b.gep(bsrc[k], [b.mul(row, _i64(LINE_BYTES))], source_etype=I8), align=64)
            return []

        _emit_loop(b, nlines, [], unpack_line)
        first_pad = b.mul(nlines, _i64(P))

        def zero_row(b, i, vals):                   # k-groups past K in the last step
            g = b.add(first_pad, i)
            for k in range(AMX_BLOCKS):
                b.store(ir.Constant(v64, None), b.gep(bsrc[k], [b.mul(g, _i64(LINE_BYTES))], source_etype=I8),
                        align=64)
            return []

        _emit_loop(b, b.sub(b.mul(nsteps, _i64(16)), first_pad), [], zero_row)

        def group(b, gi, vals):
            v0 = b.mul(gi, _i64(2 * AMX_ROWS))
            rem = b.sub(nvec, v0)
            m0 = _min(b, rem, _i64(AMX_ROWS))
            m1 = _min(b, _max(b, b.sub(rem, _i64(AMX_ROWS)), _i64(0)), _i64(AMX_ROWS))
            ksplit = b.icmp_signed("==", m1, _i64(0))
            key = b.add(b.mul(m0, _i64(64)), m1)
            with b.if_then(b.icmp_signed("!=", b.load(current, typ=I64), key)):
                config(b, m0, m1, ksplit)
                b.store(key, current)
            xa = b.gep(x, [b.mul(v0, x_stride)], source_etype=I8)
            xb = b.gep(xa, [b.mul(_i64(AMX_ROWS), x_stride)], source_etype=I8)
            for t in range(4):
                _amx(b, "tilezero", t)

            def load_step(b, s, a_tile, xrow):
                koff = b.mul(s, _i64(AMX_STEP))
                _amx(b, "tileloadd64", a_tile, b.gep(xrow, [koff], source_etype=I8), x_stride)
                boff = b.mul(s, _i64(1024))
                _amx(b, "tileloadd64", 6, b.gep(bsrc[0], [boff], source_etype=I8), _i64(64))
                _amx(b, "tileloadd64", 7, b.gep(bsrc[1], [boff], source_etype=I8), _i64(64))

            with b.if_else(ksplit) as (then, otherwise):
                with then:                          # ≤ 16 vectors: even steps into C0/C1, odd into C2/C3
                    def two_steps(b, i, vals):
                        s = b.mul(i, _i64(2))
                        load_step(b, s, 4, xa)
                        _amx(b, "tdpbsud", 0, 4, 6)
                        _amx(b, "tdpbsud", 1, 4, 7)
                        load_step(b, b.add(s, _i64(1)), 5, xa)
                        _amx(b, "tdpbsud", 2, 5, 6)
                        _amx(b, "tdpbsud", 3, 5, 7)
                        return []

                    _emit_loop(b, b.udiv(nsteps, _i64(2)), [], two_steps)
                    with b.if_then(b.trunc(nsteps, I1)):
                        load_step(b, b.sub(nsteps, _i64(1)), 4, xa)
                        _amx(b, "tdpbsud", 0, 4, 6)
                        _amx(b, "tdpbsud", 1, 4, 7)
                with otherwise:
                    def step(b, s, vals):
                        koff = b.mul(s, _i64(AMX_STEP))
                        _amx(b, "tileloadd64", 5, b.gep(xb, [koff], source_etype=I8), x_stride)
                        load_step(b, s, 4, xa)
                        _amx(b, "tdpbsud", 0, 4, 6)
                        _amx(b, "tdpbsud", 1, 4, 7)
                        _amx(b, "tdpbsud", 2, 5, 6)
                        _amx(b, "tdpbsud", 3, 5, 7)
                        return []

                    _emit_loop(b, nsteps, [], step)
            for t in range(4):
                _amx(b, "tilestored64", t, _gep(b, cbuf, 1024 * t), _i64(64))

            def epilogue(b, k, vals):                   # k = 2·(vector in group) + block
                vi, jj = b.udiv(k, _i64(2)), b.urem(k, _i64(2))
                tile = b.add(b.mul(b.udiv(vi, _i64(AMX_ROWS)), _i64(2)), jj)
                row = b.mul(b.urem(vi, _i64(AMX_ROWS)), _i64(64))
                s = b.load(b.gep(cbuf, [b.add(b.mul(tile, _i64(1024)), row)], source_etype=I8), typ=V16I32, align=64)
                odd = b.load(b.gep(cbuf, [b.add(b.mul(b.add(jj, _i64(2)), _i64(1024)), row)], source_etype=I8),
                             typ=V16I32, align=64)
                s = b.select(ksplit, b.add(s, odd), s)
                v = b.add(v0, vi)
                r0 = b.mul(b.add(j0, jj), _i64(BLOCK_ROWS))
                valid = b.or_(b.icmp_signed("==", jj, _i64(0)), has1)
                nrows = b.select(valid, b.sub(nvalid, r0), _i64(0))
                with b.if_then(b.icmp_signed(">", nrows, _i64(0))):
                    _store_block(b, s, bw, loop, b.load(_gep(b, sumx, v, I64), typ=I64),
                                 b.load(_gep(b, sx, v, F32), typ=F32), _gep(b, scale, r0, F32),
                                 _gep(b, bias, r0, F32), _gep(b, out, b.add(b.mul(v, out_stride), r0), F32), nrows,
                                 flags)
                return []

            _emit_loop(b, b.mul(b.add(m0, m1), _i64(2)), [], epilogue)
            return []

        _emit_loop(b, b.udiv(b.add(nvec, _i64(2 * AMX_ROWS - 1)), _i64(2 * AMX_ROWS)), [], group)
        return []

    _emit_loop(b, b.udiv(b.add(nblocks, _i64(1)), _i64(2)), [], pair)
    with b.if_then(b.icmp_signed(">=", b.load(current, typ=I64), _i64(0))):
        _amx(b, "tilerelease")


# ----------------------------------------------------------------------------- Numba plumbing

# argument kinds: A = (array, element offset) -> pointer, i = int64, f = float32
_SPECS = {
    # w, nlines, nblocks, x, sumx, sx, scale, bias, out, nvalid, flags
    "gemv": "AiiAifAAAii",
    # w, nlines, nblocks, x, x_stride, nvec, sumx, sx, scale, bias, out, out_stride, nvalid, flags
    "gemm": "AiiAiiAAAAAiii",
    # as gemm, then scratch (amx_scratch_bytes, 64-byte aligned)
    "amx": "AiiAiiAAAAAiiiA",
}
_EMIT = {"gemv": _emit_gemv, "gemm": _emit_gemm, "amx": _emit_amx}
_LLVM_ARG = {"A": PTR, "i": I64, "f": F32}


class _KernelAttributes(ir.values.FunctionAttributes):
    """Function attributes plus string attributes (``"key"="value"``), which llvmlite's
    attribute set does not know."""

    def __init__(self, strings):
        super().__init__()
        self.strings = list(strings)

    def _to_list(self, ret_type):
        return super()._to_list(ret_type) + self.strings


def _target_features(base: str, loop: _Loop) -> str:
    """Numba's feature string with the loop's features appended (later entries win)."""
    return ",".join(f for f in (base or "").split(",") + loop.features.split(",") if f)


def _kernel_function(module: ir.Module, kind: str, bw: int, loop: _Loop, base_features: str = "") -> ir.Function:
    """Define (once per module) the LLVM function of one kernel kind (``_SPECS``) for one loop."""
    name = f"g2quant_{kind}_u{bw}_{loop.name.replace('-', '_')}"
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [_LLVM_ARG[k] for k in _SPECS[kind]]), name)
    fn.linkage = "internal"
    features = _target_features(base_features, loop) if loop.features else ""
    fn.attributes = _KernelAttributes([f'"target-features"="{features}"'] if features else [])
    fn.attributes.add("noinline")           # one out-of-line copy per module keeps callers small
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    _EMIT[kind](b, list(fn.args), bw, loop)
    b.ret_void()
    return fn


def _ptr(context, builder, aryty, ary, idxty, idx):
    """Address of element ``idx`` of a Numba array."""
    data = context.make_array(aryty)(context, builder, ary).data
    etype = context.get_data_type(aryty.dtype)
    return builder.gep(data, [context.cast(builder, idx, idxty, types.int64)], source_etype=etype)


def _codegen(kind: str, bw: int, loop):
    """Lower a call ``kernel(<args per _SPECS[kind]>, loop)`` (each ``A`` given as an array and
    an element offset) to a call of the LLVM function of ``loop`` (a ``_Loop``; a string is the
    error message of a literal that names no loop, raised here)."""
    def codegen(context, builder, signature, args):
        if isinstance(loop, str):
            raise errors.NumbaValueError(loop)
        if kind == "amx" and not loop.amx:        # a branch the driver never takes on this loop
            builder.call(_declare(builder.module, "llvm.trap", ir.VoidType(), []), [])
            return context.get_dummy_value()
        ty, k, call_args = signature.args, 0, []
        for spec in _SPECS[kind]:
            if spec == "A":
                call_args.append(_ptr(context, builder, ty[k], args[k], ty[k + 1], args[k + 1]))
                k += 2
            else:
                call_args.append(context.cast(builder, args[k], ty[k], types.float32 if spec == "f" else types.int64))
                k += 1
        base = getattr(context.codegen(), "_tm_features", "")
        builder.call(_kernel_function(builder.module, kind, bw, loop, base), call_args)
        return context.get_dummy_value()

    return codegen


def _check_loop(loop_ty, index: int):
    """The ``_Loop`` of a literal loop argument, or the error message for a literal that names no
    loop (raised at lowering: a typing error here would make Numba retry the non-literal type).
    A non-literal loop asks Numba to make it literal (``ForceLiteralArg``), which works when it
    is an argument of the calling function."""
    if not isinstance(loop_ty, types.IntegerLiteral):
        raise errors.ForceLiteralArg({index}, fold_arguments=lambda args, kws: tuple(args))
    try:
        return loop_impl(loop_ty.literal_value)
    except (ValueError, KeyError, TypeError) as exc:
        return f"kernel loop: {exc}"


def _make_gemv(bw: int):
    @intrinsic(prefer_literal=True)
    def gemv(typingctx, w, w_off, nlines, nblocks, x, x_off, sumx, sx, scale, scale_off, bias, bias_off, out,
             out_off, nvalid, flags, loop):
        impl = _check_loop(loop, 16)
        return types.none(w, w_off, nlines, nblocks, x, x_off, sumx, sx, scale, scale_off, bias, bias_off, out,
                          out_off, nvalid, flags, loop), _codegen("gemv", bw, impl)

    gemv.__doc__ = (f"``gemv_u{bw}(w, w_off, nlines, nblocks, x, x_off, sumx, sx, scale, scale_off, bias, bias_off, "
                    f"out, out_off, nvalid, flags, loop)``: up to ``gemv_group`` blocks of {bw}-bit codes × one "
                    f"int8 vector, rows ``< nvalid`` stored; ``loop`` a literal ``isa`` loop id.")
    return gemv


def _make_gemm(bw: int, kind: str = "gemm"):
    index = 23 if kind == "amx" else 21

    def typer(args):
        impl = _check_loop(args[-1], index)
        return types.none(*args), _codegen(kind, bw, impl)

    if kind == "gemm":
        @intrinsic(prefer_literal=True)
        def fn(typingctx, w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale,
               scale_off, bias, bias_off, out, out_off, out_stride, nvalid, flags, loop):
            return typer((w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale,
                          scale_off, bias, bias_off, out, out_off, out_stride, nvalid, flags, loop))
    else:
        @intrinsic(prefer_literal=True)
        def fn(typingctx, w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale,
               scale_off, bias, bias_off, out, out_off, out_stride, nvalid, flags, scratch, scratch_off, loop):
            return typer((w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, scale,
                          scale_off, bias, bias_off, out, out_off, out_stride, nvalid, flags, scratch, scratch_off,
                          loop))

    fn.__doc__ = (f"``{kind}_u{bw}(w, w_off, nlines, nblocks, x, x_off, x_stride, nvec, sumx, sumx_off, sx, sx_off, "
                  f"scale, scale_off, bias, bias_off, out, out_off, out_stride, nvalid, flags"
                  f"{', scratch, scratch_off' if kind == 'amx' else ''}, loop)``: blocks of {bw}-bit codes × "
                  f"int8 vectors ``x + v·x_stride`` into ``out + v·out_stride``; ``loop`` a literal loop id.")
    return fn


KERNELS = {(kind, bw): (_make_gemv(bw) if kind == "gemv" else _make_gemm(bw, kind)) for kind in _SPECS
           for bw in (1, 2, 4, 8)}
gemv_u1, gemv_u2, gemv_u4, gemv_u8 = (KERNELS["gemv", bw] for bw in (1, 2, 4, 8))
gemm_u1, gemm_u2, gemm_u4, gemm_u8 = (KERNELS["gemm", bw] for bw in (1, 2, 4, 8))
amx_u1, amx_u2, amx_u4, amx_u8 = (KERNELS["amx", bw] for bw in (1, 2, 4, 8))


def _literal(v, what):
    if not isinstance(v, types.IntegerLiteral):
        raise errors.RequireLiteralValue(f"{what} must be a compile-time constant")
    return v.literal_value


@overload(gemv_group, inline="always")
def _gemv_group_ov(loop, bw):
    n = gemv_group(_literal(loop, "loop"), _literal(bw, "bw"))
    return lambda loop, bw: n


@overload(gemm_group, inline="always")
def _gemm_group_ov(loop, bw):
    rb, nv = gemm_group(_literal(loop, "loop"), _literal(bw, "bw"))
    return lambda loop, bw: (rb, nv)


@overload(uses_amx, inline="always")
def _uses_amx_ov(loop):
    flag = uses_amx(_literal(loop, "loop"))
    return lambda loop: flag


@intrinsic
def bits_to_f32(typingctx, u):
    """Reinterpret the bits of an int32 as a float32 (for a vectorizable ``2**n``)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen
