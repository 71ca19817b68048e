"""Inner loops of the CPU engine, written in LLVM IR and exposed to Numba as ``@intrinsic``.

Numba has no vector types and LLVM emits no ``vpdpbusd`` from any plain loop, so the whole
inner loop is built here with llvmlite and called from ``@njit`` code.

Packed layout (produced by ``kernels.pack_u8``; see the ``kernels`` module docstring):
a tile holds ``TILE_ROWS = 4`` rows; its data is ``nchunks`` chunks of ``4 × 64`` bytes,
chunk ``c`` = the 64-byte slice ``c`` of row 0, then of row 1, 2, 3. A 64-byte row slice of
storage width ``bw`` holds ``P = 8 // bw`` *planes*: bits ``[p·bw, (p+1)·bw)`` of byte ``t``
hold the unsigned weight code for column ``k = c·64·P + p·64 + t``. Unpacking a plane is one
shift and one mask of a ``<64 x i8>`` register, and the plane then lines up with the 64
activation bytes ``x[c·64·P + p·64 : +64]``.

One call computes 16 int32 sums ``Σ_k u[r, k] · x_v[k]`` (u unsigned, x signed int8) over all
chunks and stores them scaled (``s_r·s_x·(mult·Σu·x − offset·Σx)``, plus bias) into ``out``:
- ``panel_u{bw}``: 4 consecutive tiles (16 rows) × one vector (the batch-1 streaming case);
  two accumulators per row (alternating) hide the multiply-add latency.
- ``batch_u{bw}``: one tile × 4 vectors: each unpacked weight register feeds 4 products (on
  ISAs with 16 vector registers in two passes of 2 vectors, so the accumulators stay in
  registers).
In both the x planes are loaded once per chunk and shared by the four rows of a tile,
``llvm.prefetch`` runs ``PREFETCH_BYTES`` ahead in the weight stream, and the 16 horizontal
sums come out of one shuffle/add tree (``_reduce``) instead of 16 separate reductions.

Inner loops (``isa.LOOPS``; the last argument of every intrinsic is the loop id as a Numba
*literal* int, so only that loop's IR is emitted; literal ``True``/``False`` still mean
avx512-vnni/portable). All are exact: integer sums, no saturation for any code and
``|x| ≤ 127`` (an accumulator only matters through the sum of its lanes, so each loop may
spread the products over its lanes as it likes):
- ``avx512-vnni``: ``llvm.x86.avx512.vpdpbusd.512`` (u8×s8, 4 products per i32 lane), zmm.
- ``avx-vnni``: ``llvm.x86.avx512.vpdpbusd.256`` in a function with AVX-VNNI and without
  AVX-512, which LLVM encodes as VEX ``{vex} vpdpbusd`` on ymm.
- ``avx2``: ``vpmaddubsw`` (u8×s8 → s16 pairs, ≤ 2·15·127 for 1–4-bit codes, so all planes of a
  chunk add up in s16) then ``vpmaddwd`` with ones (→ s32). 8-bit codes would saturate
  ``vpmaddubsw`` (2·255·127 > 32767), so they take the signed code ``q = u − 128`` and the sign
  trick ``vpmaddubsw(|q|, sign(q)·x)``: ``|q| ≤ 128`` as u8, ``|sign(q)·x| ≤ 127``, pair ≤ 32512.
- ``neon-dotprod``: ``sdot`` (s8×s8): 1–4-bit codes are ≤ 15, already valid signed bytes;
  8-bit codes use ``q = u − 128`` (i8mm's mixed-sign ``usdot`` is not on Cortex-A76).
- ``neon``: ``smull`` (s8×s8 → s16) summed in s16 as far as the bound allows, then
  ``saddlp`` (pairwise widen to s32) and add.
- ``portable``: plain vector IR, i16 products (``255·127 < 2^15``) summed in i16 as far as the
  bound allows, widened to i32 by contiguous slices: fast to compile on any LLVM target.
Where a loop uses the signed code ``q = u − 128`` its sums are ``Σ q·x`` directly and the
epilogue drops the ``offset·Σx`` term accordingly (``_Loop.code_bias``).

Each kernel function carries the target features of its loop (``"target-features"`` attribute,
appended to the ones Numba compiles for), so it compiles whatever ``NUMBA_CPU_NAME`` says,
and the avx2/avx-vnni kernels contain no AVX-512 instruction even on an AVX-512 host.
"""
from __future__ import annotations

