"""Every Numba ``@intrinsic`` of minibvit: the few operations written directly in LLVM IR.

Numba has no way to spell these in Python (a bit reinterpretation, a fused multiply-add with one
rounding in vector and scalar code alike, a 64-lane vector compare packed to a word, an explicit
512-bit popcount or byte dot-product step), so each is generated here and called from ordinary
``@njit`` code in minibvit.numerics, minibvit.kernels and minibvit.engine. Nothing here computes
anything on import; each intrinsic is compiled into the kernel that calls it.

    bit casts          as_float32, as_float64
    arithmetic         fma_f32, fma_f64
    popcount           popcount (scalar), popcount_assign / popcount_add (8 lanes, unrolled words)
    packing            bits64 (sign / nonzero bits of 64 elements) and its inverse select64,
                       below_bits64, at_least_bits64,
                       interval_bits64 (the engine's packed binarizer decisions)
    byte dot products  dot4_tile (register tiles of VPDPBUSD / VPMADDUBSW / portable steps, chosen at
                       compile time),
                       for_weight_bound
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# ---------------------------------------------------------------------------------------------
# bit casts and arithmetic

@intrinsic
def as_float32(typingctx, bits):
    """Reinterpret int32 bits as float32 (an LLVM bitcast, which vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def as_float64(typingctx, bits):
    """Reinterpret int64 bits as float64 (an LLVM bitcast, which vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


def _fma_codegen(float_type):
    def codegen(context, builder, signature, args):
        fma = builder.module.declare_intrinsic("llvm.fma", [float_type], ir.FunctionType(float_type, [float_type] * 3))
        return builder.call(fma, args)

    return codegen


@intrinsic
def fma_f32(typingctx, a, b, c):
    """a * b + c for float32 with a single rounding (LLVM's fma): unlike a "contract" fast-math flag it
    fuses in the vectorized loop body and in its scalar remainder alike."""
    return types.float32(types.float32, types.float32, types.float32), _fma_codegen(ir.FloatType())


@intrinsic
def fma_f64(typingctx, a, b, c):
    """a * b + c for float64 with a single rounding (LLVM's fma), as fma_f32."""
    return types.float64(types.float64, types.float64, types.float64), _fma_codegen(ir.DoubleType())


# ---------------------------------------------------------------------------------------------
# popcount

@intrinsic
def popcount(typingctx, x):
    """Population count of an integer's bit pattern (two's complement for signed types) through
    LLVM's ``llvm.ctpop`` at the integer's own width; returns the same type.

    LLVM lowers it to POPCNT / VPOPCNTD / VPOPCNTQ when the compile target has them and to a
    bit-trick sequence (vectorised with PSHUFB on AVX2) otherwise, so it is correct on every
    x86-64 CPU. ``np.bitwise_count`` has no Numba implementation, hence this intrinsic.
    """
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return x(x), codegen


POP_LANES = 8        # uint64 lanes per explicit vector step: one 512-bit register
_V8I64 = ir.VectorType(ir.IntType(64), POP_LANES)


def _make_popcount_accumulate(assign):
    """The intrinsic below; assign=True stores the sums, False adds them to acc."""
    return intrinsic(lambda typingctx, acc, group, words, xp, yp, w: _popcount_accumulate_typer(
        typingctx, acc, group, words, xp, yp, w, assign))


def _popcount_accumulate_typer(typingctx, acc, group, words, xp, yp, w, assign):
    """acc[8g:8g+8] (= if assign, else +=) sum_i popcount(combine(words[i], xp/yp[w+i, 8g:8g+8]))

    combine(a, x, y) = a ^ x (yp None), a & y (xp None), (a ^ x) & y (both given). acc: uint64 1-D,
    64-byte aligned; words: UniTuple of uint64; xp, yp: uint64 2-D aligned panels [W, width] (width a
    multiple of 8) or None.

    The eight lanes are written as an explicit <8 x i64> vector, so LLVM emits one 512-bit VPOPCNTQ
    per step on AVX-512 (VPOPCNTDQ) CPUs even where its loop vectoriser would pick 256-bit vectors
    (`prefer-256-bit` tuning), two 256-bit PSHUFB sequences on AVX2, and smaller pieces elsewhere."""
    if not (isinstance(acc, types.Array) and isinstance(words, types.UniTuple)):
        return None
    panels = [p for p in (xp, yp) if not isinstance(p, types.NoneType)]
    if not panels or not all(isinstance(p, types.Array) and p.ndim == 2 for p in panels):
        return None
    n_words = words.count
    has_x, has_y = not isinstance(xp, types.NoneType), not isinstance(yp, types.NoneType)

    def codegen(context, builder, signature, args):
        acc_arg, group_v, words_v, xp_arg, yp_arg, w_v = args
        module = builder.module
        ctpop = cgutils.get_or_insert_function(module, ir.FunctionType(_V8I64, [_V8I64]), "llvm.ctpop.v8i64")
        acc_arr = context.make_array(signature.args[0])(context, builder, acc_arg)
        lane0 = builder.mul(group_v, ir.Constant(group_v.type, POP_LANES))

        def panel_row(ty, arg, word):
            arr = context.make_array(ty)(context, builder, arg)
            row_items = cgutils.unpack_tuple(builder, arr.shape, 2)[1]
            offset = builder.add(builder.mul(builder.add(w_v, ir.Constant(w_v.type, word)), row_items), lane0)
            ptr = builder.bitcast(builder.gep(arr.data, [offset]), _V8I64.as_pointer())
            return builder.load(ptr, align=64)

        total = None
        for i in range(n_words):
            word = builder.extract_value(words_v, i)
            splat = builder.insert_element(ir.Constant(_V8I64, ir.Undefined), word, ir.Constant(ir.IntType(32), 0))
            splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), POP_LANES),
                                                                     [0] * POP_LANES))
            bits = builder.xor(splat, panel_row(signature.args[3], xp_arg, i)) if has_x else splat
            if has_y:
                bits = builder.and_(bits, panel_row(signature.args[4], yp_arg, i))
            count = builder.call(ctpop, [bits])
            total = count if total is None else builder.add(total, count)
        acc_ptr = builder.bitcast(builder.gep(acc_arr.data, [lane0]), _V8I64.as_pointer())
        if not assign:
            total = builder.add(builder.load(acc_ptr, align=64), total)
        builder.store(total, acc_ptr, align=64)
        return context.get_dummy_value()

    return types.void(acc, group, words, xp, yp, w), codegen


