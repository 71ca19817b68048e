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

One call returns 16 int32 sums ``Σ_k u[r, k] · x_v[k]`` (u unsigned, x signed int8) over all
chunks, as a Numba ``UniTuple(int32, 16)``:
- ``panel_u{bw}``: 4 consecutive tiles (16 rows) × one vector (the batch-1 streaming case);
  two accumulators per row (alternating by plane) hide the ``vpdpbusd`` latency.
- ``batch_u{bw}``: one tile × 4 vectors: each unpacked weight register feeds 4 products.
In both the x planes are loaded once per chunk and shared by the four rows of a tile,
``llvm.prefetch`` runs ``PREFETCH_BYTES`` ahead in the weight stream, and the 16 horizontal
sums come out of one shuffle/add tree (``_fold``) instead of 16 separate reductions.

Two instruction choices share the loop skeleton:
- ``vnni``: ``llvm.x86.avx512.vpdpbusd.512`` (4 u8×s8 products summed into each i32 lane).
- ``generic``: the same sum written with plain vector IR (zext/sext to i32, multiply,
  add the four lanes of each group). It compiles for any LLVM target and is the fallback
  for CPUs without AVX512-VNNI. Both are exact, so both equal the NumPy reference.
"""
from __future__ import annotations

import llvmlite.binding as llvm
import llvmlite.ir as ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

TILE_ROWS = 4            # rows interleaved per tile: each x block load is shared by 4 rows
PANEL_TILES = 4          # tiles per "panel" call (16 rows, batch 1)
PANEL_ROWS = TILE_ROWS * PANEL_TILES
BATCH_VECS = 4           # activation vectors per "batch" call (one tile)
CHUNK_BYTES = 64
PREFETCH_BYTES = 4096    # how far ahead in the weight stream to prefetch

I8, I32, I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
V64I8 = ir.VectorType(I8, 64)
V16I32 = ir.VectorType(I32, 16)
V64I32 = ir.VectorType(I32, 64)
PTR = ir.PointerType()


def host_has_vnni() -> bool:
    """True when the host CPU (as LLVM sees it) supports AVX512-VNNI."""
    return llvm.get_host_cpu_features().get("avx512vnni", False)


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


def _broadcast(b: ir.IRBuilder, value, vty: ir.VectorType):
    zero = ir.Constant(vty, None)
    return b.shuffle_vector(b.insert_element(zero, value, _const(I32, 0)), zero,
                            ir.Constant(ir.VectorType(I32, vty.count), [_const(I32, 0)] * vty.count))


def _declare(module, name, ret, args):
    return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)


def _splat(value: int) -> ir.Constant:
    return ir.Constant(V64I8, [ir.Constant(I8, value)] * 64)


def _dot_vnni(b: ir.IRBuilder, acc, u, x):
    fn = _declare(b.module, "llvm.x86.avx512.vpdpbusd.512", V16I32, [V16I32] * 3)
    return b.call(fn, [acc, b.bitcast(u, V16I32), b.bitcast(x, V16I32)])


_GROUP_MASKS = [ir.Constant(V16I32, [ir.Constant(I32, 4 * i + j) for i in range(16)]) for j in range(4)]


def _dot_generic(b: ir.IRBuilder, acc, u, x):
    prod = b.mul(b.zext(u, V64I32), b.sext(x, V64I32))
    for mask in _GROUP_MASKS:
        acc = b.add(acc, b.shuffle_vector(prod, prod, mask))
    return acc


def _emit_tile_loop(b: ir.IRBuilder, w, x, x_stride, nchunks, bw: int, vnni: bool, nvec: int):
    """Emit the chunk loop of one tile (4 rows) against ``nvec`` activation vectors spaced
    ``x_stride`` bytes apart; returns ``sums[r][v]`` (``<16 x i32>`` partial sums) with the
    builder positioned after the loop."""
    fn, pre = b.function, b.block
    loop, done = fn.append_basic_block("loop"), fn.append_basic_block("done")
    dot = _dot_vnni if vnni else _dot_generic
    planes, cpi = 8 // bw, chunks_per_iter(bw)
    nacc = 2 if nvec == 1 else 1                   # enough independent vpdpbusd chains either way
    n_iter = b.lshr(nchunks, _const(I64, cpi - 1))
    zero = ir.Constant(V16I32, None)
    b.cbranch(b.icmp_signed(">", n_iter, _const(I64, 0)), loop, done)

    b.position_at_end(loop)
    i = b.phi(I64, "i")
    phis = [[[b.phi(V16I32) for _ in range(nacc)] for _ in range(nvec)] for _ in range(TILE_ROWS)]
    accs = [[list(a) for a in row] for row in phis]
    w_it = b.gep(w, [b.mul(i, _const(I64, cpi * TILE_ROWS * CHUNK_BYTES))], source_etype=I8)
    x_it = b.gep(x, [b.mul(i, _const(I64, cpi * planes * CHUNK_BYTES))], source_etype=I8)
    prefetch = _declare(b.module, "llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
    for line in range(cpi * TILE_ROWS):
        b.call(prefetch, [b.gep(w_it, [_const(I64, PREFETCH_BYTES + line * CHUNK_BYTES)], source_etype=I8),
                          _const(I32, 0), _const(I32, 3), _const(I32, 1)])
    x_vecs = [x_it if v == 0 else b.gep(x_it, [b.mul(x_stride, _const(I64, v))], source_etype=I8)
              for v in range(nvec)]
    step = 0
    for cc in range(cpi):
        xs = [[b.load(b.gep(xv, [_const(I64, (cc * planes + p) * CHUNK_BYTES)], source_etype=I8),
                      typ=V64I8, align=1) for p in range(planes)] for xv in x_vecs]
        for r in range(TILE_ROWS):
            off = (cc * TILE_ROWS + r) * CHUNK_BYTES
            word = b.load(b.gep(w_it, [_const(I64, off)], source_etype=I8), typ=V64I8, align=1)
            for p in range(planes):
                u = word if p == 0 else b.lshr(word, _splat(p * bw))
                if p < planes - 1:
                    u = b.and_(u, _splat((1 << bw) - 1))
                a = (step + p) % nacc
                for v in range(nvec):
                    accs[r][v][a] = dot(b, accs[r][v][a], u, xs[v][p])
        step += planes
    i_next = b.add(i, _const(I64, 1))
    b.cbranch(b.icmp_signed("<", i_next, n_iter), loop, done)
    i.add_incoming(_const(I64, 0), pre)
    i.add_incoming(i_next, loop)
    for r in range(TILE_ROWS):
        for v in range(nvec):
            for a in range(nacc):
                phis[r][v][a].add_incoming(zero, pre)
                phis[r][v][a].add_incoming(accs[r][v][a], loop)

    b.position_at_end(done)
    exits = [[[b.phi(V16I32) for _ in range(nacc)] for _ in range(nvec)] for _ in range(TILE_ROWS)]
    for r in range(TILE_ROWS):
        for v in range(nvec):
            for a in range(nacc):
                exits[r][v][a].add_incoming(zero, pre)
                exits[r][v][a].add_incoming(accs[r][v][a], loop)
    return [[exits[r][v][0] if nacc == 1 else b.add(*exits[r][v]) for v in range(nvec)] for r in range(TILE_ROWS)]


def _fold(b: ir.IRBuilder, xv, yv, width: int):
    """Two vectors of 16/width segments of ``width`` lanes -> one vector of twice as many
    segments of half the width (segment sums kept, X's segments first)."""
    half, segs = width // 2, 16 // width
    lo = [s * width + t for s in range(segs) for t in range(half)]
    hi = [s * width + half + t for s in range(segs) for t in range(half)]

    def mask(idx):
        return ir.Constant(V16I32, [_const(I32, k) for k in idx + [16 + k for k in idx]])

    return b.add(b.shuffle_vector(xv, yv, mask(lo)), b.shuffle_vector(xv, yv, mask(hi)))


def _reduce(b: ir.IRBuilder, vecs: list, width: int = 16):
    """Fold a power-of-two list of vectors (segments of ``width``) down to one vector."""
    while len(vecs) > 1:
        vecs = [_fold(b, vecs[k], vecs[k + 1], width) for k in range(0, len(vecs), 2)]
        width //= 2
    return vecs[0], width


def _panel_sums(b: ir.IRBuilder, w, x, nchunks, bw: int, vnni: bool):
    """16 int32 sums (one per row) of the 4 consecutive tiles at ``w`` against ``x``."""
    tile_bytes = b.mul(nchunks, _const(I64, TILE_ROWS * CHUNK_BYTES))
    parts = []
    for t in range(PANEL_TILES):
        wt = b.gep(w, [b.mul(tile_bytes, _const(I64, t))], source_etype=I8)
        sums = _emit_tile_loop(b, wt, x, None, nchunks, bw, vnni, nvec=1)
        parts.append(_reduce(b, [row[0] for row in sums])[0])
    return _reduce(b, parts, 16 // TILE_ROWS)[0]


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


def _shuffle(b: ir.IRBuilder, vec, idx):
    return b.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(I32, len(idx)), [_const(I32, k) for k in idx]))