import llvmlite.ir as ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from . import isa

TILE_ROWS = 4            # rows interleaved per tile: each x block load is shared by 4 rows
PANEL_TILES = 4          # tiles per "panel" call (16 rows, batch 1)
PANEL_ROWS = TILE_ROWS * PANEL_TILES
BATCH_VECS = 4           # activation vectors per "batch" call (one tile)
CHUNK_BYTES = 64
PREFETCH_BYTES = 4096    # how far ahead in the weight stream to prefetch
S16_MAX = 2 ** 15 - 1
ACT_QMAX = 127

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
V16I32 = ir.VectorType(I32, 16)
PTR = ir.PointerType()


def host_has_vnni() -> bool:
    """True when this CPU can run the avx512-vnni loop."""
    return "avx512-vnni" in isa.host_loops()


HOST_VNNI = host_has_vnni()


def code_params(bw: int) -> tuple[int, int]:
    """``(offset, mult)`` of the unsigned ``bw``-bit weight code: ``q = mult·u − offset``
    (bw 1 is binary ±1: u = (q + 1) / 2; otherwise u = q + 2^(bw−1))."""
    return (1, 2) if bw == 1 else (1 << (bw - 1), 1)


def chunks_per_iter(bw: int) -> int:
    """Chunks handled per loop iteration: 8-bit does two so each row keeps two accumulators busy."""
    return 2 if bw == 8 else 1


def k_block(bw: int) -> int:
    """Columns per loop iteration; K is padded to a multiple of this (128, 128, 256, 512)."""
    return CHUNK_BYTES * (8 // bw) * chunks_per_iter(bw)


def _const(ty, v):
    return ir.Constant(ty, v)


def _vec_const(ty: ir.VectorType, value: int) -> ir.Constant:
    return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)


def _broadcast(b: ir.IRBuilder, value, vty: ir.VectorType):
    zero = ir.Constant(vty, None)
    return b.shuffle_vector(b.insert_element(zero, value, _const(I32, 0)), zero,
                            ir.Constant(ir.VectorType(I32, vty.count), [_const(I32, 0)] * vty.count))


def _declare(module, name, ret, args):
    return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)


def _shuffle(b: ir.IRBuilder, vec, idx):
    return b.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(I32, len(idx)), [_const(I32, k) for k in idx]))


def _slices(b: ir.IRBuilder, vec, n: int) -> list:
    """``vec`` cut into contiguous slices of ``n`` lanes (free register selections)."""
    return [_shuffle(b, vec, list(range(s, s + n))) for s in range(0, vec.type.count, n)]


def _tree_sum(b: ir.IRBuilder, values: list):
    while len(values) > 1:
        values = [b.add(values[k], values[k + 1]) if k + 1 < len(values) else values[k]
                  for k in range(0, len(values), 2)]
    return values[0]


def _groups(values: list, size: int) -> list:
    return [values[k:k + size] for k in range(0, len(values), size)]


class _Chains:
    """The accumulators of one (row, vector) pair; ``add`` updates them round-robin, so
    consecutive multiply-adds go to independent dependency chains."""

    def __init__(self, values):
        self.values, self.next = list(values), 0

    def add(self, fn):
        k = self.next % len(self.values)
        self.values[k] = fn(self.values[k])
        self.next += 1


class _Loop:
    """One inner loop: vector width, accumulator shape, register budget and the multiply-add.

    ``vector_bytes``: bytes per weight/activation vector (64 zmm, 32 ymm, 16 NEON), so a
    64-byte chunk is handled in ``64 // vector_bytes`` parts; ``lanes``: i32 lanes per
    accumulator; ``panel_accs``: accumulators per row in the panel kernel; ``batch_group``:
    vectors per pass of the batch kernel; ``features``: LLVM target features its kernels need
    (appended to Numba's). ``row_chunk(b, chains, us, xs, bw)`` adds
    ``Σ_p Σ_t (us[p][t] − code_bias(bw))·xs[p][t]`` over the planes of one row part (``us``:
    ``<vector_bytes x i8>`` codes per plane, ``xs``: the activations per plane as ``prepare_x``
    made them) into ``chains``."""

    name = ""
    vector_bytes = 64
    lanes = 16
    panel_accs = 2
    batch_group = BATCH_VECS
    features = ""

    def code_bias(self, bw: int) -> int:
        return 0

    @property
    def acc_type(self) -> ir.VectorType:
        return ir.VectorType(I32, self.lanes)

    def prepare_x(self, b, x, bw: int):
        """The form of one activation vector that ``row_chunk`` takes (computed once per part and
        shared by the 4 rows of the tile); the ``<vector_bytes x i8>`` vector itself by default."""
        return x

    def row_chunk(self, b, chains: _Chains, us: list, xs: list, bw: int) -> None:
        raise NotImplementedError

    def _signed(self, b, u, bw):
        """Codes as signed bytes: as they are for bw ≤ 4 (u ≤ 15), ``u − 128`` for bw 8."""
        return b.xor(u, _vec_const(u.type, -128)) if self.code_bias(bw) else u

    def _max_code(self, bw):
        """Largest |code| the products see: 128 for the signed 8-bit code, else 2^bw − 1."""
        return 128 if self.code_bias(bw) else (1 << bw) - 1


