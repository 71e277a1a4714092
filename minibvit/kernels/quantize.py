"""Fused quantizer kernels: each quantizer's forward, or its pseudo-gradient with its scale
reduction, in one Numba pass over the tensor, bit-identical to the NumPy formulas of minibvit.quant.

What makes them bit-identical:
    - every element is computed with the same float operations, in the same dtype and order, as the
      NumPy expression (no fast-math, no fused multiply-add);
    - the scale gradients are sums of one float term per element, which NumPy's ``np.sum`` adds in
      its pairwise order (loops_utils.h: blocks of up to 128 elements in 8 interleaved partial sums,
      split in halves rounded down to a multiple of 8, the total added to 0). _subtree walks that
      tree, the top of it split across threads, and computes each leaf's terms into a scratch of 128
      where they are summed (quantize_int's leaf sum), so no array of terms is ever stored.

The packed bits of an activation (bit 0 = +1 / level 0, bit 1 = -1 / level 1; kernels.pack's
convention, tail bits 0) come out of the same forward pass (packed along the last axis); V of the
attention, whose product with A reduces over the token axis, is packed along that axis on demand
(pack_sign_columns).

NaN: both binarizers treat NaN as NumPy does: sign(NaN) = -1 (signed), clamp(round(NaN), 0, 1) * alpha
= NaN (unsigned), and bit 1 resp. bit 0; -0. passes through np.clip, and so it does here.

Each kernel has its NumPy reference in minibvit.quant (the function whose fast path it is); the
tests (reference_tests/test_fused_quant.py) hold them bit for bit.
"""
import numpy as np
from numba import njit, prange

from ..intrinsics import bits64, select64
from ..numerics import CONTIGUOUS_ROWS, row_table
from .quantize_int import _PW_BLOCK, _pairwise_leaf, pairwise_sum

_PARALLEL_MIN = 1 << 12          # elements per parallel pairwise subtree, at least
_TREE_DEPTH = 4                  # 16 pairwise subtrees computed in parallel

# term kinds of the elastic binarizer's backward (quant.elastic_binarize_backward)
SIGNED_LSQ, SIGNED_GSB, UNSIGNED = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# the elastic binarizer's per-element pseudo-gradient: (dx, the scale-gradient term)


@njit(inline="always")
def _elastic_terms(kind, x, g, a, one):
    """(dx, term) of one element, the float32/float64 operations of quant.elastic_binarize_backward:
    q = x / a; signed: dx = g * 1[|q| <= 1], term = sign(x) * g ("lsq") or (sign(x) - 1[|q| <= 1] q) g
    ("gsb"); unsigned: dx = g * 1[0 <= q <= 1], term = (1[q > 1] + 1[0 <= q <= 1] (round(q) - q)) g.
    one: 1 in x's dtype (Numba would widen a float32 mixed with an integer literal to float64)."""
    zero = one - one
    q = x / a
    if kind == UNSIGNED:
        inside = one if (q >= 0 and q <= 1) else zero
        above = one if q > 1 else zero
        return g * inside, (above + inside * (np.rint(q) - q)) * g
    inside = one if abs(q) <= 1 else zero
    s = one if x >= 0 else -one
    if kind == SIGNED_LSQ:
        return g * inside, s * g
    return g * inside, (s - inside * q) * g


@njit(inline="always")
def _kind_terms(kind, xb, gb, a, one, db, terms):
    """db = dx and terms[:n] = the terms of the slices xb, gb of one leaf, for a constant kind: two
    loops over local slices (one output each), so that LLVM vectorizes both."""
    for i in range(xb.size):
        db[i] = _elastic_terms(kind, xb[i], gb[i], a, one)[0]
    for i in range(xb.size):
        terms[i] = _elastic_terms(kind, xb[i], gb[i], a, one)[1]


@njit(inline="always")
def _segment_terms(kind, xb, gb, a, one, db, terms):
    """_kind_terms for the kind of the call (a constant in each branch, so each loop is compiled for it)."""
    if kind == UNSIGNED:
        _kind_terms(UNSIGNED, xb, gb, a, one, db, terms)
    elif kind == SIGNED_LSQ:
        _kind_terms(SIGNED_LSQ, xb, gb, a, one, db, terms)
    else:
        _kind_terms(SIGNED_GSB, xb, gb, a, one, db, terms)