def _scale(b: ir.IRBuilder, sums, bw: int, corr_sumx, scale_v, sx_v):
    """``s_r·s_x·(mult·sum − offset·Σx)`` lane-wise (float order of the reference:
    ``(float(acc)·s_r)·s_x``); ``corr_sumx`` holds Σx_q per lane."""
    offset, mult = code_params(bw)
    t = b.shl(sums, ir.Constant(V16I32, [_const(I32, 1)] * 16)) if mult == 2 else sums
    t = b.sub(t, b.mul(corr_sumx, ir.Constant(V16I32, [_const(I32, offset)] * 16)))
    return b.fmul(b.fmul(b.sitofp(t, scale_v.type), scale_v), sx_v)


def _panel_epilogue(b: ir.IRBuilder, sums, bw: int, sumx, sx, scale, bias, out, nvalid, flags):
    """``out[r] (+)= s_r·s_x·(mult·sum_r − offset·Σx) (+ bias[r])`` for the first ``nvalid`` rows."""
    v16f = ir.VectorType(ir.FloatType(), 16)
    y = _scale(b, sums, bw, _broadcast(b, b.trunc(sumx, I32), V16I32), b.load(scale, typ=v16f, align=4),
               _broadcast(b, sx, v16f))
    _store_rows(b, y, out, bias, nvalid, flags)


