"""Bit-packed binary and ternary matrix kernels (Numba), each with a NumPy reference.

Bit convention (larq compute-engine): bit 0 encodes +1, bit 1 encodes -1, and sign(0) = +1, so
``x >= 0`` packs to bit 0 (``-0.0`` too) and ``x < 0`` packs to bit 1 (NaN packs to bit 0).
Packing runs along the reduction axis K into uint64 words: bit j of word w holds element
64*w + j. The tail of the last word is zero, so for two packed +-1 vectors of true length K

    dot(a, b) = K - 2 * popcount(a XOR b)      (summed over words).

Layouts:
    activations        a_packed [M, W]       W = ceil(K / 64), row-major, packed along K
    GEMM weights       w_packed_T [W, N]     word-major ("K-major"), so the inner loop runs over N
    attention operands [B, M, W], [B, N, W]  both packed along their shared axis

Every fast kernel ``f`` has a plain NumPy ``f_reference`` beside it; the tests hold them bit-exact.
See docs/kernels.md for the measured speed and the AVX2 / AVX-512 notes.
"""
import contextlib

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

WORD_BITS = 64
_PANEL_COLS = 256       # at most this many output columns per task (one weight panel [W, cols] each)
_COL_ALIGN = 32         # panel widths are multiples of this (whole vectors, aligned rows)
_TASK_ROWS = 128        # about this many output rows per task
# Below these sizes a kernel runs on the calling thread only: even a spinning OpenMP worker
# (GOMP_SPINCOUNT exported) costs a few microseconds to start, a sleeping one ~50 us in a VM.
# Measured at 2 threads on the 8 shapes M in {520, 1576}, K, N in {192, 384}: popcount threshold 2M
# words 4.6x median over NumPy, 512K words 8.1x, 128K words 8.2x; packing threshold 1M -> 256K elements
# took the with-packing median from 5.2x to 6.0x. Without the spin (minibvit's default) the 32-shape
# 2-thread median was 6.92x with these thresholds and 7.10x with the old ones: within noise.
_PARALLEL_MIN_WORDS = 1 << 19       # popcount matmuls: M * N * W words
_PARALLEL_MIN_MACS = 1 << 24        # int8 x ternary: M * N * K multiply-adds
_PARALLEL_MIN_ELEMENTS = 1 << 18    # packing: elements


def _words(k):
    return (k + WORD_BITS - 1) // WORD_BITS


@contextlib.contextmanager
def _threads_for(work, parallel_min):
    """Yield the thread count a prange kernel should use: Numba's current one, or 1 (set for the
    duration) when work < parallel_min."""
    threads = numba.get_num_threads()
    if work >= parallel_min or threads == 1:
        yield threads
        return
    numba.set_num_threads(1)
    try:
        yield 1
    finally:
        numba.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# popcount
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------

def _bit(value):
    """The packed bit of one element: value < 0 for floats (sign bit; NaN and -0.0 give 0),
    value != 0 for integers (masks)."""
    return value < 0 if isinstance(value, (float, np.floating)) else value != 0


@overload(_bit, inline="always")
def _bit_overload(value):
    if isinstance(value, types.Float):
        return lambda value: np.uint64(value < 0)
    return lambda value: np.uint64(value != 0)


@intrinsic
def _bits64(typingctx, row, start):
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


@njit(parallel=True, cache=True)
def _pack_rows(x):
    """uint64 [R, ceil(K/64)] from x [R, K]: bit = _bit(x) (x < 0 for floats, x != 0 for integers)."""
    rows, k = x.shape
    n_words = (k + 63) // 64
    full_words = k // 64
    out = np.empty((rows, n_words), np.uint64)
    for r in prange(rows):
        row = x[r]
        for w in range(full_words):
            out[r, w] = _bits64(row, 64 * w)
        if full_words < n_words:
            word = np.uint64(0)
            for j in range(64 * full_words, k):
                word |= _bit(row[j]) << np.uint64(j - 64 * full_words)
            out[r, full_words] = word
    return out


def _as_rows(x, name):
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the packed axis K is the last one)")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last axis; K must be >= 1")
    return x, np.ascontiguousarray(x.reshape(-1, x.shape[-1]))


def pack_signs(x):
    """Pack the signs of the last axis of a float array into uint64 words.

    Inputs:
        x: float array [..., K]
    Returns:
        uint64 [..., ceil(K/64)]; bit j of word w is 1 where x[..., 64*w + j] < 0 (sign -1),
        0 where x >= 0 (sign(0) = +1); tail bits of the last word are 0.
    """
    x, rows = _as_rows(x, "x")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"pack_signs expects a float array, got {x.dtype}; use pack_bits for masks")
    with _threads_for(rows.size, _PARALLEL_MIN_ELEMENTS):
        packed = _pack_rows(rows)
    return packed.reshape(x.shape[:-1] + (_words(x.shape[-1]),))


def pack_bits(mask):
    """Pack a {0,1} (or bool) mask along its last axis: bit = 1 where the mask is nonzero.

    Inputs:
        mask: bool or numeric array [..., K]
    Returns:
        uint64 [..., ceil(K/64)], tail bits 0.
    """
    mask, rows = _as_rows(mask, "mask")
    if rows.dtype != np.bool_:
        rows = rows != 0
    with _threads_for(rows.size, _PARALLEL_MIN_ELEMENTS):
        packed = _pack_rows(rows.view(np.uint8))
    return packed.reshape(mask.shape[:-1] + (_words(mask.shape[-1]),))


def _packbits_reference(bits):
    k = bits.shape[-1]
    pad = _words(k) * WORD_BITS - k
    bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), bool)], axis=-1)
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return packed.view("<u8").astype(np.uint64)


def pack_signs_reference(x):
    """NumPy reference of pack_signs (np.packbits, little bit order)."""
    x = np.asarray(x)
    return _packbits_reference(x < 0)


def pack_bits_reference(mask):
    """NumPy reference of pack_bits."""
    return _packbits_reference(np.asarray(mask) != 0)