popcount_assign = _make_popcount_accumulate(assign=True)
popcount_add = _make_popcount_accumulate(assign=False)


# ---------------------------------------------------------------------------------------------
# packing 64 elements into one word

@intrinsic
def bits64(typingctx, row, start):
    """uint64 whose bit j is _bit(row[start + j]), j < 64. Loads the 64 elements as one vector and
    bitcasts the 64 comparison results to an i64, which LLVM turns into vector compares and mask
    moves (VCMPPS + KMOV on AVX-512, VMOVMSKPS on AVX2)."""
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.layout == "C"
            and isinstance(row.dtype, (types.Float, types.Integer))):
        return None

    def codegen(context, builder, signature, args):
        row_arg, start_v = args
        dtype = signature.args[0].dtype
        arr = context.make_array(signature.args[0])(context, builder, row_arg)
        vector_t = ir.VectorType(context.get_value_type(dtype), 64)
        ptr = builder.bitcast(builder.gep(arr.data, [start_v]), vector_t.as_pointer())
        values = builder.load(ptr, align=dtype.bitwidth // 8)
        if isinstance(dtype, types.Float):
            bits = builder.fcmp_ordered("<", values, ir.Constant(vector_t, [0.0] * 64))
        else:
            bits = builder.icmp_unsigned("!=", values, ir.Constant(vector_t, [0] * 64))
        return builder.bitcast(bits, ir.IntType(64))

    return types.uint64(row, start), codegen


# The engine's packers: like bits64 they load 64 elements as one vector, compare them and bitcast
# the 64 results to an i64 (vector compares into mask registers on AVX-512, VMOVMSKPS-style
# sequences on AVX2). Each reads elements start .. start + 63 of contiguous 1-D arrays; partial
# last words go through the callers' scalar loops.

def _is_row(array, dtype):
    return isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C" and array.dtype == dtype


def _load64(context, builder, array_type, array, start):
    data = context.make_array(array_type)(context, builder, array).data
    vector_t = ir.VectorType(context.get_value_type(array_type.dtype), 64)
    return builder.load(builder.bitcast(builder.gep(data, [start]), vector_t.as_pointer()),
                        align=array_type.dtype.bitwidth // 8)


@intrinsic
def below_bits64(typingctx, values, shift, start):
    """Bit j = not (values[start + j] - shift[start + j] >= 0) (float32 subtraction; NaN -> 1)."""
    if not (_is_row(values, types.float32) and _is_row(shift, types.float32)):
        return None

    def codegen(context, builder, signature, args):
        diff = builder.fsub(_load64(context, builder, signature.args[0], args[0], args[2]),
                            _load64(context, builder, signature.args[1], args[1], args[2]))
        below = builder.fcmp_unordered("<", diff, ir.Constant(diff.type, [0.0] * 64))
        return builder.bitcast(below, ir.IntType(64))

    return types.uint64(values, shift, start), codegen


@intrinsic
def at_least_bits64(typingctx, values, start, threshold):
    """Bit j = values[start + j] >= threshold (int32)."""
    if not (_is_row(values, types.int32) and isinstance(threshold, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        v = _load64(context, builder, signature.args[0], args[0], args[1])
        t = context.cast(builder, args[2], signature.args[2], types.int32)
        splat = builder.insert_element(ir.Constant(v.type, ir.Undefined), t, ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), 64), [0] * 64))
        return builder.bitcast(builder.icmp_signed(">=", v, splat), ir.IntType(64))

    return types.uint64(values, start, threshold), codegen


@intrinsic
def interval_bits64(typingctx, values, lo, span, flip, start):
    """Bit j = (uint32(values - lo) <= uint32(span)) != (flip != 0) at element start + j (int32
    arrays): lo <= value <= lo + span, inverted where flip is set (see _interval_operands)."""
    if not all(_is_row(a, types.int32) for a in (values, lo, span, flip)):
        return None

    def codegen(context, builder, signature, args):
        v, low, width, invert = (_load64(context, builder, signature.args[i], args[i], args[4]) for i in range(4))
        inside = builder.icmp_unsigned("<=", builder.sub(v, low), width)
        flipped = builder.icmp_unsigned("!=", invert, ir.Constant(invert.type, [0] * 64))
        return builder.bitcast(builder.xor(inside, flipped), ir.IntType(64))

    return types.uint64(values, lo, span, flip, start), codegen

@intrinsic
def select64(typingctx, word, if_set, if_clear, row, start):
    """row[start + j] = if_set where bit j of word is 1, else if_clear, j < 64: the inverse of bits64.
    Bitcasts the i64 to 64 lanes of i1 and stores one vector select (a masked blend on AVX-512)."""
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.layout == "C"
            and isinstance(row.dtype, types.Float) and isinstance(word, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        word_v, set_v, clear_v, row_arg, start_v = args
        row_t = signature.args[3]
        element_t = context.get_value_type(row_t.dtype)
        vector_t = ir.VectorType(element_t, 64)

        def splat(value, value_type):
            value = context.cast(builder, value, value_type, row_t.dtype)
            v = builder.insert_element(ir.Constant(vector_t, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), 64), [0] * 64))

        mask = builder.bitcast(context.cast(builder, word_v, signature.args[0], types.uint64),
                               ir.VectorType(ir.IntType(1), 64))
        chosen = builder.select(mask, splat(set_v, signature.args[1]), splat(clear_v, signature.args[2]))
        data = context.make_array(row_t)(context, builder, row_arg).data
        builder.store(chosen, builder.bitcast(builder.gep(data, [start_v]), vector_t.as_pointer()),
                      align=row_t.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.void(word, if_set, if_clear, row, start), codegen


# ---------------------------------------------------------------------------------------------
# byte dot products (8-bit activations x ternary weights, minibvit.kernels.ternary)

DOT4_LANES = 16      # int32 lanes (output columns) of one byte dot-product step
_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V64I8, _V16I32 = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16)