@njit(inline="always")
def _leaf_terms(kind, x, g, a, one, dx, dx_rows, k, start, n, terms):
    """dx of elements start .. start + n - 1 written, their terms into terms[:n]. dx: the flat output,
    or with dx_rows (non-empty) the flat buffer of a view whose row r (of k) starts at dx[dx_rows[r]]
    (row_table): dx is then computed straight into each row segment the elements span."""
    if dx_rows.size == 0:
        _segment_terms(kind, x[start:start + n], g[start:start + n], a, one, dx[start:start + n], terms)
        return
    r = start // k
    j = start - r * k
    t = 0
    while t < n:
        seg = min(k - j, n - t)
        lo = dx_rows[r] + j
        _segment_terms(kind, x[start + t:start + t + seg], g[start + t:start + t + seg], a, one, dx[lo:lo + seg],
                       terms[t:t + seg])
        t += seg
        r += 1
        j = 0


@njit(inline="always")
def _leaf(kind, x, g, a, one, dx, dx_rows, k, start, n, terms):
    """NumPy's pairwise sum of the terms of elements start .. start + n - 1 for n <= 128
    (quantize_int's leaf sum over the terms, computed into the scratch terms), writing their dx."""
    _leaf_terms(kind, x, g, a, one, dx, dx_rows, k, start, n, terms)
    return _pairwise_leaf(terms, 0, n, one - one)


@njit(cache=True)
def _subtree(kind, x, g, a, one, dx, dx_rows, k, start, n):
    """NumPy's pairwise_sum over elements start .. start + n - 1: a node of more than 128 elements
    is the sum left + right of its halves (the first rounded down to a multiple of 8). Walked with an
    explicit stack (a cached recursive Numba function crashes on load), left half first."""
    starts = np.empty(128, np.int64)
    lengths = np.empty(128, np.int64)
    expanded = np.zeros(128, np.bool_)
    values = np.empty(128, x.dtype)
    terms = np.empty(_PW_BLOCK, x.dtype)
    top, n_values = 0, 0
    starts[0], lengths[0] = start, n
    while top >= 0:
        s, m = starts[top], lengths[top]
        if m <= _PW_BLOCK:
            values[n_values] = _leaf(kind, x, g, a, one, dx, dx_rows, k, s, m, terms)
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


@njit(cache=True)
def _tree_nodes(n, depth):
    """(starts, lengths) of the 2^depth nodes at that depth of NumPy's pairwise tree over n elements
    (every node above it has more than 128 elements, so it is split)."""
    starts = np.zeros(1, np.int64)
    lengths = np.full(1, n, np.int64)
    for _ in range(depth):
        new_starts = np.empty(2 * starts.size, np.int64)
        new_lengths = np.empty(2 * starts.size, np.int64)
        for i in range(starts.size):
            half = lengths[i] // 2
            half -= half % 8
            new_starts[2 * i], new_lengths[2 * i] = starts[i], half
            new_starts[2 * i + 1], new_lengths[2 * i + 1] = starts[i] + half, lengths[i] - half
        starts, lengths = new_starts, new_lengths
    return starts, lengths