def _check_packed(packed, k, name):
    packed = np.asarray(packed)
    if packed.dtype != np.uint64:
        raise TypeError(f"{name} must be uint64 packed words, got {packed.dtype}")
    if packed.ndim == 0 or packed.shape[-1] != _words(k):
        raise ValueError(f"{name} has {packed.shape[-1] if packed.ndim else 0} words on its last "
                         f"axis but K={k} needs ceil(K/64)={_words(k)}")
    return packed


def unpack_bits(packed, k):
    """Inverse of pack_bits: uint64 [..., ceil(K/64)] -> uint8 {0,1} [..., K]."""
    packed = _check_packed(packed, k, "packed")
    as_bytes = np.ascontiguousarray(packed.astype("<u8")).view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1, count=k, bitorder="little")


def unpack_signs(packed, k):
    """Inverse of pack_signs: uint64 [..., ceil(K/64)] -> float32 +-1 [..., K] (bit 1 -> -1)."""
    return (1.0 - 2.0 * unpack_bits(packed, k)).astype(np.float32)


def pack_weight(w):
    """Lay out a float weight [N, K] (y = x @ w.T) for binary_gemm: signs packed along K,
    transposed word-major.

    Inputs:
        w: float [N, K]
    Returns:
        uint64 [ceil(K/64), N] C-contiguous: w_packed_T[w_idx, n] holds K-bits 64*w_idx.. of row n.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"pack_weight expects a 2-D weight [N, K], got shape {w.shape}")
    return np.ascontiguousarray(pack_signs(w).T)


def pack_ternary_weight(w):
    """Bit-planes of a ternary weight [N, K] with values in {-1, 0, +1}, laid out word-major.

    Returns:
        (w_nonzero, w_sign): uint64 [ceil(K/64), N] each; nonzero bit = (w != 0),
        sign bit = (w < 0) (so sign bits are 0 wherever the weight is 0).
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"pack_ternary_weight expects a 2-D weight [N, K], got shape {w.shape}")
    if not np.isin(w, (-1, 0, 1)).all():
        raise ValueError("pack_ternary_weight expects values in {-1, 0, +1}; quantize first")
    return (np.ascontiguousarray(pack_bits(w != 0).T),
            np.ascontiguousarray(pack_bits(w < 0).T))


# ---------------------------------------------------------------------------------------------
# the popcount matmul core: out[b, m, n] = row_offset[b, m] + col_offset[b, n]
#                                          - 2 * sum_w popcount(combine(a[b, m, w], planes[b, w, n]))
# combine(a, x, y) = a ^ x (y is None), a & y (x is None), (a ^ x) & y (both given).
# ---------------------------------------------------------------------------------------------

@njit(cache=True)
def _aligned_empty(rows, cols, dtype):
    """[rows, cols] of dtype, C-contiguous, first element on a 64-byte (cache line) boundary."""
    itemsize = np.empty(0, dtype).itemsize
    buf = np.empty(rows * cols + 64 // itemsize, dtype)
    start = ((-buf.ctypes.data) % 64) // itemsize
    return buf[start:start + rows * cols].reshape((rows, cols))


@njit(cache=True)
def _column_blocks(n_cols):
    """(number of column blocks, block width): equal blocks of at most _PANEL_COLS columns,
    the width rounded up to _COL_ALIGN (N=384 -> 2 x 192 rather than 256 + 128)."""
    n_blocks = (n_cols + _PANEL_COLS - 1) // _PANEL_COLS
    width = (n_cols + n_blocks - 1) // n_blocks
    return n_blocks, (width + _COL_ALIGN - 1) // _COL_ALIGN * _COL_ALIGN


@njit(cache=True)
def _row_blocks(n_rows, other_blocks, threads):
    """(number of row blocks, rows per block): about _TASK_ROWS rows each, and a task count
    (row blocks x other_blocks) that is a multiple of the thread count, so Numba's static split of
    the tasks gives every thread the same amount of work."""
    n_blocks = (n_rows + _TASK_ROWS - 1) // _TASK_ROWS
    while (n_blocks * other_blocks) % threads != 0 and n_blocks < n_rows:
        n_blocks += 1
    return n_blocks, (n_rows + n_blocks - 1) // n_blocks


def _copy_panel(planes, b, n0, nb, width):
    """Aligned [W, width] copy of planes[b, :, n0:n0+nb], zero-padded; None stays None."""
    n_words = planes.shape[1]
    panel = _aligned_empty(n_words, width, np.uint64)
    for w in range(n_words):
        src = planes[b, w, n0:n0 + nb]
        dst = panel[w]
        for j in range(nb):
            dst[j] = src[j]
        for j in range(nb, width):
            dst[j] = 0
    return panel


@overload(_copy_panel)
def _copy_panel_overload(planes, b, n0, nb, width):
    # picked by type, so a panel is an array (not an Optional) in the kernels that use it
    if isinstance(planes, types.NoneType):
        return lambda planes, b, n0, nb, width: None
    return _copy_panel


_POP_LANES = 8        # uint64 lanes per explicit vector step: one 512-bit register
_POP_JAM = 3          # words summed in registers per accumulator update (unroll-and-jam)
_V8I64 = ir.VectorType(ir.IntType(64), _POP_LANES)


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
        lane0 = builder.mul(group_v, ir.Constant(group_v.type, _POP_LANES))

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
            splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), _POP_LANES),
                                                                     [0] * _POP_LANES))
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


_popcount_assign = _make_popcount_accumulate(assign=True)
_popcount_add = _make_popcount_accumulate(assign=False)


def _accumulate_row(arow, xp, yp, acc):
    """acc[j] = sum_w popcount(combine(arow[w], panel[w, j])) for every panel column j < len(acc).

    _POP_JAM words are summed in registers per accumulator update, so the accumulator is loaded
    and stored once per three words; the first pass (1 to 3 words) assigns instead of adding,
    which saves zeroing it."""
    n_words = arow.shape[0]
    n_groups = acc.shape[0] // _POP_LANES
    head = n_words - (n_words - 1) // _POP_JAM * _POP_JAM
    if head == 3:
        words3 = (arow[0], arow[1], arow[2])
        for g in range(n_groups):
            _popcount_assign(acc, g, words3, xp, yp, 0)
    elif head == 2:
        words2 = (arow[0], arow[1])
        for g in range(n_groups):
            _popcount_assign(acc, g, words2, xp, yp, 0)
    else:
        words1 = (arow[0],)
        for g in range(n_groups):
            _popcount_assign(acc, g, words1, xp, yp, 0)
    for w in range(head, n_words, _POP_JAM):
        words3 = (arow[w], arow[w + 1], arow[w + 2])
        for g in range(n_groups):
            _popcount_add(acc, g, words3, xp, yp, w)


