"""TerViT blocks on byte dot products: 8-bit activations x ternary weights (kernels.ternary_gemm_quads)
and the 8-bit attention products (kernels.int8.dot4_bmm; both exact on AVX2 too, intrinsics._dot4_step),
with the activation quantizers fused into the passes that produce or lay out their operands.

Every 8-bit activation of TerViT takes a per-tensor min-max scale over the whole batch tensor
(quant.minmax_codes). A scale needs the whole tensor, so each quantizer is: the producing pass
(the qkv and fc1 GEMMs' epilogues, linear_with_stats; the softmax) or one reduction pass gives
max |x| (or min and max),
the scale is computed in NumPy float32 exactly as minmax_codes does (minmax_scale), and one pass
writes the codes straight into the layout the next product reads: the unsigned bytes of the
activation quads (signed codes + 128, whose -128 sum t correction is a column offset of the
product) or, for K and V, the int8 panels of the attention products. The float operations are the
model's: ops' LayerNorm (engine.fused.residual_norm_pack), softmax (its second pass fused with the
probabilities' codes: attention_softmax, probability_codes) and GELU (in fc1's epilogue, with its output's
min and max), the levels' float32 product then the scales, in ops' order; so the logits have the
bits of ViT.forward(training=False).
"""
import numba
import numpy as np
from numba import njit, prange

from .. import ops
from ..numerics import EXACT_FASTMATH, gelu_f32, softmax_exp_rows
from ..kernels.binary import aligned_empty, column_blocks, row_tasks
from ..kernels.int8 import dot4_bmm_rows, padded_columns
from ..kernels.ternary import TILE_ROWS, dot4_rows, ternary_gemm_quads, ternary_weight_quads, ternary_weight_sums
from . import fused

_F32 = np.float32
_ROWS = 32  # rows per task of the element-wise passes


def minmax_scale(lo_hi, signed):
    """(scale float32, zero point int) of quant.minmax_codes (8 bits, per tensor) from the tensor's
    max |x| (signed) or (min x, max x) (unsigned), with the same float32 operations."""
    if signed:
        scale = np.float32(lo_hi) / 127
        return (scale if scale > 0 else np.float32(1)), 0
    lo = np.minimum(np.float32(lo_hi[0]), np.float32(0))
    hi = np.maximum(np.float32(lo_hi[1]), np.float32(0))
    scale = (hi - lo) / 255
    scale = scale if scale > 0 else np.float32(1)
    return scale, int(np.round(-lo / scale))


@njit(inline="always")
def _signed_code(v, scale):
    """clamp(round(v / scale), -127, 127) (minmax_codes, signed 8-bit), as int32."""
    return np.int32(min(max(np.rint(v / scale), np.float32(-127.0)), np.float32(127.0)))


@njit(inline="always")
def _unsigned_code(v, scale, zero_point):
    """clamp(round(v / scale) + zero_point, 0, 255) (minmax_codes, unsigned 8-bit), as int32."""
    return np.int32(min(max(np.float64(np.rint(v / scale)) + zero_point, 0.0), 255.0))


@njit(parallel=True, cache=True)
def signed_quads(x, scale, out):
    """out [M, 4 Kq] uint8 = signed codes of x [M, K] + 128 (the activation quads' bytes), pad 128."""
    rows, k = x.shape
    for r in prange(rows):
        xr, o = x[r], out[r]
        for j in range(k):
            o[j] = np.uint8(_signed_code(xr[j], scale) + 128)
        for j in range(k, o.shape[0]):
            o[j] = 128


@njit(parallel=True, cache=True)
def unsigned_quads(x, scale, zero_point, out):
    """out [M, 4 Kq] uint8 = unsigned codes of x [M, K], pad 0."""
    rows, k = x.shape
    for r in prange(rows):
        xr, o = x[r], out[r]
        for j in range(k):
            o[j] = np.uint8(_unsigned_code(xr[j], scale, zero_point))
        for j in range(k, o.shape[0]):
            o[j] = 0


@njit(parallel=True, cache=True)
def min_max(x):
    """(min, max) of a C-contiguous float32 array [M, K] as a float32 [2] (order keys: exact in any
    order; no NaN expected)."""
    rows = x.shape[0]
    tasks = (rows + _ROWS - 1) // _ROWS
    keys = np.empty((tasks, 2), np.int32)
    bits = x.view(np.int32)
    for t in prange(tasks):
        lo, hi = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
        for r in range(t * _ROWS, min(rows, (t + 1) * _ROWS)):
            br = bits[r]
            for j in range(x.shape[1]):
                key = fused.order_key(br[j])
                lo = min(lo, key)
                hi = max(hi, key)
        keys[t, 0], keys[t, 1] = lo, hi
    lo, hi = keys[:, 0].min(), keys[:, 1].max()
    return np.array([fused.order_key(lo), fused.order_key(hi)], np.int32).view(np.float32)


