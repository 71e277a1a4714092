"""Full-precision ViT ops, each a forward/backward pair written by hand.

Convention (CS231n / llm.c): ``out, cache = op_forward(...)`` and
``grads = op_backward(dout, cache)``. Every op works in the dtype of its inputs: float32 for
training, float64 for the reference tests. Shapes use B = batch, N = tokens, D = embedding
width, H = heads, d = D / H, C = classes.

How to read an op: its body is the math in plain NumPy. Where a row-wise loop is hot (LayerNorm,
GELU, softmax, column sums, bias and residual adds, the heads' gradient layout, attention's stacks
of small matrix products), the op first hands float32 / float64 inputs to the same computation in
minibvit.numerics (Numba, parallel over rows, fixed summation order) and returns its result; the
NumPy lines after that ``if _numerics(...)`` are the definition it implements. Set
``ops.USE_NUMERICS = False`` to run the NumPy bodies (reference_tests/test_numerics.py compares the
two). Quantizers never appear here: minibvit.model composes them around these ops.
"""
import math

import numpy as np

from . import numerics
from .kernels.binary import and_bmm, binary_bmm
from .kernels.gsb import combined_products, gsb_combine
from .kernels.pack import row_popcount
from .kernels.quantize_int import scale_columns
from .kernels.ternary import ternary_gemm_quads
from .numerics import exp_f32  # noqa: F401  (public: the float32 exp of the softmax)

USE_NUMERICS = True  # False: every op runs its NumPy body


def _numerics(*arrays):
    """True when the hot loop goes to minibvit.numerics: USE_NUMERICS and every array float32 or float64."""
    return USE_NUMERICS and all(a.dtype == np.float32 or a.dtype == np.float64 for a in arrays)


# ----------------------------------------------------------------------------------------------
# linear and exact products of integer levels


def linear_forward(x, w, b=None, product=None):
    """y = x @ w.T + b.

    x: (..., K) input; w: (N, K) weight (PyTorch layout); b: (N,) bias or None.
    product: optional x @ w.T, (rows, N) with rows = x.size / K, already computed by the caller (a
        fresh array: the bias is added in place). minibvit.model passes the exact product of two
        quantized operands (levels_matmul), so that y has the bits of an integer kernel's output
        scaled by the same (N,) vector and added to the same bias.
    Returns y: (..., N) and the cache (the backward uses x and w).
    """
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ w.T if product is None else product.reshape(x2.shape[0], w.shape[0])
    if b is not None:
        b = b.astype(y.dtype, copy=False)
        if _numerics(y):
            numerics.add_to_rows(y, b)  # the float additions of y += b, on all threads
        else:
            y += b
    return y.reshape(*x.shape[:-1], w.shape[0]), (x2, w, x.shape, b is not None)


def linear_backward(dout, cache):
    """Returns dx (..., K), dw (N, K), db (N,) or None."""
    x2, w, x_shape, has_bias = cache
    d2 = dout.reshape(-1, w.shape[0])
    dx = (d2 @ w).reshape(x_shape)
    dw = d2.T @ x2
    db = (numerics.column_sums(d2) if _numerics(d2) else d2.sum(axis=0)) if has_bias else None
    return dx, dw, db


def integer_matmul(a, b, a_max=None, b_max=None):
    """a @ b for integer-valued float arrays, exact: in a's dtype while K * max|a| * max|b| < 2^24
    (float32) or 2^53, so that every partial sum is an exact integer, else in float64 and cast back.
    a_max, b_max: a bound of |a|, |b| the caller knows (a quantizer's level range,
    quant._Quantizer.level_bound), or None to take max|.| from the array (one pass over it).
    Stacks of matrices are split across threads (_matmul): an exact product has the same bits in any
    order of its sums."""
    a_max = float(np.abs(a).max(initial=0)) if a_max is None else float(a_max)
    b_max = float(np.abs(b).max(initial=0)) if b_max is None else float(b_max)
    exact_limit = 2.0 ** (np.finfo(a.dtype).nmant + 1)
    if a.shape[-1] * a_max * b_max < exact_limit:
        return _matmul(a, b)
    return _matmul(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)