class _Avx512Vnni(_Loop):
    name, vector_bytes, lanes, features = "avx512-vnni", 64, 16, "+avx512f,+avx512bw,+avx512vnni"

    def row_chunk(self, b, chains, us, xs, bw):
        fn = _declare(b.module, "llvm.x86.avx512.vpdpbusd.512", V16I32, [V16I32] * 3)
        for u, x in zip(us, xs):
            chains.add(lambda a: b.call(fn, [a, b.bitcast(u, V16I32), b.bitcast(x, V16I32)]))


class _AvxVnni(_Loop):
    name, vector_bytes, lanes, batch_group = "avx-vnni", 32, 8, 2
    features = "+avx2,+avxvnni,-avx512f"

    def row_chunk(self, b, chains, us, xs, bw):
        v8 = ir.VectorType(I32, 8)
        fn = _declare(b.module, "llvm.x86.avx512.vpdpbusd.256", v8, [v8] * 3)
        for u, x in zip(us, xs):
            chains.add(lambda a: b.call(fn, [a, b.bitcast(u, v8), b.bitcast(x, v8)]))


class _Avx2(_Loop):
    name, vector_bytes, lanes, batch_group = "avx2", 32, 8, 2
    features = "+avx2,-avx512f,-avxvnni,-gfni"

    def code_bias(self, bw):
        return 128 if bw == 8 else 0

    def row_chunk(self, b, chains, us, xs, bw):
        v32i8, v16i16, v8i32 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8)
        maddubs = _declare(b.module, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
        maddwd = _declare(b.module, "llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
        pairs = []                                  # s16 vectors of pair sums, exact
        for u, x in zip(us, xs):
            if self.code_bias(bw):                  # sign trick: |q| (u8, ≤ 128) × sign(q)·x
                q = self._signed(b, u, bw)
                absq = b.call(_declare(b.module, "llvm.abs.v32i8", v32i8, [v32i8, I1]), [q, _const(I1, 0)])
                sx = b.call(_declare(b.module, "llvm.x86.avx2.psign.b", v32i8, [v32i8, v32i8]), [x, q])
                pairs.append(b.call(maddubs, [absq, sx]))
            else:
                pairs.append(b.call(maddubs, [u, x]))
        ones = _vec_const(v16i16, 1)
        for group in _groups(pairs, S16_MAX // (2 * self._max_code(bw) * ACT_QMAX)):
            s16 = _tree_sum(b, group)
            chains.add(lambda a: b.add(a, b.call(maddwd, [s16, ones])))


class _NeonDotprod(_Loop):
    name, vector_bytes, lanes, batch_group, features = "neon-dotprod", 16, 4, 2, "+neon,+dotprod"

    def code_bias(self, bw):
        return 128 if bw == 8 else 0

    def row_chunk(self, b, chains, us, xs, bw):
        v16i8, v4i32 = ir.VectorType(I8, 16), ir.VectorType(I32, 4)
        fn = _declare(b.module, "llvm.aarch64.neon.sdot.v4i32.v16i8", v4i32, [v4i32, v16i8, v16i8])
        for u, x in zip(us, xs):
            q = self._signed(b, u, bw)
            chains.add(lambda a: b.call(fn, [a, q, x]))


class _Neon(_Loop):
    name, vector_bytes, lanes, batch_group, features = "neon", 16, 4, 2, "+neon"

    def code_bias(self, bw):
        return 128 if bw == 8 else 0

    def prepare_x(self, b, x, bw):
        return _slices(b, x, 8)                          # the two d-register halves

    def row_chunk(self, b, chains, us, xs, bw):
        # smull/smull2 (s8 × s8 → s16), summed in s16 while the bound allows (smlal), then
        # saddlp (s16 pairs → s32; sadalp with the add)
        v8i8, v8i16, v4i32 = ir.VectorType(I8, 8), ir.VectorType(I16, 8), ir.VectorType(I32, 4)
        smull = _declare(b.module, "llvm.aarch64.neon.smull.v8i16", v8i16, [v8i8, v8i8])
        saddlp = _declare(b.module, "llvm.aarch64.neon.saddlp.v4i32.v8i16", v4i32, [v8i16])
        prods = [b.call(smull, [uh, xh]) for u, x in zip(us, xs)
                 for uh, xh in zip(_slices(b, self._signed(b, u, bw), 8), x)]
        for group in _groups(prods, S16_MAX // (self._max_code(bw) * ACT_QMAX)):
            s16 = _tree_sum(b, group)
            chains.add(lambda a: b.add(a, b.call(saddlp, [s16])))


class _Portable(_Loop):
    name, vector_bytes, lanes, batch_group = "portable", 32, 8, 2

    def prepare_x(self, b, x, bw):
        return b.sext(x, ir.VectorType(I16, 32))

    def row_chunk(self, b, chains, us, xs, bw):
        v32i16, v8i32 = ir.VectorType(I16, 32), ir.VectorType(I32, 8)
        max_prod = self._max_code(bw) * ACT_QMAX
        prods = [b.mul(b.zext(u, v32i16), x) for u, x in zip(us, xs)]
        per_group = S16_MAX // max_prod
        for group in _groups(prods, per_group):
            s16, bound = _tree_sum(b, group), len(group) * max_prod
            while s16.type.count > 8 and 2 * bound <= S16_MAX:      # halve in i16 while exact
                lo, hi = _slices(b, s16, s16.type.count // 2)
                s16, bound = b.add(lo, hi), 2 * bound
            total = _tree_sum(b, [b.sext(s, v8i32) for s in _slices(b, s16, 8)])
            chains.add(lambda a: b.add(a, total))


_LOOP_IMPLS = {impl.name: impl for impl in (_Avx512Vnni(), _AvxVnni(), _Avx2(), _NeonDotprod(), _Neon(), _Portable())}
assert tuple(_LOOP_IMPLS) == isa.LOOPS


def loop_impl(loop) -> _Loop:
    """The ``_Loop`` of a loop id, name, or legacy bool (True = avx512-vnni, False = portable)."""
    if isinstance(loop, bool):
        return _LOOP_IMPLS["avx512-vnni" if loop else "portable"]
    return _LOOP_IMPLS[isa.loop_name(loop) if isinstance(loop, int) else isa.canonical(loop)]


def _emit_tile_loop(b: ir.IRBuilder, w, x, x_stride, nchunks, bw: int, loop: _Loop, nvec: int, n_iter=None):
    """Emit the chunk loop of one tile (4 rows) against ``nvec`` activation vectors spaced
    ``x_stride`` bytes apart; returns ``sums[r][v]`` (partial
    sums, ``loop.acc_type``) with the builder positioned after the loop. ``n_iter`` overrides
    the iteration count (0 skips the loop; the sums are then zero). Each 64-byte chunk is
    handled in parts of ``loop.vector_bytes``: per part the x planes are loaded once, then each
    row's part is loaded, unpacked and consumed, which keeps few registers live."""
    fn, pre = b.function, b.block
    body, done = fn.append_basic_block("loop"), fn.append_basic_block("done")
    planes, cpi, vb = 8 // bw, chunks_per_iter(bw), loop.vector_bytes
    vty = ir.VectorType(I8, vb)
    nacc = loop.panel_accs if nvec == 1 else 1     # enough independent chains either way
    if n_iter is None:
        n_iter = b.lshr(nchunks, _const(I64, cpi - 1))
    acc_t = loop.acc_type
    zero = ir.Constant(acc_t, None)
    b.cbranch(b.icmp_signed(">", n_iter, _const(I64, 0)), body, done)

    b.position_at_end(body)
    i = b.phi(I64, "i")
    phis = [[[b.phi(acc_t) for _ in range(nacc)] for _ in range(nvec)] for _ in range(TILE_ROWS)]
    chains = [[_Chains(a) for a in row] for row in phis]
    w_it = b.gep(w, [b.mul(i, _const(I64, cpi * TILE_ROWS * CHUNK_BYTES))], source_etype=I8)
    x_it = b.gep(x, [b.mul(i, _const(I64, cpi * planes * CHUNK_BYTES))], source_etype=I8)
    prefetch = _declare(b.module, "llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
    for line in range(cpi * TILE_ROWS):
        b.call(prefetch, [b.gep(w_it, [_const(I64, PREFETCH_BYTES + line * CHUNK_BYTES)], source_etype=I8),
                          _const(I32, 0), _const(I32, 3), _const(I32, 1)])
    x_vecs = [x_it if v == 0 else b.gep(x_it, [b.mul(x_stride, _const(I64, v))], source_etype=I8)
              for v in range(nvec)]
    mask = _vec_const(vty, (1 << bw) - 1)

    def load(ptr, off):
        return b.load(b.gep(ptr, [_const(I64, off)], source_etype=I8), typ=vty, align=1)

    for cc in range(cpi):
        for part in range(CHUNK_BYTES // vb):
            xs = [[loop.prepare_x(b, load(xv, (cc * planes + p) * CHUNK_BYTES + part * vb), bw) for p in range(planes)]
                  for xv in x_vecs]
            for r in range(TILE_ROWS):
                word = load(w_it, (cc * TILE_ROWS + r) * CHUNK_BYTES + part * vb)
                us = []
                for p in range(planes):
                    u = word if p == 0 else b.lshr(word, _vec_const(vty, p * bw))
                    us.append(b.and_(u, mask) if p < planes - 1 else u)
                for v in range(nvec):
                    loop.row_chunk(b, chains[r][v], us, xs[v], bw)
    i_next = b.add(i, _const(I64, 1))
    b.cbranch(b.icmp_signed("<", i_next, n_iter), body, done)
    i.add_incoming(_const(I64, 0), pre)
    i.add_incoming(i_next, body)
    for r in range(TILE_ROWS):
        for v in range(nvec):
            for a in range(nacc):
                phis[r][v][a].add_incoming(zero, pre)
                phis[r][v][a].add_incoming(chains[r][v].values[a], body)

    b.position_at_end(done)
    exits = [[[b.phi(acc_t) for _ in range(nacc)] for _ in range(nvec)] for _ in range(TILE_ROWS)]
    for r in range(TILE_ROWS):
        for v in range(nvec):
            for a in range(nacc):
                exits[r][v][a].add_incoming(zero, pre)
                exits[r][v][a].add_incoming(chains[r][v].values[a], body)
    return [[_tree_sum(b, exits[r][v]) for v in range(nvec)] for r in range(TILE_ROWS)]


def _fold(b: ir.IRBuilder, xv, yv, width: int):
    """Two vectors of ``L/width`` segments of ``width`` lanes -> one vector of twice as many
    segments of half the width (segment sums kept, X's segments first)."""
    lanes = xv.type.count
    half, segs = width // 2, lanes // width
    lo = [s * width + t for s in range(segs) for t in range(half)]
    hi = [s * width + half + t for s in range(segs) for t in range(half)]

    def mask(idx):
        return ir.Constant(ir.VectorType(I32, lanes), [_const(I32, k) for k in idx + [lanes + k for k in idx]])

    return b.add(b.shuffle_vector(xv, yv, mask(lo)), b.shuffle_vector(xv, yv, mask(hi)))


def _reduce(b: ir.IRBuilder, vecs: list, width: int | None = None):
    """Sum the segments of a power-of-two list of vectors (each ``L`` lanes in segments of
    ``width``, default one segment): returns ``(vector, width)`` holding the segment sums in list
    order, as one vector of ``L`` lanes when they fit (folds), else concatenated."""
    width = vecs[0].type.count if width is None else width
    while len(vecs) > 1 and width > 1:
        vecs = [_fold(b, vecs[k], vecs[k + 1], width) for k in range(0, len(vecs), 2)]
        width //= 2
    while len(vecs) > 1:
        n = vecs[0].type.count
        vecs = [b.shuffle_vector(vecs[k], vecs[k + 1], ir.Constant(ir.VectorType(I32, 2 * n),
                                                                    [_const(I32, j) for j in range(2 * n)]))
                for k in range(0, len(vecs), 2)]
    return vecs[0], width


def _repeat(b: ir.IRBuilder, count: int, body) -> None:
    """Emit ``for k in range(count): body(b, k)`` as a run-time loop (``body`` may emit loops
    itself), so the IR holds one copy of the body; the builder ends after the loop."""
    fn, pre = b.function, b.block
    head, done = fn.append_basic_block("rep"), fn.append_basic_block("rep_done")
    b.branch(head)
    b.position_at_end(head)
    k = b.phi(I64, "k")
    k.add_incoming(_const(I64, 0), pre)
    body(b, k)
    k_next = b.add(k, _const(I64, 1))
    k.add_incoming(k_next, b.block)
    b.cbranch(b.icmp_signed("<", k_next, _const(I64, count)), head, done)
    b.position_at_end(done)


def _slot(b: ir.IRBuilder, slots, index):
    """Address of element ``index`` (an i64 value or an int) of a stack array of vectors."""
    index = _const(I64, index) if isinstance(index, int) else index
    return b.gep(slots, [_const(I64, 0), index])


def _panel_sums(b: ir.IRBuilder, w, x, nchunks, bw: int, loop: _Loop):
    """16 int32 sums (one per row) of the 4 consecutive tiles at ``w`` against ``x``: one tile
    loop run for each tile, its 4 row sums folded into one vector kept on the stack."""
    tile_bytes = b.mul(nchunks, _const(I64, TILE_ROWS * CHUNK_BYTES))
    slots = cgutils.alloca_once(b, ir.ArrayType(loop.acc_type, PANEL_TILES))
    width = []

    def tile(b, t):
        wt = b.gep(w, [b.mul(tile_bytes, t)], source_etype=I8)
        sums = _emit_tile_loop(b, wt, x, None, nchunks, bw, loop, nvec=1)
        part, part_width = _reduce(b, [row[0] for row in sums])
        width.append(part_width)
        b.store(part, _slot(b, slots, t))

    _repeat(b, PANEL_TILES, tile)
    parts = [b.load(_slot(b, slots, t), typ=loop.acc_type) for t in range(PANEL_TILES)]
    return _reduce(b, parts, width[0])[0]


def _batch_sums(b: ir.IRBuilder, w, x, x_stride, nchunks, nvec, bw: int, loop: _Loop):
    """16 int32 sums (lane ``4r + v``) of one tile against 4 vectors, in passes of
    ``loop.batch_group`` vectors (a pass whose vectors are all beyond ``nvec`` is skipped; one
    copy of the pass in the IR, its sums kept on the stack)."""
    group = loop.batch_group
    passes = BATCH_VECS // group
    n_all = b.lshr(nchunks, _const(I64, chunks_per_iter(bw) - 1))
    if passes == 1:
        sums = _emit_tile_loop(b, w, x, x_stride, nchunks, bw, loop, nvec=group, n_iter=n_all)
        return _reduce(b, [s for row in sums for s in row])[0]
    per_pass = TILE_ROWS * group
    slots = cgutils.alloca_once(b, ir.ArrayType(loop.acc_type, passes * per_pass))

    def one_pass(b, p):
        v0 = b.mul(p, _const(I64, group))
        n_iter = b.select(b.icmp_signed(">", nvec, v0), n_all, _const(I64, 0))
        xp = b.gep(x, [b.mul(x_stride, v0)], source_etype=I8)
        part = _emit_tile_loop(b, w, xp, x_stride, nchunks, bw, loop, nvec=group, n_iter=n_iter)
        base = b.mul(p, _const(I64, per_pass))
        for r in range(TILE_ROWS):
            for v in range(group):
                b.store(part[r][v], _slot(b, slots, b.add(base, _const(I64, r * group + v))))

    _repeat(b, passes, one_pass)
    sums = [b.load(_slot(b, slots, (v // group) * per_pass + r * group + v % group), typ=loop.acc_type)
            for r in range(TILE_ROWS) for v in range(BATCH_VECS)]
    return _reduce(b, sums)[0]


def _store_rows(b: ir.IRBuilder, y, out, bias, nvalid, flags):
    """Store the first ``nvalid`` lanes of the float vector ``y`` to ``out``; ``flags`` bit 1 adds
    the values already in ``out`` first, bit 0 adds ``bias`` last, which keeps the reference's
    float order ``(W_ih·x + W_hh·h) + bias``."""
    n = y.type.count
    vf, vb, vi = y.type, ir.VectorType(ir.IntType(1), n), ir.VectorType(I32, n)
    lanes = ir.Constant(vi, [_const(I32, k) for k in range(n)])
    nv = b.trunc(b.select(b.icmp_signed(">", nvalid, _const(I64, n)), _const(I64, n), nvalid), I32)
    mask = b.icmp_signed("<", lanes, _broadcast(b, nv, vi))
    mload = _declare(b.module, f"llvm.masked.load.v{n}f32.p0", vf, [PTR, I32, vb, vf])
    mstore = _declare(b.module, f"llvm.masked.store.v{n}f32.p0", ir.VoidType(), [vf, PTR, I32, vb])
    slot = cgutils.alloca_once_value(b, y)
    with b.if_then(b.trunc(b.lshr(flags, _const(I64, 1)), ir.IntType(1))):
        old = b.call(mload, [out, _const(I32, 4), mask, ir.Constant(vf, None)])
        b.store(b.fadd(old, b.load(slot, typ=vf)), slot)
    with b.if_then(b.trunc(flags, ir.IntType(1))):
        bv = b.call(mload, [bias, _const(I32, 4), mask, ir.Constant(vf, None)])
        b.store(b.fadd(b.load(slot, typ=vf), bv), slot)
    b.call(mstore, [b.load(slot, typ=vf), out, _const(I32, 4), mask])


def _scale(b: ir.IRBuilder, sums, bw: int, loop: _Loop, corr_sumx, scale_v, sx_v):
    """``s_r·s_x·(mult·sum − offset·Σx)`` lane-wise (float order of the reference:
    ``(float(acc)·s_r)·s_x``); ``corr_sumx`` holds Σx_q per lane. When the loop summed
    ``(u − c)·x`` (``c = loop.code_bias(bw)``) the correction is ``offset − mult·c``."""
    offset, mult = code_params(bw)
    offset -= mult * loop.code_bias(bw)
    t = b.shl(sums, _vec_const(V16I32, 1)) if mult == 2 else sums
    if offset:
        t = b.sub(t, b.mul(corr_sumx, _vec_const(V16I32, offset)))
    return b.fmul(b.fmul(b.sitofp(t, scale_v.type), scale_v), sx_v)


def _panel_epilogue(b: ir.IRBuilder, sums, bw: int, loop: _Loop, sumx, sx, scale, bias, out, nvalid, flags):
    """``out[r] (+)= s_r·s_x·(mult·sum_r − offset·Σx) (+ bias[r])`` for the first ``nvalid`` rows."""
    v16f = ir.VectorType(ir.FloatType(), 16)
    y = _scale(b, sums, bw, loop, _broadcast(b, b.trunc(sumx, I32), V16I32), b.load(scale, typ=v16f, align=4),
               _broadcast(b, sx, v16f))
    _store_rows(b, y, out, bias, nvalid, flags)


def _batch_epilogue(b: ir.IRBuilder, sums, bw: int, loop: _Loop, sumx, sx, scale, bias, out, out_stride, nrows,
                    nvec, flags):
    """``out[v·out_stride + r] (+)= s_r·s_x[v]·(…) (+ bias[r])`` for rows ``r < nrows`` and
    vectors ``v < nvec`` of one tile × 4 vectors (``sums`` lane ``4r + v``)."""
    v4f, v4q = ir.VectorType(ir.FloatType(), 4), ir.VectorType(I64, 4)
    by_vec = [v for v in range(BATCH_VECS) for _ in range(TILE_ROWS)]      # lane 4v + r -> v
    by_row = [r for _ in range(BATCH_VECS) for r in range(TILE_ROWS)]      # lane 4v + r -> r
    sums_vr = _shuffle(b, sums, [4 * r + v for v, r in zip(by_vec, by_row)])
    sumx_v = _shuffle(b, b.trunc(b.load(sumx, typ=v4q, align=8), ir.VectorType(I32, 4)), by_vec)
    y = _scale(b, sums_vr, bw, loop, sumx_v, _shuffle(b, b.load(scale, typ=v4f, align=4), by_row),
               _shuffle(b, b.load(sx, typ=v4f, align=4), by_vec))
    for v in range(BATCH_VECS):
        with b.if_then(b.icmp_signed(">", nvec, _const(I64, v))):
            dst = b.gep(out, [b.mul(out_stride, _const(I64, v))], source_etype=ir.FloatType())
            _store_rows(b, _shuffle(b, y, list(range(4 * v, 4 * v + 4))), dst, bias, nrows, flags)


# argument kinds of the two kernels: A = (array, element offset) -> pointer, i = int64, f = float32
_SPECS = {"panel": "AAiifAAAii", "batch": "AAiiAAAAAiiii"}
_LLVM_ARG = {"A": PTR, "i": I64, "f": ir.FloatType()}


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
    """Define (once per module) the LLVM function of one kernel kind for one loop:

    - ``panel(w, x, nchunks, sumx, sx, scale, bias, out, nvalid, flags)``: 4 consecutive tiles
      (16 rows) × one vector, epilogue ``_panel_epilogue``.
    - ``batch(w, x, x_stride, nchunks, sumx, sx, scale, bias, out, out_stride, nrows, nvec,
      flags)``: one tile (4 rows) × 4 vectors ``x + v·x_stride`` (bytes), epilogue
      ``_batch_epilogue``; ``sumx``/``sx`` must hold 4 entries.
    """
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
    if kind == "panel":
        w, x, nchunks, sumx, sx, scale, bias, out, nvalid, flags = fn.args
        _panel_epilogue(b, _panel_sums(b, w, x, nchunks, bw, loop), bw, loop, sumx, sx, scale, bias, out,
                        nvalid, flags)
    else:
        w, x, x_stride, nchunks, sumx, sx, scale, bias, out, out_stride, nrows, nvec, flags = fn.args
        sums = _batch_sums(b, w, x, x_stride, nchunks, nvec, bw, loop)
        _batch_epilogue(b, sums, bw, loop, sumx, sx, scale, bias, out, out_stride, nrows, nvec, flags)
    b.ret_void()
    return fn


def _literal_loop(loop_ty) -> _Loop:
    """The ``_Loop`` named by the type of the last intrinsic argument (a literal loop id, or a
    literal bool: True = avx512-vnni, False = portable)."""
    return loop_impl(loop_ty.literal_value)


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
    if not isinstance(loop_ty, (types.IntegerLiteral, types.BooleanLiteral)):
        raise errors.ForceLiteralArg({index}, fold_arguments=lambda args, kws: tuple(args))
    try:
        return _literal_loop(loop_ty)
    except (ValueError, KeyError, TypeError) as exc:
        return f"kernel loop: {exc}"


def _make_panel_intrinsic(bw: int):
    @intrinsic(prefer_literal=True)
    def panel(typingctx, w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off,
              out, out_off, nvalid, flags, loop):
        impl = _check_loop(loop, 15)
        return types.none(w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off,
                          out, out_off, nvalid, flags, loop), _codegen("panel", bw, impl)

    panel.__doc__ = (f"``panel(w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off, out, "
                     f"out_off, nvalid, flags, loop)``: 16 rows of {bw}-bit codes × one int8 vector, "
                     f"scaled into ``out`` (``_panel_epilogue``); ``loop`` a literal ``isa`` loop id.")
    return panel


def _make_batch_intrinsic(bw: int):
    @intrinsic(prefer_literal=True)
    def batch(typingctx, w, w_off, x, x_off, x_stride, nchunks, sumx, sumx_off, sx, sx_off, scale, scale_off,
              bias, bias_off, out, out_off, out_stride, nrows, nvec, flags, loop):
        impl = _check_loop(loop, 20)
        sig = types.none(w, w_off, x, x_off, x_stride, nchunks, sumx, sumx_off, sx, sx_off, scale, scale_off,
                         bias, bias_off, out, out_off, out_stride, nrows, nvec, flags, loop)
        return sig, _codegen("batch", bw, impl)

    batch.__doc__ = (f"``batch(w, w_off, x, x_off, x_stride, nchunks, sumx, sumx_off, sx, sx_off, scale, scale_off, "
                     f"bias, bias_off, out, out_off, out_stride, nrows, nvec, flags, loop)``: one tile of {bw}-bit "
                     f"codes × 4 int8 vectors, scaled into ``out`` (``_batch_epilogue``); ``loop`` a literal "
                     f"``isa`` loop id.")
    return batch


@intrinsic
def bits_to_f32(typingctx, u):
    """Reinterpret the bits of an int32 as a float32 (for a vectorizable ``2**n``)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


panel_u1, panel_u2, panel_u4, panel_u8 = (_make_panel_intrinsic(bw) for bw in (1, 2, 4, 8))
batch_u1, batch_u2, batch_u4, batch_u8 = (_make_batch_intrinsic(bw) for bw in (1, 2, 4, 8))
