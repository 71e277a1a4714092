"""GSB's attention product A_q V_q in the packed engine: the bases packed straight from the
probabilities and values, the nine integer partial products by AND-popcount on kernels' one-thread
core, and kernels.gsb_combine's float64 sum, fused per (image, head).

    A_q = a1 B1 + a2 T1 + a3 T2          B1 = [round(y / a1) >= 1], T1 = [y > 0.7 max y], T2 = [y > 0.9 max y]
    V_q = b1 S + b2 T1v S + b3 T2v S     S = sign(yv), T1v / T2v: yv beyond 0.7 / 0.9 of max yv or min yv
    C_ij = P_i @ (U_j o S) = popcount(P_i & U_j) - 2 popcount(P_i & U_j & s)      (U = 1, T1v, T2v)
    out  = sum_ij (float64(a_i) float64(b_j)) C_ij  in the order (0,0), (0,1), ..., (2,2), then float32

with y = softmax + attn_bias and yv = v - v_shift (gsb.GSBAttnQuantizer / GSBValueQuantizer, whose
masks take the maximum over the whole tensor, or per row with gsb_max_over="row"). The thresholds
are computed in NumPy float32 as gsb.gsb_attn_masks / gsb_value_masks compute them, every element
with the same float32 operations, and the combine repeats kernels.gsb_combine element by element,
so the output has the bits of ops.basis_matmul in the simulated forward.
"""
import numpy as np
from numba import njit, prange

from ..gsb import GSB_T1_FRACTION, GSB_T2_FRACTION
from ..intrinsics import as_float32, bits64, popcount
from ..kernels.gsb import combined_products
from .fused import _ROWS_PER_TASK, _pack_signed_row, _softmax_row, _softmax_rows4, order_key

_F32 = np.float32
_ROWS = 32  # rows per task of the row passes (their scratch is per task)


@njit(inline="always")
def _shifted_key_range(src, shift, y, lo, hi):
    """(lo, hi) widened by the order keys of y = src - shift (float32 differences, y a scratch row)."""
    n = y.shape[0]
    for j in range(n):
        y[j] = src[j] - shift[j]
    y_keys = y.view(np.int32)
    for j in range(n):
        key = order_key(y_keys[j])
        lo = min(lo, key)
        hi = max(hi, key)
    return lo, hi


@njit(inline="always")
def _float_range(keys):
    """The float32 [2] (min, max) of per-task (lo, hi) order keys [tasks, 2]."""
    return np.array([order_key(keys[:, 0].min()), order_key(keys[:, 1].max())], np.int32).view(np.float32)


