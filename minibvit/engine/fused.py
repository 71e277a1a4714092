"""The packed engine's fused float kernels (Numba): the float operations of minibvit.ops fused with
sign packing, the exp and decision tables, and the small helpers of the 8-bit layers.

Exactness rules followed below: no fastmath (no reassociation, no contraction into FMA), the
same operand precisions as ops (ops' LayerNorm and softmax accumulate float32 inputs in float64),
the same operation order; the LayerNorm moments and normalise step and the float32 exp are
minibvit.numerics' own functions. Bits are packed as kernels.pack_signs (bit 1 = -1, element
64w + j in bit j of word w, tail bits 0); {0, 1} levels as kernels.pack_bits (bit 1 = level 1).

Tables: a binarizer's decision on a binary linear's output is a function of the output column c
and the integer I alone (the value is float32(I) * s_c + b_c), so it is tabulated at load time
(linear_values, decision_table) and packed from the integer accumulators through one interval of I
per column (decision_intervals). The softmax of binary attention scores reads its exp values from
a table built the same way (exp_table).
"""
import numpy as np
from numba import njit, prange

from .. import numerics, ops
from ..numerics import row_max
from ..intrinsics import at_least_bits64, below_bits64, interval_bits64

_F32 = np.float32

_ROWS_PER_TASK = 16


@njit(inline="always")
def order_key(bits):
    """An int32 key ordered as the float32 with these bits (non-NaN; -0.0 just below +0.0); its own
    inverse. Integer min / max vectorize, float ones (with their NaN rules) do not, so the engine's
    min / max reductions compare keys: exact in any order, as a maximum is."""
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


@njit(inline="always")
def _layernorm_row(x, gamma, beta, eps, out):
    """ops' LayerNorm (numerics.layernorm_rows) on one row x (n,) into out (n,)."""
    mean, var = numerics.layernorm_moments(x)
    numerics.layernorm_normalize_row(x, mean, var, gamma, beta, eps, out, out)


@njit(inline="always")
def _layernorm_rows8(x, r, gamma64, beta64, eps, squares, out):
    """ops' LayerNorm on rows r .. r + 7 of x into out[0..7], with numerics' eight-row moments (squares:
    (8, n) float64 scratch). gamma64, beta64: gamma and beta converted to float64 (exact)."""
    means, variances = numerics.layernorm_moments8(x, r, squares)
    for k in range(8):
        numerics.layernorm_normalize_row(x[r + k], means[k], variances[k], gamma64, beta64, eps, out[k], out[k])


# The packers below build each word in a loop of constant trip count 64 (LLVM vectorizes it; a
# variable bound made them ~10x slower) and the partial last word in a second loop.

@njit(inline="always")
def _signed_bit(v, centre, shift):
    return np.uint64(not v - (centre + shift) >= 0)


@njit(inline="always")
def _pack_signed_row(y, centre, shift, words):
    """words[w] bit j = not (y[64w + j] - (centre + shift[64w + j]) >= 0): the sign bit of an
    (ASM-shifted) signed binarizer, sign(0) = +1."""
    n = y.shape[0]
    full = n // 64
    for w in range(full):
        word = np.uint64(0)
        for j in range(64):
            word |= _signed_bit(y[64 * w + j], centre, shift[64 * w + j]) << np.uint64(j)
        words[w] = word
    if full < words.shape[0]:
        word = np.uint64(0)
        for j in range(n - 64 * full):
            word |= _signed_bit(y[64 * full + j], centre, shift[64 * full + j]) << np.uint64(j)
        words[full] = word


