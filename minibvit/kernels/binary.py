"""Binary (+-1) matrix products from packed bits: out = K - 2 popcount(a XOR w), and the
popcount-matmul core that every packed product of minibvit runs on (also ternary and GSB).

    dot(a, b) = K - 2 * popcount(a XOR b)      (summed over words, for +-1 vectors of length K)

Layouts:
    activations        a_packed [M, W]       W = ceil(K / 64), row-major, packed along K
    GEMM weights       w_packed_T [W, N]     word-major ("K-major"), so the inner loop runs over N
    attention operands [B, M, W], [B, N, W]  both packed along their shared axis

Every fast kernel ``f`` has a plain NumPy ``f_reference`` beside it; the tests hold them bit-exact.
The one-thread core (panel_rows on aligned weight panels: column_blocks, aligned_empty, copy_panel)
is public: the packed engine's one-region network calls it from its own parallel loop.
"""
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ..intrinsics import POP_LANES, popcount_add, popcount_assign
from .pack import _NATIVE_FLOATS, check_k, check_words, pack_row, row_popcount, threads_for

_PANEL_COLS = 256       # at most this many output columns per task (one weight panel [W, cols] each)
_COL_ALIGN = 32         # panel widths are multiples of this (whole vectors, aligned rows)
_TASK_ROWS = 128        # about this many output rows per task
_PARALLEL_MIN_WORDS = 1 << 19       # popcount matmuls: M * N * W words


# ---------------------------------------------------------------------------------------------
# the popcount matmul core: out[b, m, n] = row_offset[b, m] + col_offset[b, n]
#                                          - 2 * sum_w popcount(combine(a[b, m, w], planes[b, w, n]))
# combine(a, x, y) = a ^ x (y is None), a & y (x is None), (a ^ x) & y (both given).
# ---------------------------------------------------------------------------------------------