def levels_matmul(a_levels, a_scale, b_levels, b_scale, a_max=None, b_max=None):
    """a @ b for a = a_levels * a_scale and b = b_levels * b_scale ("integer levels, then one scale"):

        a @ b = (a_levels @ b_levels) * (a_scale * b_scale)

    a_levels (..., M, K), b_levels (..., K, N): small integers in a float dtype; a_scale a scalar,
    b_scale a scalar or one per output column (N,); a_max, b_max: bounds of |a_levels|, |b_levels| if
    known (integer_matmul). The integer product is exact (integer_matmul), so an exact 0 stays 0 and
    the packed engine, which computes the same integers with popcounts and applies the same scale, gets
    the same bits. Returns (..., M, N) in the levels' dtype."""
    out = integer_matmul(a_levels, b_levels, a_max, b_max)
    scale = a_scale * b_scale
    if _numerics(out) and np.result_type(scale) == out.dtype and out.flags.c_contiguous and out.size:
        scale_columns(out, scale)  # out *= scale, on all threads
    else:
        out *= scale
    return out


def packed_matmul(a_bits, a_kind, a_scale, b_bits, b_kind, b_scale, k):
    """levels_matmul of two operands given as packed bits, with XNOR / AND-popcount kernels:

        a @ b = float(a_levels @ b_levels) * (a_scale * b_scale)

    a_bits (..., M, W) and b_bits (..., N, W) or, for a weight shared by every leading index, (N, W):
    the levels of a (..., M, K) and of b^T (..., N, K) packed along K (kernels.pack), kind "sign"
    (levels +-1) or "unit" (levels {0, 1}); a_scale a scalar, b_scale a scalar or (N,). The integer
    product is exact, and its conversion to float rounds it to nearest as integer_matmul's float64
    path does, so the result has the bits of levels_matmul on the float levels. Returns (..., M, N),
    or None for a pair of kinds without a kernel (the caller then uses levels_matmul)."""
    lead, (m, words), n = a_bits.shape[:-2], a_bits.shape[-2:], b_bits.shape[-2]
    if b_bits.ndim == 2:  # one weight for every row of a
        a3, b3 = a_bits.reshape(1, -1, words), b_bits[None]
    else:
        a3, b3 = a_bits.reshape(-1, m, words), b_bits.reshape(-1, n, words)
    kernels = {("sign", "sign"): binary_bmm, ("unit", "sign"): and_bmm}
    if (a_kind, b_kind) not in kernels:
        return None
    kernel, scale = kernels[a_kind, b_kind], np.broadcast_to(a_scale * b_scale, (n,))
    if scale.dtype == np.float32 and np.all(scale > 0):
        # the kernel's epilogue float32(dot) * 1 * scale + 0: the same bits, as |dot| >= 1 or dot == 0
        # and scale > 0 leave no -0. for the + 0 to change
        return kernel(a3, b3, k, col_scale=scale).reshape(lead + (m, n))
    out = kernel(a3, b3, k).astype(scale.dtype)  # the exact integers, rounded once, as integer_matmul's
    scale_columns(out, scale)
    return out.reshape(lead + (m, n))


