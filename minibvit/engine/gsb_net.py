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
from ..intrinsics import popcount
from ..kernels.gsb import combined_products

_F32 = np.float32


@njit(parallel=True, cache=True)
def biased_max(probs, bias, n_heads, row_max):
    """max over each row of y = probs + bias (probs [B*H*N, N], bias [H, N, N]) into row_max [B*H*N]."""
    rows, n = probs.shape
    per_head = bias.shape[1]
    for r in prange(rows):
        b_row = bias[(r // per_head) % n_heads, r % per_head]
        p_row = probs[r]
        best = p_row[0] + b_row[0]
        for j in range(1, n):
            best = max(best, p_row[j] + b_row[j])
        row_max[r] = best


@njit(parallel=True, cache=True)
def attn_bases(probs, bias, n_heads, alpha1, thr1, thr2, bases, row_pop):
    """The packed {0, 1} bases of y = probs + bias along the keys: bases [B*H, 3, N, Wn] (B1, T1, T2;
    tail bits 0) and their row popcounts row_pop [B*H, 3, N]. thr1, thr2: float32 [B*H*N], the
    mask thresholds of each row (0.7 / 0.9 max y)."""
    rows, n = probs.shape
    per_head = bias.shape[1]
    for r in prange(rows):
        t, i = r // per_head, r % per_head
        b_row = bias[t % n_heads, i]
        p_row = probs[r]
        t1, t2 = thr1[r], thr2[r]
        c0, c1, c2 = 0, 0, 0
        for w in range(bases.shape[3]):
            w0, w1, w2 = np.uint64(0), np.uint64(0), np.uint64(0)
            for j in range(64 * w, min(n, 64 * w + 64)):
                y = p_row[j] + b_row[j]
                bit = np.uint64(j - 64 * w)
                w0 |= np.uint64(np.rint(y / alpha1) >= 1) << bit    # clamp(round(y / a1), 0, 1) != 0
                w1 |= np.uint64(y > t1) << bit
                w2 |= np.uint64(y > t2) << bit
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
    """(min, max) of yv = v - v_shift over the whole value tensor (v: the last third of qkv [M, 3D])."""
    rows, dim = qkv.shape[0], qkv.shape[1] // 3
    d = dim // n_heads
    tasks = (rows + 31) // 32
    lows = np.empty(tasks, np.float32)
    highs = np.empty(tasks, np.float32)
    for task in prange(tasks):
        lo = qkv[32 * task, 2 * dim] - v_shift[0, 0]
        hi = lo
        for r in range(32 * task, min(rows, 32 * task + 32)):
            row = qkv[r]
            for c in range(dim):
                y = row[2 * dim + c] - v_shift[c // d, c % d]
                lo = min(lo, y)
                hi = max(hi, y)
        lows[task], highs[task] = lo, hi
    return lows.min(), highs.max()


@njit(parallel=True, cache=True)
def value_planes(qkv, n_tokens, n_heads, v_shift, hi1, lo1, hi2, lo2, planes):
    """The value bases packed along the tokens, word-major: planes [B*H, Wn, 5d] = the bits of
    (S, T1v & S, T2v & S, T1v, T2v) (S: sign bits, 1 = -1) in column blocks of d, tail bits 0.
    T1v = yv > hi1 or yv < lo1, T2v likewise with hi2, lo2 (0.7 / 0.9 of max yv and min yv)."""
    dim = qkv.shape[1] // 3
    d = dim // n_heads
    for t in prange(planes.shape[0]):
        b, h = t // n_heads, t % n_heads
        pt = planes[t]
        pt[:] = 0
        for n in range(n_tokens):
            row = qkv[b * n_tokens + n]
            w, bit = n // 64, np.uint64(n % 64)
            pw = pt[w]
            for j in range(d):
                y = row[2 * dim + h * d + j] - v_shift[h, j]
                s = np.uint64(y < 0)
                m1 = np.uint64((y > hi1) | (y < lo1))
                m2 = np.uint64((y > hi2) | (y < lo2))
                pw[j] |= s << bit
                pw[d + j] |= (m1 & s) << bit
                pw[2 * d + j] |= (m2 & s) << bit
                pw[3 * d + j] |= m1 << bit
                pw[4 * d + j] |= m2 << bit


def gsb_attention(probs, qkv, gsb, n_images, n_tokens, n_heads, max_over):
    """GSB's A_q V_q [B*H, N, d] float32 from the softmax probabilities probs [B*H*N, N] (float32) and
    the fused qkv output [B*N, 3D] (float32), for one block's GSB tensors gsb (attn_alphas, attn_bias,
    v_alphas, v_shift)."""
    rows = probs.shape[0]
    n_bh, n_words = n_images * n_heads, (n_tokens + 63) // 64
    d = qkv.shape[1] // (3 * n_heads)
    bias, v_shift = gsb["attn_bias"], np.ascontiguousarray(gsb["v_shift"], _F32)
    row_max = np.empty(rows, _F32)
    biased_max(probs, bias, n_heads, row_max)
    amax = row_max.max() if max_over == "tensor" else row_max                 # gsb._attn_max
    thr1 = np.broadcast_to(GSB_T1_FRACTION * amax, (rows,)).astype(_F32)     # gsb_attn_masks' thresholds
    thr2 = np.broadcast_to(GSB_T2_FRACTION * amax, (rows,)).astype(_F32)
    bases = np.empty((n_bh, 3, n_tokens, n_words), np.uint64)
    row_pop = np.empty((n_bh, 3, n_tokens), np.int64)
    attn_bases(probs, bias, n_heads, gsb["attn_alphas"][0], thr1, thr2, bases, row_pop)
    vmin, vmax = (_F32(v) for v in value_min_max(qkv, n_heads, v_shift))        # Numba returns Python floats
    planes = np.empty((n_bh, n_words, 5 * d), np.uint64)
    value_planes(qkv, n_tokens, n_heads, v_shift, GSB_T1_FRACTION * vmax, GSB_T1_FRACTION * vmin,
                 GSB_T2_FRACTION * vmax, GSB_T2_FRACTION * vmin, planes)          # gsb_value_masks' thresholds
    weights = np.float64(gsb["attn_alphas"])[:, None] * np.float64(gsb["v_alphas"])[None, :]
    out = np.empty((n_bh, n_tokens, d), _F32)
    combined_products(bases, row_pop, planes, weights, out)
    return out
