"""GSB attention product (arXiv 2305.07931) from binary bases: the nine exact integer partial
products and their one combine, shared by the simulated forward (ops.basis_matmul), the packed
engine and gsb_attention_product. Each with a NumPy reference.
"""
import numpy as np
from numba import njit, prange

from .binary import accumulate_row, aligned_empty, column_blocks, copy_panel, panel_rows, popcount_matmul, transpose_words
from .pack import check_k, check_words, row_popcount, unpack_bits, unpack_signs

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
    a = check_words(a_bases, "a_bases", 4)
    s = check_words(v_signs, "v_signs", 3)
    t = check_words(v_masks, "v_masks", 4)
    n_batch, _, n_rows, n_words = a.shape
    n_dim = s.shape[1]
    if a.shape[1] != 3 or t.shape[1] != 2:
        raise ValueError(f"a_bases must be [B, 3, M, W] (B1, T1, T2) and v_masks [B, 2, D, W] (T1v, T2v); "
                         f"got {a.shape} and {t.shape}")
    if s.shape != (n_batch, n_dim, n_words) or t.shape != (n_batch, 2, n_dim, n_words):
        raise ValueError(f"v_signs {s.shape} must be [B, D, W] and v_masks {t.shape} [B, 2, D, W] with "
                         f"B={n_batch}, W={n_words} from a_bases {a.shape}")
    check_k(k, n_words, "a_bases")
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
    Zero tails required in every operand, as in binary_gemm (not checked here).
    """
    a, s, t = _check_gsb(a_bases, v_signs, v_masks, K)
    n_batch, _, n_rows, n_words = a.shape
    n_dim = s.shape[1]
    planes = np.concatenate([s, t[:, 0] & s, t[:, 1] & s, t[:, 0], t[:, 1]], axis=1)     # [B, 5D, W]
    minus_twice = popcount_matmul(a.reshape(n_batch, 3 * n_rows, n_words), None, transpose_words(planes),
                          np.zeros((n_batch, 3 * n_rows), np.int64), None, None, 5 * n_dim)   # -2 popcount(P & U)
    counts = (minus_twice // -2).reshape(n_batch, 3, n_rows, 5, n_dim).transpose(0, 1, 3, 2, 4)  # [B, 3, 5, M, D]
    row_pop = row_popcount(a)[:, :, :, None]                                             # [B, 3, M, 1]
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


def gsb_combine(products, a_scales, v_scales):
    """GSB's A_q V_q from its integer partial products, in one fixed order:

        out = sum_{i=0..2} sum_{j=0..2} (float64(a_i) * float64(b_j)) * C_ij

    accumulated in float64 in the order (i, j) = (0, 0), (0, 1), ..., (2, 2), element by element.
    products: C_ij = products[i][j], integer-valued arrays (..., M, D) (e.g. the transposed
    gsb_partial_products, or float products of the integer bases); a_scales, v_scales: (3,), or
    one row per leading batch entry (B, 3). Returns float64 (..., M, D); the callers cast (float32).
    Every implementation that applies this to the same integers gets the same bits: the simulated
    forward (ops.basis_matmul), the packed engine and gsb_attention_product call this one."""
    a_scales, v_scales = np.asarray(a_scales), np.asarray(v_scales)
    out = 0.0
    for i in range(len(products)):
        for j in range(len(products[i])):
            weight = np.asarray(a_scales[..., i], np.float64) * np.asarray(v_scales[..., j], np.float64)
            product = products[i][j]
            if weight.ndim:  # one scale per batch entry
                weight = weight.reshape(weight.shape + (1,) * (np.ndim(product) - weight.ndim))
            out = out + weight * product
    return out


@njit(parallel=True, cache=True)
def combined_products(bases, row_pop, planes, weights, out):
    """out [B*H, N, d] (float32 or float64) = sum_ij weights[i, j] * C_ij, summed in float64 in
    gsb_combine's order and rounded once to out's dtype, with C_ij from the AND-popcount counts of
    the bases [B*H, 3, N, Wn] (pack_bits of B1, T1, T2 along the keys) against the value planes
    [B*H, Wn, 5d] (the bits of S, T1v & S, T2v & S, T1v, T2v packed along the keys, word-major, in
    column blocks of d); row_pop [B*H, 3, N] int64: the row popcounts of the bases; weights float64
    [3, 3] = float64(a_i) * float64(b_j). The fused form of gsb_combine(gsb_partial_products(...)),
    one task per (image, head): the packed engine and the training forward (ops.packed_basis_matmul).
    Each query row's 15 counts (3 bases x 5 planes) are taken into an L1 buffer and combined at once."""
    n_bh, _, n_rows, n_words = bases.shape
    d = out.shape[2]
    width = -(-5 * d // 8) * 8
    for t in prange(n_bh):
        panel = copy_panel(planes[t:t + 1], 0, 0, 5 * d, width)     # aligned [Wn, width], L1-resident
        counts = aligned_empty(3, width, np.uint64)                  # popcount(P_i[m] & plane), per m
        c0, c1, c2 = counts[0], counts[1], counts[2]
        for m in range(n_rows):
            accumulate_row(bases[t, 0, m], None, panel, c0)
            accumulate_row(bases[t, 1, m], None, panel, c1)
            accumulate_row(bases[t, 2, m], None, panel, c2)
            r0, r1, r2 = row_pop[t, 0, m], row_pop[t, 1, m], row_pop[t, 2, m]
            orow = out[t, m]
            for j in range(d):
                # planes (s, T1v & s, T2v & s, T1v, T2v): P_i @ (U_j o S) = popcount(P_i & U_j) - 2 popcount(P_i & U_j & s)
                total = 0.0
                total = total + weights[0, 0] * np.float64(r0 - 2 * np.int64(c0[j]))
                total = total + weights[0, 1] * np.float64(np.int64(c0[3 * d + j]) - 2 * np.int64(c0[d + j]))
                total = total + weights[0, 2] * np.float64(np.int64(c0[4 * d + j]) - 2 * np.int64(c0[2 * d + j]))
                total = total + weights[1, 0] * np.float64(r1 - 2 * np.int64(c1[j]))
                total = total + weights[1, 1] * np.float64(np.int64(c1[3 * d + j]) - 2 * np.int64(c1[d + j]))
                total = total + weights[1, 2] * np.float64(np.int64(c1[4 * d + j]) - 2 * np.int64(c1[2 * d + j]))
                total = total + weights[2, 0] * np.float64(r2 - 2 * np.int64(c2[j]))
                total = total + weights[2, 1] * np.float64(np.int64(c2[3 * d + j]) - 2 * np.int64(c2[d + j]))
                total = total + weights[2, 2] * np.float64(np.int64(c2[4 * d + j]) - 2 * np.int64(c2[2 * d + j]))
                orow[j] = total  # one rounding to out's dtype, as .astype does


def gsb_attention_product(a_bases, a_scales, v_signs, v_masks, v_scales, K):
    """GSB attention output A_q @ V_q per batch*head from binary bases (see the section comment).

    Inputs:
        a_bases, v_signs, v_masks, K: as in gsb_partial_products
        a_scales: (a1, a2, a3), shape [3] or per batch*head [B, 3]
        v_scales: (b1, b2, b3), shape [3] or [B, 3]
    Returns:
        float64 [B, M, D] = sum_ij a_i b_j C_ij, combined in float64 from the exact integers (gsb_combine).
    Zero tails required, as in gsb_partial_products (not checked here).
    """
    partial = gsb_partial_products(a_bases, v_signs, v_masks, K)
    n_batch = partial.shape[0]
    return gsb_combine(partial.transpose(1, 2, 0, 3, 4), _gsb_scales(a_scales, n_batch, "a_scales"),
                       _gsb_scales(v_scales, n_batch, "v_scales"))


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


# ---------------------------------------------------------------------------------------------
# GSB's quantizers in training (minibvit.gsb): the elementwise work of each forward and backward in
# one or two Numba passes, every element with the float operations of the NumPy formula in the same
# order. The scale gradients stay np.sum over the per-element terms these kernels write, so they
# have np.sum's bits. The NumPy formulas in gsb.py are the reference (test_fused_quant.py).
# ---------------------------------------------------------------------------------------------

_CHUNK = 1 << 14  # elements per task of the flat passes
# Each task indexes its chunk from 0 (y[start:stop], then range(size)): an index counted from a start
# that Numba cannot prove >= 0 gets a negative-index check per element, which keeps LLVM from
# vectorizing the loop (the passes were 3-18x slower: docs/kernels.md "Loops that vectorize").


@njit(inline="always")
def _chunk(c, n):
    """(start, stop) of task c's chunk of n elements."""
    return c * _CHUNK, min(n, (c + 1) * _CHUNK)


@njit(inline="always")
def _extrema(y):
    """(min, max, any NaN) of a nonempty 1-D y."""
    lo, hi, nan = y[0], y[0], False
    for i in range(y.size):  # branch-free; with a NaN anywhere lo and hi are not used
        x = y[i]
        nan |= x != x
        lo = x if x < lo else lo
        hi = x if x > hi else hi
    return lo, hi, nan


@njit(parallel=True, cache=True)
def _chunk_extrema(y, lows, highs, nans):
    n = y.size
    for c in prange(lows.size):
        start, stop = _chunk(c, n)
        lows[c], highs[c], nans[c] = _extrema(y[start:stop])


def tensor_extrema(y):
    """(y.min(), y.max()) of a contiguous array as NumPy gives them: NaN when y holds a NaN."""
    flat = y.reshape(-1)
    chunks = (flat.size + _CHUNK - 1) // _CHUNK
    lows, highs = np.empty(chunks, y.dtype), np.empty(chunks, y.dtype)
    nans = np.empty(chunks, np.bool_)
    _chunk_extrema(flat, lows, highs, nans)
    if nans.any():
        return y.dtype.type(np.nan), y.dtype.type(np.nan)
    return lows.min(), highs.max()


@njit(inline="always")
def _value_level(a0, a1, a2, s, f1, f2):
    """a1 S + a2 (T1 S) + a3 (T2 S) of one element, in gsb._value_output's order (f1, f2: T1, T2 as 0 / 1)."""
    return (a0 * s + a1 * (f1 * s)) + a2 * (f2 * s)


@njit(parallel=True, cache=True)
def _value_forward(y, a, hi1, lo1, hi2, lo2, out, t1, t2, counts):
    """out = a1 S + a2 (T1 S) + a3 (T2 S) (gsb.gsb_value_forward), T1 / T2 and their counts per task."""
    one = np.ones(1, y.dtype)[0]
    zero = one - one
    n = y.size
    a0, a1, a2 = a[0], a[1], a[2]
    for c in prange(counts.shape[0]):
        start, stop = _chunk(c, n)
        yc, oc, t1c, t2c = y[start:stop], out[start:stop], t1[start:stop], t2[start:stop]
        c1, c2 = 0, 0
        for i in range(yc.size):
            x = yc[i]
            s = one if x >= 0 else -one
            m1 = (x > hi1) | (x < lo1)
            m2 = (x > hi2) | (x < lo2)
            f1 = one if m1 else zero
            f2 = one if m2 else zero
            oc[i] = _value_level(a0, a1, a2, s, f1, f2)
            t1c[i], t2c[i] = m1, m2
            c1 += m1
            c2 += m2
        counts[c, 0], counts[c, 1] = c1, c2


def value_forward(y, a, hi1, lo1, hi2, lo2):
    """(out, t1, t2, |T1|, |T2|) of gsb_value_forward for a contiguous y and its thresholds
    (0.7 / 0.9 of max y and of min y, as gsb_value_masks computes them)."""
    dt = y.dtype.type
    return _masked_output(_value_forward, y, a, dt(hi1), dt(lo1), dt(hi2), dt(lo2))


@njit(parallel=True, cache=True)
def _value_output(y, a, t1, t2, out):
    """out = a1 S + a2 (T1 S) + a3 (T2 S) from y and its masks (gsb.GSBValueQuantizer.recompute)."""
    one = np.ones(1, y.dtype)[0]
    zero = one - one
    n = y.size
    a0, a1, a2 = a[0], a[1], a[2]
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        start, stop = _chunk(c, n)
        yc, oc, t1c, t2c = y[start:stop], out[start:stop], t1[start:stop], t2[start:stop]
        for i in range(yc.size):
            s = one if yc[i] >= 0 else -one
            oc[i] = _value_level(a0, a1, a2, s, one if t1c[i] else zero, one if t2c[i] else zero)


def value_output(y, a, t1, t2):
    """gsb._value_output(y, a, t1, t2) (the value quantizer's output from its cache) in one pass, for a
    C-contiguous y and its boolean masks."""
    out = np.empty_like(y)
    _value_output(y.reshape(-1), a, t1.reshape(-1), t2.reshape(-1), out.reshape(-1))
    return out


def _masked_output(kernel, y, *args):
    """kernel(flat y, *args, out, t1, t2, counts) run on fresh buffers: (out, t1, t2 in y's shape,
    |T1|, |T2|)."""
    flat = y.reshape(-1)
    out, t1, t2 = np.empty_like(flat), np.empty(flat.size, np.bool_), np.empty(flat.size, np.bool_)
    counts = np.empty(((flat.size + _CHUNK - 1) // _CHUNK, 2), np.int64)
    kernel(flat, *args, out, t1, t2, counts)
    c1, c2 = counts.sum(axis=0)
    return out.reshape(y.shape), t1.reshape(y.shape), t2.reshape(y.shape), int(c1), int(c2)


@njit(parallel=True, cache=True)
def _value_backward(y, t1, t2, g, a, principled, dv, terms):
    """dv = sum_k 1[|q_k| <= 1] (& T_k, principled) g and terms[k] = (sign(v_k) - 1[...] q_k) g with
    v_k = (v, v T1, v T2), q_k = v_k / a_k (gsb.gsb_value_backward)."""
    one = np.ones(1, y.dtype)[0]
    zero = one - one
    n = y.size
    a0, a1, a2 = a[0], a[1], a[2]
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        start, stop = _chunk(c, n)
        yc, gc, t1c, t2c, dvc = y[start:stop], g[start:stop], t1[start:stop], t2[start:stop], dv[start:stop]
        term0, term1, term2 = terms[0, start:stop], terms[1, start:stop], terms[2, start:stop]
        for i in range(yc.size):  # the terms k = 0, 1, 2 written out: v_k = x, x T1, x T2
            x, gi = yc[i], gc[i]
            s = one if x >= 0 else -one
            f1 = one if t1c[i] else zero
            f2 = one if t2c[i] else zero
            q0, q1, q2 = x / a0, (x * f1) / a1, (x * f2) / a2
            in0, in1, in2 = abs(q0) <= 1, abs(q1) <= 1, abs(q2) <= 1
            if principled:
                in1, in2 = in1 & t1c[i], in2 & t2c[i]
            fin0, fin1, fin2 = one if in0 else zero, one if in1 else zero, one if in2 else zero
            dvc[i] = ((zero + fin0 * gi) + fin1 * gi) + fin2 * gi
            term0[i] = (s - fin0 * q0) * gi
            term1[i] = (f1 * s - fin1 * q1) * gi
            term2[i] = (f2 * s - fin2 * q2) * gi


def value_backward(y, t1, t2, g, a, principled):
    """(dv, terms (3, n)) of gsb_value_backward; the caller sums each row of terms with np.sum."""
    flat = y.reshape(-1)
    dv = np.empty_like(flat)
    terms = np.empty((3, flat.size), y.dtype)
    _value_backward(flat, t1.reshape(-1), t2.reshape(-1), np.ascontiguousarray(g, y.dtype).reshape(-1), a,
                    bool(principled), dv, terms)
    return dv.reshape(y.shape), terms


@njit(parallel=True, cache=True)
def _attn_forward(y, al, thr1, thr2, out, t1, t2, counts):
    """out = a1 clamp(round(y / a1), 0, 1) + a2 T1 + a3 T2 (gsb.gsb_attn_forward), T1 = y > thr1,
    T2 = y > thr2 and their counts per task."""
    one = np.ones(1, y.dtype)[0]
    zero = one - one
    n = y.size
    a0, a1, a2 = al[0], al[1], al[2]
    for c in prange(counts.shape[0]):
        start, stop = _chunk(c, n)
        yc, oc, t1c, t2c = y[start:stop], out[start:stop], t1[start:stop], t2[start:stop]
        c1, c2 = 0, 0
        for i in range(yc.size):
            x = yc[i]
            level = np.rint(x / a0)
            if level > one:  # np.clip: -0. and NaN pass through
                level = one
            elif level < zero:
                level = zero
            m1, m2 = x > thr1, x > thr2
            oc[i] = (level * a0 + (one if m1 else zero) * a1) + (one if m2 else zero) * a2
            t1c[i], t2c[i] = m1, m2
            c1 += m1
            c2 += m2
        counts[c, 0], counts[c, 1] = c1, c2


def attn_forward(y, al, thr1, thr2):
    """(out, t1, t2, |T1|, |T2|) of gsb_attn_forward (max over the tensor) for a contiguous y."""
    return _masked_output(_attn_forward, y, al, y.dtype.type(thr1), y.dtype.type(thr2))


@njit(parallel=True, cache=True)
def _attn_backward_official(y, t1, t2, g, al, da, terms):
    """da = W1 g + (T1 g) a2 + (T2 g) a3, terms = ((1[q > 1] + W1 (round(q) - q)) g, T1 g, T2 g) with
    q = y / a1, W1 = 1[0 <= q <= 1] (NaN q: W1 = 1, as ~(q < 0) & ~(q > 1)) (gsb.gsb_attn_backward)."""
    one = np.ones(1, y.dtype)[0]
    zero = one - one
    n = y.size
    a0, a1, a2 = al[0], al[1], al[2]
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        start, stop = _chunk(c, n)
        yc, gc, t1c, t2c, dac = y[start:stop], g[start:stop], t1[start:stop], t2[start:stop], da[start:stop]
        term0, term1, term2 = terms[0, start:stop], terms[1, start:stop], terms[2, start:stop]
        for i in range(yc.size):
            gi = gc[i]
            q = yc[i] / a0
            above = one if q > 1 else zero
            inside = zero if (q < 0) | (q > 1) else one
            f1 = one if t1c[i] else zero
            f2 = one if t2c[i] else zero
            t1g, t2g = f1 * gi, f2 * gi
            dac[i] = (inside * gi + t1g * a1) + t2g * a2
            term0[i] = (above + inside * (np.rint(q) - q)) * gi
            term1[i], term2[i] = t1g, t2g


def attn_backward_official(y, t1, t2, g, al):
    """(da, terms (3, n)) of gsb_attn_backward in the official mode; the caller sums each row of terms."""
    flat = y.reshape(-1)
    da = np.empty_like(flat)
    terms = np.empty((3, flat.size), y.dtype)
    _attn_backward_official(flat, t1.reshape(-1), t2.reshape(-1), np.ascontiguousarray(g, y.dtype).reshape(-1),
                            al, da, terms)
    return da.reshape(y.shape), terms