def byte_matmul(a_codes, a_offset, a_scale, w_quads, w_sums, w_scale, n, w_max=127):
    """levels_matmul of 8-bit activations and a weight of small integer levels (TerViT's A8 x ternary,
    and its W8A8 stage), on byte dot products (VPDPBUSD where the CPU has it, kernels.ternary):

        a @ w.T = float(codes @ T.T - a_offset * sum_k T) * (a_scale * w_scale)

    a_codes uint8 (M, K): a's levels + a_offset (quant.minmax_quant_forward's byte codes); a_scale a
    scalar; w_quads, w_sums: the weight's levels T (N, K) as kernels.ternary.weight_level_quads lays
    them out; w_scale a scalar or (N,). The integer product is exact (int32, |T| <= 127), and its
    conversion to float rounds it to nearest as integer_matmul does, so the result has the bits of
    levels_matmul on the float levels. w_max: a bound of |T| (1 for ternary weights: the faster byte
    step on AVX2, kernels.ternary_gemm_quads). Returns (M, N) in the scale's dtype, or None when the int32
    accumulator could overflow (the caller then uses levels_matmul)."""
    m, k = a_codes.shape
    if k * 255 * 127 >= 2**31:
        return None
    k4 = -(-k // 4) * 4
    if k4 != k:  # zero codes fill the last quad (the weight's quads are zero there)
        padded = np.zeros((m, k4), np.uint8)
        padded[:, :k] = a_codes
        a_codes = padded
    quads = np.ascontiguousarray(a_codes).view("<u4").astype(np.uint32, copy=False)
    scale = np.broadcast_to(a_scale * w_scale, (n,))
    col_offset = -int(a_offset) * w_sums
    if scale.dtype == np.float32 and np.all(scale > 0):
        # the kernel's epilogue float32(dot) * 1 * scale + 0: packed_matmul's reason for the same bits
        return ternary_gemm_quads(quads, w_quads, n, col_offset, col_scale=scale, w_max=w_max)
    out = ternary_gemm_quads(quads, w_quads, n, col_offset, w_max=w_max).astype(scale.dtype)
    scale_columns(out, scale)
    return out


def basis_matmul(a_bases, a_scales, b_bases, b_scales, dtype):
    """(sum_i a_i P_i) @ (sum_j b_j U_j) for operands that are sums of scaled integer bases (GSB):
    sum_ij (a_i b_j) (P_i @ U_j), each P_i @ U_j exact (integer_matmul), combined in float64 in
    the order of kernels.gsb_combine, as the packed engine combines its popcount products, then
    cast to dtype. a_bases: P_i (..., M, K); b_bases: U_j (..., K, N)."""
    products = [[integer_matmul(p, u) for u in b_bases] for p in a_bases]
    return gsb_combine(products, a_scales, b_scales).astype(dtype)


def packed_basis_matmul(a_bases, a_scales, v_signs, v_masks, v_scales, k, dtype):
    """basis_matmul of GSB's A_q (..., M, K) and V_q (..., K, D) from packed bases: the nine exact
    integer products from AND-popcounts, combined in gsb_combine's float64 order, fused per leading
    index (kernels.gsb.combined_products), so the bits are basis_matmul's. a_bases (..., 3, M, W);
    v_signs (..., D, W); v_masks (..., 2, D, W), all packed along K; a_scales, v_scales (3,).
    Returns (..., M, D) in dtype."""
    lead, (m, words), d = a_bases.shape[:-3], a_bases.shape[-2:], v_signs.shape[-2]
    bases = np.ascontiguousarray(a_bases.reshape(-1, 3, m, words))
    s = v_signs.reshape(-1, d, words)
    t1, t2 = v_masks.reshape(-1, 2, d, words)[:, 0], v_masks.reshape(-1, 2, d, words)[:, 1]
    planes = np.ascontiguousarray(np.concatenate([s, t1 & s, t2 & s, t1, t2], axis=1).transpose(0, 2, 1))
    weights = np.float64(np.asarray(a_scales))[:, None] * np.float64(np.asarray(v_scales))[None, :]
    out = np.empty((bases.shape[0], m, d), dtype)
    combined_products(bases, row_popcount(bases), planes, weights, out)
    return out.reshape(lead + (m, d))


def add(x, y, out=None):
    """x + y for two arrays of the same shape and dtype; out may be x or y."""
    if x.shape == y.shape and x.dtype == y.dtype and _numerics(x) and x.flags.c_contiguous \
            and y.flags.c_contiguous and (out is None or out.flags.c_contiguous):
        return numerics.add(x, y, out=out)  # on all threads (NumPy's add runs on one)
    return np.add(x, y, out=out)


# ----------------------------------------------------------------------------------------------
# LayerNorm


def layernorm_forward(x, gamma, beta, eps=1e-6):
    """LayerNorm over the last axis: y = (x - mean) / sqrt(var + eps) * gamma + beta.

    x: (..., D); gamma, beta: (D,). eps defaults to 1e-6 as in timm's ViT. The mean and variance
    are computed in float64 (numerics: summed in order, which the packed engine reproduces).
    Returns y: (..., D) and the cache.
    """
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    if _numerics(x2):
        out, xhat, rstd = numerics.layernorm(x2, gamma, beta, eps)
    else:
        mean = x2.mean(axis=-1, keepdims=True, dtype=np.float64)
        var = ((x2 - mean) ** 2).mean(axis=-1, keepdims=True)
        rstd64 = 1.0 / np.sqrt(var + eps)
        xhat64 = (x2 - mean) * rstd64
        out = (xhat64 * gamma + beta).astype(x.dtype)
        xhat, rstd = xhat64.astype(x.dtype), rstd64[:, 0].astype(x.dtype)
    return out.reshape(x.shape), (xhat, rstd, gamma, x.shape)


def layernorm_backward(dout, cache):
    """With g = dout * gamma:  dx = (g - mean(g) - xhat * mean(g * xhat)) * rstd  (means over D),
    dgamma = sum over rows of dout * xhat, dbeta = sum over rows of dout.
    Returns dx (..., D), dgamma (D,), dbeta (D,)."""
    xhat, rstd, gamma, x_shape = cache
    d2 = np.ascontiguousarray(dout.reshape(xhat.shape))
    if _numerics(d2):
        dx, dgamma, dbeta = numerics.layernorm_backward(d2, xhat, rstd, gamma)
    else:
        g = d2 * gamma
        dx = (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True)) * rstd[:, None]
        dgamma, dbeta = (d2 * xhat).sum(axis=0), d2.sum(axis=0)
    return dx.reshape(x_shape), dgamma, dbeta