def _store_row(acc, acc_weight, orow, base, coff, rs, cs, bias):
    """Epilogue of one output row segment, fused while acc is in L1 (n = n0 + j, j < len(orow)):
    value = base + coff[j] + acc_weight * acc[j]      (coff None -> 0)
    integer: orow[j] = value                                 (rs is None)
    scaled:  orow[j] = float32(value) * rs * cs[j] + bias[j]"""
    for j in range(orow.shape[0]):
        value = base + (0 if coff is None else coff[j]) + acc_weight * np.int64(acc[j])
        orow[j] = value if rs is None else np.float32(value) * rs * cs[j] + bias[j]


# Per-row helpers are inlined into the row loop (Numba-level inlining, variants picked by argument
# types): a real call per row, with its array reference counting, costs as much as a whole row
# when K is small. acc_weight is a literal, so no 64-bit multiply is emitted.
overload(_accumulate_row, inline="always")(lambda arow, xp, yp, acc: _accumulate_row)


@overload(_store_row, inline="always", prefer_literal=True)
def _store_row_overload(acc, acc_weight, orow, base, coff, rs, cs, bias):
    if not isinstance(acc_weight, types.IntegerLiteral):
        return None
    weight = acc_weight.literal_value
    if isinstance(coff, types.NoneType) and isinstance(rs, types.NoneType):
        def store(acc, acc_weight, orow, base, coff, rs, cs, bias):
            for j in range(orow.shape[0]):
                orow[j] = base + weight * np.int64(acc[j])
    elif isinstance(rs, types.NoneType):
        def store(acc, acc_weight, orow, base, coff, rs, cs, bias):
            for j in range(orow.shape[0]):
                orow[j] = base + coff[j] + weight * np.int64(acc[j])
    elif isinstance(coff, types.NoneType):
        def store(acc, acc_weight, orow, base, coff, rs, cs, bias):
            for j in range(orow.shape[0]):
                orow[j] = np.float32(base + weight * np.int64(acc[j])) * rs * cs[j] + bias[j]
    else:
        def store(acc, acc_weight, orow, base, coff, rs, cs, bias):
            for j in range(orow.shape[0]):
                orow[j] = np.float32(base + coff[j] + weight * np.int64(acc[j])) * rs * cs[j] + bias[j]
    return store


@njit(cache=True, boundscheck=False)
def _panel_rows(a, b, m0, m1, xp, yp, n0, nb, width, row_offset, col_offset, row_scale, col_scale, bias, out):
    """Rows m0..m1-1 of batch b against one panel [W, width] (columns n0..n0+nb-1), epilogue included."""
    acc = _aligned_empty(1, width, np.uint64)[0]
    coff = None if col_offset is None else col_offset[b, n0:n0 + nb]
    cs = None if col_scale is None else col_scale[n0:n0 + nb]
    bi = None if bias is None else bias[n0:n0 + nb]
    for m in range(m0, m1):
        _accumulate_row(a[b, m], xp, yp, acc)
        rs = None if row_scale is None else row_scale[m]
        _store_row(acc, -2, out[b, m, n0:n0 + nb], row_offset[b, m], coff, rs, cs, bi)