@njit(parallel=True, cache=True)
def _elastic_backward_flat(kind, x, g, a, one, dx, dx_rows, k):
    """dx (written; through dx_rows when non-empty, _leaf_terms) and the pairwise sum of the terms
    over the flat arrays x, g (C order)."""
    n = x.size
    if n <= _PARALLEL_MIN << _TREE_DEPTH:
        return _subtree(kind, x, g, a, one, dx, dx_rows, k, 0, n)
    starts, lengths = _tree_nodes(n, _TREE_DEPTH)
    sums = np.empty(starts.size, x.dtype)
    for i in prange(starts.size):
        sums[i] = _subtree(kind, x, g, a, one, dx, dx_rows, k, starts[i], lengths[i])
    width = sums.size
    while width > 1:  # combine the subtrees as the recursion above them does: left + right
        for i in range(width // 2):
            sums[i] = sums[2 * i] + sums[2 * i + 1]
        width //= 2
    return sums[0]


# elastic_backward writes dx into a view (out=) where it lies only when its rows hold this many
# elements: shorter rows cost more a segment at a time than a contiguous dx and one copy (AMD EPYC,
# the attention's dq in a qkv gradient: head_dim 24, 32 and 48 slower that way, 64 faster).
VIEW_ROWS_MIN = 64


def elastic_backward(kind, x, dout, alpha, out=None):
    """(dx, sum of the scale-gradient terms) of quant.elastic_binarize_backward in one pass.

    x: the binarizer's input, dout: the upstream gradient (x's shape), alpha: the floored scale
    (a scalar of x's dtype); out: None, or an array of x's shape and dtype to write dx into, a view
    too (the attention's dq, dk, dv in the qkv gradient): written where it lies (row_table) when its
    rows hold at least VIEW_ROWS_MIN elements, else dx is made contiguous and copied there. Returns dx
    (x's shape and dtype; out when given) and the sum as a scalar of x's dtype, equal bit for bit to
    np.sum(terms * dout) of the NumPy formula."""
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"out must be a {x.dtype} array of shape {x.shape}, got {out.dtype} {out.shape}")
    x1 = np.ascontiguousarray(x).reshape(-1)
    g1 = np.ascontiguousarray(dout, dtype=x.dtype).reshape(-1)
    k = x.shape[-1] if x.ndim else 1
    in_place = out is not None and (out.flags.c_contiguous or k >= VIEW_ROWS_MIN)
    table = row_table(out) if in_place else None
    dx_flat, dx_rows = (np.empty_like(x1), CONTIGUOUS_ROWS) if table is None else table
    total = _elastic_backward_flat(kind, x1, g1, x.dtype.type(alpha), x.dtype.type(1), dx_flat, dx_rows, k)
    if table is not None:  # written into out
        return out, x.dtype.type(0) + x.dtype.type(total)  # np.sum adds its sum to 0.
    dx = dx_flat.reshape(x.shape)
    if out is not None:
        out[...] = dx
        dx = out
    return dx, x.dtype.type(0) + x.dtype.type(total)  # np.sum adds its sum to 0.


# ---------------------------------------------------------------------------------------------
# the elastic binarizer's forward, with the packed bits of its levels


@njit(inline="always")
def _store_word_tail(levels_row, out_bits, full_words, n_words, k):
    if full_words < n_words:
        word = np.uint64(0)
        for j in range(64 * full_words, k):
            word |= np.uint64(levels_row[j] != 0) << np.uint64(j - 64 * full_words)
        out_bits[full_words] = word


_ROW_BLOCK = 16  # rows per task of the forward (one scratch row of level bits per task)