# ----------------------------------------------------------------------------------------------
# GELU

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_forward(x, approximate="none", bias=None):
    """GELU, optionally of x + bias. approximate="none": y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
    (exact); approximate="tanh": y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    numerics computes float64 with libm's erf and float32 with a vectorized erfc approximation
    (relative error about 2e-6).

    x: (..., n); bias: (n,) or None, the preceding linear layer's bias, added in the same pass over
    the data as the GELU (the same float additions as linear_forward's). Returns y (same shape as x)
    and the cache.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1] if x.ndim else 1)
    if bias is not None:
        bias = bias.astype(x2.dtype, copy=False)
    if _numerics(x2):
        out = numerics.gelu_rows(x2, bias, approximate)
    else:
        v = x2 if bias is None else x2 + bias
        if approximate == "none":
            out = (0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)).astype(v.dtype))).astype(x2.dtype)
        else:
            out = 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    return out.reshape(x.shape), (x2, bias, approximate, x.shape)


def gelu_backward(dout, cache):
    """dx = dout * GELU'(v), v = x + bias: GELU'(v) = Phi(v) + v phi(v) (exact form), or the
    derivative of the tanh form. Returns dx (same shape as x) and dbias (n,), or None without bias."""
    x2, bias, approximate, shape = cache
    dout = np.ascontiguousarray(dout, dtype=x2.dtype).reshape(x2.shape)
    if _numerics(x2):
        dx, dbias = numerics.gelu_rows_backward(x2, bias, dout, approximate)
    else:
        v = x2 if bias is None else x2 + bias
        if approximate == "none":
            cdf = 0.5 * (1.0 + _erf(v / math.sqrt(2.0)).astype(v.dtype))
            dx = dout * (cdf + v * np.exp(-0.5 * v * v) / math.sqrt(2.0 * math.pi))
        else:
            c = math.sqrt(2.0 / math.pi)
            t = np.tanh(c * (v + 0.044715 * v ** 3))
            dx = dout * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * v * v))
        dx = dx.astype(x2.dtype)
        dbias = dx.sum(axis=0)
    return dx.reshape(shape), None if bias is None else dbias


# ----------------------------------------------------------------------------------------------
# softmax (last axis)


def softmax_forward(x):
    """Numerically stable softmax over the last axis: y = exp(x - max x) / sum exp(x - max x).
    x: (..., n). Returns y and the cache."""
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    if _numerics(x2):
        y = numerics.softmax(x2)
    else:
        e = np.exp(x2 - x2.max(axis=-1, keepdims=True))
        y = e / e.sum(axis=-1, keepdims=True)
    return y.reshape(x.shape), y


def softmax_backward(dout, cache):
    """dx = y * (dout - sum(dout * y, -1)). Returns dx (same shape)."""
    y = cache
    d2 = np.ascontiguousarray(dout).reshape(y.shape)
    if _numerics(y, d2):
        dx = numerics.softmax_backward(y, d2)
    else:
        dx = y * (d2 - (d2 * y).sum(axis=-1, keepdims=True))
    return dx.reshape(dout.shape)


# ----------------------------------------------------------------------------------------------
# multi-head self-attention


def _matmul(a, b, out=None):
    """a @ b for stacks of matrices; numerics splits the stack across threads (the same bits)."""
    if _numerics(a, b):
        return numerics.stacked_matmul(a, b, out=out)
    return np.matmul(a, b, out=out)


def split_heads_forward(qkv, num_heads):
    """(B, N, 3D) fused qkv projection -> q, k, v each (B, H, N, d) (timm's layout)."""
    B, N, threeD = qkv.shape
    d = threeD // (3 * num_heads)
    qkv = qkv.reshape(B, N, 3, num_heads, d).transpose(2, 0, 3, 1, 4)
    return (qkv[0], qkv[1], qkv[2]), qkv.shape


def split_heads_backward(dq, dk, dv, cache):
    """Inverse of split_heads_forward: returns d qkv (B, N, 3D). When dq, dk, dv are the views that
    split_heads_grad_views handed out, the gradient already lies in that layout: no copy."""
    _, B, H, N, d = cache
    dqkv = dq.base
    if not (dqkv is not None and dqkv.shape == (B, N, 3, H, d) and dk.base is dqkv and dv.base is dqkv
            and all(t.__array_interface__ == e.__array_interface__
                    for t, e in zip((dq, dk, dv), dqkv.transpose(2, 0, 3, 1, 4)))):
        dqkv = np.empty((B, N, 3, H, d), dtype=dq.dtype)
        if _numerics(dqkv):
            numerics.interleave_heads(dq, dk, dv, dqkv)  # one parallel pass
        else:
            dqkv.transpose(2, 0, 3, 1, 4)[...] = (dq, dk, dv)
    return dqkv.reshape(B, N, 3 * H * d)


def split_heads_grad_views(cache, dtype):
    """Three (B, H, N, d) views dq, dk, dv into one fresh d qkv buffer in split_heads_forward's
    layout: attention_backward(..., out=views) writes the gradients there and split_heads_backward
    then returns the buffer without copying."""
    _, B, H, N, d = cache
    return tuple(np.empty((B, N, 3, H, d), dtype=dtype).transpose(2, 0, 3, 1, 4))


def merge_heads_forward(x):
    """(B, H, N, d) -> (B, N, H*d)."""
    B, H, N, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, N, H * d), x.shape