@njit(cache=True)
def aligned_empty(rows, cols, dtype):
    """[rows, cols] of dtype, C-contiguous, first element on a 64-byte (cache line) boundary."""
    itemsize = np.empty(0, dtype).itemsize
    buf = np.empty(rows * cols + 64 // itemsize, dtype)
    start = ((-buf.ctypes.data) % 64) // itemsize
    return buf[start:start + rows * cols].reshape((rows, cols))


@njit(cache=True)
def column_blocks(n_cols):
    """(number of column blocks, block width): equal blocks of at most _PANEL_COLS columns,
    the width rounded up to _COL_ALIGN (N=384 -> 2 x 192 rather than 256 + 128)."""
    n_blocks = (n_cols + _PANEL_COLS - 1) // _PANEL_COLS
    width = (n_cols + n_blocks - 1) // n_blocks
    return n_blocks, (width + _COL_ALIGN - 1) // _COL_ALIGN * _COL_ALIGN


@njit(cache=True)
def row_tasks(n_rows, other_blocks, threads):
    """(number of row blocks, rows per block): about _TASK_ROWS rows each, and a task count
    (row blocks x other_blocks) that is a multiple of the thread count, so Numba's static split of
    the tasks gives every thread the same amount of work."""
    n_blocks = (n_rows + _TASK_ROWS - 1) // _TASK_ROWS
    while (n_blocks * other_blocks) % threads != 0 and n_blocks < n_rows:
        n_blocks += 1
    return n_blocks, (n_rows + n_blocks - 1) // n_blocks


def copy_panel(planes, b, n0, nb, width):
    """Aligned [W, width] copy of planes[b, :, n0:n0+nb], zero-padded; None stays None."""
    n_words = planes.shape[1]
    panel = aligned_empty(n_words, width, np.uint64)
    for w in range(n_words):
        src = planes[b, w, n0:n0 + nb]
        dst = panel[w]
        for j in range(nb):
            dst[j] = src[j]
        for j in range(nb, width):
            dst[j] = 0
    return panel


@overload(copy_panel)
def _copy_panel_overload(planes, b, n0, nb, width):
    # picked by type, so a panel is an array (not an Optional) in the kernels that use it
    if isinstance(planes, types.NoneType):
        return lambda planes, b, n0, nb, width: None
    return copy_panel


_POP_JAM = 3          # words summed in registers per accumulator update (unroll-and-jam)


def accumulate_row(arow, xp, yp, acc):
    """acc[j] = sum_w popcount(combine(arow[w], panel[w, j])) for every panel column j < len(acc).

    _POP_JAM words are summed in registers per accumulator update, so the accumulator is loaded
    and stored once per three words; the first pass (1 to 3 words) assigns instead of adding,
    which saves zeroing it."""
    n_words = arow.shape[0]
    n_groups = acc.shape[0] // POP_LANES
    head = n_words - (n_words - 1) // _POP_JAM * _POP_JAM
    if head == 3:
        words3 = (arow[0], arow[1], arow[2])
        for g in range(n_groups):
            popcount_assign(acc, g, words3, xp, yp, 0)
    elif head == 2:
        words2 = (arow[0], arow[1])
        for g in range(n_groups):
            popcount_assign(acc, g, words2, xp, yp, 0)
    else:
        words1 = (arow[0],)
        for g in range(n_groups):
            popcount_assign(acc, g, words1, xp, yp, 0)
    for w in range(head, n_words, _POP_JAM):
        words3 = (arow[w], arow[w + 1], arow[w + 2])
        for g in range(n_groups):
            popcount_add(acc, g, words3, xp, yp, w)


def store_row(acc, acc_weight, orow, base, coff, rs, cs, bias):
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
overload(accumulate_row, inline="always")(lambda arow, xp, yp, acc: accumulate_row)


@overload(store_row, inline="always", prefer_literal=True)
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
def panel_rows(a, b, m0, m1, xp, yp, n0, nb, width, row_offset, col_offset, row_scale, col_scale, bias, out):
    """Rows m0..m1-1 of batch b against one panel [W, width] (columns n0..n0+nb-1), epilogue included."""
    acc = aligned_empty(1, width, np.uint64)[0]
    coff = None if col_offset is None else col_offset[b, n0:n0 + nb]
    cs = None if col_scale is None else col_scale[n0:n0 + nb]
    bi = None if bias is None else bias[n0:n0 + nb]
    for m in range(m0, m1):
        accumulate_row(a[b, m], xp, yp, acc)
        rs = None if row_scale is None else row_scale[m]
        store_row(acc, -2, out[b, m, n0:n0 + nb], row_offset[b, m], coff, rs, cs, bi)


@njit(parallel=True, cache=True, boundscheck=False)
def _popcount_matmul_tasks(a, x_planes, y_planes, row_offset, col_offset, row_scale, col_scale, bias, out, threads):
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
    col_blocks, width = column_blocks(n_cols)
    row_blocks, height = row_tasks(n_rows, n_batch * col_blocks, threads)
    for task in prange(n_batch * row_blocks * col_blocks):
        b = task // (row_blocks * col_blocks)
        row_block = (task // col_blocks) % row_blocks
        col_block = task % col_blocks
        n0 = col_block * width
        nb = min(width, n_cols - n0)
        m0 = row_block * height
        m1 = min(m0 + height, n_rows)
        xp = copy_panel(x_planes, b, n0, nb, width)
        yp = copy_panel(y_planes, b, n0, nb, width)
        panel_rows(a, b, m0, m1, xp, yp, n0, nb, width, row_offset, col_offset, row_scale, col_scale, bias, out)


# ---------------------------------------------------------------------------------------------
# public binary kernels
# ---------------------------------------------------------------------------------------------

def epilogue_args(n_rows, n_cols, row_scale, col_scale, bias):
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


def popcount_matmul(a, x_planes, y_planes, row_offset, col_offset, epilogue, n_cols):
    """out [B, M, n_cols] = row_offset + col_offset - 2 * sum_w popcount(combine(a, x/y planes)) (see the
    section comment), int32, or its float32 epilogue (epilogue_args); on all threads when the work
    is large enough (threads_for)."""
    n_batch, n_rows, _ = a.shape
    out = np.empty((n_batch, n_rows, n_cols), np.int32 if epilogue is None else np.float32)
    if out.size:
        with threads_for(out.size * a.shape[2], _PARALLEL_MIN_WORDS) as threads, numba.parallel_chunksize(1):
            _popcount_matmul_tasks(a, x_planes, y_planes, row_offset, col_offset, *(epilogue or (None, None, None)),
                                   out, threads)
    return out


@njit(parallel=True, cache=True, boundscheck=False)
def _packing_gemm_tasks(x, w, k, row_scale, col_scale, bias, out, threads):
    """binary_gemm_packing's kernel: one task per block of rows packs their signs (kernels.pack's
    row packer) into a buffer of its own, then sweeps every column panel over it."""
    n_rows = x.shape[0]
    n_words, n_cols = w.shape
    col_blocks, width = column_blocks(n_cols)
    row_blocks, height = row_tasks(n_rows, 1, threads)
    planes = w.reshape((1, n_words, n_cols))
    for task in prange(row_blocks):
        m0 = task * height
        m1 = min(m0 + height, n_rows)
        if m1 <= m0:
            continue
        a = np.empty((1, m1 - m0, n_words), np.uint64)
        for m in range(m0, m1):
            pack_row(x[m], a[0, m - m0])
        offset = np.full((1, m1 - m0), k, np.int64)
        rs = None if row_scale is None else row_scale[m0:m1]
        o = out[m0:m1].reshape((1, m1 - m0, n_cols))
        for cb in range(col_blocks):
            n0 = cb * width
            nb = min(width, n_cols - n0)
            panel_rows(a, 0, 0, m1 - m0, copy_panel(planes, 0, n0, nb, width), None, n0, nb, width, offset, None,
                       rs, col_scale, bias, o)


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
    Both operands must keep the zero tail of their last word (the contract in kernels.pack; not
    checked here, check_zero_tail checks it): a tail bit set in one operand and not the other
    lowers the dot of that row and column by 2.
    """
    a = check_words(a_packed, "a_packed", 2)
    w = check_words(w_packed_T, "w_packed_T", 2)
    if a.shape[1] != w.shape[0]:
        raise ValueError(f"a_packed [M, W]={a.shape} and w_packed_T [W, N]={w.shape} disagree on W")
    k = check_k(K, a.shape[1], "a_packed")
    n_rows, n_cols = a.shape[0], w.shape[1]
    epilogue = epilogue_args(n_rows, n_cols, row_scale, col_scale, bias)
    row_offset = np.full((1, n_rows), k, np.int64)
    return popcount_matmul(a[None], w[None], None, row_offset, None, epilogue, n_cols)[0]


def binary_gemm_packing(x, w_packed_T, K, row_scale=None, col_scale=None, bias=None):
    """binary_gemm(pack_signs(x), w_packed_T, K, ...) in one parallel region: each task packs the
    signs of its own rows (sign(0) = +1, bit 1 = -1) and multiplies them at once, so the
    activations are read once, their bits stay in cache and no second region is started.

    Inputs:
        x: float32 or float64 [M, K] (native byte order; other dtypes: pack_signs, then binary_gemm)
        w_packed_T, K, row_scale, col_scale, bias: as in binary_gemm
    Returns: as binary_gemm (int32 [M, N], or the float32 epilogue)."""
    x = np.asarray(x)
    w = check_words(w_packed_T, "w_packed_T", 2)
    if x.ndim != 2 or x.dtype not in _NATIVE_FLOATS:
        raise TypeError(f"x must be a 2-D float32 or float64 array [M, K], got {x.dtype} with shape {x.shape}")
    k = check_k(K, w.shape[0], "w_packed_T")
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns but K={k}")
    n_rows, n_cols = x.shape[0], w.shape[1]
    epilogue = epilogue_args(n_rows, n_cols, row_scale, col_scale, bias)
    out = np.empty((n_rows, n_cols), np.int32 if epilogue is None else np.float32)
    if out.size:
        with threads_for(out.size * w.shape[0], _PARALLEL_MIN_WORDS) as threads, numba.parallel_chunksize(1):
            _packing_gemm_tasks(np.ascontiguousarray(x), np.ascontiguousarray(w), k,
                                *(epilogue or (None, None, None)), out, threads)
    return out


def popcount_sum_reference(a, x, y):
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
    a = check_words(a_packed, "a_packed", 2)
    w = check_words(w_packed_T, "w_packed_T", 2)
    dot = K - 2 * popcount_sum_reference(a, w, None)
    epilogue = epilogue_args(a.shape[0], w.shape[1], row_scale, col_scale, bias)
    if epilogue is None:
        return dot.astype(np.int32)
    rs, cs, bias = epilogue
    return dot.astype(np.float32) * rs[:, None] * cs[None, :] + bias[None, :]


def transpose_words(x):
    """[B, N, W] -> [B, W, N] C-contiguous (word-major, as _popcount_matmul_tasks wants its planes)."""
    return np.ascontiguousarray(x.transpose(0, 2, 1))


def binary_bmm(a_packed, b_packed, K, col_scale=None):
    """Batched binary matmul  out[b] = A_b @ B_b.T  for +-1 A_b [M, K], B_b [N, K]
    (attention scores Q_b @ K_b.T per batch*head, both packed along the head dimension K).

    Inputs:
        a_packed: uint64 [B, M, W]; b_packed: uint64 [B, N, W]; K: int
        col_scale: optional float32 [N]
    Returns:
        int32 [B, M, N] = K - 2 * popcount(a XOR b), or with col_scale float32
        dot * 1 * col_scale[n] + 0 (binary_gemm's epilogue, row scale 1, bias 0).
    Zero tails required, as in binary_gemm (not checked here).
    """
    a = check_words(a_packed, "a_packed", 3)
    b = check_words(b_packed, "b_packed", 3)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"a_packed {a.shape} and b_packed {b.shape} must agree on B and W")
    k = check_k(K, a.shape[2], "a_packed")
    row_offset = np.full(a.shape[:2], k, np.int64)
    return popcount_matmul(a, transpose_words(b), None, row_offset, None, _column_epilogue(a, b, col_scale),
                           b.shape[1])


def _column_epilogue(a, b, col_scale):
    """epilogue_args with only a column scale (None without one)."""
    return None if col_scale is None else epilogue_args(a.shape[1], b.shape[1], None, col_scale, None)


def binary_bmm_reference(a_packed, b_packed, K):
    """NumPy reference of binary_bmm."""
    a = check_words(a_packed, "a_packed", 3)
    b = check_words(b_packed, "b_packed", 3)
    return (K - 2 * popcount_sum_reference(a, b.transpose(0, 2, 1), None)).astype(np.int32)


def and_bmm(p_bits, v_packed, K, col_scale=None):
    """Batched {0,1} x (+-1) matmul  out[b, m, d] = sum_k p[b, m, k] * v[b, k, d]
    (attention probabilities as bits times sign-binarised values).

    Inputs:
        p_bits:   uint64 [B, M, W]  pack_bits(P), P {0,1} [B, M, K] packed along the token axis K
        v_packed: uint64 [B, D, W]  pack_signs(V^T), V [B, K, D] transposed, packed along K
        K:        int, number of tokens
        col_scale: optional float32 [D], as in binary_bmm
    Returns:
        int32 [B, M, D] = popcount(p AND NOT v) - popcount(p AND v) = popcount(p) - 2 popcount(p AND v)
        (float32 dot * 1 * col_scale[d] + 0 with col_scale)
    Zero tails required, as in binary_gemm (not checked here): a tail bit of p counts as a token.
    """
    p = check_words(p_bits, "p_bits", 3)
    v = check_words(v_packed, "v_packed", 3)
    if p.shape[0] != v.shape[0] or p.shape[2] != v.shape[2]:
        raise ValueError(f"p_bits {p.shape} and v_packed {v.shape} must agree on B and W")
    check_k(K, p.shape[2], "p_bits")
    return popcount_matmul(p, None, transpose_words(v), row_popcount(p), None, _column_epilogue(p, v, col_scale),
                           v.shape[1])


def and_bmm_reference(p_bits, v_packed, K):
    """NumPy reference of and_bmm: popcount(p & ~v) - popcount(p & v), computed literally."""
    p = check_words(p_bits, "p_bits", 3)
    v = transpose_words(check_words(v_packed, "v_packed", 3))
    positive = popcount_sum_reference(p, None, ~v)
    negative = popcount_sum_reference(p, None, v)
    return (positive - negative).astype(np.int32)
