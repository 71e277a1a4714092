"""Fused kernels of the integer-level quantizers (min-max k-bit, TWN / TerViT ternary), bit-identical to
the NumPy formulas of minibvit.quant (the elastic binarizer's are in kernels.quantize).

What makes them bit-identical (as in kernels.quantize): every element is computed with the same
float operations, in the same dtype and order, as the NumPy expression (no fast-math, no fused
multiply-add); a maximum or minimum is exact in any order; and a sum is added in np.sum's pairwise
order (pairwise_sum: blocks of up to 128 elements in 8 interleaved partial sums, split in halves
rounded down to a multiple of 8, the total added to 0).

min-max (quant.minmax_quant_forward): two passes. tensor_extrema gives max |x| (signed) or min x and
max x (unsigned) per channel; quant computes scale and zero point from them in NumPy (after the
collective, in data parallel); minmax_levels then writes the levels (codes - zero point), or instead
the codes as bytes (8 bits, per tensor: the operand of ops.byte_matmul), and the output levels * scale
in one pass. Any layout of x is read in place (a view of at most four axes besides the channel axis; a
contiguous tensor per tensor as flat segments, which vectorize); the outputs are C-contiguous in x's
shape. byte_levels / byte_values give the levels and the output again from the bytes.

ternary (quant.ternarize_forward): one task per output channel (a row of the C-contiguous weight,
or the whole weight per tensor) reads the row for mean|W|, then, on the cached row, writes the levels,
the entries above Delta and their sum, and the output alpha * T.

NaN: outside the contract. The NumPy path's statistics propagate a NaN into a scale of 1 and cast the NaN
code to an integer (undefined), so neither gives a meaningful output; the fused statistics (selects) need
not propagate a NaN, and the levels of a NaN element need not agree with NumPy's. inf is handled as
NumPy does.

Each kernel has its NumPy reference in minibvit.quant (the function whose fast path it is); the tests
(reference_tests/test_fused_tervit.py) hold them bit for bit.
"""
import numba
import numpy as np
from numba import njit, prange

_PW_BLOCK = 128  # NumPy's PW_BLOCKSIZE


# ---------------------------------------------------------------------------------------------
# np.sum's pairwise order over a contiguous 1-D array