def _batch_epilogue(b: ir.IRBuilder, sums, bw: int, sumx, sx, scale, bias, out, out_stride, nrows, nvec, flags):
    """``out[v·out_stride + r] (+)= s_r·s_x[v]·(…) (+ bias[r])`` for rows ``r < nrows`` and
    vectors ``v < nvec`` of one tile × 4 vectors (``sums`` lane ``4r + v``)."""
    v4f, v4q = ir.VectorType(ir.FloatType(), 4), ir.VectorType(I64, 4)
    by_vec = [v for v in range(BATCH_VECS) for _ in range(TILE_ROWS)]      # lane 4v + r -> v
    by_row = [r for _ in range(BATCH_VECS) for r in range(TILE_ROWS)]      # lane 4v + r -> r
    sums_vr = _shuffle(b, sums, [4 * r + v for v, r in zip(by_vec, by_row)])
    sumx_v = _shuffle(b, b.trunc(b.load(sumx, typ=v4q, align=8), ir.VectorType(I32, 4)), by_vec)
    y = _scale(b, sums_vr, bw, sumx_v, _shuffle(b, b.load(scale, typ=v4f, align=4), by_row),
               _shuffle(b, b.load(sx, typ=v4f, align=4), by_vec))
    for v in range(BATCH_VECS):
        with b.if_then(b.icmp_signed(">", nvec, _const(I64, v))):
            dst = b.gep(out, [b.mul(out_stride, _const(I64, v))], source_etype=ir.FloatType())
            _store_rows(b, _shuffle(b, y, list(range(4 * v, 4 * v + 4))), dst, bias, nrows, flags)


# argument kinds of the two kernels: A = (array, element offset) -> pointer, i = int64, f = float32
_SPECS = {"panel": "AAiifAAAii", "batch": "AAiiAAAAAiiii"}
_LLVM_ARG = {"A": PTR, "i": I64, "f": ir.FloatType()}


def _kernel_function(module: ir.Module, kind: str, bw: int, vnni: bool) -> ir.Function:
    """Define (once per module) the LLVM function of one kernel kind:

    - ``panel(w, x, nchunks, sumx, sx, scale, bias, out, nvalid, flags)``: 4 consecutive tiles
      (16 rows) × one vector, epilogue ``_panel_epilogue``.
    - ``batch(w, x, x_stride, nchunks, sumx, sx, scale, bias, out, out_stride, nrows, nvec,
      flags)``: one tile (4 rows) × 4 vectors ``x + v·x_stride`` (bytes), epilogue
      ``_batch_epilogue``; ``sumx``/``sx`` must hold 4 entries.
    """
    name = f"g2quant_{kind}_u{bw}_{'vnni' if vnni else 'generic'}"
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [_LLVM_ARG[k] for k in _SPECS[kind]]), name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")           # one out-of-line copy per module keeps callers small
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    if kind == "panel":
        w, x, nchunks, sumx, sx, scale, bias, out, nvalid, flags = fn.args
        _panel_epilogue(b, _panel_sums(b, w, x, nchunks, bw, vnni), bw, sumx, sx, scale, bias, out, nvalid, flags)
    else:
        w, x, x_stride, nchunks, sumx, sx, scale, bias, out, out_stride, nrows, nvec, flags = fn.args
        sums = _emit_tile_loop(b, w, x, x_stride, nchunks, bw, vnni, nvec=BATCH_VECS)
        result, _ = _reduce(b, [s for row in sums for s in row])
        _batch_epilogue(b, result, bw, sumx, sx, scale, bias, out, out_stride, nrows, nvec, flags)
    b.ret_void()
    return fn