@njit(parallel=True, cache=True)
def qkv_operands(qkv, n_tokens, n_heads, scales, q_bytes, k_panels, k_offset, v_panels):
    """The attention operands from the fused qkv output [B*N, 3D], per (image, head) t:
    q_bytes [B*H, N, 4 Kq_d] uint8: signed codes of q + 128 (pad 128);
    k_panels [B*H, Kq_d, 4 Npad] int8: [t, j // 4, 4n + j % 4] = code of k[t, n, j] (zero pad);
    k_offset [B*H, N] int64: -128 sum_j code k[t, n, j] (the +128 of q's bytes);
    v_panels [B*H, Kq_N, 4 dpad] int8: [t, n // 4, 4j + n % 4] = code of v[t, n, j] (zero pad).
    scales: float32 [3], the per-tensor scales of q, k, v. Seen as int32 words, a k panel's word
    (j // 4, n) is token n's codes j .. j + 3 and a v panel's word (n // 4, j) is channel j of tokens
    4 (n // 4) .. + 3, so each token's codes are computed in vectorized loops over its channels and
    stored a word at a time."""
    dim = qkv.shape[1] // 3
    d = dim // n_heads
    quads_d = -(-d // 4)
    sq, sk, sv = scales[0], scales[1], scales[2]
    for t in prange(q_bytes.shape[0]):
        b, hd = t // n_heads, (t % n_heads) * d
        k_panels[t] = 0
        v_panels[t] = 0
        k_words, v_words = k_panels[t].view(np.int32), v_panels[t].view(np.int32)
        k_codes = np.zeros(4 * quads_d, np.int8)             # one token's k codes, zero pad
        k_code_words = k_codes.view(np.int32)
        v_codes = np.zeros((4, d), np.int32)                 # four tokens' v codes
        qt = q_bytes[t]
        for n in range(n_tokens):
            row = qkv[b * n_tokens + n]
            qn, vn = qt[n], v_codes[n % 4]
            total = 0
            for j in range(d):
                qn[j] = np.uint8(_signed_code(row[hd + j], sq) + 128)
            for j in range(d, qn.shape[0]):
                qn[j] = 128
            for j in range(d):
                code = _signed_code(row[dim + hd + j], sk)
                k_codes[j] = np.int8(code)
                total += code
            k_offset[t, n] = -128 * total
            for q in range(quads_d):
                k_words[q, n] = k_code_words[q]
            for j in range(d):
                vn[j] = _signed_code(row[2 * dim + hd + j], sv)
            if n % 4 == 3 or n == n_tokens - 1:
                for lane in range(n % 4 + 1, 4):             # tokens past the last: zero bytes
                    v_codes[lane] = 0
                vw = v_words[n // 4]
                for j in range(d):
                    vw[j] = ((v_codes[0, j] & 0xFF) | ((v_codes[1, j] & 0xFF) << 8) | ((v_codes[2, j] & 0xFF) << 16)
                             | (v_codes[3, j] << 24))


@njit(parallel=True, cache=True)
def probability_codes(e, inv_sums, scale, out):
    """out [R, 4 Kq] uint8 = unsigned 8-bit codes (zero point 0) of the probabilities
    float32(float64(e) * inv_sum), numerics' scaling step, without writing them; pad 0."""
    for r in prange(e.shape[0]):
        er, o, inv = e[r], out[r], inv_sums[r]
        for j in range(er.shape[0]):
            o[j] = np.uint8(_unsigned_code(np.float32(er[j] * inv), scale, 0))
        for j in range(er.shape[0], o.shape[0]):
            o[j] = 0


_SOFTMAX_ROWS = 4 * TILE_ROWS  # score rows per softmax call: whole groups of 8 for its eight-row sums


@njit(cache=True)
def _attention_softmax_head(q_quads, k_panels, k_offset, s1, s2, t, e, inv_sums):
    """attention_softmax for head t (one thread)."""
    n_tokens = q_quads.shape[1]
    groups = k_panels.shape[2] // 64
    accs = aligned_empty(TILE_ROWS, 16 * groups, np.int32)
    scores = np.empty((_SOFTMAX_ROWS, n_tokens), np.float32)
    a, panel, coff = q_quads[t], k_panels[t], k_offset[t]
    for m0 in range(0, n_tokens, _SOFTMAX_ROWS):
        m1 = min(n_tokens, m0 + _SOFTMAX_ROWS)
        for m in range(m0, m1, TILE_ROWS):
            rows = min(TILE_ROWS, m1 - m)
            dot4_rows(a, m, rows, panel, groups, accs, False)
            for r in range(rows):
                acc, srow = accs[r], scores[m - m0 + r]
                for j in range(n_tokens):
                    srow[j] = np.float32(coff[j] + acc[j]) * s1 * s2      # kernels.int8.dot4_bmm's epilogue
        r0 = t * n_tokens + m0
        softmax_exp_rows(scores, e[r0:r0 + m1 - m0], inv_sums[r0:r0 + m1 - m0], 0, m1 - m0)


@njit(parallel=True, cache=True)
def attention_softmax(q_quads, k_panels, k_offset, s_qk, inv_sqrt_d, e, inv_sums):
    """The first pass of ops' float32 softmax (numerics.softmax_exp_rows) on the scores
    float32(Q_levels K_levels^T) * s_qk * (1 / sqrt d) (kernels.int8.dot4_bmm's product and epilogue, one
    task per head), each block of score rows taken into the softmax while in L1; the scores are never
    stored. e [B*H*N, N] = float32(exp(x - max x)), inv_sums [B*H*N] float64 = 1 / the row's sum. The
    probabilities are float32(e * inv_sum) (probability_codes); their largest value in a row is
    float32(inv_sum), since exp(0) = 1 and e <= 1 elsewhere, so the whole tensor's maximum, which the
    8-bit scale needs, is float32(max inv_sums) with no pass over the probabilities."""
    for t in prange(q_quads.shape[0]):
        _attention_softmax_head(q_quads, k_panels, k_offset, s_qk, inv_sqrt_d, t, e, inv_sums)


@njit(parallel=True, cache=True)
def attention_values(a_quads, v_panels, s_av, n_tokens, n_heads, out):
    """The attention output float32(A_levels V_levels) * s_av, heads merged: out [B*N, D]."""
    n_bh = a_quads.shape[0]
    d = out.shape[1] // n_heads
    one = np.float32(1.0)
    for t in prange(n_bh):
        o = np.empty((1, n_tokens, d), np.float32)
        dot4_bmm_rows(a_quads[t:t + 1], v_panels[t:t + 1], None, s_av, one, 0, o)
        b, hd = t // n_heads, (t % n_heads) * d
        for n in range(n_tokens):
            out[b * n_tokens + n, hd:hd + d] = o[0, n]


LINEAR_QKV_ABSMAX, LINEAR_GELU_MIN_MAX = 1, 2  # the statistic linear_with_stats takes


@njit(cache=True)
def _abs_max_bits(bits):
    """max over the int32 bits of float32 values of bits & 0x7FFFFFFF (the largest |x|'s bits), 0 if
    empty. (A function of its own: three such loops written in one function did not all vectorize.)"""
    m = np.int32(0)
    for j in range(bits.shape[0]):
        m = max(m, bits[j] & np.int32(0x7FFFFFFF))
    return m


@njit(cache=True, fastmath=EXACT_FASTMATH, error_model="numpy", boundscheck=False)
def _stats_task(a_quads, w_quads, col_offset, scale, bias, mode, out, n0, nb, m0, m1, keys):
    """Rows m0 .. m1 - 1, columns n0 .. n0 + nb - 1 of linear_with_stats; keys [3] int32: the task's
    statistic. (A function of its own: written inside the parallel loop, the same code ran 3-4x slower.)"""
    third = out.shape[1] // 3
    bits = out.view(np.int32)
    one = np.float32(1.0)
    padded = 16 * ((nb + 15) // 16)
    panel = w_quads[:, 4 * n0:4 * (n0 + padded)]
    accs = aligned_empty(TILE_ROWS, padded, np.int32)
    lo, hi = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
    m_q, m_k, m_v = np.int32(0), np.int32(0), np.int32(0)
    coff, cs, bi = col_offset[n0:n0 + nb], scale[n0:n0 + nb], bias[n0:n0 + nb]
    q_end, k_end = max(0, min(nb, third - n0)), max(0, min(nb, 2 * third - n0))  # the thirds in the segment
    for m in range(m0, m1, TILE_ROWS):
        rows = min(TILE_ROWS, m1 - m)
        dot4_rows(a_quads, m, rows, panel, padded // 16, accs, True)
        for r in range(rows):
            acc, orow, brow = accs[r], out[m + r, n0:n0 + nb], bits[m + r, n0:n0 + nb]
            for j in range(nb):
                orow[j] = np.float32(coff[j] + np.int64(acc[j])) * one * cs[j] + bi[j]
            if mode == LINEAR_GELU_MIN_MAX:
                for j in range(nb):
                    v = orow[j]
                    orow[j] = gelu_f32(v)
                for j in range(nb):
                    key = fused.order_key(brow[j])
                    lo = min(lo, key)
                    hi = max(hi, key)
            else:
                m_q = max(m_q, _abs_max_bits(brow[:q_end]))
                m_k = max(m_k, _abs_max_bits(brow[q_end:k_end]))
                m_v = max(m_v, _abs_max_bits(brow[k_end:]))
    if mode == LINEAR_GELU_MIN_MAX:
        keys[0], keys[1], keys[2] = lo, hi, 0
    else:
        keys[0], keys[1], keys[2] = m_q, m_k, m_v


@njit(parallel=True, cache=True)
def linear_with_stats(a_quads, w_quads, col_offset, scale, bias, mode, out, threads):
    """TernaryLinear's product and epilogue into out [M, N] (kernels.ternary_gemm_quads' task grid,
    register tiles and float32 operations: float32(levels product) * 1 * scale[n] + bias[n]) with the
    statistic the next 8-bit quantizer needs, taken while each row segment is in L1, as a float32 [3]:
      LINEAR_QKV_ABSMAX:   max |out| over each third of the columns (the scales of q, k and v);
      LINEAR_GELU_MIN_MAX: out = GELU(...) (ops.gelu_forward's approximate "none": numerics.gelu_f32,
                           compiled with its flags, so the same bits), returns (min, max, 0) of it.
    (Numba's cache of this module does not see a change of numerics: a change of gelu_f32 comes with
    an edit here.)
    Exact: maxima and minima are compared as int32 keys (fused.order_key), in any order."""
    n_rows, n_cols = out.shape
    col_blocks, width = column_blocks(n_cols)
    row_blocks, height = row_tasks(n_rows, col_blocks, threads)
    keys = np.empty((row_blocks * col_blocks, 3), np.int32)
    for task in prange(row_blocks * col_blocks):
        n0, m0 = (task % col_blocks) * width, (task // col_blocks) * height
        _stats_task(a_quads, w_quads, col_offset, scale, bias, mode, out, n0, min(width, n_cols - n0), m0,
                    min(m0 + height, n_rows), keys[task])
    result = np.empty(3, np.int32)
    if mode == LINEAR_GELU_MIN_MAX:
        result[0], result[1], result[2] = fused.order_key(keys[:, 0].min()), fused.order_key(keys[:, 1].max()), 0
    else:
        for i in range(3):
            result[i] = keys[:, i].max()
    return result.view(np.float32)


def _quads(rows, k):
    """uint8 [rows, 4 ceil(K/4)] and its uint32 view [rows, ceil(K/4)]."""
    raw = np.empty((rows, 4 * -(-k // 4)), np.uint8)
    return raw, raw.view(np.uint32)


class TernaryLinear:
    """One TerViT linear layer, laid out at load: weight quads, the -128 sum t and sum t offsets."""

    def __init__(self, nonzero, sign, k, w_scale, bias):
        self.k, self.n = k, nonzero.shape[1]
        self.quads = ternary_weight_quads(nonzero, sign, k)
        self.colsum = ternary_weight_sums(nonzero, sign).astype(np.int64)
        self.w_scale = w_scale
        self.bias = np.ascontiguousarray(bias, _F32)

    def __call__(self, a_quads, x_scale, zero_point=None):
        """float32 [M, N]: the model's 8-bit linear (levels product, * (s_x s_w), + bias) on the codes
        in a_quads (signed + 128 when zero_point is None, else unsigned with that zero point)."""
        offset = -128 * self.colsum if zero_point is None else -zero_point * self.colsum
        scale = x_scale * self.w_scale          # = the simulated forward's s_x * s_w (float32)
        return ternary_gemm_quads(a_quads, self.quads, self.n, offset, np.ones(a_quads.shape[0], _F32), scale,
                                  self.bias, w_max=1)

    def with_stats(self, a_quads, x_scale, mode):
        """(out, statistic): __call__'s output with linear_with_stats' statistic (signed codes)."""
        out = np.empty((a_quads.shape[0], self.n), _F32)
        stats = linear_with_stats(a_quads, self.quads, -128 * self.colsum, x_scale * self.w_scale, self.bias, mode,
                                  out, numba.get_num_threads())
        return out, stats


def tervit_blocks(stream, blocks, cfg, n_images, inv_sqrt_d):
    """Every TerViT block on the stream [B*N, D] (float32, in place). blocks: dicts with norm1, norm2
    (gamma, beta) and the TernaryLinear of attn.qkv, attn.proj, mlp.fc1, mlp.fc2."""
    N, H, D, Hd = cfg.num_tokens, cfg.num_heads, cfg.embed_dim, cfg.mlp_hidden
    d = D // H
    M, BH = stream.shape[0], n_images * H
    eps = _F32(cfg.layernorm_eps)
    dummy_v, dummy_f = np.zeros(1, _F32), np.zeros((1, 1), _F32)
    dummy_i, dummy_bits = np.zeros((1, 1), np.int32), np.zeros((1, 1), np.uint64)
    h = np.empty_like(stream)
    x_raw, x_quads = _quads(M, D)
    h_raw, h_quads = _quads(M, Hd)
    q_raw = np.empty((BH, N, 4 * -(-d // 4)), np.uint8)
    k_panels = aligned_empty(BH * -(-d // 4), 4 * padded_columns(N), np.int8).reshape(BH, -(-d // 4), -1)
    k_offset = np.empty((BH, N), np.int64)
    v_panels = aligned_empty(BH * -(-N // 4), 4 * padded_columns(d), np.int8).reshape(BH, -(-N // 4), -1)
    a_raw = np.empty((BH * N, 4 * -(-N // 4)), np.uint8)
    exps, inv_sums = np.empty((BH * N, N), _F32), np.empty(BH * N)
    o = np.empty((M, D), _F32)

    def norm(add, gamma_beta, out_mode):
        """stream += add (None: nothing added), then h = LayerNorm(stream) (out_mode 2)."""
        gamma, beta = gamma_beta if gamma_beta is not None else (dummy_v, dummy_v)
        fused.residual_norm_pack(stream, dummy_f if add is None else add, dummy_i, dummy_i[0], dummy_v, dummy_v,
                                 0 if add is None else 1, gamma, beta, eps, dummy_v, dummy_bits, h, out_mode)

    def signed_codes(x, raw):
        scale, _ = minmax_scale(fused.max_abs(x.reshape(-1)), True)
        signed_quads(x, scale, raw)
        return scale

    norm(None, blocks[0]["norm1"], 2)
    for i, blk in enumerate(blocks):
        qkv, absmax = blk["attn.qkv"].with_stats(x_quads, signed_codes(h, x_raw), LINEAR_QKV_ABSMAX)
        s_q, s_k, s_v = (minmax_scale(m, True)[0] for m in absmax)
        qkv_operands(qkv, N, H, np.array([s_q, s_k, s_v], _F32), q_raw, k_panels, k_offset, v_panels)
        attention_softmax(q_raw.view(np.uint32), k_panels, k_offset, s_q * s_k, inv_sqrt_d, exps, inv_sums)
        s_a, _ = minmax_scale((np.float32(0), np.float32(inv_sums.max())), False)  # with the codes of its
        probability_codes(exps, inv_sums, s_a, a_raw)                              # probabilities (>= 0)
        attention_values(a_raw.view(np.uint32).reshape(BH, N, -1), v_panels, s_a * s_v, N, H, o)
        proj = blk["attn.proj"](x_quads, signed_codes(o, x_raw))
        norm(proj, blk["norm2"], 2)
        if cfg.gelu_approximate == "none":
            g, g_min_max = blk["mlp.fc1"].with_stats(x_quads, signed_codes(h, x_raw), LINEAR_GELU_MIN_MAX)
        else:
            g, _ = ops.gelu_forward(blk["mlp.fc1"](x_quads, signed_codes(h, x_raw)), cfg.gelu_approximate)
            g_min_max = min_max(g)
        s_g, zp = minmax_scale(g_min_max, False)
        unsigned_quads(g, s_g, zp, h_raw)
        y = blk["mlp.fc2"](h_quads, s_g, zp)
        nxt = blocks[i + 1]["norm1"] if i + 1 < len(blocks) else None
        norm(y, nxt, 2 if nxt is not None else 0)