def _target_features(context):
    """The '+feature' names of the target Numba is compiling for (host CPU unless overridden)."""
    features = getattr(context.codegen(), "_tm_features", None)
    if features is None:
        from numba.core import config
        import llvmlite.binding as llvm
        features = config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm.get_host_cpu_features().flatten()
    return {f[1:] for f in features.split(",") if f.startswith("+")}


def _dot4_instruction(context):
    features = _target_features(context)
    if {"avx512vnni", "avx512bw"} <= features:
        return "vnni"
    if "avx2" in features:
        return "avx2"
    return "portable"


def _dot4_step(builder, kind, acc, a_bytes, w_bytes, small_weights=False):
    """acc[l] + sum_{q<4} zext(a_bytes[4l+q]) * sext(w_bytes[4l+q]), l < 16, for one instruction kind.
    small_weights: every |w| <= 64 (ternary weights), so that on AVX2 one VPMADDUBSW is exact."""
    module = builder.module
    if kind == "vnni":
        fn = cgutils.get_or_insert_function(module, ir.FunctionType(_V16I32, [_V16I32, _V64I8, _V64I8]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, a_bytes, w_bytes])
    if kind == "avx2":
        # VPMADDUBSW adds two u8 x s8 products in int16 and saturates: 2 * 255 * 127 does not fit.
        # With u = 16 hi + lo (nibbles), each pair sum is at most 2 * 15 * 128 in magnitude, exact;
        # VPMADDWD widens each to the quad sums in int32: sum u w = 16 sum hi w + sum lo w, exact
        # for every u8 and s8 (the ternary, 8-bit weight and 8-bit attention operands alike).
        v32i8, v16i16, v8i32 = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
        maddubs = cgutils.get_or_insert_function(module, ir.FunctionType(v16i16, [v32i8, v32i8]), "llvm.x86.avx2.pmadd.ub.sw")
        maddwd = cgutils.get_or_insert_function(module, ir.FunctionType(v8i32, [v16i16, v16i16]), "llvm.x86.avx2.pmadd.wd")
        ones, sixteens = ir.Constant(v16i16, [1] * 16), ir.Constant(v16i16, [16] * 16)
        low_nibble, four = ir.Constant(v32i8, [15] * 32), ir.Constant(v32i8, [4] * 32)
        halves = []
        for h in range(2):
            lanes = ir.Constant(ir.VectorType(_I32, 32), [32 * h + i for i in range(32)])
            a_half = builder.shuffle_vector(a_bytes, a_bytes, lanes)
            w_half = builder.shuffle_vector(w_bytes, w_bytes, lanes)
            if small_weights:  # a pair sum is at most 2 * 255 * 64 = 32640: one VPMADDUBSW is exact
                halves.append(builder.call(maddwd, [builder.call(maddubs, [a_half, w_half]), ones]))
                continue
            lo = builder.and_(a_half, low_nibble)
            hi = builder.lshr(a_half, four)
            sums = builder.add(builder.call(maddwd, [builder.call(maddubs, [hi, w_half]), sixteens]),
                               builder.call(maddwd, [builder.call(maddubs, [lo, w_half]), ones]))
            halves.append(sums)
        both = builder.shuffle_vector(halves[0], halves[1], ir.Constant(_V16I32, list(range(16))))
        return builder.add(acc, both)
    v64i32 = ir.VectorType(_I32, 64)
    products = builder.mul(builder.zext(a_bytes, v64i32), builder.sext(w_bytes, v64i32))
    for q in range(4):
        lanes = ir.Constant(_V16I32, [4 * lane + q for lane in range(16)])
        acc = builder.add(acc, builder.shuffle_vector(products, products, lanes))
    return acc