@njit(parallel=True, cache=True)
def _elastic_forward_rows(x, x_rows, shift, a, signed, one, out, bits, shifted):
    """out = a * sign(y) (signed) or a * clamp(round(y / a), 0, 1) (unsigned), row by row, and the
    packed bits of the levels along each row (bit 1: level -1 (signed), level 1 (unsigned)), with
    y = x, or y = x - shift (per column, shift (K,)) written to shifted when shift is non-empty.
    x: (rows, K), or with x_rows non-empty a flat buffer whose row r starts at x[x_rows[r]]
    (numerics.row_table: a view read where it lies)."""
    rows, k = out.shape
    n_words = bits.shape[1]
    full_words = k // 64
    zero = one - one
    has_shift = shift.size > 0
    flat = x.reshape(-1)
    for task in prange((rows + _ROW_BLOCK - 1) // _ROW_BLOCK):
        level_bits = np.empty(k, np.uint8)
        for r in range(task * _ROW_BLOCK, min(rows, (task + 1) * _ROW_BLOCK)):
            start = x_rows[r] if x_rows.size else r * k
            xr, outr = flat[start:start + k], out[r]
            if has_shift:
                yr = shifted[r]
                for j in range(k):
                    yr[j] = xr[j] - shift[j]
                xr = yr
            if signed:
                for j in range(k):
                    negative = not xr[j] >= 0  # sign(x) = -1 (NaN too, as np.where(x >= 0, 1, -1))
                    outr[j] = a * (-one if negative else one)
                    level_bits[j] = negative
            else:
                for j in range(k):
                    level = np.rint(xr[j] / a)
                    if level > one:  # np.clip's order: -0. and NaN pass through, as in NumPy
                        level = one
                    elif level < zero:
                        level = zero
                    outr[j] = a * level
                    level_bits[j] = level >= one
            for w in range(full_words):
                bits[r, w] = bits64(level_bits, 64 * w)
            _store_word_tail(level_bits, bits[r], full_words, n_words, k)


def elastic_forward(x, alpha, signed, shift=None):
    """out (x's shape and dtype) and the packed level bits [..., ceil(K/64)] (K = x.shape[-1]) of
    quant.elastic_binarize_forward, in one pass; alpha: the floored scale (a scalar). With shift
    (K,) of x's dtype, the binarizer's input is y = x - shift (ASM's centring), and the result is
    (out, bits, y): y as NumPy's x - shift, contiguous (x itself, a view too, is read where it lies)."""
    k = x.shape[-1] if x.ndim else 1
    dtype = x.dtype
    if shift is None:
        x2 = np.ascontiguousarray(x).reshape(-1, k)
        out = np.empty_like(x2)
        bits = np.empty((x2.shape[0], (k + 63) // 64), np.uint64)
        _elastic_forward_rows(x2, CONTIGUOUS_ROWS, np.empty(0, dtype), dtype.type(alpha), bool(signed), dtype.type(1),
                              out, bits, out)
        return out.reshape(x.shape), bits.reshape(x.shape[:-1] + (bits.shape[1],))
    table = row_table(x)
    if table is None:
        table = (np.ascontiguousarray(x).reshape(-1), CONTIGUOUS_ROWS)
    rows = x.size // k if k else 0
    out, y = np.empty((rows, k), dtype), np.empty((rows, k), dtype)
    bits = np.empty((rows, (k + 63) // 64), np.uint64)
    _elastic_forward_rows(table[0], table[1], np.ascontiguousarray(shift, dtype), dtype.type(alpha), bool(signed),
                          dtype.type(1), out, bits, y)
    return out.reshape(x.shape), bits.reshape(x.shape[:-1] + (bits.shape[1],)), y.reshape(x.shape)


@njit(parallel=True, cache=True)
def _sign_rows(bits, if_set, if_clear, out):
    """out[r, j] = if_set where bit j of row r's packed words is 1, else if_clear (select64 per word)."""
    rows, k = out.shape
    full_words = k // 64
    for r in prange(rows):
        br, outr = bits[r], out[r]
        for w in range(full_words):
            select64(br[w], if_set, if_clear, outr, 64 * w)
        for j in range(64 * full_words, k):
            outr[j] = if_set if (br[full_words] >> np.uint64(j - 64 * full_words)) & np.uint64(1) else if_clear


def signed_output(bits, alpha, shape, dtype):
    """The signed elastic binarizer's output alpha * sign(x) (shape, dtype) from its packed level bits
    (elastic_forward's bits; bit 1: -1): alpha * -1 and alpha * 1, the forward's two values, bit for
    bit, without reading x."""
    out = np.empty(shape, dtype)
    one, a = np.dtype(dtype).type(1), np.dtype(dtype).type(alpha)
    k = shape[-1] if len(shape) else 1
    _sign_rows(bits.reshape(-1, bits.shape[-1]), a * -one, a * one, out.reshape(-1, k))
    return out


@njit(inline="always")
def _row_mean(row, one, count):
    """np.mean of a contiguous row: its np.sum (quantize_int.pairwise_sum) over count, the row's
    length in the row's dtype (Numba would divide a float32 by an integer in float64)."""
    return pairwise_sum(row, one - one) / count


@njit(parallel=True, cache=True)
def _weight_rows(w, center, per_channel, one, count, centred, levels, alpha, bits, out, derivative):
    """Per output row r of w (C_out, K): centred[r] = w[r] - mean(w[r]) (center; a scratch row when
    centred has no rows), levels[r] = sign of it (+-1, NaN -> -1), alpha[r] = mean |centred[r]|
    (per_channel), bits[r] = its packed sign bits; when out has rows (per_channel), also
    out[r] = alpha[r] * levels[r] and, when derivative has rows, derivative[r] = 1[|centred[r]| <= 1]
    (the clipped STE's derivative), as weight_binarize_forward computes them."""
    rows, k = w.shape
    n_words = bits.shape[1]
    full_words = k // 64
    zero = one - one
    for r in prange(rows):
        scratch = np.empty(k, w.dtype)
        level_bits = np.empty(k, np.uint8)
        wr, lr = w[r], levels[r]
        cr = centred[r] if centred.shape[0] else (np.empty(k, w.dtype) if center else wr)
        if center:
            mean = _row_mean(wr, one, count)
            for j in range(k):
                cr[j] = wr[j] - mean
        for j in range(k):
            negative = not cr[j] >= 0
            lr[j] = -one if negative else one
            level_bits[j] = negative
            scratch[j] = abs(cr[j])
        if per_channel:
            alpha[r] = _row_mean(scratch, one, count)
        for wd in range(full_words):
            bits[r, wd] = bits64(level_bits, 64 * wd)
        _store_word_tail(level_bits, bits[r], full_words, n_words, k)
        if out.shape[0]:
            a, outr = alpha[r], out[r]
            for j in range(k):
                outr[j] = a * lr[j]
        if derivative.shape[0]:
            dr = derivative[r]
            for j in range(k):
                dr[j] = one if scratch[j] <= one else zero


def _no_rows(w):
    return np.empty((0, w.shape[1]), w.dtype)


def weight_binarize(w, center, per_channel):
    """(w_c, levels, alpha (C_out,) or None, sign bits (C_out, ceil(K/64))) of a 2-D weight (C_out, K),
    the NumPy steps of quant._binarize_weight in one pass per row: w_c = w - mean_row(w) (center; else
    w itself), levels = sign(w_c) as floats, alpha = mean_row|w_c| (per_channel)."""
    w = np.ascontiguousarray(w)
    centred = np.empty_like(w) if center else w
    levels = np.empty_like(w)
    alpha = np.empty(w.shape[0], w.dtype)
    bits = np.empty((w.shape[0], (w.shape[1] + 63) // 64), np.uint64)
    _weight_rows(w, bool(center), bool(per_channel), w.dtype.type(1), w.dtype.type(w.shape[1]), centred, levels,
                 alpha, bits, _no_rows(w), _no_rows(w))
    return centred, levels, (alpha if per_channel else None), bits


def weight_binarize_channel(w, center, clipped):
    """(out, derivative or None, levels, alpha (C_out,), sign bits) of quant.weight_binarize_forward with
    scale="channel" for a 2-D weight (C_out, K), in one pass per row: out = alpha[:, None] * levels and,
    clipped, the STE derivative 1[|W_c| <= 1] (else None: the identity STE)."""
    w = np.ascontiguousarray(w)
    out, levels = np.empty_like(w), np.empty_like(w)
    derivative = np.empty_like(w) if clipped else None
    alpha = np.empty(w.shape[0], w.dtype)
    bits = np.empty((w.shape[0], (w.shape[1] + 63) // 64), np.uint64)
    _weight_rows(w, bool(center), True, w.dtype.type(1), w.dtype.type(w.shape[1]), _no_rows(w), levels, alpha,
                 bits, out, _no_rows(w) if derivative is None else derivative)
    return out, derivative, levels, alpha, bits


@njit(parallel=True, cache=True)
def _weight_grad_rows(dout, derivative, center, one, count, dw):
    """Per row r: dw[r] = dout[r] * derivative[r] (dout[r] when derivative has no rows), minus its
    row mean (center): quant.weight_binarize_backward's steps."""
    rows, k = dout.shape
    for r in prange(rows):
        dr, gr = dw[r], dout[r]
        if derivative.shape[0]:
            der = derivative[r]
            for j in range(k):
                dr[j] = gr[j] * der[j]
        else:
            for j in range(k):
                dr[j] = gr[j]
        if center:
            mean = _row_mean(dr, one, count)
            for j in range(k):
                dr[j] = dr[j] - mean


def weight_grad(dout, derivative, center):
    """quant.weight_binarize_backward of a 2-D gradient (C_out, K) in one pass per row: dW_c = g * d
    (d: the STE derivative, None for the identity), then dW_c - mean_row(dW_c) with center."""
    dout = np.ascontiguousarray(dout)
    dw = np.empty_like(dout)
    der = _no_rows(dout) if derivative is None else np.ascontiguousarray(derivative, dout.dtype)
    _weight_grad_rows(dout, der, bool(center), dout.dtype.type(1), dout.dtype.type(dout.shape[1]), dw)
    return dw


@njit(parallel=True, cache=True)
def _grs_rows(w, grad, lam, l2, center, one, count, out):
    """Per output row r of w (C_out, K): out[r] = grad[r] + g, g = the GRS gradient of the row's latent
    W_c (w[r] - mean(w[r]) with center, else w[r]), pulled back through the centring (g - mean(g))."""
    rows, k = w.shape
    for r in prange(rows):
        latent = np.empty(k, w.dtype)
        g = np.empty(k, w.dtype)
        wr = w[r]
        if center:
            mean = _row_mean(wr, one, count)
            for j in range(k):
                latent[j] = wr[j] - mean
        else:
            latent[:] = wr
        for j in range(k):
            g[j] = abs(latent[j])
        alpha = _row_mean(g, one, count)
        for j in range(k):
            s = one if latent[j] >= 0 else -one  # sign(0) = +1, NaN -> -1 (quant.sign)
            if l2:
                g[j] = lam * (latent[j] - alpha * s)
            else:
                g[j] = lam * (one if abs(latent[j]) - alpha >= 0 else -one) * s
        if center:
            g_mean = _row_mean(g, one, count)
            for j in range(k):
                g[j] = g[j] - g_mean
        for j in range(k):
            out[r, j] = grad[r, j] + g[j]


def grs_gradient_added(w, grad, lam, variant, center):
    """grad + the GRS gradient of a 2-D latent weight w (C_out, K), as binaryvit.GRSHook's NumPy steps
    compute it (binarized_latent, grs_gradient, the pull back through the centring) in one pass per
    row: a new array of w's shape and dtype. variant "l2" | "l1"; center: the binarizer centres W."""
    w = np.ascontiguousarray(w)
    out = np.empty_like(w)
    _grs_rows(w, np.ascontiguousarray(grad, w.dtype), w.dtype.type(lam), variant == "l2", bool(center),
              w.dtype.type(1), w.dtype.type(w.shape[1]), out)
    return out


@njit(parallel=True, cache=True)
def _pack_columns(x, signs, bits):
    """bits[b, j, w] = the bits of the column j of x[b] over rows i = 64 w .. 64 w + 63: bit 1 where
    not x >= 0 (signs: sign(x) = -1, NaN too, as quant.sign) or where x != 0 (a mask)."""
    n_batch, n_rows, n_cols = x.shape
    n_words = bits.shape[2]
    for b in prange(n_batch):
        words = np.empty(n_cols, np.uint64)  # the words of all columns, built a row at a time
        for w in range(n_words):
            words[:] = 0
            for i in range(min(64, n_rows - 64 * w)):
                row, shift = x[b, 64 * w + i], np.uint64(i)
                for j in range(n_cols):
                    hit = (not row[j] >= 0) if signs else row[j] != 0
                    words[j] |= np.uint64(hit) << shift
            bits[b, :, w] = words


def _columns_packed(x, signs):
    """_pack_columns of x (..., K, N) (a bool x read as bytes): uint64 (..., N, ceil(K/64))."""
    k, n = x.shape[-2], x.shape[-1]
    x3 = np.ascontiguousarray(x).reshape(-1, k, n)
    if x3.dtype == np.bool_:
        x3 = x3.view(np.uint8)
    bits = np.empty((x3.shape[0], n, (k + 63) // 64), np.uint64)
    _pack_columns(x3, signs, bits)
    return bits.reshape(x.shape[:-2] + bits.shape[1:])


def pack_sign_columns(x):
    """Sign bits of x (..., K, N) packed along K for each column: uint64 (..., N, ceil(K/64)), bit 1 where
    sign(x) = -1 (x < 0, or NaN as quant.sign). The layout of and_bmm's v_packed (pack_signs(V^T))."""
    return _columns_packed(x, True)


def pack_mask_columns(mask):
    """A mask (..., K, N) (bool or numeric: bit = mask != 0) packed along K for each column:
    uint64 (..., N, ceil(K/64)) (pack_bits of mask^T)."""
    return _columns_packed(mask, False)