def merge_heads_backward(dout, cache):
    B, H, N, d = cache
    return dout.reshape(B, N, H, d).transpose(0, 2, 1, 3)


def attention_scores_forward(q, k, product=None):
    """S = Q K^T / sqrt(d), batched over batch and heads. q, k: (B, H, N, d) -> S (B, H, N, N).
    product: Q K^T if the caller computed it already (a fresh array, scaled in place; minibvit.model
    passes the exact product of quantized Q and K, see ops.levels_matmul). Returns S and the cache."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = _matmul(q, k.swapaxes(-1, -2)) if product is None else product
    scores *= scores.dtype.type(scale)
    return scores, (q, k, scale)


def attention_scores_backward(dscores, cache, out=None):
    """dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d). dscores (B, H, N, N) is scaled in place (pass a
    fresh array: the softmax backward's output). out: optional (dq, dk) arrays to write into."""
    q, k, scale = cache
    dq_out, dk_out = out or (None, None)
    dscores *= dscores.dtype.type(scale)
    return _matmul(dscores, k, out=dq_out), _matmul(dscores.swapaxes(-1, -2), q, out=dk_out)


def attention_values_forward(attn, v, product=None):
    """O = A V. attn: (B, H, N, N), v: (B, H, N, d) -> O (B, H, N, d), a view of a (B, N, H, d)
    array, so that merge_heads_forward needs no copy. product: A V if the caller computed it
    already (see attention_scores_forward). Returns O and the cache."""
    B, H, N, d = v.shape
    out = np.empty((B, N, H, d), dtype=np.result_type(attn, v)).transpose(0, 2, 1, 3)
    if product is None:
        _matmul(attn, v, out=out)
    else:
        out[...] = product
    return out, (attn, v)


def attention_values_backward(dout, cache, out=None):
    """dA = dO V^T, dV = A^T dO. out: optional array to write dV into. Returns dA, dV."""
    attn, v = cache
    return _matmul(dout, v.swapaxes(-1, -2)), _matmul(attn.swapaxes(-1, -2), dout, out=out)


def attention_forward(q, k, v, training=False, attn_drop=0.0, rng=None):
    """Scaled dot-product attention, batched over batch and heads (no Python loop per head):

        S = Q K^T / sqrt(d),  A = softmax(S),  O = dropout(A) V

    q, k, v: (B, H, N, d). attn_drop: dropout rate on A (training only; rng a numpy Generator).
    Returns O: (B, H, N, d) (a view of a (B, N, H, d) array, see attention_values_forward) and the
    cache. minibvit.model's attention runs the same steps with quantizers between them.
    """
    scores, c_scores = attention_scores_forward(q, k)
    attn, c_soft = softmax_forward(scores)
    attn, c_drop = dropout_forward(attn, attn_drop, rng, training)
    out, c_values = attention_values_forward(attn, v)
    return out, (c_scores, c_soft, c_drop, c_values)


def attention_backward(dout, cache, out=None):
    """Returns dq, dk, dv (each (B, H, N, d)) and {} (attention has no parameters; the quantized
    attention of minibvit.model returns its quantizers' parameter gradients there).
    out: optional (dq, dk, dv) arrays to write the gradients into (split_heads_grad_views)."""
    c_scores, c_soft, c_drop, c_values = cache
    dq_out, dk_out, dv_out = out or (None, None, None)
    dattn, dv = attention_values_backward(dout, c_values, out=dv_out)
    dattn = dropout_backward(dattn, c_drop)
    dq, dk = attention_scores_backward(softmax_backward(dattn, c_soft), c_scores, out=(dq_out, dk_out))
    return dq, dk, dv, {}


# ----------------------------------------------------------------------------------------------
# patch embedding, tokens, pooling


def patch_embed_forward(x, w, b, patch_size):
    """Non-overlapping patch convolution (kernel = stride = p) as reshape + matmul.

    x: (B, C, H, W) images; w: (D, C, p, p) conv weight (PyTorch layout); b: (D,).
    Returns tokens (B, N, D) with N = (H/p)(W/p) in row-major patch order, and the cache.
    """
    B, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
    gh, gw = H // p, W // p
    patches = x.reshape(B, C, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
    w2 = w.reshape(w.shape[0], -1)
    out, c_lin = linear_forward(patches, w2, b)
    return out, (c_lin, x.shape, w.shape, p)


def patch_embed_backward(dout, cache):
    """Returns dx (B, C, H, W), dw (D, C, p, p), db (D,)."""
    c_lin, x_shape, w_shape, p = cache
    dpatches, dw2, db = linear_backward(dout, c_lin)
    B, C, H, W = x_shape
    gh, gw = H // p, W // p
    dx = dpatches.reshape(B, gh, gw, C, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(x_shape)
    return dx, dw2.reshape(w_shape), db


def tokens_forward(x, pos_embed, cls_token, dist_token=None):
    """Prepend the class token (and the distillation token) and add the position embedding.

    x: (B, N, D) patch tokens; cls_token, dist_token: (1, 1, D); pos_embed: (1, N + prefix, D).
    Returns (B, N + prefix, D), prefix = 1 or 2, and the cache.
    """
    B = x.shape[0]
    prefix = [np.broadcast_to(cls_token, (B, 1, x.shape[2]))]
    if dist_token is not None:
        prefix.append(np.broadcast_to(dist_token, (B, 1, x.shape[2])))
    out = np.concatenate(prefix + [x], axis=1)
    out += pos_embed
    return out, len(prefix)


def tokens_backward(dout, cache):
    """Returns dx (B, N, D), dpos_embed (1, N+prefix, D), dcls (1, 1, D), ddist (1, 1, D) or None."""
    prefix = cache
    dpos = dout.sum(axis=0, keepdims=True)
    dcls = dout[:, :1].sum(axis=0, keepdims=True)
    ddist = dout[:, 1:2].sum(axis=0, keepdims=True) if prefix == 2 else None
    return dout[:, prefix:], dpos, dcls, ddist


def pool_forward(x, mode, num_prefix):
    """Token pooling. mode "token": the class token x[:, 0]; mode "mean": the mean of the patch
    tokens x[:, num_prefix:] (timm's global_pool="avg"). x: (B, N, D) -> (B, D)."""
    if mode == "token":
        return x[:, 0], (mode, x.shape, num_prefix)
    if mode == "mean":
        return x[:, num_prefix:].mean(axis=1), (mode, x.shape, num_prefix)
    raise ValueError(f"pool mode must be 'token' or 'mean', got {mode!r}")


def pool_backward(dout, cache):
    mode, shape, num_prefix = cache
    dx = np.zeros(shape, dtype=dout.dtype)
    if mode == "token":
        dx[:, 0] = dout
    else:
        dx[:, num_prefix:] = dout[:, None, :] / (shape[1] - num_prefix)
    return dx


def residual_forward(x, y, out=None):
    """Residual add x + y (the block's skip connection). out: optional array to write the sum into
    (e.g. y, a branch output nothing else holds, to save an allocation)."""
    return add(x, y, out=out), None


def residual_backward(dout, cache):
    """Both branches receive the incoming gradient unchanged."""
    return dout, dout


# ----------------------------------------------------------------------------------------------
# dropout and stochastic depth (seeded: pass a numpy Generator)


def dropout_forward(x, p, rng, training):
    """Inverted dropout: y = x * m / (1 - p), m ~ Bernoulli(1 - p) drawn from ``rng``.
    Identity when not training or p == 0."""
    if not training or p == 0.0:
        return x, None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {p}")
    mask = (rng.random(x.shape, dtype=np.float32) >= p).astype(x.dtype)
    mask /= x.dtype.type(1.0 - p)
    return x * mask, mask


def dropout_backward(dout, cache):
    return dout if cache is None else dout * cache


def drop_path_forward(x, p, rng, training):
    """Stochastic depth (Huang et al. 2016): drop a sample's whole residual branch with
    probability p, scaling kept ones by 1/(1-p). x: (B, ...); one Bernoulli draw per sample."""
    if not training or p == 0.0:
        return x, None
    keep = (rng.random(x.shape[0], dtype=np.float32) >= p).astype(x.dtype) / x.dtype.type(1.0 - p)
    mask = keep.reshape((-1,) + (1,) * (x.ndim - 1))
    return x * mask, mask


drop_path_backward = dropout_backward


# ----------------------------------------------------------------------------------------------
# losses


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def soft_target_cross_entropy_forward(logits, targets):
    """Mean cross-entropy against soft targets (mixup / cutmix; torch.nn.functional.cross_entropy with
    class probabilities, timm's SoftTargetCrossEntropy):  loss = mean_b( -sum_c t_bc log softmax(z_b)_c ).

    logits, targets: (B, C). Returns the scalar loss and the cache.
    """
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the logits' shape {logits.shape}, got {targets.shape}")
    logp = _log_softmax(logits)
    targets = targets.astype(logits.dtype, copy=False)
    return -(targets * logp).sum() / logits.shape[0], (logp, targets)


def soft_target_cross_entropy_backward(dloss, cache):
    """d logits = dloss * (softmax(z) sum_c t - t) / B  (= softmax(z) - t for rows that are distributions)."""
    logp, targets = cache
    return (np.exp(logp) * targets.sum(axis=1, keepdims=True) - targets) * (dloss / logp.shape[0])


def cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Mean cross-entropy with label smoothing (as torch.nn.functional.cross_entropy): the soft-target
    loss with target q = (1 - eps) onehot(y) + eps / C.

    logits: (B, C); labels: (B,) integers in [0, C). Returns the scalar loss and the cache.
    """
    B, C = logits.shape
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},), got {labels.shape}")
    target = np.full_like(logits, label_smoothing / C)
    target[np.arange(B), labels] += 1.0 - label_smoothing
    return soft_target_cross_entropy_forward(logits, target)


def cross_entropy_backward(dloss, cache):
    """d logits = dloss * (softmax(z) - q) / B: the soft-target gradient, using sum_c q = 1."""
    logp, target = cache
    return (np.exp(logp) - target) * (dloss / logp.shape[0])


def kd_soft_forward(student_logits, teacher_logits, temperature):
    """Soft knowledge distillation (Hinton et al. 2015):
    loss = tau^2 * mean_b KL(softmax(t_b / tau) || softmax(s_b / tau)).

    student_logits, teacher_logits: (B, C); the teacher is a constant. Returns loss and cache.
    """
    tau = temperature
    logp_s = _log_softmax(student_logits / tau)
    logp_t = _log_softmax(teacher_logits / tau)
    p_t = np.exp(logp_t)
    loss = tau * tau * (p_t * (logp_t - logp_s)).sum() / student_logits.shape[0]
    return loss, (logp_s, p_t, tau)


def kd_soft_backward(dloss, cache):
    """d student_logits = dloss * tau * (softmax(s / tau) - softmax(t / tau)) / B."""
    logp_s, p_t, tau = cache
    return (np.exp(logp_s) - p_t) * (dloss * tau / logp_s.shape[0])