@njit(parallel=True, cache=True)
def softmax_biased_max(scores, table, bias, n_heads, probs, row_max):
    """The attention probabilities of the binary scores [B*H*N, N] (int32) into probs (float32; the
    table and float operations of fused.score_softmax, in its tasks of rows) with biased_max's row
    maxima of y = probs + bias (bias [H, N, N]) in the same pass, while each row is in L1."""
    rows, n = scores.shape
    d = (table.shape[0] - 1) // 2
    per_head = bias.shape[1]
    for task in prange((rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        buf = np.empty((4, n), np.float32)
        y = np.empty(n, np.float32)
        keys = y.view(np.int32)
        r, r1 = task * _ROWS_PER_TASK, min(rows, (task + 1) * _ROWS_PER_TASK)
        while r < r1:
            count = 4 if r + 4 <= r1 else 1
            if count == 4:
                _softmax_rows4(scores[r], scores[r + 1], scores[r + 2], scores[r + 3], table, d, buf)
            else:
                _softmax_row(scores[r], table, d, buf[0])
            for k in range(count):
                src, p_row = buf[k], probs[r + k]
                b_row = bias[((r + k) // per_head) % n_heads, (r + k) % per_head]
                for j in range(n):
                    p_row[j] = src[j]
                for j in range(n):
                    y[j] = src[j] + b_row[j]
                best = np.int32(-0x80000000)
                for j in range(n):
                    best = max(best, order_key(keys[j]))
                row_max[r + k] = as_float32(order_key(best))
            r += count


@njit(parallel=True, cache=True)
def pack_qk_value_range(qkv, n_batch, n_tokens, n_heads, centres, shifts, qk_bits, v_shift):
    """fused.pack_qkv's q and k bits (qk_bits [2, B*H, N, Wd]; thresholds centres[t, row] + shifts[t])
    and value_min_max's (min, max) of yv = v - v_shift (float32 [2]) in one pass over qkv [B*N, 3D]:
    GSB's values are quantized by its own bases (value_planes), not by a sign binarizer."""
    dim = qkv.shape[1] // 3
    d = dim // n_heads
    tasks = n_batch * n_heads
    keys = np.empty((tasks, 2), np.int32)
    for task in prange(tasks):
        b, h = task // n_heads, task % n_heads
        hd = h * d
        shift = v_shift[h]
        y = np.empty(d, np.float32)
        lo, hi = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
        for n in range(n_tokens):
            row = qkv[b * n_tokens + n]
            r = task * n_tokens + n
            for t in range(2):
                _pack_signed_row(row[t * dim + hd:t * dim + hd + d], centres[t, r], shifts[t], qk_bits[t, task, n])
            lo, hi = _shifted_key_range(row[2 * dim + hd:2 * dim + hd + d], shift, y, lo, hi)
        keys[task, 0], keys[task, 1] = lo, hi
    return _float_range(keys)


@njit(parallel=True, cache=True)
def biased_max(probs, bias, n_heads, row_max):
    """max over each row of y = probs + bias (probs [B*H*N, N], bias [H, N, N]) into row_max [B*H*N]
    (float32 sums, compared as order keys: exact)."""
    rows, n = probs.shape
    per_head = bias.shape[1]
    for task in prange((rows + _ROWS - 1) // _ROWS):
        y = np.empty(n, np.float32)
        keys = y.view(np.int32)
        for r in range(task * _ROWS, min(rows, (task + 1) * _ROWS)):
            b_row = bias[(r // per_head) % n_heads, r % per_head]
            p_row = probs[r]
            for j in range(n):
                y[j] = p_row[j] + b_row[j]
            best = np.int32(-0x80000000)
            for j in range(n):
                best = max(best, order_key(keys[j]))
            row_max[r] = as_float32(order_key(best))


@njit(parallel=True, cache=True)
def attn_bases(probs, bias, n_heads, alpha1, thr1, thr2, bases, row_pop):
    """The packed {0, 1} bases of y = probs + bias along the keys: bases [B*H, 3, N, Wn] (B1, T1, T2;
    tail bits 0) and their row popcounts row_pop [B*H, 3, N]. thr1, thr2: float32 [B*H*N], the
    mask thresholds of each row (0.7 / 0.9 max y). Each row's three decisions go to byte flags in
    one vectorized loop, then 64 at a time into words (bits64)."""
    rows, n = probs.shape
    per_head = bias.shape[1]
    for task in prange((rows + _ROWS - 1) // _ROWS):
        flags = np.zeros((3, 64 * bases.shape[3]), np.uint8)   # flags from n on stay 0: tail bits 0
        f0, f1, f2 = flags[0], flags[1], flags[2]
        for r in range(task * _ROWS, min(rows, (task + 1) * _ROWS)):
            t, i = r // per_head, r % per_head
            b_row = bias[t % n_heads, i]
            p_row = probs[r]
            t1, t2 = thr1[r], thr2[r]
            for j in range(n):
                y = p_row[j] + b_row[j]
                f0[j] = np.rint(y / alpha1) >= 1    # clamp(round(y / a1), 0, 1) != 0
                f1[j] = y > t1
                f2[j] = y > t2
            c0, c1, c2 = 0, 0, 0
            for w in range(bases.shape[3]):
                w0, w1, w2 = bits64(f0, 64 * w), bits64(f1, 64 * w), bits64(f2, 64 * w)
                bases[t, 0, i, w], bases[t, 1, i, w], bases[t, 2, i, w] = w0, w1, w2
                c0 += _popcount64(w0)
                c1 += _popcount64(w1)
                c2 += _popcount64(w2)
            row_pop[t, 0, i], row_pop[t, 1, i], row_pop[t, 2, i] = c0, c1, c2


@njit(inline="always")
def _popcount64(x):
    return np.int64(popcount(x))


@njit(parallel=True, cache=True)
def value_min_max(qkv, n_heads, v_shift):
    """(min, max) of yv = v - v_shift over the whole value tensor (v: the last third of qkv [M, 3D];
    v_shift [H, d] C-contiguous), as a float32 [2] (float32 differences compared as order keys: exact)."""
    rows, dim = qkv.shape[0], qkv.shape[1] // 3
    shift = v_shift.reshape(dim)           # channel h d + j of the merged heads
    tasks = (rows + _ROWS - 1) // _ROWS
    keys = np.empty((tasks, 2), np.int32)
    for task in prange(tasks):
        lo, hi = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
        y = np.empty(dim, np.float32)
        for r in range(task * _ROWS, min(rows, (task + 1) * _ROWS)):
            row = qkv[r]
            lo, hi = _shifted_key_range(row[2 * dim:], shift, y, lo, hi)
        keys[task, 0], keys[task, 1] = lo, hi
    return _float_range(keys)


@njit(parallel=True, cache=True)
def value_planes(qkv, n_tokens, n_heads, v_shift, hi1, lo1, hi2, lo2, planes):
    """The value bases packed along the tokens, word-major: planes [B*H, Wn, 5d] = the bits of
    (S, T1v & S, T2v & S, T1v, T2v) (S: sign bits, 1 = -1) in column blocks of d, tail bits 0.
    T1v = yv > hi1 or yv < lo1, T2v likewise with hi2, lo2 (0.7 / 0.9 of max yv and min yv).
    One loop per plane over a token's d channels, so that each vectorizes."""
    dim = qkv.shape[1] // 3
    d = dim // n_heads
    for t in prange(planes.shape[0]):
        b, h = t // n_heads, t % n_heads
        pt = planes[t]
        pt[:] = 0
        shift = v_shift[h]
        y = np.empty(d, np.float32)
        for n in range(n_tokens):
            row = qkv[b * n_tokens + n, 2 * dim + h * d:2 * dim + (h + 1) * d]
            bit = np.uint64(n % 64)
            pw = pt[n // 64]
            sign, sign1, sign2, mask1, mask2 = pw[:d], pw[d:2 * d], pw[2 * d:3 * d], pw[3 * d:4 * d], pw[4 * d:]
            for j in range(d):
                y[j] = row[j] - shift[j]
            for j in range(d):
                sign[j] |= np.uint64(y[j] < 0) << bit
            for j in range(d):
                mask1[j] |= np.uint64((y[j] > hi1) | (y[j] < lo1)) << bit
            for j in range(d):
                mask2[j] |= np.uint64((y[j] > hi2) | (y[j] < lo2)) << bit
        for w in range(pt.shape[0]):
            pw = pt[w]
            for j in range(d):
                pw[d + j] = pw[3 * d + j] & pw[j]
                pw[2 * d + j] = pw[4 * d + j] & pw[j]


def gsb_attention(probs, qkv, gsb, n_images, n_tokens, n_heads, max_over, row_max=None, value_range=None):
    """GSB's A_q V_q [B*H, N, d] float32 from the softmax probabilities probs [B*H*N, N] (float32) and
    the fused qkv output [B*N, 3D] (float32), for one block's GSB tensors gsb (attn_alphas, attn_bias,
    v_alphas, v_shift). row_max (biased_max's) and value_range (value_min_max's) when the passes that
    produced probs and read qkv took them (softmax_biased_max, pack_qk_value_range)."""
    rows = probs.shape[0]
    n_bh, n_words = n_images * n_heads, (n_tokens + 63) // 64
    d = qkv.shape[1] // (3 * n_heads)
    bias, v_shift = gsb["attn_bias"], np.ascontiguousarray(gsb["v_shift"], _F32)
    if row_max is None:
        row_max = np.empty(rows, _F32)
        biased_max(probs, bias, n_heads, row_max)
    amax = row_max.max() if max_over == "tensor" else row_max                 # gsb._attn_max
    thr1 = np.broadcast_to(GSB_T1_FRACTION * amax, (rows,)).astype(_F32)     # gsb_attn_masks' thresholds
    thr2 = np.broadcast_to(GSB_T2_FRACTION * amax, (rows,)).astype(_F32)
    bases = np.empty((n_bh, 3, n_tokens, n_words), np.uint64)
    row_pop = np.empty((n_bh, 3, n_tokens), np.int64)
    attn_bases(probs, bias, n_heads, gsb["attn_alphas"][0], thr1, thr2, bases, row_pop)
    vmin, vmax = value_min_max(qkv, n_heads, v_shift) if value_range is None else value_range
    planes = np.empty((n_bh, n_words, 5 * d), np.uint64)
    value_planes(qkv, n_tokens, n_heads, v_shift, GSB_T1_FRACTION * vmax, GSB_T1_FRACTION * vmin,
                 GSB_T2_FRACTION * vmax, GSB_T2_FRACTION * vmin, planes)          # gsb_value_masks' thresholds
    weights = np.float64(gsb["attn_alphas"])[:, None] * np.float64(gsb["v_alphas"])[None, :]
    out = np.empty((n_bh, n_tokens, d), _F32)
    combined_products(bases, row_pop, planes, weights, out)
    return out