@njit(parallel=True, cache=True, boundscheck=False)
def _popcount_matmul(a, x_planes, y_planes, row_offset, col_offset, row_scale, col_scale, bias, out, threads):
    """Fill out [B, M, N] with row_offset + col_offset - 2 * popcount sums (see the section
    comment), or its float epilogue. a [B, M, W]; x_planes, y_planes [B, W, N] or None;
    row_offset [B, M] int64; col_offset [B, N] int64 or None; scales/bias float32 [M]/[N]/[N] or
    None (all three None -> integer out, else all three given -> float out); threads: Numba's
    current thread count.

    Parallel over (batch, block of rows, block of columns), columns fastest: Numba's static
    schedule then hands each thread whole rows of the output, so no two threads write into the
    same cache line (interleaved column blocks made two threads slower than one). Each task
    copies its weight panel to an aligned, zero-padded buffer once and sweeps its rows over it
    (the panel stays in L1/L2)."""
    n_batch, n_rows, _ = a.shape
    n_cols = out.shape[2]
    col_blocks, width = _column_blocks(n_cols)
    row_blocks, height = _row_blocks(n_rows, n_batch * col_blocks, threads)
    for task in prange(n_batch * row_blocks * col_blocks):
        b = task // (row_blocks * col_blocks)
        row_block = (task // col_blocks) % row_blocks
        col_block = task % col_blocks
        n0 = col_block * width
        nb = min(width, n_cols - n0)
        m0 = row_block * height
        m1 = min(m0 + height, n_rows)
        xp = _copy_panel(x_planes, b, n0, nb, width)
        yp = _copy_panel(y_planes, b, n0, nb, width)
        _panel_rows(a, b, m0, m1, xp, yp, n0, nb, width, row_offset, col_offset, row_scale, col_scale, bias, out)


# ---------------------------------------------------------------------------------------------
# public binary kernels
# ---------------------------------------------------------------------------------------------

def _check_k(k, n_words, name):
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise TypeError(f"K must be an int (the true unpacked length), got {type(k).__name__}")
    if not (n_words - 1) * WORD_BITS < k <= n_words * WORD_BITS:
        raise ValueError(f"K={k} does not match {n_words} packed words in {name}: "
                         f"need {(n_words - 1) * WORD_BITS} < K <= {n_words * WORD_BITS}")
    return int(k)


def _check_words(x, name, ndim):
    x = np.asarray(x)
    if x.dtype != np.uint64:
        raise TypeError(f"{name} must be uint64 packed words (see pack_signs / pack_bits), got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes, got shape {x.shape}")
    return np.ascontiguousarray(x)


def _epilogue_args(n_rows, n_cols, row_scale, col_scale, bias):
    """None if no scaling was asked for, else float32 (row_scale [M], col_scale [N], bias [N])
    with ones / zeros for the missing ones."""
    if row_scale is None and col_scale is None and bias is None:
        return None
    args = []
    for value, size, fill, name in ((row_scale, n_rows, 1.0, "row_scale"), (col_scale, n_cols, 1.0, "col_scale"),
                                    (bias, n_cols, 0.0, "bias")):
        value = np.full(size, fill, np.float32) if value is None else np.asarray(value, np.float32)
        if value.shape != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {value.shape}")
        args.append(np.ascontiguousarray(value))
    return tuple(args)


def _matmul(a, x_planes, y_planes, row_offset, col_offset, epilogue, n_cols):
    n_batch, n_rows, _ = a.shape
    out = np.empty((n_batch, n_rows, n_cols), np.int32 if epilogue is None else np.float32)
    if out.size:
        with _threads_for(out.size * a.shape[2], _PARALLEL_MIN_WORDS) as threads:
            _popcount_matmul(a, x_planes, y_planes, row_offset, col_offset, *(epilogue or (None, None, None)), out,
                             threads)
    return out


def binary_gemm(a_packed, w_packed_T, K, row_scale=None, col_scale=None, bias=None):
    """Binary GEMM  out = A @ W.T  for +-1 matrices A [M, K], W [N, K], from packed bits.

    Inputs:
        a_packed:   uint64 [M, W]  pack_signs(A), W = ceil(K/64)
        w_packed_T: uint64 [W, N]  pack_weight(W) (word-major)
        K:          int, the true reduction length
        row_scale:  optional float32 [M]  (e.g. per-token activation scale)
        col_scale:  optional float32 [N]  (e.g. per-output-channel weight scale)
        bias:       optional float32 [N]
    Returns:
        int32 [M, N]  dot = K - 2 * popcount(a XOR w)            if no scale or bias is given
        float32 [M, N] dot * row_scale[m] * col_scale[n] + bias[n] otherwise, computed in the
        kernel's epilogue (missing scales are 1, a missing bias is 0).
    """
    a = _check_words(a_packed, "a_packed", 2)
    w = _check_words(w_packed_T, "w_packed_T", 2)
    if a.shape[1] != w.shape[0]:
        raise ValueError(f"a_packed [M, W]={a.shape} and w_packed_T [W, N]={w.shape} disagree on W")
    k = _check_k(K, a.shape[1], "a_packed")
    n_rows, n_cols = a.shape[0], w.shape[1]
    epilogue = _epilogue_args(n_rows, n_cols, row_scale, col_scale, bias)
    row_offset = np.full((1, n_rows), k, np.int64)
    return _matmul(a[None], w[None], None, row_offset, None, epilogue, n_cols)[0]


def _popcount_sum_reference(a, x, y):
    """sum_w popcount(combine(a[..., m, w], x/y[..., w, n])) with NumPy, one word at a time."""
    total = 0
    for w in range(a.shape[-1]):
        aw = a[..., :, w, None]
        if y is None:
            bits = aw ^ x[..., w, None, :]
        elif x is None:
            bits = aw & y[..., w, None, :]
        else:
            bits = (aw ^ x[..., w, None, :]) & y[..., w, None, :]
        total = total + np.bitwise_count(bits).astype(np.int64)
    return total


def binary_gemm_reference(a_packed, w_packed_T, K, row_scale=None, col_scale=None, bias=None):
    """NumPy reference of binary_gemm (same epilogue formula and float32 operation order)."""
    a = _check_words(a_packed, "a_packed", 2)
    w = _check_words(w_packed_T, "w_packed_T", 2)
    dot = K - 2 * _popcount_sum_reference(a, w, None)
    epilogue = _epilogue_args(a.shape[0], w.shape[1], row_scale, col_scale, bias)
    if epilogue is None:
        return dot.astype(np.int32)
    rs, cs, bias = epilogue
    return dot.astype(np.float32) * rs[:, None] * cs[None, :] + bias[None, :]


def _transpose_words(x):
    """[B, N, W] -> [B, W, N] C-contiguous (word-major, as _popcount_matmul wants its planes)."""
    return np.ascontiguousarray(x.transpose(0, 2, 1))


def binary_bmm(a_packed, b_packed, K):
    """Batched binary matmul  out[b] = A_b @ B_b.T  for +-1 A_b [M, K], B_b [N, K]
    (attention scores Q_b @ K_b.T per batch*head, both packed along the head dimension K).

    Inputs:
        a_packed: uint64 [B, M, W]; b_packed: uint64 [B, N, W]; K: int
    Returns:
        int32 [B, M, N] = K - 2 * popcount(a XOR b)
    """
    a = _check_words(a_packed, "a_packed", 3)
    b = _check_words(b_packed, "b_packed", 3)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"a_packed {a.shape} and b_packed {b.shape} must agree on B and W")
    k = _check_k(K, a.shape[2], "a_packed")
    row_offset = np.full(a.shape[:2], k, np.int64)
    return _matmul(a, _transpose_words(b), None, row_offset, None, None, b.shape[1])


def binary_bmm_reference(a_packed, b_packed, K):
    """NumPy reference of binary_bmm."""
    a = _check_words(a_packed, "a_packed", 3)
    b = _check_words(b_packed, "b_packed", 3)
    return (K - 2 * _popcount_sum_reference(a, b.transpose(0, 2, 1), None)).astype(np.int32)


def _row_popcount(x):
    """int64 [...]: popcount summed over the last (word) axis."""
    return np.bitwise_count(x).sum(axis=-1, dtype=np.int64)