def _call_path(context, builder, kind, bw, flag, flag_ty, call_args):
    """Call the VNNI or the generic variant of a kernel. A literal ``use_vnni`` (the callers pass
    it through ``numba.literally``) compiles only the chosen variant; a run-time flag both."""
    if not HOST_VNNI or (isinstance(flag_ty, types.Literal) and not flag_ty.literal_value):
        builder.call(_kernel_function(builder.module, kind, bw, vnni=False), call_args)
        return
    if isinstance(flag_ty, types.Literal):
        builder.call(_kernel_function(builder.module, kind, bw, vnni=True), call_args)
        return
    generic = _kernel_function(builder.module, kind, bw, vnni=False)
    with builder.if_else(context.cast(builder, flag, flag_ty, types.boolean)) as (then, otherwise):
        with then:
            builder.call(_kernel_function(builder.module, kind, bw, vnni=True), call_args)
        with otherwise:
            builder.call(generic, call_args)


def _ptr(context, builder, aryty, ary, idxty, idx):
    """Address of element ``idx`` of a Numba array."""
    data = context.make_array(aryty)(context, builder, ary).data
    etype = context.get_data_type(aryty.dtype)
    return builder.gep(data, [context.cast(builder, idx, idxty, types.int64)], source_etype=etype)


def _codegen(kind: str, bw: int):
    """Lower a call ``kernel(<args per _SPECS[kind]>, use_vnni)`` (each ``A`` given as an array and
    an element offset) to a call of the VNNI or generic LLVM function."""
    def codegen(context, builder, signature, args):
        ty, k, call_args = signature.args, 0, []
        for spec in _SPECS[kind]:
            if spec == "A":
                call_args.append(_ptr(context, builder, ty[k], args[k], ty[k + 1], args[k + 1]))
                k += 2
            else:
                call_args.append(context.cast(builder, args[k], ty[k], types.float32 if spec == "f" else types.int64))
                k += 1
        _call_path(context, builder, kind, bw, args[k], ty[k], call_args)
        return context.get_dummy_value()

    return codegen


def _make_panel_intrinsic(bw: int):
    @intrinsic
    def panel(typingctx, w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off,
              out, out_off, nvalid, flags, use_vnni):
        return types.none(w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off,
                          out, out_off, nvalid, flags, use_vnni), _codegen("panel", bw)

    panel.__doc__ = (f"``panel(w, w_off, x, x_off, nchunks, sumx, sx, scale, scale_off, bias, bias_off, out, "
                     f"out_off, nvalid, flags, use_vnni)``: 16 rows of {bw}-bit codes × one int8 vector, "
                     f"scaled into ``out`` (``_panel_epilogue``).")
    return panel


def _make_batch_intrinsic(bw: int):
    @intrinsic
    def batch(typingctx, w, w_off, x, x_off, x_stride, nchunks, sumx, sumx_off, sx, sx_off, scale, scale_off,
              bias, bias_off, out, out_off, out_stride, nrows, nvec, flags, use_vnni):
        sig = types.none(w, w_off, x, x_off, x_stride, nchunks, sumx, sumx_off, sx, sx_off, scale, scale_off,
                         bias, bias_off, out, out_off, out_stride, nrows, nvec, flags, use_vnni)
        return sig, _codegen("batch", bw)

    batch.__doc__ = (f"``batch(w, w_off, x, x_off, x_stride, nchunks, sumx, sumx_off, sx, sx_off, scale, scale_off, "
                     f"bias, bias_off, out, out_off, out_stride, nrows, nvec, flags, use_vnni)``: one tile of {bw}-bit "
                     f"codes × 4 int8 vectors, scaled into ``out`` (``_batch_epilogue``).")
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