def for_weight_bound(builder, kind, small_weights, emit):
    """emit(small) the code of a byte dot-product intrinsic: on AVX2 twice, under a branch on the runtime
    boolean small_weights (every |w| <= 64: _dot4_step's one-instruction step), elsewhere once (the same
    code either way). emit loads, accumulates and stores itself, so neither branch returns a value."""
    if kind != "avx2":
        emit(False)
        return
    with builder.if_else(small_weights) as (small, exact):
        with small:
            emit(True)
        with exact:
            emit(False)


def dot4_tile(n_rows, n_groups):
    """The intrinsic dot4_tile(acc, group, a_quads, m, panel, small_weights) of an n_rows x n_groups
    register tile (see _dot4_tile_typer); small_weights: every |panel| <= 64 (ternary weights:
    _dot4_step's one-instruction AVX2 step)."""
    return intrinsic(lambda typingctx, acc, group, a_quads, m, panel, small_weights: _dot4_tile_typer(
        typingctx, acc, group, a_quads, m, panel, n_rows, n_groups))


def _dot4_tile_typer(typingctx, acc, group, a_quads, m, panel, n_rows, n_groups):
    """acc[r, 16(group + g) + l] = sum_kq dot4(a_quads[m + r, kq], panel[kq, 64(group + g) + 4l : +4])
    for r < n_rows, g < n_groups, l < 16, over every K-quad kq < a_quads.shape[1] (= panel's rows): a
    register tile, its n_rows x n_groups accumulators kept in registers for the whole K loop (an LLVM
    loop whose phi nodes are the accumulators), each weight vector loaded once for the n_rows rows and
    each activation quad broadcast once for the n_groups groups. acc: int32 2-D C [>= n_rows, width]
    (overwritten); a_quads: uint32 2-D C; panel: int8 2-D with a contiguous last axis. The
    instruction is chosen at compile time (_dot4_step)."""
    if not all(isinstance(t, types.Array) and t.ndim == 2 for t in (acc, a_quads, panel)):
        return None

    def codegen(context, builder, signature, args):
        acc_arg, group_v, a_arg, m_v, panel_arg, small_v = args
        kind = _dot4_instruction(context)
        index_t = group_v.type
        acc_arr = context.make_array(signature.args[0])(context, builder, acc_arg)
        a_arr = context.make_array(signature.args[2])(context, builder, a_arg)
        panel_arr = context.make_array(signature.args[4])(context, builder, panel_arg)
        acc_cols = cgutils.unpack_tuple(builder, acc_arr.shape, 2)[1]
        n_quads = cgutils.unpack_tuple(builder, a_arr.shape, 2)[1]
        row_bytes = cgutils.unpack_tuple(builder, panel_arr.strides, 2)[0]
        panel_bytes = builder.bitcast(panel_arr.data, _I8.as_pointer())
        i32, zero = _I32, ir.Constant(index_t, 0)
        # 512-bit registers (32 of them) hold the whole tile; AVX2's 16 256-bit ones hold one column group
        # of it (2 registers per accumulator), so there the tile is one K loop per group
        column_sets = [range(n_groups)] if kind == "vnni" else [[g] for g in range(n_groups)]

        def const(v):
            return ir.Constant(index_t, v)

        def k_loop(groups, small):
            tile = [(r, g) for r in range(n_rows) for g in groups]
            entry = builder.block
            loop, done = builder.append_basic_block("dot4_tile.loop"), builder.append_basic_block("dot4_tile.done")
            builder.cbranch(builder.icmp_signed(">", n_quads, zero), loop, done)
            builder.position_at_end(loop)
            kq = builder.phi(index_t)
            accs = [builder.phi(_V16I32) for _ in tile]
            weights = {}
            for g in groups:
                offset = builder.add(builder.mul(kq, row_bytes), builder.mul(builder.add(group_v, const(g)), const(64)))
                weights[g] = builder.load(builder.bitcast(builder.gep(panel_bytes, [offset]), _V64I8.as_pointer()),
                                          align=1)
            new = list(accs)
            for r in range(n_rows):
                a_index = builder.add(builder.mul(builder.add(m_v, const(r)), n_quads), kq)
                quad = builder.load(builder.gep(a_arr.data, [a_index]), align=4)
                splat = builder.insert_element(ir.Constant(_V16I32, ir.Undefined), quad, ir.Constant(i32, 0))
                splat = builder.bitcast(builder.shuffle_vector(splat, splat, ir.Constant(_V16I32, [0] * 16)), _V64I8)
                for i, (r_i, g) in enumerate(tile):
                    if r_i == r:
                        new[i] = _dot4_step(builder, kind, accs[i], splat, weights[g], small)
            kq_next = builder.add(kq, const(1))
            body_end = builder.block
            kq.add_incoming(zero, entry)
            kq.add_incoming(kq_next, body_end)
            for phi, value in zip(accs, new):
                phi.add_incoming(ir.Constant(_V16I32, None), entry)
                phi.add_incoming(value, body_end)
            builder.cbranch(builder.icmp_signed("<", kq_next, n_quads), loop, done)
            builder.position_at_end(done)
            finals = []
            for value in new:
                finals.append(builder.phi(_V16I32))
                finals[-1].add_incoming(ir.Constant(_V16I32, None), entry)
                finals[-1].add_incoming(value, body_end)
            for (r, g), final in zip(tile, finals):
                lane0 = builder.add(builder.mul(const(r), acc_cols), builder.mul(builder.add(group_v, const(g)), const(16)))
                builder.store(final, builder.bitcast(builder.gep(acc_arr.data, [lane0]), _V16I32.as_pointer()), align=4)

        def emit(small):
            for groups in column_sets:
                k_loop(groups, small)

        for_weight_bound(builder, kind, small_v, emit)
        return context.get_dummy_value()

    return types.void(acc, group, a_quads, m, panel, types.boolean), codegen