def and_bmm(p_bits, v_packed, K):
    """Batched {0,1} x (+-1) matmul  out[b, m, d] = sum_k p[b, m, k] * v[b, k, d]
    (attention probabilities as bits times sign-binarised values).

    Inputs:
        p_bits:   uint64 [B, M, W]  pack_bits(P), P {0,1} [B, M, K] packed along the token axis K
        v_packed: uint64 [B, D, W]  pack_signs(V^T), V [B, K, D] transposed, packed along K
        K:        int, number of tokens
    Returns:
        int32 [B, M, D] = popcount(p AND NOT v) - popcount(p AND v) = popcount(p) - 2 popcount(p AND v)
    """
    p = _check_words(p_bits, "p_bits", 3)
    v = _check_words(v_packed, "v_packed", 3)
    if p.shape[0] != v.shape[0] or p.shape[2] != v.shape[2]:
        raise ValueError(f"p_bits {p.shape} and v_packed {v.shape} must agree on B and W")
    _check_k(K, p.shape[2], "p_bits")
    return _matmul(p, None, _transpose_words(v), _row_popcount(p), None, None, v.shape[1])


def and_bmm_reference(p_bits, v_packed, K):
    """NumPy reference of and_bmm: popcount(p & ~v) - popcount(p & v), computed literally."""
    p = _check_words(p_bits, "p_bits", 3)
    v = _transpose_words(_check_words(v_packed, "v_packed", 3))
    positive = _popcount_sum_reference(p, None, ~v)
    negative = _popcount_sum_reference(p, None, v)
    return (positive - negative).astype(np.int32)


def ternary_gemm_binary(a_packed, w_nonzero, w_sign, K, row_scale=None, col_scale=None, bias=None):
    """Binary activations x ternary weights:  out = A @ T.T, A +-1 [M, K], T {-1,0,+1} [N, K].

    Inputs:
        a_packed:  uint64 [M, W]  pack_signs(A)
        w_nonzero, w_sign: uint64 [W, N]  pack_ternary_weight(T)
        K, row_scale, col_scale, bias: as in binary_gemm
    Returns:
        int32 [M, N] = popcount(nz & ~(a ^ s)) - popcount(nz & (a ^ s))
                     = popcount(nz) - 2 popcount(nz & (a ^ s)),   or the float32 epilogue.
    """
    a = _check_words(a_packed, "a_packed", 2)
    nz = _check_words(w_nonzero, "w_nonzero", 2)
    sign = _check_words(w_sign, "w_sign", 2)
    if nz.shape != sign.shape or a.shape[1] != nz.shape[0]:
        raise ValueError(f"a_packed {a.shape}, w_nonzero {nz.shape}, w_sign {sign.shape}: need [M, W], [W, N], [W, N]")
    _check_k(K, a.shape[1], "a_packed")
    n_rows, n_cols = a.shape[0], nz.shape[1]
    epilogue = _epilogue_args(n_rows, n_cols, row_scale, col_scale, bias)
    col_offset = _row_popcount(nz.T)[None]
    return _matmul(a[None], sign[None], nz[None], np.zeros((1, n_rows), np.int64), col_offset,
                   epilogue, n_cols)[0]


def ternary_gemm_binary_reference(a_packed, w_nonzero, w_sign, K, row_scale=None, col_scale=None, bias=None):
    """NumPy reference of ternary_gemm_binary, computed literally as the two popcounts."""
    a = _check_words(a_packed, "a_packed", 2)
    nz = _check_words(w_nonzero, "w_nonzero", 2)
    sign = _check_words(w_sign, "w_sign", 2)
    agree = _popcount_sum_reference(~a, sign, nz)      # nz & ~(a ^ s) = nz & (~a ^ s)
    disagree = _popcount_sum_reference(a, sign, nz)
    dot = agree - disagree
    epilogue = _epilogue_args(a.shape[0], nz.shape[1], row_scale, col_scale, bias)
    if epilogue is None:
        return dot.astype(np.int32)
    rs, cs, bias = epilogue
    return dot.astype(np.float32) * rs[:, None] * cs[None, :] + bias[None, :]


# ---------------------------------------------------------------------------------------------
# 8-bit activations x ternary weights (TerViT)
#
# a (int8) * t (ternary) summed in groups of 4 along K with an unsigned-by-signed byte dot
# product: with u = a + 128 (uint8, = a XOR 0x80), sum_k a_k t_k = sum_k u_k t_k - 128 sum_k t_k.
# Activations are grouped into uint32 words of 4 consecutive K; weights are expanded from their
# bit-planes into int8 quads [ceil(K/4), N, 4]. One 512-bit step multiplies 16 columns x 4 K.
# The instruction is chosen when the kernel is compiled, from the CPU features Numba compiles for:
#   avx512vnni  VPDPBUSD: 64 multiply-adds in one instruction
#   avx2        VPMADDUBSW + VPMADDWD on 256-bit halves (pair sums are at most 2*255, no saturation)
#   otherwise   portable LLVM IR (widen, multiply, add groups of 4): correct, slow
# ---------------------------------------------------------------------------------------------

_QUAD_GROUP = 16     # int32 lanes (output columns) per 512-bit step
_QUAD_JAM = 8        # K-quads summed per accumulator update
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


def _dot4_step(builder, kind, acc, a_bytes, w_bytes):
    """acc[l] + sum_{q<4} zext(a_bytes[4l+q]) * sext(w_bytes[4l+q]), l < 16, for one instruction kind."""
    module = builder.module
    if kind == "vnni":
        fn = cgutils.get_or_insert_function(module, ir.FunctionType(_V16I32, [_V16I32, _V64I8, _V64I8]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, a_bytes, w_bytes])
    if kind == "avx2":
        v32i8, v16i16, v8i32 = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
        maddubs = cgutils.get_or_insert_function(module, ir.FunctionType(v16i16, [v32i8, v32i8]), "llvm.x86.avx2.pmadd.ub.sw")
        maddwd = cgutils.get_or_insert_function(module, ir.FunctionType(v8i32, [v16i16, v16i16]), "llvm.x86.avx2.pmadd.wd")
        ones = ir.Constant(v16i16, [1] * 16)
        halves = []
        for h in range(2):
            lanes = ir.Constant(ir.VectorType(_I32, 32), [32 * h + i for i in range(32)])
            a_half = builder.shuffle_vector(a_bytes, a_bytes, lanes)
            w_half = builder.shuffle_vector(w_bytes, w_bytes, lanes)
            halves.append(builder.call(maddwd, [builder.call(maddubs, [a_half, w_half]), ones]))
        both = builder.shuffle_vector(halves[0], halves[1], ir.Constant(_V16I32, list(range(16))))
        return builder.add(acc, both)
    v64i32 = ir.VectorType(_I32, 64)
    products = builder.mul(builder.zext(a_bytes, v64i32), builder.sext(w_bytes, v64i32))
    for q in range(4):
        lanes = ir.Constant(_V16I32, [4 * lane + q for lane in range(16)])
        acc = builder.add(acc, builder.shuffle_vector(products, products, lanes))
    return acc