@njit(inline="always")
def _pairwise_leaf(a, start, n, zero):
    """NumPy's pairwise_sum of a[start : start + n] for n <= 128: below 8 elements one sum from 0;
    else 8 interleaved sums, combined ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)), then the
    last n % 8 added in order."""
    if n < 8:
        res = zero
        for i in range(start, start + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[start], a[start + 1], a[start + 2], a[start + 3]
    r4, r5, r6, r7 = a[start + 4], a[start + 5], a[start + 6], a[start + 7]
    end8 = start + n - n % 8
    i = start + 8
    while i < end8:
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < start + n:
        res += a[i]
        i += 1
    return res


@njit(inline="always")
def _pairwise_tree(a, zero, starts, lengths, expanded, values):
    """pairwise_sum of more than 128 elements, the stack in the scratch arrays (128 entries each)."""
    top, n_values = 0, 0
    starts[0], lengths[0], expanded[0] = 0, a.size, False
    while top >= 0:
        s, m = starts[top], lengths[top]
        if m <= _PW_BLOCK:
            values[n_values] = _pairwise_leaf(a, s, m, zero)
            n_values += 1
            top -= 1
        elif not expanded[top]:
            expanded[top] = True
            half = m // 2
            half -= half % 8
            starts[top + 1], lengths[top + 1], expanded[top + 1] = s + half, m - half, False
            starts[top + 2], lengths[top + 2], expanded[top + 2] = s, half, False
            top += 2
        else:  # both halves done: values[-2] is the left one
            values[n_values - 2] = values[n_values - 2] + values[n_values - 1]
            n_values -= 1
            top -= 1
    return values[0]


@njit(inline="always")
def _pairwise_sum(a, zero, starts, lengths, expanded, values):
    if a.size <= _PW_BLOCK:
        return zero + _pairwise_leaf(a, 0, a.size, zero)
    return zero + _pairwise_tree(a, zero, starts, lengths, expanded, values)


@njit(inline="always")
def _pairwise_scratch(dtype_like):
    return (np.empty(128, np.int64), np.empty(128, np.int64), np.zeros(128, np.bool_),
            np.empty(128, dtype_like.dtype))


@njit(cache=True)
def pairwise_sum(a, zero):
    """np.sum(a) of a contiguous 1-D float array, in NumPy's order, as a scalar of a's dtype (zero: 0 in
    that dtype). A node of more than 128 elements is left + right of its halves (the first rounded
    down to a multiple of 8), walked with an explicit stack (a cached recursive Numba function crashes
    on load), left half first; the total is added to 0 as np.sum does."""
    starts, lengths, expanded, values = _pairwise_scratch(a)
    return _pairwise_sum(a, zero, starts, lengths, expanded, values)


# ---------------------------------------------------------------------------------------------
# min-max k-bit: the statistics, then the levels and the output


def _channel_view(x, channel_axis):
    """x (at most 4-D, _at_most_4d) as a 5-D view (C, A, B, E, D), no copy: the channel axis first (C = 1
    per tensor), the others in order, padded with 1s after the channel axis."""
    v = x[None] if channel_axis is None else np.moveaxis(x, channel_axis, 0)
    return np.expand_dims(v, tuple(range(1, 6 - v.ndim)))


@njit(inline="always")
def _row(v, i):
    """Row i (over the first four axes, C order) of a 5-D view and its channel."""
    _, na, nb, ne, _ = v.shape
    e = i % ne
    b = (i // ne) % nb
    a = (i // (ne * nb)) % na
    c = i // (ne * nb * na)
    return v[c, a, b, e], c


@njit(inline="always")
def _larger(t, m):
    return t if t > m else m


@njit(inline="always")
def _smaller(t, m):
    return t if t < m else m


@njit(inline="always")
def _row_abs_max(row):
    """max |row| in 8 independent lanes of selects (vectorized; a maximum is exact in any order)."""
    n = row.size
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = abs(row[0])
    j = 0
    while j + 8 <= n:
        m0, m1 = _larger(abs(row[j]), m0), _larger(abs(row[j + 1]), m1)
        m2, m3 = _larger(abs(row[j + 2]), m2), _larger(abs(row[j + 3]), m3)
        m4, m5 = _larger(abs(row[j + 4]), m4), _larger(abs(row[j + 5]), m5)
        m6, m7 = _larger(abs(row[j + 6]), m6), _larger(abs(row[j + 7]), m7)
        j += 8
    while j < n:
        m0 = _larger(abs(row[j]), m0)
        j += 1
    return _larger(_larger(_larger(m1, m0), _larger(m3, m2)), _larger(_larger(m5, m4), _larger(m7, m6)))


@njit(inline="always")
def _row_min_max(row):
    """(min row, max row), as _row_abs_max."""
    n = row.size
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = row[0]
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = row[0]
    j = 0
    while j + 8 <= n:
        t0, t1, t2, t3 = row[j], row[j + 1], row[j + 2], row[j + 3]
        t4, t5, t6, t7 = row[j + 4], row[j + 5], row[j + 6], row[j + 7]
        a0, a1, a2, a3 = _smaller(t0, a0), _smaller(t1, a1), _smaller(t2, a2), _smaller(t3, a3)
        a4, a5, a6, a7 = _smaller(t4, a4), _smaller(t5, a5), _smaller(t6, a6), _smaller(t7, a7)
        b0, b1, b2, b3 = _larger(t0, b0), _larger(t1, b1), _larger(t2, b2), _larger(t3, b3)
        b4, b5, b6, b7 = _larger(t4, b4), _larger(t5, b5), _larger(t6, b6), _larger(t7, b7)
        j += 8
    while j < n:
        a0, b0 = _smaller(row[j], a0), _larger(row[j], b0)
        j += 1
    lo = _smaller(_smaller(_smaller(a1, a0), _smaller(a3, a2)), _smaller(_smaller(a5, a4), _smaller(a7, a6)))
    hi = _larger(_larger(_larger(b1, b0), _larger(b3, b2)), _larger(_larger(b5, b4), _larger(b7, b6)))
    return lo, hi


@njit(parallel=True, cache=True)
def _row_extrema(v, signed, lo, hi):
    """Per row of v: hi = max |x| (signed) or lo, hi = min x, max x (unsigned)."""
    for i in prange(lo.size):
        row, _ = _row(v, i)
        if signed:
            hi[i] = _row_abs_max(row)
        else:
            lo[i], hi[i] = _row_min_max(row)


@njit(cache=True)
def _channel_extrema(lo, hi, signed, n_channels):
    """Reduce the row statistics (C * rows per channel, channel-major) to one per channel."""
    per = lo.size // n_channels
    out_lo, out_hi = np.empty(n_channels, lo.dtype), np.empty(n_channels, hi.dtype)
    for c in range(n_channels):
        mn, mx = lo[c * per], hi[c * per]
        for i in range(c * per + 1, (c + 1) * per):
            mn, mx = _smaller(lo[i], mn), _larger(hi[i], mx)
        out_lo[c], out_hi[c] = mn, mx
    return out_lo, out_hi


@njit(parallel=True, cache=True)
def _flat_extrema(x, signed, lo, hi):
    """_row_extrema of a contiguous 1-D x cut into lo.size segments."""
    n, n_tasks = x.size, lo.size
    for task in prange(n_tasks):
        segment = x[task * n // n_tasks:(task + 1) * n // n_tasks]
        if signed:
            hi[task] = _row_abs_max(segment)
        else:
            lo[task], hi[task] = _row_min_max(segment)


_FLAT_TASKS = 64  # segments of a per-tensor pass over a contiguous tensor


def _flat(x, channel_axis):
    """x as its contiguous 1-D view when a per-tensor pass can walk it flat (else None)."""
    return x.reshape(-1) if channel_axis is None and x.flags.c_contiguous else None


def tensor_extrema(x, channel_axis, signed):
    """max |x| (signed) or (min x, max x) (unsigned) over all axes but channel_axis (all axes for None),
    each of shape (C,) (C = 1 per tensor), in x's dtype: the values of np.abs(x).max(axis) / x.min(axis),
    x.max(axis) (a maximum is exact in any order) for x without NaN. x non-empty, float32 or float64."""
    flat = _flat(x, channel_axis)
    if flat is not None:  # per tensor over a contiguous x: segments of the flat array (vectorized)
        lo = np.empty(min(flat.size, _FLAT_TASKS), x.dtype)
        hi = np.empty_like(lo)
        _flat_extrema(flat, bool(signed), lo, hi)
        lo, hi = _channel_extrema(lo, hi, bool(signed), 1)
        return hi if signed else (lo, hi)
    v = _channel_view(*_at_most_4d(x, channel_axis))
    rows = v.size // v.shape[-1]
    lo, hi = np.empty(rows, x.dtype), np.empty(rows, x.dtype)
    _row_extrema(v, bool(signed), lo, hi)
    lo, hi = _channel_extrema(lo, hi, bool(signed), v.shape[0])
    return hi if signed else (lo, hi)


@njit(inline="always")
def _quantize_row(row, s, zl, qmax, lowest, zero, lrow, orow, crow, bias):
    """lrow: the row's levels, or None; crow: None, or the row's byte codes, q + bias as uint8 (bias 128
    for signed codes)."""
    for j in range(row.size):
        q = np.rint(row[j] / s) + zl
        q = lowest if q < lowest else q  # np.clip's order
        q = qmax if q > qmax else q
        level = q - zl + zero  # + 0.: a code 0 converts to +0., never -0.
        if lrow is not None:
            lrow[j] = level
        orow[j] = level * s
        if crow is not None:
            crow[j] = np.uint8(q + bias)


@njit(parallel=True, cache=True)
def _levels_flat(x, s, zl, qmax, signed, levels, out, codes, n_tasks):
    """_levels_rows of a contiguous 1-D x with one scale (per tensor), in n_tasks segments."""
    n = x.size
    bias = x.dtype.type(128 if signed else 0)
    zero = s - s
    lowest = -qmax if signed else zero
    for task in prange(n_tasks):
        a, b = task * n // n_tasks, (task + 1) * n // n_tasks
        _quantize_row(x[a:b], s, zl, qmax, lowest, zero, None if levels is None else levels[a:b], out[a:b],
                      None if codes is None else codes[a:b], bias)


@njit(parallel=True, cache=True)
def _levels_rows(v, scale, zero_level, qmax, signed, staged, levels, out, codes):
    """out = levels * scale with levels = codes - zero_point, row by row (see minmax_levels), and either
    the levels or (codes not None, uint8) the byte codes. staged: copy each row of a strided x into a
    contiguous buffer first (the arithmetic then vectorizes)."""
    n_rows, k = v.size // v.shape[-1], v.shape[-1]
    n_tasks = min(n_rows, 64)
    bias = v.dtype.type(128 if signed else 0)
    for task in prange(n_tasks):
        buffer = np.empty(k, v.dtype)
        for i in range(task * n_rows // n_tasks, (task + 1) * n_rows // n_tasks):
            row, c = _row(v, i)
            orow = _row(out, i)[0]
            lrow = None if levels is None else _row(levels, i)[0]
            crow = None if codes is None else _row(codes, i)[0]
            s, zl = scale[c], zero_level[c]
            zero = s - s
            lowest = -qmax if signed else zero
            if staged:
                buffer[:] = row
                _quantize_row(buffer, s, zl, qmax, lowest, zero, lrow, orow, crow, bias)
            else:
                _quantize_row(row, s, zl, qmax, lowest, zero, lrow, orow, crow, bias)


def _at_most_4d(x, channel_axis):
    """x (and its channel axis) with at most four axes: a C-contiguous reshape of a larger one."""
    if x.ndim <= 4:
        return x, channel_axis
    x = np.ascontiguousarray(x)
    if channel_axis is None:
        return x.reshape(-1, x.shape[-1]), None
    return x.reshape(int(np.prod(x.shape[:channel_axis])), x.shape[channel_axis], -1), 1


def minmax_levels(x, scale, zero_point, qmax, signed, channel_axis, byte_codes=False):
    """(levels, out, byte codes) of quant.minmax_quant_forward in one pass over x, all C-contiguous in x's
    shape, levels and out in x's dtype: codes = clamp(round(x / scale), -qmax, qmax) (signed) or
    clamp(round(x / scale) + zero_point, 0, qmax) (unsigned), levels = codes - zero_point, out = levels *
    scale. scale (C,) in x's dtype, zero_point (C,) integers (C = 1 per tensor). byte_codes (qmax <= 127
    signed, <= 255 unsigned): the codes as uint8 instead of the levels (levels None), biased by 128 when
    signed, so that levels = byte codes - (128 or zero_point) (byte_levels), the unsigned operand of the
    byte dot products; else byte codes None.

    NumPy converts the codes to integers (the unsigned sum in float64) and back; here they stay in x's
    dtype: every value on the way is an integer of magnitude about qmax <= 2^16 (|x / scale| <= qmax, up
    to rounding), exact in float32, so the levels are the same numbers, and the + 0. turns a -0. code
    (round(-0.3) = -0.) into the +0. of the integer conversion."""
    if byte_codes and qmax > (127 if signed else 255):
        raise ValueError(f"byte codes hold 8-bit codes; qmax {qmax} (signed={signed}) needs more")
    shape = x.shape
    x, channel_axis = _at_most_4d(x, channel_axis)
    out = np.empty(x.shape, x.dtype)
    levels, codes = (None, np.empty(x.shape, np.uint8)) if byte_codes else (np.empty(x.shape, x.dtype), None)
    flat = _flat(x, channel_axis)
    if flat is not None:  # per tensor over a contiguous x: segments of the flat array (vectorized)
        _levels_flat(flat, x.dtype.type(np.asarray(scale).reshape(-1)[0]),
                     x.dtype.type(np.asarray(zero_point).reshape(-1)[0]), x.dtype.type(qmax), bool(signed),
                     None if levels is None else levels.reshape(-1), out.reshape(-1),
                     None if codes is None else codes.reshape(-1), min(flat.size, _FLAT_TASKS))
        return (None if levels is None else levels.reshape(shape)), out.reshape(shape), \
            (None if codes is None else codes.reshape(shape))
    view = _channel_view(x, channel_axis)
    _levels_rows(view, np.ascontiguousarray(scale, x.dtype).reshape(-1),
                 np.asarray(zero_point).reshape(-1).astype(x.dtype), x.dtype.type(qmax), bool(signed),
                 not view.flags.c_contiguous, None if levels is None else _channel_view(levels, channel_axis),
                 _channel_view(out, channel_axis), None if codes is None else _channel_view(codes, channel_axis))
    return (None if levels is None else levels.reshape(shape)), out.reshape(shape), \
        (None if codes is None else codes.reshape(shape))


@njit(parallel=True, cache=True)
def _byte_levels_f32(codes, offset, out):
    for i in prange(codes.size):
        out[i] = np.float32(codes[i]) - offset


@njit(parallel=True, cache=True)
def _byte_values_f32(codes, offset, scale, out):
    for i in prange(codes.size):
        out[i] = (np.float32(codes[i]) - offset) * scale


def byte_levels(codes, offset, dtype):
    """The levels of byte codes (minmax_levels), codes - offset in dtype: the float levels minmax_levels
    writes without byte_codes, bit for bit (small integers; c - c is +0.)."""
    dtype = np.dtype(dtype)
    if dtype != np.float32:
        return codes.astype(dtype) - dtype.type(offset)
    out = np.empty(codes.shape, dtype)
    _byte_levels_f32(np.ascontiguousarray(codes).reshape(-1), np.float32(offset), out.reshape(-1))
    return out


def byte_values(codes, offset, scale):
    """The quantizer's output from its byte codes, (codes - offset) * scale in scale's dtype (scale a
    scalar): minmax_levels' out, bit for bit (the same two operations per element, in that dtype)."""
    scale = np.asarray(scale).reshape(())[()]
    if scale.dtype != np.float32:
        return (codes.astype(scale.dtype) - scale.dtype.type(offset)) * scale
    out = np.empty(codes.shape, np.float32)
    _byte_values_f32(np.ascontiguousarray(codes).reshape(-1), np.float32(offset), scale, out.reshape(-1))
    return out


# ---------------------------------------------------------------------------------------------
# ternary (TWN, per output channel or per tensor)


@njit(parallel=True, cache=True)
def _ternary_rows(w, delta_factor, zero, n_tasks, levels, out, alpha, delta):
    """Per row r of the C-contiguous w (C, K): Delta = delta_factor * mean|w|, T = sign(w) 1[|w| > Delta],
    alpha = sum(|w| 1[|w| > Delta]) / count (0 for none), out = alpha * T: quant.ternary_codes'
    operations (the sums pairwise in w's dtype, np.mean's division and alpha's in float64, each rounded
    to w's dtype by its store into delta / alpha). Rows in n_tasks blocks, each with its scratch."""
    rows, k = w.shape
    for task in prange(n_tasks):
        values = np.empty(k, w.dtype)
        starts, lengths, expanded, partial = _pairwise_scratch(values)
        for r in range(task * rows // n_tasks, (task + 1) * rows // n_tasks):
            wr, lr, outr = w[r], levels[r], out[r]
            for j in range(k):
                values[j] = abs(wr[j])
            delta[r] = np.float64(_pairwise_sum(values, zero, starts, lengths, expanded, partial)) / np.float64(k)
            d = delta_factor * delta[r]  # delta_factor * mean|w|, in w's dtype
            count = 0
            for j in range(k):
                if values[j] > d:
                    count += 1
                    lr[j] = 1.0 if wr[j] >= 0 else -1.0
                else:
                    values[j] = zero
                    lr[j] = 0.0
            total = _pairwise_sum(values, zero, starts, lengths, expanded, partial)
            alpha[r] = np.float64(total) / np.float64(count) if count > 0 else 0.0
            delta[r] = d
            a = alpha[r]
            for j in range(k):
                outr[j] = a * lr[j]


def ternarize(w, per_channel, delta_factor):
    """(out, levels, alpha, delta) of quant.ternarize_forward / ternary_codes in one pass per row: out and
    levels of w's shape and dtype, alpha and delta (C,) per channel, (1,) per tensor. w C-contiguous
    (NumPy's reductions over its trailing axes are then one pairwise sum per channel)."""
    w2 = w.reshape(w.shape[0] if per_channel else 1, -1)
    levels, out = np.empty_like(w2), np.empty_like(w2)
    alpha, delta = np.empty(w2.shape[0], w.dtype), np.empty(w2.shape[0], w.dtype)
    n_tasks = min(w2.shape[0], 4 * numba.get_num_threads())
    _ternary_rows(w2, w.dtype.type(delta_factor), w.dtype.type(0), n_tasks, levels, out, alpha, delta)
    return out.reshape(w.shape), levels.reshape(w.shape), alpha, delta


# ---------------------------------------------------------------------------------------------
# the scale of an exact integer product


@njit(parallel=True, cache=True)
def _scale_rows(product, scale):
    for r in prange(product.shape[0]):
        for n in range(product.shape[1]):
            product[r, n] *= scale[n]


def scale_columns(product, scale):
    """product *= scale in place, in parallel over the rows: product C-contiguous (..., N), scale a
    scalar or (N,) of product's dtype; the one multiplication of NumPy's product *= scale per element."""
    n = product.shape[-1]
    _scale_rows(product.reshape(-1, n), np.ascontiguousarray(np.broadcast_to(scale, (n,))))