@njit(inline="always")
def residual_norm_pack_rows(x, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps, shift, bits, h,
                             out_mode, r0, r1):
    """residual_norm_pack on rows r0 .. r1 - 1 (one thread)."""
    n = x.shape[1]
    for r in range(r0, r1):
        xr = x[r]
        if add_mode == 1:
            ar = add[r]
            for j in range(n):
                xr[j] = xr[j] + ar[j]
        elif add_mode == 2:
            cr = acc[r]
            for j in range(n):
                y = np.float32((cr[j] + colsum[j]) // 2) * scale[j]
                xr[j] = xr[j] + (y + bias[j])
    if out_mode == 0:
        return
    buf = np.empty((8, n), np.float32)
    squares = np.empty((8, n), np.float64)
    gamma64, beta64 = gamma.astype(np.float64), beta.astype(np.float64)
    r = r0
    while r < r1:
        if r + 8 <= r1:
            _layernorm_rows8(x, r, gamma64, beta64, eps, squares, buf)
            count = 8
        else:
            _layernorm_row(x[r], gamma, beta, eps, buf[0])
            count = 1
        for k in range(count):
            if out_mode == 1:
                _pack_below_row(buf[k], shift, bits[r + k])
            else:
                h[r + k] = buf[k]
        r += count


@njit(inline="always")
def _pack_below_row(y, shift, words):
    """words = packed not (y - shift >= 0): _pack_signed_row with centre 0, vectorized."""
    n = y.shape[0]
    full = n // 64
    for w in range(full):
        words[w] = below_bits64(y, shift, 64 * w)
    if full < words.shape[0]:
        _below_tail(y, shift, full, words)


@njit(cache=True)
def _below_tail(y, shift, full, words):
    """words[full]: the partial last word of _pack_below_row (see _interval_tail)."""
    word = np.uint64(0)
    for j in range(y.shape[0] - 64 * full):
        word |= _signed_bit(y[64 * full + j], np.float32(0.0), shift[64 * full + j]) << np.uint64(j)
    words[full] = word


@njit(parallel=True, cache=True)
def residual_norm_pack(x, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps, shift, bits, h, out_mode):
    """The residual add that ends a sub-block, fused with the next LayerNorm and the sign packing
    of its output (the next linear's input binarizer). Rows of x [M, D] in parallel:

    add_mode 0: x unchanged;  1: x += add (float32 [M, D]);  2: x += float32((acc + colsum) / 2)
        * scale + bias  (acc int32 [M, D] from binary_gemm of the +-1 recoding of {0, 1} levels:
        sum_k l_k w_k = (sum_k s_k w_k + sum_k w_k) / 2; then ops.linear_forward's epilogue).
    out_mode 0: nothing more;  1: bits [M, W] = packed sign(LN(x) - shift) (threshold per column);
        2: h [M, D] = LN(x) (float32), for an ASM 'token' centre computed by NumPy afterwards.
    """
    rows = x.shape[0]
    tasks = (rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(tasks):
        residual_norm_pack_rows(x, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps, shift, bits, h,
                                 out_mode, task * _ROWS_PER_TASK, min(rows, (task + 1) * _ROWS_PER_TASK))


@njit(parallel=True, cache=True)
def pack_signed_rows(y, centres, shift, bits):
    """bits[r] = packed not(y[r] - (centres[r] + shift) >= 0), rows in parallel (ASM 'token')."""
    for r in prange(y.shape[0]):
        _pack_signed_row(y[r], centres[r], shift, bits[r])


@njit(parallel=True, cache=True)
def pack_qkv(qkv, n_batch, n_tokens, n_heads, centres, shifts, qk_bits, vt_bits):
    """Split the fused qkv output [B*N, 3D] into packed binarizer bits, per (batch, head) task:
    qk_bits [2, B*H, N, Wd]: sign bits of q and k along the head dim d;
    vt_bits [B*H, d, Wn] (zero on entry): sign bits of v transposed, packed along the tokens.
    Threshold of element (b, h, n, j) of tensor t: centres[t, (b*H + h)*N + n] + shifts[t, j]."""
    dim = qkv.shape[1] // 3
    d = dim // n_heads
    for task in prange(n_batch * n_heads):
        b = task // n_heads
        hd = (task % n_heads) * d
        for n in range(n_tokens):
            row = qkv[b * n_tokens + n]
            r = task * n_tokens + n
            for t in range(2):
                _pack_signed_row(row[t * dim + hd:t * dim + hd + d], centres[t, r], shifts[t], qk_bits[t, task, n])
            word, bit = n // 64, np.uint64(n % 64)
            c = centres[2, r]
            for j in range(d):
                v = row[2 * dim + hd + j] - (c + shifts[2, j])
                vt_bits[task, j, word] |= np.uint64(not v >= 0) << bit


@njit(inline="always")
def _pack_interval_range(acc, lo, span, flip, c0, n, words):
    """words = packed decisions of columns c0 .. c0 + n - 1 of one accumulator row: bit =
    (lo <= acc <= lo + span) != flip per column (int32 operands of interval_operands)."""
    full = n // 64
    for w in range(full):
        words[w] = interval_bits64(acc, lo, span, flip, c0 + 64 * w)
    if full < words.shape[0]:
        _interval_tail(acc, lo, span, flip, c0, n, full, words)


@njit(cache=True)
def _interval_tail(acc, lo, span, flip, c0, n, full, words):
    """words[full]: the partial last word of _pack_interval_range. A separate function writing into
    words: inlined (or returning the word), the scalar loop made every call ~10x slower (measured)."""
    word = np.uint64(0)
    for j in range(n - 64 * full):
        c = c0 + 64 * full + j
        word |= np.uint64((np.uint32(acc[c] - lo[c]) <= np.uint32(span[c])) != (flip[c] != 0)) << np.uint64(j)
    words[full] = word


@njit(cache=True)
def pack_interval_rows(acc, lo, span, flip, bits):
    """bits [M, W] of every row of acc [M, C] (_pack_interval_range)."""
    for r in range(acc.shape[0]):
        _pack_interval_range(acc[r], lo, span, flip, 0, acc.shape[1], bits[r])


@njit(parallel=True, cache=True)
def pack_interval_tasks(acc, lo, span, flip, bits):
    """pack_interval_rows in parallel, in tasks of 64 rows (the packed engine's per-kernel path)."""
    rows = acc.shape[0]
    for task in prange((rows + 63) // 64):
        r0, r1 = 64 * task, min(rows, 64 * task + 64)
        pack_interval_rows(acc[r0:r1], lo, span, flip, bits[r0:r1])


def interval_operands(intervals):
    """decision_intervals' (lo, hi, invert) as the int32 (lo, span, flip) of _pack_interval_range;
    an empty interval (lo = K + 1 > hi = K) becomes the single integer K + 1, never reached."""
    lo, hi, invert = intervals
    hi = np.maximum(hi, lo)
    return lo.astype(np.int32), (hi - lo).astype(np.int32), invert.astype(np.int32)


@njit(inline="always")
def transpose_bits64(a):
    """In-place transpose of a 64 x 64 bit matrix, row i = word a[i], column j = bit j: afterwards
    bit j of a[i] is bit i of the former a[j] (block swaps of 32, 16, ..., 1; Hacker's Delight 7-3)."""
    s = 32
    mask = np.uint64(0x00000000FFFFFFFF)
    while s:
        shift = np.uint64(s)
        for k in range(64):
            if k & s == 0:
                t = ((a[k] >> shift) ^ a[k + s]) & mask
                a[k + s] ^= t
                a[k] ^= t << shift
        s //= 2
        mask ^= mask << np.uint64(s)


@njit(cache=True)
def pack_qkv_intervals(acc, lo, span, flip, n_images, n_tokens, n_heads, q_bits, k_words, v_words):
    """The q, k, v binarizers' bits from the integer qkv accumulator acc [b*N, 3D] (no epilogue)
    through per-column decision intervals, per (image, head) t, in the layouts the attention
    products read (kernels' popcount-matmul operands, planes word-major):
    q_bits [b*H, N, Wd]: q packed along the head dim d;  k_words [b*H, Wd, N]: the same for k,
    word-major;  v_words [b*H, Wn, d]: v packed along the tokens, word-major (64 x 64 bit
    transposes of v packed along d)."""
    dim = acc.shape[1] // 3
    d = dim // n_heads
    d_words, n_words = q_bits.shape[2], v_words.shape[1]
    v_rows = np.zeros((64 * n_words, d_words), np.uint64)    # rows past the last token stay 0
    k_row = np.empty(d_words, np.uint64)
    block = np.empty(64, np.uint64)
    for task in range(n_images * n_heads):
        b = task // n_heads
        hd = (task % n_heads) * d
        for n in range(n_tokens):
            row = acc[b * n_tokens + n]
            for t in range(3):
                c0 = t * dim + hd
                words = q_bits[task, n] if t == 0 else k_row if t == 1 else v_rows[n]
                _pack_interval_range(row, lo, span, flip, c0, d, words)
            for g in range(d_words):
                k_words[task, g, n] = k_row[g]
        for g in range(d_words):
            for w in range(n_words):
                block[:] = v_rows[64 * w:64 * w + 64, g]
                transpose_bits64(block)
                for j in range(min(64, d - 64 * g)):
                    v_words[task, w, 64 * g + j] = block[j]


@njit(cache=True)
def pack_heads_intervals(o, lo, span, flip, n_tokens, n_heads, bits):
    """Merge the heads of the integer attention output o [b*H, N, d] and pack the proj input's
    bits from per-column decision intervals: bits [b*N, Wd]."""
    n_bh, _, d = o.shape
    merged = np.empty(n_heads * d, np.int32)
    for r in range((n_bh // n_heads) * n_tokens):
        b, n = r // n_tokens, r % n_tokens
        for hh in range(n_heads):
            merged[hh * d:(hh + 1) * d] = o[b * n_heads + hh, n]
        _pack_interval_range(merged, lo, span, flip, 0, n_heads * d, bits[r])


@njit(parallel=True, cache=True)
def pack_heads(o, scale, n_tokens, n_heads, centres, shift, bits):
    """Merge the heads of the attention output o [B*H, N, d] (float32, or int32 counts) and pack
    the proj input's sign bits: value float32(o) * scale, threshold centres[b*N + n] + shift[h*d + j];
    bits [B*N, Wd] (zero on entry). For GSB and ASM 'token' (else pack_heads_intervals)."""
    n_bh, _, d = o.shape
    for r in prange((n_bh // n_heads) * n_tokens):
        b, n = r // n_tokens, r % n_tokens
        words = bits[r]
        c = centres[r]
        col = 0
        for hh in range(n_heads):
            orow = o[b * n_heads + hh, n]
            for j in range(d):
                v = np.float32(orow[j]) * scale - (c + shift[col])
                words[col // 64] |= np.uint64(not v >= 0) << np.uint64(col % 64)
                col += 1


@njit(inline="always")
def _unsigned_bit(v, centre, shift, alpha, flip):
    """The {0, 1} level of the unsigned elastic binarizer, clamp(round((v - (centre + shift)) /
    alpha), 0, 1) = ((v - (centre + shift)) / alpha > 0.5), xor flip."""
    return np.uint64((v - (centre + shift)) / alpha > 0.5) ^ flip


@njit(inline="always")
def _pack_unsigned_row(y, centre, shift, alpha, words, flip):
    n = y.shape[0]
    full = n // 64
    for w in range(full):
        word = np.uint64(0)
        for j in range(64):
            word |= _unsigned_bit(y[64 * w + j], centre, shift[64 * w + j], alpha, flip) << np.uint64(j)
        words[w] = word
    if full < words.shape[0]:
        word = np.uint64(0)
        for j in range(n - 64 * full):
            word |= _unsigned_bit(y[64 * full + j], centre, shift[64 * full + j], alpha, flip) << np.uint64(j)
        words[full] = word


@njit(cache=True)
def exp_table(d, s_qk, inv_sqrt_d):
    """The exp values ops' softmax takes on binary attention scores: the scores of one row are
    x(I) = float32(float32(I) * s_qk) * float32(1/sqrt d) for integers I in [-d, d] (Q K^T of +-1
    vectors of length d), so every exp(x_j - max_j x_j) of ops' float32 softmax is
    table[I_max + d, I_j + d] = exp(x(I_j) - x(I_max)), computed here with the same float32
    operations and the same exp (numerics.exp_f32_rounded). Returns float32 [2d + 1, 2d + 1]."""
    x = np.empty(2 * d + 1, np.float32)
    for i in range(2 * d + 1):
        x[i] = (np.float32(i - d) * s_qk) * inv_sqrt_d
    table = np.empty((2 * d + 1, 2 * d + 1), np.float32)
    for a in range(2 * d + 1):
        for b in range(2 * d + 1):
            table[a, b] = numerics.exp_f32_rounded(x[b] - x[a])
    return table


@njit(inline="always")
def _row_exps(scores, table, d):
    """The table row of exp(x_j - max x) for one row of binary scores."""
    return table[row_max(scores) + d]


@njit(inline="always")
def _softmax_rows4(s0, s1, s2, s3, table, d, out):
    """numerics.softmax (float32) on four rows of binary scores (int32) into out[0..3] (float32): exp
    values from the table, their float64 sums in order (four independent chains), out = float32(e / sum)."""
    e0, e1, e2, e3 = _row_exps(s0, table, d), _row_exps(s1, table, d), _row_exps(s2, table, d), _row_exps(s3, table, d)
    n = s0.shape[0]
    t0 = t1 = t2 = t3 = 0.0
    for j in range(n):
        a0, a1, a2, a3 = e0[s0[j] + d], e1[s1[j] + d], e2[s2[j] + d], e3[s3[j] + d]
        out[0, j], out[1, j], out[2, j], out[3, j] = a0, a1, a2, a3
        t0 += a0
        t1 += a1
        t2 += a2
        t3 += a3
    for k, total in enumerate((t0, t1, t2, t3)):
        inv = 1.0 / total
        for j in range(n):
            out[k, j] *= inv


@njit(inline="always")
def _softmax_row(scores, table, d, out):
    """_softmax_rows4 for a single row."""
    exps = _row_exps(scores, table, d)
    total = 0.0
    for j in range(scores.shape[0]):
        e = exps[scores[j] + d]
        out[j] = e
        total += e
    inv = 1.0 / total
    for j in range(scores.shape[0]):
        out[j] *= inv


@njit(inline="always")
def _softmax_task(scores, table, r0, r1, buf, probs, alpha, p_bits):
    """Softmax rows r0..r1 of scores [R, N]; write the probabilities (probs) or their unsigned-
    binarized bits (p_bits: level 1 where round(p / alpha) >= 1, i.e. p / alpha > 0.5)."""
    d = (table.shape[0] - 1) // 2
    zeros = np.zeros(scores.shape[1], np.float32)
    r = r0
    while r < r1:
        if r + 4 <= r1:
            _softmax_rows4(scores[r], scores[r + 1], scores[r + 2], scores[r + 3], table, d, buf)
            count = 4
        else:
            _softmax_row(scores[r], table, d, buf[0])
            count = 1
        for k in range(count):
            if p_bits.shape[0] == 0:
                probs[r + k] = buf[k]
            else:
                _pack_unsigned_row(buf[k], np.float32(0.0), zeros, alpha, p_bits[r + k], np.uint64(0))
        r += count


@njit(cache=True)
def level_threshold(alpha):
    """The smallest float32 p with float32(p / alpha) > 0.5 (alpha > 0): the unsigned elastic
    binarizer's level of a probability p is 1 exactly where p >= this (division is monotone)."""
    p = np.float32(0.5) * alpha
    while p / alpha > 0.5:
        p = np.nextafter(p, np.float32(0.0))
    while not p / alpha > 0.5:
        p = np.nextafter(p, np.float32(np.inf))
    return p


@njit(inline="always")
def _exp_sum(scores, exps, d):
    """sum_j exps[scores[j] + d] in float64, in order (ops' softmax denominator); exps: a float64
    table row (the float32 exp values, converted exactly)."""
    total = 0.0
    for j in range(scores.shape[0]):
        total += exps[np.uint64(scores[j] + d)]
    return total


@njit(inline="always")
def _exp_sums8(s0, s1, s2, s3, s4, s5, s6, s7, e0, e1, e2, e3, e4, e5, e6, e7, d):
    """_exp_sum of eight rows as eight independent chains (the float64 add latency, not the
    arithmetic, bounds one row)."""
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = 0.0
    for j in range(s0.shape[0]):
        t0 += e0[np.uint64(s0[j] + d)]
        t1 += e1[np.uint64(s1[j] + d)]
        t2 += e2[np.uint64(s2[j] + d)]
        t3 += e3[np.uint64(s3[j] + d)]
        t4 += e4[np.uint64(s4[j] + d)]
        t5 += e5[np.uint64(s5[j] + d)]
        t6 += e6[np.uint64(s6[j] + d)]
        t7 += e7[np.uint64(s7[j] + d)]
    return t0, t1, t2, t3, t4, t5, t6, t7


@njit(inline="always")
def _pack_at_least(scores, threshold, words):
    """words = packed (scores[j] >= threshold)."""
    n = scores.shape[0]
    full = n // 64
    for w in range(full):
        words[w] = at_least_bits64(scores, 64 * w, threshold)
    if full < words.shape[0]:
        _at_least_tail(scores, threshold, full, words)


@njit(cache=True)
def _at_least_tail(scores, threshold, full, words):
    """words[full]: the partial last word of _pack_at_least (see _interval_tail)."""
    word = np.uint64(0)
    for j in range(scores.shape[0] - 64 * full):
        word |= np.uint64(scores[64 * full + j] >= threshold) << np.uint64(j)
    words[full] = word


@njit(inline="always")
def _pack_attention_row(scores, exps, top, total, d, p_min, words):
    """The attention binarizer's bits of one row: p_j = float32(e_j * (1 / total)) has level 1 where
    p_j >= p_min (level_threshold). With the table row exps (float64) non-decreasing in I, so is
    the level: the smallest I at level 1 is -d plus the number of I in [-d, top] at level 0
    (counted without branches), and the bits are scores >= that I."""
    inv = 1.0 / total
    zeros = 0
    for i in range(top + d + 1):
        zeros += np.float32(exps[i] * inv) < p_min
    _pack_at_least(scores, zeros - d, words)


@njit(inline="always")
def score_softmax_rows(scores, table, table64, monotone, probs, alpha, p_min, p_bits, r0, r1):
    """score_softmax on rows r0 .. r1 - 1 (one thread); table64: the exp table in float64, p_min:
    level_threshold(alpha)."""
    d = (table.shape[0] - 1) // 2
    if not (monotone and p_bits.shape[0]):
        _softmax_task(scores, table, r0, r1, np.empty((4, scores.shape[1]), np.float32), probs, alpha, p_bits)
        return
    r = r0
    while r + 8 <= r1:
        s0, s1, s2, s3, s4, s5, s6, s7 = (scores[r], scores[r + 1], scores[r + 2], scores[r + 3], scores[r + 4],
                                          scores[r + 5], scores[r + 6], scores[r + 7])
        tops = (row_max(s0), row_max(s1), row_max(s2), row_max(s3), row_max(s4), row_max(s5),
                row_max(s6), row_max(s7))
        e0, e1, e2, e3, e4, e5, e6, e7 = (table64[tops[0] + d], table64[tops[1] + d], table64[tops[2] + d],
                                          table64[tops[3] + d], table64[tops[4] + d], table64[tops[5] + d],
                                          table64[tops[6] + d], table64[tops[7] + d])
        totals = _exp_sums8(s0, s1, s2, s3, s4, s5, s6, s7, e0, e1, e2, e3, e4, e5, e6, e7, d)
        _pack_attention_row(s0, e0, tops[0], totals[0], d, p_min, p_bits[r])
        _pack_attention_row(s1, e1, tops[1], totals[1], d, p_min, p_bits[r + 1])
        _pack_attention_row(s2, e2, tops[2], totals[2], d, p_min, p_bits[r + 2])
        _pack_attention_row(s3, e3, tops[3], totals[3], d, p_min, p_bits[r + 3])
        _pack_attention_row(s4, e4, tops[4], totals[4], d, p_min, p_bits[r + 4])
        _pack_attention_row(s5, e5, tops[5], totals[5], d, p_min, p_bits[r + 5])
        _pack_attention_row(s6, e6, tops[6], totals[6], d, p_min, p_bits[r + 6])
        _pack_attention_row(s7, e7, tops[7], totals[7], d, p_min, p_bits[r + 7])
        r += 8
    while r < r1:
        top = row_max(scores[r])
        exps = table64[top + d]
        _pack_attention_row(scores[r], exps, top, _exp_sum(scores[r], exps, d), d, p_min, p_bits[r])
        r += 1


@njit(parallel=True, cache=True)
def score_softmax(scores, table, monotone, probs, alpha, p_bits):
    """Attention probabilities of binary scores [R, N] (int32, R = B*H*N rows): into probs [R, N]
    when p_bits is empty, else binarized to {0, 1} and packed along the keys into p_bits [R, Wn]
    (through thresholds on the scores when every table row is non-decreasing: ``monotone``)."""
    rows = scores.shape[0]
    table64 = table.astype(np.float64)
    p_min = level_threshold(alpha)
    tasks = (rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(tasks):
        score_softmax_rows(scores, table, table64, monotone, probs, alpha, p_min, p_bits, task * _ROWS_PER_TASK,
                      min(rows, (task + 1) * _ROWS_PER_TASK))


def table_is_monotone(table):
    """Every row a of an exp_table non-decreasing over the columns b <= a it is read at."""
    steps = np.diff(table, axis=1)
    reachable = np.arange(table.shape[1] - 1)[None, :] < np.arange(table.shape[0])[:, None]
    return bool((steps[reachable] >= 0).all())


@njit(parallel=True, cache=True)
def pack_unsigned_rows(g, centres, shift, alpha, bits):
    """fc2 input bits from the GELU output g [M, Hd] (the fallback of the decision intervals):
    level = clamp(round((g - (centre + shift)) / alpha), 0, 1), packed in the +-1 recoding
    s = 2 level - 1 that binary_gemm multiplies (bit 1 where the level is 0)."""
    for r in prange(g.shape[0]):
        _pack_unsigned_row(g[r], centres[r], shift, alpha, bits[r], np.uint64(1))


@njit(parallel=True, cache=True)
def max_abs(x):
    """max |x| over a flat float32 array (a max is exact in any order), found as the largest
    |x| bit pattern: for floats of one sign the bit patterns are ordered as the values, and an
    integer max vectorizes (a float max does not, without fastmath). A NaN gives a NaN."""
    bits = x.view(np.int32)
    m = np.int32(0)
    for i in prange(x.size):
        m = max(m, bits[i] & np.int32(0x7FFFFFFF))
    return np.array([m], np.int32).view(np.float32)[0]


@njit(parallel=True, cache=True)
def quantized_patches(x, scale, p, out):
    """The 8-bit patch-embedding input (quant.minmax_quant_forward, signed, per tensor: value =
    (clamp(round(x / scale), -127, 127) - 0) * scale) laid out as ops.patch_embed_forward's patch
    matrix: out [B * gh * gw, C * p * p], row (b, gy, gx), column (c, py, px)."""
    n_batch, channels, height, width = x.shape
    gh, gw = height // p, width // p
    zero = np.float32(0.0)
    for task in prange(n_batch * gh):
        b, gy = task // gh, task % gh
        for gx in range(gw):
            row = out[(b * gh + gy) * gw + gx]
            for c in range(channels):
                for py in range(p):
                    src = x[b, c, gy * p + py, gx * p:gx * p + p]
                    dst = row[(c * p + py) * p:(c * p + py) * p + p]
                    for px in range(p):
                        level = min(max(np.rint(src[px] / scale), np.float32(-127.0)), np.float32(127.0))
                        dst[px] = (np.float32(level) - zero) * scale


@njit(parallel=True, cache=True)
def int8_matmul(a, w):
    """a @ w.T for int8 a [M, K] and w [N, K], exact in int64, as int64 [M, N]."""
    out = np.empty((a.shape[0], w.shape[0]), np.int64)
    for n in prange(w.shape[0]):
        wn = w[n]
        for m in range(a.shape[0]):
            am = a[m]
            total = 0
            for k in range(a.shape[1]):
                total += np.int32(am[k]) * np.int32(wn[k])
            out[m, n] = total
    return out


def linear_values(k, scale, bias):
    """Every value a binary linear's output column c can take: float32(I) * scale[c] + bias[c] for
    I = -K .. K, with the float32 operations of the model's exact linear (ops.levels_matmul, then
    the bias). Returns float32 [C, 2K + 1] (column I + K holds I)."""
    levels = np.arange(-k, k + 1, dtype=_F32)
    values = levels[None, :] * scale[:, None]
    values += bias[:, None]
    return values


def decision_table(values, threshold, alpha=None, gelu=None):
    """The bit a binarizer takes on each tabulated value (see linear_values), as bool [C, 2K + 1].

    Signed (alpha None): bit = not (v - threshold[c] >= 0), the pack_signs convention (1 = -1).
    Unsigned after GELU (alpha, gelu = "none" / "tanh"; ops.gelu_forward itself): bit = not
    (round((GELU(v) - threshold[c]) / alpha) >= 1), the +-1 recoding of the {0, 1} level (1 = level 0).
    threshold: (C,) float32, the binarizer's folded ASM threshold per column (zeros without ASM)."""
    threshold = threshold[:, None]
    if alpha is None:
        return ~((values - threshold) >= 0)
    g, _ = ops.gelu_forward(values, gelu)
    return ~((g - threshold) / alpha > 0.5)


def decision_intervals(table):
    """A decision table [C, 2K + 1] (bit of column c at integer I in table[c, I + K]) as intervals:
    (lo, hi) int32 [C] and invert uint64 [C] with bit = (lo <= I <= hi) != invert, or None when a
    column is not of that form. A sign decision on float32(I) * s + b (s > 0) is monotone in I, so an
    interval; GELU then a threshold is the complement of an interval (GELU falls, then rises)."""
    k = (table.shape[1] - 1) // 2

    def run(mask):
        """(is one contiguous run or empty, first I, last I); empty -> (K + 1, K)."""
        present = mask.any(axis=1)
        first = mask.argmax(axis=1)
        last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
        contiguous = ~present | (mask.sum(axis=1) == last - first + 1)
        return contiguous, np.where(present, first - k, k + 1), np.where(present, last - k, k)

    ones, lo1, hi1 = run(table)
    zeros, lo0, hi0 = run(~table)
    if not (ones | zeros).all():
        return None
    return (np.where(ones, lo1, lo0).astype(np.int32), np.where(ones, hi1, hi0).astype(np.int32),
            (~ones).astype(np.uint64))