@intrinsic
def _dot4_accumulate(typingctx, acc_row, group, a_quads, panel, kq):
    """acc_row[16g:16g+16] += sum_i sum_q u8(a_quads[i] byte q) * panel[kq+i, 64g + 4l + q] (l < 16)

    acc_row int32 1-D; a_quads: tuple of uint32 (4 activation bytes each, one per K-quad);
    panel: int8 2-D [K-quads, 4 * columns] with a contiguous last axis; rows kq .. kq+len-1."""
    if not (isinstance(acc_row, types.Array) and isinstance(panel, types.Array)
            and isinstance(a_quads, types.UniTuple)):
        return None
    n_quads = a_quads.count

    def codegen(context, builder, signature, args):
        acc_arg, group_v, quads_v, panel_arg, kq_v = args
        acc_arr = context.make_array(signature.args[0])(context, builder, acc_arg)
        panel_arr = context.make_array(signature.args[3])(context, builder, panel_arg)
        kind = _dot4_instruction(context)
        row_bytes = cgutils.unpack_tuple(builder, panel_arr.strides, 2)[0]
        index_t = group_v.type
        acc_ptr = builder.bitcast(builder.gep(acc_arr.data, [builder.mul(group_v, ir.Constant(index_t, 16))]),
                                  _V16I32.as_pointer())
        panel_bytes = builder.bitcast(panel_arr.data, _I8.as_pointer())
        acc = builder.load(acc_ptr, align=4)
        for i in range(n_quads):
            quad = builder.trunc(builder.extract_value(quads_v, i), _I32)
            splat = builder.insert_element(ir.Constant(_V16I32, ir.Undefined), quad, ir.Constant(_I32, 0))
            splat = builder.shuffle_vector(splat, splat, ir.Constant(_V16I32, [0] * 16))
            row = builder.add(kq_v, ir.Constant(index_t, i))
            offset = builder.add(builder.mul(row, row_bytes), builder.mul(group_v, ir.Constant(index_t, 64)))
            w_ptr = builder.bitcast(builder.gep(panel_bytes, [offset]), _V64I8.as_pointer())
            acc = _dot4_step(builder, kind, acc, builder.bitcast(splat, _V64I8), builder.load(w_ptr, align=1))
        builder.store(acc, acc_ptr, align=4)
        return context.get_dummy_value()

    return types.void(acc_row, group, a_quads, panel, kq), codegen


@njit(parallel=True, cache=True)
def _expand_ternary_quads(w_nonzero, w_sign, k, n_cols_padded):
    """int8 [ceil(K/4), 4 * n_cols_padded] with [kq, 4n + q] = ternary weight (n, 4kq + q), 0-padded,
    each row starting on a 64-byte boundary (n_cols_padded is a multiple of 16)."""
    n_cols = w_nonzero.shape[1]
    n_quads = (k + 3) // 4
    out = _aligned_empty(n_quads, 4 * n_cols_padded, np.int8)
    for kq in prange(n_quads):
        row = out[kq]
        row[:] = 0
        for q in range(4):
            kk = 4 * kq + q
            if kk < k:
                word, bit = kk // 64, np.uint64(kk % 64)
                nz_row = w_nonzero[word]
                sign_row = w_sign[word]
                for n in range(n_cols):
                    nonzero = np.int8((nz_row[n] >> bit) & np.uint64(1))
                    negative = np.int8((sign_row[n] >> bit) & np.uint64(1))
                    row[4 * n + q] = nonzero - 2 * (nonzero & negative)
    return out


def _quad_row(arow, panel, n_groups, acc):
    """acc[:16 * n_groups] = sum_kq dot4(arow[kq], panel[kq]), _QUAD_JAM quads per accumulator update."""
    n_quads = arow.shape[0]
    acc[:] = 0
    kq = 0
    while kq + _QUAD_JAM <= n_quads:
        quads = (arow[kq], arow[kq + 1], arow[kq + 2], arow[kq + 3], arow[kq + 4], arow[kq + 5], arow[kq + 6],
                 arow[kq + 7])
        for g in range(n_groups):
            _dot4_accumulate(acc, g, quads, panel, kq)
        kq += _QUAD_JAM
    while kq < n_quads:
        quads = (arow[kq],)
        for g in range(n_groups):
            _dot4_accumulate(acc, g, quads, panel, kq)
        kq += 1


overload(_quad_row, inline="always")(lambda arow, panel, n_groups, acc: _quad_row)


@njit(cache=True, boundscheck=False)
def _quad_panel_rows(a_quads, m0, m1, panel, n0, nb, row_offset, col_offset, row_scale, col_scale, bias, out):
    """Rows m0..m1-1 against the weight quads of columns n0..n0+nb-1, epilogue included."""
    acc = _aligned_empty(1, _QUAD_GROUP * ((nb + _QUAD_GROUP - 1) // _QUAD_GROUP), np.int32)[0]
    n_groups = acc.shape[0] // _QUAD_GROUP
    coff = col_offset[0, n0:n0 + nb]
    cs = None if col_scale is None else col_scale[n0:n0 + nb]
    bi = None if bias is None else bias[n0:n0 + nb]
    for m in range(m0, m1):
        _quad_row(a_quads[m], panel, n_groups, acc)
        rs = None if row_scale is None else row_scale[m]
        _store_row(acc, 1, out[0, m, n0:n0 + nb], row_offset[0, m], coff, rs, cs, bi)


@njit(parallel=True, cache=True, boundscheck=False)
def _quad_matmul(a_quads, w_quads, row_offset, col_offset, row_scale, col_scale, bias, out, threads):
    """out[0, m, n] = row_offset[0, m] + col_offset[0, n] + sum_kq dot4(a_quads[m, kq], w_quads[kq, n]),
    or its float epilogue (see _store_row). Same task grid as _popcount_matmul; the weight quads
    are read in place (their rows are 64-byte aligned)."""
    n_rows = a_quads.shape[0]
    n_cols = out.shape[2]
    col_blocks, width = _column_blocks(n_cols)
    row_blocks, height = _row_blocks(n_rows, col_blocks, threads)
    for task in prange(row_blocks * col_blocks):
        row_block = task // col_blocks
        col_block = task % col_blocks
        n0 = col_block * width
        nb = min(width, n_cols - n0)
        m0 = row_block * height
        m1 = min(m0 + height, n_rows)
        padded = _QUAD_GROUP * ((nb + _QUAD_GROUP - 1) // _QUAD_GROUP)
        panel = w_quads[:, 4 * n0:4 * (n0 + padded)]
        _quad_panel_rows(a_quads, m0, m1, panel, n0, nb, row_offset, col_offset, row_scale, col_scale, bias, out)


def _int8_quads(a_int8, k):
    """uint32 [M, ceil(K/4)]: bytes a + 128 (= a XOR 0x80 as uint8), K zero-padded (a=0 -> 128)."""
    n_rows = a_int8.shape[0]
    n_quads = (k + 3) // 4
    shifted = np.full((n_rows, 4 * n_quads), 0x80, np.uint8)
    shifted[:, :k] = a_int8.view(np.uint8) ^ np.uint8(0x80)
    return shifted.view("<u4").astype(np.uint32, copy=False)


def ternary_gemm_int8(a_int8, w_nonzero, w_sign, K, row_scale=None, col_scale=None, bias=None):
    """8-bit activations x ternary weights (TerViT):  out = A @ T.T, A int8 [M, K], T {-1,0,+1} [N, K].

    Inputs:
        a_int8:            int8 [M, K] quantized activations (not packed)
        w_nonzero, w_sign: uint64 [ceil(K/64), N]  pack_ternary_weight(T)
        K:                 int
        row_scale, col_scale, bias: optional float32 [M], [N], [N] as in binary_gemm
    Returns:
        int32 [M, N] = sum_k a[m, k] * T[n, k] (exact), or the float32 epilogue
        float32(dot) * row_scale[m] * col_scale[n] + bias[n].
    Computed with byte dot products (VPDPBUSD on AVX512-VNNI); see the section comment.
    """
    a = np.asarray(a_int8)
    if a.dtype != np.int8 or a.ndim != 2:
        raise TypeError(f"a_int8 must be a 2-D int8 array, got {a.dtype} with shape {a.shape}")
    nz = _check_words(w_nonzero, "w_nonzero", 2)
    sign = _check_words(w_sign, "w_sign", 2)
    if nz.shape != sign.shape:
        raise ValueError(f"w_nonzero {nz.shape} and w_sign {sign.shape} must have the same shape")
    k = _check_k(K, nz.shape[0], "w_nonzero")
    if a.shape[1] != k:
        raise ValueError(f"a_int8 has {a.shape[1]} columns but K={k}")
    n_rows, n_cols = a.shape[0], nz.shape[1]
    epilogue = _epilogue_args(n_rows, n_cols, row_scale, col_scale, bias)
    n_cols_padded = -(-n_cols // _QUAD_GROUP) * _QUAD_GROUP
    with _threads_for(n_cols * k, _PARALLEL_MIN_ELEMENTS):
        w_quads = _expand_ternary_quads(nz, sign, k, n_cols_padded)
    # sum_k a t = sum_k (a + 128) t - 128 sum_k t
    col_offset = -128 * (_row_popcount(nz.T) - 2 * _row_popcount((nz & sign).T))[None]
    a_quads = np.ascontiguousarray(_int8_quads(np.ascontiguousarray(a), k))
    row_offset = np.zeros((1, n_rows), np.int64)
    out = np.empty((1, n_rows, n_cols), np.int32 if epilogue is None else np.float32)
    if out.size:
        with _threads_for(out.size * k, _PARALLEL_MIN_MACS) as threads:
            _quad_matmul(a_quads, w_quads, row_offset, col_offset, *(epilogue or (None, None, None)), out, threads)
    return out[0]


def unpack_ternary(w_nonzero, w_sign, K):
    """Inverse of pack_ternary_weight: int8 {-1,0,+1} [N, K] from the word-major bit-planes."""
    nz = unpack_bits(np.ascontiguousarray(np.asarray(w_nonzero).T), K).astype(np.int8)
    neg = unpack_bits(np.ascontiguousarray(np.asarray(w_sign).T), K).astype(np.int8)
    return nz * (1 - 2 * neg)


def ternary_gemm_int8_reference(a_int8, w_nonzero, w_sign, K, row_scale=None, col_scale=None, bias=None):
    """NumPy reference of ternary_gemm_int8: exact int64 matmul of the unpacked ternary weight."""
    a = np.asarray(a_int8)
    dot = a.astype(np.int64) @ unpack_ternary(w_nonzero, w_sign, K).astype(np.int64).T
    epilogue = _epilogue_args(a.shape[0], dot.shape[1], row_scale, col_scale, bias)
    if epilogue is None:
        return dot.astype(np.int32)
    rs, cs, bias = epilogue
    return dot.astype(np.float32) * rs[:, None] * cs[None, :] + bias[None, :]


# ---------------------------------------------------------------------------------------------
# GSB attention product (arXiv 2305.07931): A_q @ V_q from binary bases
#   A_q = a1*B1 + a2*T1 + a3*T2                  B1, T1, T2 in {0,1} [M, K]  (K = tokens)
#   V_q = b1*S + b2*(T1v o S) + b3*(T2v o S)     S in {-1,+1}, T1v, T2v in {0,1} [K, D]
#   A_q @ V_q = sum_ij a_i b_j C_ij,  C_ij = P_i @ (U_j o S)  with P = (B1, T1, T2), U = (1, T1v, T2v)
#   C_ij = popcount(P_i & U_j) - 2 popcount(P_i & U_j & s)     (s = sign bits of S; U_0 & s = s)
# One AND-popcount matmul of the 3 stacked A bases against the 5 planes (s, T1v&s, T2v&s, T1v, T2v)
# gives every term; popcount(P_i & U_0) is the row popcount of P_i.
# ---------------------------------------------------------------------------------------------

def _check_gsb(a_bases, v_signs, v_masks, k):
    a = _check_words(a_bases, "a_bases", 4)
    s = _check_words(v_signs, "v_signs", 3)
    t = _check_words(v_masks, "v_masks", 4)
    n_batch, _, n_rows, n_words = a.shape
    n_dim = s.shape[1]
    if a.shape[1] != 3 or t.shape[1] != 2:
        raise ValueError(f"a_bases must be [B, 3, M, W] (B1, T1, T2) and v_masks [B, 2, D, W] (T1v, T2v); "
                         f"got {a.shape} and {t.shape}")
    if s.shape != (n_batch, n_dim, n_words) or t.shape != (n_batch, 2, n_dim, n_words):
        raise ValueError(f"v_signs {s.shape} must be [B, D, W] and v_masks {t.shape} [B, 2, D, W] with "
                         f"B={n_batch}, W={n_words} from a_bases {a.shape}")
    _check_k(k, n_words, "a_bases")
    return a, s, t


def gsb_partial_products(a_bases, v_signs, v_masks, K):
    """Integer partial products C_ij = P_i @ (U_j o S) of GSB attention (see the section comment).

    Inputs:
        a_bases: uint64 [B, 3, M, W]  pack_bits of (B1, T1, T2), each {0,1} [B, M, K], K = tokens
        v_signs: uint64 [B, D, W]     pack_signs(V^T): sign bits of S, transposed, packed along K
        v_masks: uint64 [B, 2, D, W]  pack_bits of (T1v^T, T2v^T)
        K:       int, number of tokens
    Returns:
        int32 [B, 3, 3, M, D], exact.
    """
    a, s, t = _check_gsb(a_bases, v_signs, v_masks, K)
    n_batch, _, n_rows, n_words = a.shape
    n_dim = s.shape[1]
    planes = np.concatenate([s, t[:, 0] & s, t[:, 1] & s, t[:, 0], t[:, 1]], axis=1)     # [B, 5D, W]
    minus_twice = _matmul(a.reshape(n_batch, 3 * n_rows, n_words), None, _transpose_words(planes),
                          np.zeros((n_batch, 3 * n_rows), np.int64), None, None, 5 * n_dim)   # -2 popcount(P & U)
    counts = (minus_twice // -2).reshape(n_batch, 3, n_rows, 5, n_dim).transpose(0, 1, 3, 2, 4)  # [B, 3, 5, M, D]
    row_pop = _row_popcount(a)[:, :, :, None]                                             # [B, 3, M, 1]
    out = np.empty((n_batch, 3, 3, n_rows, n_dim), np.int32)
    out[:, :, 0] = row_pop - 2 * counts[:, :, 0]
    out[:, :, 1] = counts[:, :, 3] - 2 * counts[:, :, 1]
    out[:, :, 2] = counts[:, :, 4] - 2 * counts[:, :, 2]
    return out


def _gsb_scales(scales, n_batch, name):
    scales = np.asarray(scales, np.float64)
    if scales.shape not in ((3,), (n_batch, 3)):
        raise ValueError(f"{name} must have shape (3,) or (B, 3)=({n_batch}, 3), got {scales.shape}")
    return np.broadcast_to(scales, (n_batch, 3))


def gsb_attention_product(a_bases, a_scales, v_signs, v_masks, v_scales, K):
    """GSB attention output A_q @ V_q per batch*head from binary bases (see the section comment).

    Inputs:
        a_bases, v_signs, v_masks, K: as in gsb_partial_products
        a_scales: (a1, a2, a3), shape [3] or per batch*head [B, 3]
        v_scales: (b1, b2, b3), shape [3] or [B, 3]
    Returns:
        float64 [B, M, D] = sum_ij a_i b_j C_ij, combined in float64 from the exact integers.
    """
    partial = gsb_partial_products(a_bases, v_signs, v_masks, K)
    n_batch = partial.shape[0]
    weights = _gsb_scales(a_scales, n_batch, "a_scales")[:, :, None] * _gsb_scales(v_scales, n_batch, "v_scales")[:, None, :]
    return np.einsum("bij,bijmd->bmd", weights, partial.astype(np.float64))


def _gsb_dense(a_bases, v_signs, v_masks, K):
    """Unpacked reference operands: P {0,1} [B, 3, M, K] and V bases [B, 3, K, D] (+-1 / 0), int64."""
    a, s, t = _check_gsb(a_bases, v_signs, v_masks, K)
    p = unpack_bits(a, K).astype(np.int64)
    signs = unpack_signs(s, K).astype(np.int64)                    # [B, D, K]
    masks = unpack_bits(t, K).astype(np.int64)                     # [B, 2, D, K]
    v_bases = np.stack([signs, masks[:, 0] * signs, masks[:, 1] * signs], axis=1)
    return p, v_bases.transpose(0, 1, 3, 2)


def gsb_partial_products_reference(a_bases, v_signs, v_masks, K):
    """NumPy reference of gsb_partial_products: int64 matmuls of the unpacked bases."""
    p, v = _gsb_dense(a_bases, v_signs, v_masks, K)
    return np.einsum("bimk,bjkd->bijmd", p, v).astype(np.int32)


def gsb_attention_product_reference(a_bases, a_scales, v_signs, v_masks, v_scales, K):
    """NumPy reference of gsb_attention_product: builds A_q and V_q in float64 and multiplies them."""
    p, v = _gsb_dense(a_bases, v_signs, v_masks, K)
    n_batch = p.shape[0]
    a_q = np.einsum("bi,bimk->bmk", _gsb_scales(a_scales, n_batch, "a_scales"), p.astype(np.float64))
    v_q = np.einsum("bj,bjkd->bkd", _gsb_scales(v_scales, n_batch, "v_scales"), v.astype(np.float64))
    return a_q @ v_q
