"""Full-precision ViT ops, each a forward/backward pair written by hand.

Convention (CS231n / llm.c): ``out, cache = op_forward(...)`` and
``grads = op_backward(dout, cache)``. Every op works in the dtype of its inputs: float32 for
training, float64 for the reference tests. Shapes use B = batch, N = tokens, D = embedding
width, H = heads, d = D / H, C = classes.

The element-wise and row-wise hot spots (GELU, LayerNorm, softmax, the heads' layout change in the
backward) are Numba kernels that run in parallel over rows; everything else is NumPy and BLAS, with
attention's stacks of small matrix products split across threads (_stacked_matmul).
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# ----------------------------------------------------------------------------------------------
# linear


def linear_forward(x, w, b=None, levels=None):
    """y = x @ w.T + b.

    x: (..., K) input; w: (N, K) weight (PyTorch layout); b: (N,) bias or None.
    levels: optional integer form of quantized operands, (x_levels (..., K), w_levels (N, K), scale
        (N,) or ()) with x @ w.T == (x_levels @ w_levels.T) * scale. y is then computed that way: the
        integer product is exact (in float64 when it could exceed float32's 2^24), so y has the same
        bits as an integer kernel's output scaled by the same (N,) vector and added to the same bias.
    Returns y: (..., N) and the cache (the backward uses x and w).
    """
    x2 = x.reshape(-1, x.shape[-1])
    if levels is None:
        y = x2 @ w.T
    else:
        y = integer_matmul(levels[0].reshape(x2.shape), levels[1].T)
        y *= levels[2]
    if b is not None:
        _add_to_rows(y, b.astype(y.dtype, copy=False))
    return y.reshape(*x.shape[:-1], w.shape[0]), (x2, w, x.shape, b is not None)


def integer_matmul(a, b):
    """a @ b for integer-valued float arrays, exact: in a's dtype while every partial sum is an
    integer below 2^24 (float32) or 2^53, else in float64 and cast back."""
    bound = a.shape[-1] * float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0))
    exact_limit = 2.0 ** (np.finfo(a.dtype).nmant + 1)
    if bound < exact_limit:
        return np.matmul(a, b)
    return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)


def linear_backward(dout, cache):
    """Returns dx (..., K), dw (N, K), db (N,) or None."""
    x2, w, x_shape, has_bias = cache
    d2 = dout.reshape(-1, w.shape[0])
    dx = (d2 @ w).reshape(x_shape)
    dw = d2.T @ x2
    db = column_sums(d2) if has_bias else None
    return dx, dw, db


@njit(parallel=True, cache=True)
def _add_to_rows(y, b):
    """y[r, :] += b for every row r of y (rows, n), in place: the float additions of y += b, on all
    threads (NumPy's broadcast add runs on one)."""
    for r in prange(y.shape[0]):
        for j in range(y.shape[1]):
            y[r, j] += b[j]


@njit(parallel=True, cache=True)
def _add_rows(x, y, out):
    for r in prange(x.shape[0]):
        for j in range(x.shape[1]):
            out[r, j] = x[r, j] + y[r, j]


def add(x, y, out=None):
    """x + y for two arrays of the same shape and dtype, on all threads; out may be x or y."""
    if out is None:
        out = np.empty_like(x)
    if x.shape != y.shape or x.dtype != y.dtype or not (x.flags.c_contiguous and y.flags.c_contiguous and out.flags.c_contiguous):
        return np.add(x, y, out=out)
    n = x.shape[-1] if x.ndim else 1
    _add_rows(x.reshape(-1, n), y.reshape(-1, n), out.reshape(-1, n))
    return out


# ----------------------------------------------------------------------------------------------
# LayerNorm


# The forward sums each row's mean and variance in float64, in order (no reassociation): the packed
# inference engine reproduces these bits. One row's chain of dependent float64 adds is bound by the
# add latency, so rows are summed eight at a time as eight independent chains (the same order per row).

@njit(inline="always")
def _sums8(a0, a1, a2, a3, a4, a5, a6, a7):
    """sum_j float64(a_k[j]) of eight 1-D arrays, each in order from 0.0, as eight independent chains."""
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = 0.0
    for j in range(a0.shape[0]):
        t0 += a0[j]
        t1 += a1[j]
        t2 += a2[j]
        t3 += a3[j]
        t4 += a4[j]
        t5 += a5[j]
        t6 += a6[j]
        t7 += a7[j]
    return t0, t1, t2, t3, t4, t5, t6, t7


@njit(cache=True)
def _layernorm_moments(x):
    """Mean and variance of one row x (n,) in float64: sum(x) / n, then sum((x - mean)^2) / n, in order."""
    n = x.shape[0]
    mean = 0.0
    for j in range(n):
        mean += x[j]
    mean /= n
    var = 0.0
    for j in range(n):
        t = x[j] - mean
        var += t * t
    return mean, var / n


@njit(cache=True)
def _layernorm_moments8(x, r, squares):
    """_layernorm_moments of rows r .. r + 7 of x (rows, n), as two tuples of eight: the squared
    deviations go to squares (8, n) float64 first (vectorized), so that the eight chains only add."""
    n = x.shape[1]
    sums = _sums8(x[r], x[r + 1], x[r + 2], x[r + 3], x[r + 4], x[r + 5], x[r + 6], x[r + 7])
    for k in range(8):
        xk, sk = x[r + k], squares[k]
        mean = sums[k] / n
        for j in range(n):
            t = xk[j] - mean
            sk[j] = t * t
    square_sums = _sums8(squares[0], squares[1], squares[2], squares[3], squares[4], squares[5], squares[6],
                         squares[7])
    means = (sums[0] / n, sums[1] / n, sums[2] / n, sums[3] / n, sums[4] / n, sums[5] / n, sums[6] / n,
             sums[7] / n)
    variances = (square_sums[0] / n, square_sums[1] / n, square_sums[2] / n, square_sums[3] / n,
                 square_sums[4] / n, square_sums[5] / n, square_sums[6] / n, square_sums[7] / n)
    return means, variances


@njit(inline="always")
def _layernorm_normalize_row(x, mean, var, gamma, beta, eps, out, xhat, rstd, r):
    s = 1.0 / math.sqrt(var + eps)
    rstd[r] = s
    for j in range(x.shape[0]):
        h = (x[j] - mean) * s
        xhat[j] = h
        out[j] = h * gamma[j] + beta[j]


_LAYERNORM_ROWS_PER_TASK = 64


@njit(cache=True, fastmath=False)
def _layernorm_row_range(x, gamma, beta, eps, out, xhat, rstd, r0, r1):
    squares = np.empty((8, x.shape[1]), np.float64)
    r = r0
    while r + 8 <= r1:
        means, variances = _layernorm_moments8(x, r, squares)
        for k in range(8):
            _layernorm_normalize_row(x[r + k], means[k], variances[k], gamma, beta, eps, out[r + k], xhat[r + k],
                                     rstd, r + k)
        r += 8
    while r < r1:
        mean, var = _layernorm_moments(x[r])
        _layernorm_normalize_row(x[r], mean, var, gamma, beta, eps, out[r], xhat[r], rstd, r)
        r += 1


@njit(parallel=True, cache=True)
def _layernorm_rows(x, gamma, beta, eps, out, xhat, rstd):
    rows = x.shape[0]
    tasks = (rows + _LAYERNORM_ROWS_PER_TASK - 1) // _LAYERNORM_ROWS_PER_TASK
    for task in prange(tasks):
        _layernorm_row_range(x, gamma, beta, eps, out, xhat, rstd, task * _LAYERNORM_ROWS_PER_TASK,
                             min(rows, (task + 1) * _LAYERNORM_ROWS_PER_TASK))


# Reductions that only training uses may be reassociated (vectorized sums); the forward kernels keep
# their in-order sums, which the packed inference engine reproduces bit for bit.
_REDUCE_FASTMATH = {"reassoc", "contract", "nsz"}
# Row reductions over the batch (dgamma, dbeta, a bias gradient) are summed in this many fixed chunks
# of rows, in parallel, and the chunks then added: the result does not depend on the number of threads.
_ROW_CHUNKS = 16


@njit(parallel=True, cache=True, fastmath=_REDUCE_FASTMATH)
def _column_sum_chunks(x, chunks):
    rows, n = x.shape
    parts = chunks.shape[0]
    for c in prange(parts):
        for r in range(c * rows // parts, (c + 1) * rows // parts):
            for j in range(n):
                chunks[c, j] += x[r, j]


def column_sums(x):
    """x.sum(axis=0) of a 2-D array (rows, n) -> (n,), in parallel: partial sums over _ROW_CHUNKS
    fixed row ranges (the same result for any thread count), then their sum."""
    chunks = np.zeros((_ROW_CHUNKS, x.shape[1]), dtype=x.dtype)
    _column_sum_chunks(np.ascontiguousarray(x), chunks)
    return chunks.sum(axis=0)


@njit(parallel=True, cache=True, fastmath=_REDUCE_FASTMATH)
def _layernorm_rows_backward(dout, xhat, rstd, gamma, dx, dgamma_chunks, dbeta_chunks):
    rows, n = dout.shape
    chunks = dgamma_chunks.shape[0]
    for c in prange(chunks):
        dgamma, dbeta = dgamma_chunks[c], dbeta_chunks[c]
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            sum_g = 0.0
            sum_gx = 0.0
            for j in range(n):
                g = dout[r, j] * gamma[j]
                sum_g += g
                sum_gx += g * xhat[r, j]
                dgamma[j] += dout[r, j] * xhat[r, j]
                dbeta[j] += dout[r, j]
            sum_g /= n
            sum_gx /= n
            for j in range(n):
                dx[r, j] = (dout[r, j] * gamma[j] - sum_g - xhat[r, j] * sum_gx) * rstd[r]


def layernorm_forward(x, gamma, beta, eps=1e-6):
    """LayerNorm over the last axis: y = (x - mean) / sqrt(var + eps) * gamma + beta.

    x: (..., D); gamma, beta: (D,). eps defaults to 1e-6 as in timm's ViT.
    Returns y: (..., D) and the cache.
    """
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = np.empty_like(x2)
    xhat = np.empty_like(x2)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)
    _layernorm_rows(x2, gamma.astype(x.dtype), beta.astype(x.dtype), x.dtype.type(eps), out, xhat, rstd)
    return out.reshape(x.shape), (xhat, rstd, gamma, x.shape)


def layernorm_backward(dout, cache):
    """Returns dx (..., D), dgamma (D,), dbeta (D,)."""
    xhat, rstd, gamma, x_shape = cache
    d2 = np.ascontiguousarray(dout.reshape(xhat.shape))
    dx = np.empty_like(d2)
    dgamma = np.zeros((_ROW_CHUNKS, d2.shape[1]), dtype=d2.dtype)  # partial sums of dout * xhat and dout
    dbeta = np.zeros((_ROW_CHUNKS, d2.shape[1]), dtype=d2.dtype)
    _layernorm_rows_backward(d2, xhat, rstd, gamma.astype(d2.dtype), dx, dgamma, dbeta)
    return dx.reshape(x_shape), dgamma.sum(axis=0), dbeta.sum(axis=0)


# ----------------------------------------------------------------------------------------------
# GELU

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@intrinsic
def _as_float32(typingctx, bits):
    """Reinterpret int32 bits as float32 (an LLVM bitcast, which vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _as_float64(typingctx, bits):
    """Reinterpret int64 bits as float64 (an LLVM bitcast, which vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


# No "contract"/"reassoc": the vectorized body and the scalar remainder of a loop must round alike,
# so that an element's value does not depend on where it falls in the thread chunks.
_EXACT_FASTMATH = {"nnan", "ninf", "nsz"}
# error_model="numpy": a float division by zero gives inf instead of raising ZeroDivisionError; the
# check for it would keep LLVM from vectorizing the loops.


@intrinsic
def _fma_f32(typingctx, a, b, c):
    """a * b + c for float32 with a single rounding (LLVM's fma): unlike a "contract" fast-math flag it
    fuses in the vectorized loop body and in its scalar remainder alike."""
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fma = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fma, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always")
def _horner_f32(t, coeffs):
    """coeffs[0] + coeffs[1] t + coeffs[2] t^2 + ... by Horner's rule with fused multiply-adds."""
    acc = coeffs[-1]
    for i in range(len(coeffs) - 2, -1, -1):
        acc = _fma_f32(acc, t, coeffs[i])
    return acc


# 2^f for |f| <= 1/2 (degree 6) and Numerical Recipes' erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2)
_EXP2_COEFFS = tuple(np.float32(c) for c in (
    1.0, 0.6931471805599453, 0.2402265069591007, 0.05550410866482158, 0.009618129107628477,
    0.0013333558146428443, 0.00015403530393381606))
_ERFC_COEFFS = tuple(np.float32(c) for c in (
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
    -0.82215223, 0.17087277))


@njit(inline="always", fastmath=_EXACT_FASTMATH)
def _exp_f32(x):
    """exp(x) for float32 as 2^n * 2^f (n = round(x log2 e), |f| <= 1/2, degree-6 polynomial for
    2^f, relative error < 2e-6): unlike libm's expf it vectorizes, which makes the GELU kernels
    several times faster."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    y = x * np.float32(1.4426950408889634)
    n = np.floor(y + np.float32(0.5))  # float32 (math.floor would give an int64 and float64 arithmetic)
    return _horner_f32(y - n, _EXP2_COEFFS) * _as_float32((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(inline="always", fastmath=_EXACT_FASTMATH)
def _phi_fast(v):
    """Phi(v) = erfc(-v / sqrt 2) / 2 through Numerical Recipes' Chebyshev erfc (relative error
    < 1.2e-7) and _exp_f32; about 2e-6 relative in all. Branch-free so the loop vectorizes."""
    z = abs(v) * np.float32(0.7071067811865476)
    t = np.float32(1.0) / _fma_f32(np.float32(0.5), z, np.float32(1.0))
    half_erfc = np.float32(0.5) * t * _exp_f32(_fma_f32(-z, z, _horner_f32(t, _ERFC_COEFFS)))  # = Phi(-|v|)
    return half_erfc if v < 0 else np.float32(1.0) - half_erfc


# The GELU kernels work on rows: x (rows, n) is the output of the preceding linear layer before its
# bias (n,), or the pre-activation itself when bias is None (Numba compiles that case without it).
# The backward kernels also sum dx over the rows into the bias gradient, in _ROW_CHUNKS fixed
# chunks of rows (partial sums in x's dtype: float64 ones would double the float32 kernel's time), in
# the same pass.


@njit(parallel=True, cache=True, fastmath=_EXACT_FASTMATH, error_model="numpy")
def _gelu_erf_f32(x, bias, out):
    rows, n = x.shape
    for r in prange(rows):
        for j in range(n):
            v = x[r, j] if bias is None else x[r, j] + bias[j]
            out[r, j] = v * _phi_fast(v)


@njit(parallel=True, cache=True, fastmath=_EXACT_FASTMATH, error_model="numpy")
def _gelu_erf_f32_backward(x, bias, dout, dx, dbias_chunks):
    rows, n = x.shape
    chunks = dbias_chunks.shape[0]
    for c in prange(chunks):
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            for j in range(n):
                v = x[r, j] if bias is None else x[r, j] + bias[j]
                pdf = np.float32(0.3989422804014327) * _exp_f32(np.float32(-0.5) * v * v)
                g = dout[r, j] * _fma_f32(v, pdf, _phi_fast(v))
                dx[r, j] = g
                if bias is not None:
                    dbias_chunks[c, j] += g


@njit(parallel=True, cache=True)
def _gelu_erf(x, bias, out, half, one, c):
    # float64 (and other dtypes): libm erf, exact to the last bits; c = (1/sqrt 2, 1/sqrt(2 pi))
    rows, n = x.shape
    for r in prange(rows):
        for j in range(n):
            v = x[r, j] if bias is None else x[r, j] + bias[j]
            out[r, j] = half * v * (one + math.erf(v * c[0]))


@njit(parallel=True, cache=True)
def _gelu_erf_backward(x, bias, dout, dx, dbias_chunks, half, one, c):
    rows, n = x.shape
    chunks = dbias_chunks.shape[0]
    for k in prange(chunks):
        for r in range(k * rows // chunks, (k + 1) * rows // chunks):
            for j in range(n):
                v = x[r, j] if bias is None else x[r, j] + bias[j]
                cdf = half * (one + math.erf(v * c[0]))
                pdf = c[1] * math.exp(-half * v * v)
                dx[r, j] = dout[r, j] * (cdf + v * pdf)
                if bias is not None:
                    dbias_chunks[k, j] += dx[r, j]


@njit(parallel=True, cache=True)
def _gelu_tanh(x, bias, out, half, one, c):
    # c = (sqrt(2/pi), 0.044715, 3 * 0.044715)
    rows, n = x.shape
    for r in prange(rows):
        for j in range(n):
            v = x[r, j] if bias is None else x[r, j] + bias[j]
            out[r, j] = half * v * (one + math.tanh(c[0] * (v + c[1] * v * v * v)))


@njit(parallel=True, cache=True)
def _gelu_tanh_backward(x, bias, dout, dx, dbias_chunks, half, one, c):
    rows, n = x.shape
    chunks = dbias_chunks.shape[0]
    for k in prange(chunks):
        for r in range(k * rows // chunks, (k + 1) * rows // chunks):
            for j in range(n):
                v = x[r, j] if bias is None else x[r, j] + bias[j]
                t = math.tanh(c[0] * (v + c[1] * v * v * v))
                du = c[0] * (one + c[2] * v * v)
                dx[r, j] = dout[r, j] * (half * (one + t) + half * v * (one - t * t) * du)
                if bias is not None:
                    dbias_chunks[k, j] += dx[r, j]


def _gelu_constants(approximate, dtype):
    if approximate == "none":
        c = np.array([_INV_SQRT_2, _INV_SQRT_2PI], dtype=dtype)
    else:
        c = np.array([_SQRT_2_OVER_PI, 0.044715, 3 * 0.044715], dtype=dtype)
    return dtype.type(0.5), dtype.type(1.0), c


def gelu_forward(x, approximate="none", bias=None):
    """GELU, optionally of x + bias. approximate="none": y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
    (exact); approximate="tanh": y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    float64 uses libm's erf; float32 a vectorized erfc approximation (relative error about 2e-6).

    x: (..., n); bias: (n,) or None, the preceding linear layer's bias, added in the same pass over
    the data as the GELU (the same float additions as linear_forward's). Returns y (same shape as x)
    and the cache.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1] if x.ndim else 1)
    if bias is not None:
        bias = bias.astype(x2.dtype, copy=False)
    out = np.empty_like(x2)
    if approximate == "none" and x2.dtype == np.float32:
        _gelu_erf_f32(x2, bias, out)
    else:
        kernel = _gelu_erf if approximate == "none" else _gelu_tanh
        kernel(x2, bias, out, *_gelu_constants(approximate, x2.dtype))
    return out.reshape(x.shape), (x2, bias, approximate, x.shape)


def gelu_backward(dout, cache):
    """dx = dout * GELU'(x + bias). Returns dx (same shape as x) and dbias (n,), or None without bias."""
    x2, bias, approximate, shape = cache
    dx = np.empty_like(x2)
    dout = np.ascontiguousarray(dout, dtype=x2.dtype).reshape(x2.shape)
    dbias = np.zeros((_ROW_CHUNKS, x2.shape[1]), dtype=x2.dtype)
    if approximate == "none" and x2.dtype == np.float32:
        _gelu_erf_f32_backward(x2, bias, dout, dx, dbias)
    else:
        kernel = _gelu_erf_backward if approximate == "none" else _gelu_tanh_backward
        kernel(x2, bias, dout, dx, dbias, *_gelu_constants(approximate, x2.dtype))
    return dx.reshape(shape), None if bias is None else dbias.sum(axis=0)


# ----------------------------------------------------------------------------------------------
# softmax (last axis)


# exp(r) for |r| <= ln(2) / 2: Taylor coefficients 1 / k!, k = 0 .. 12 (truncation < 2e-16 relative);
# ln 2 split as in fdlibm, so that n * _LN2_HI is exact for the |n| <= 151 used here.
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(13))
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


@njit(inline="always")
def _exp_f32_rounded(x):
    """float32(exp(x)) for float32 x, evaluated in float64 as 2^n exp(r), n = round(x / ln 2), with a
    degree-12 polynomial for exp(r): about 3e-16 relative before the one rounding to float32, so the
    result is the correctly rounded exp(x) unless exp(x) lies that close to a float32 rounding boundary
    (measured: no difference from float32(numpy.exp(float64(x))) on 10^7 points). Branch-free, so the
    loops vectorize (libm's expf does not). exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN."""
    v = min(max(np.float64(x), -104.0), 89.0)  # exp(-104) rounds to 0 and exp(89) to inf in float32
    n = np.floor(v * 1.4426950408889634 + 0.5)
    r = (v - n * _LN2_HI) - n * _LN2_LO
    p = _EXP_TAYLOR[12]
    for k in range(11, -1, -1):
        p = p * r + _EXP_TAYLOR[k]
    y = np.float32(p * _as_float64((np.int64(n) + np.int64(1023)) << np.int64(52)))
    return y if x == x else x


def exp_f32(x):
    """Element-wise exp of a float32 array with the bits of ops' float32 softmax (_exp_f32_rounded;
    Numba code such as engine.exp_table calls that directly)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _exp_f32_array(x.reshape(-1), out.reshape(-1))
    return out


@njit(cache=True)
def _exp_f32_array(x, out):
    for i in range(x.shape[0]):
        out[i] = _exp_f32_rounded(x[i])


@njit(inline="always")
def _row_max(x):
    m = x[0]
    for j in range(1, x.shape[0]):
        if x[j] > m:
            m = x[j]
    return m


@njit(inline="always")
def _scale_row(x, s):
    for j in range(x.shape[0]):
        x[j] *= s


@njit(parallel=True, cache=True)
def _softmax_rows(x, out):
    # float64 (and other dtypes): libm exp
    rows, n = x.shape
    for r in prange(rows):
        m = _row_max(x[r])
        s = 0.0
        for j in range(n):
            e = math.exp(x[r, j] - m)
            out[r, j] = e
            s += e
        _scale_row(out[r], 1.0 / s)


_SOFTMAX_ROWS_PER_TASK = 64


@njit(cache=True)
def _softmax_row_range_f32(x, out, r0, r1):
    """Rows r0 .. r1 - 1 of the float32 softmax: e = float32(exp(x - max)) (vectorized), the float64
    sum of each row's e in order (eight rows as independent chains), out = float32(e * (1 / sum))."""
    for r in range(r0, r1):
        m = _row_max(x[r])
        xr, er = x[r], out[r]
        for j in range(x.shape[1]):
            er[j] = _exp_f32_rounded(xr[j] - m)
    r = r0
    while r + 8 <= r1:
        sums = _sums8(out[r], out[r + 1], out[r + 2], out[r + 3], out[r + 4], out[r + 5], out[r + 6], out[r + 7])
        for k in range(8):
            _scale_row(out[r + k], 1.0 / sums[k])
        r += 8
    while r < r1:
        s = 0.0
        for j in range(x.shape[1]):
            s += out[r, j]
        _scale_row(out[r], 1.0 / s)
        r += 1


@njit(parallel=True, cache=True)
def _softmax_rows_f32(x, out):
    rows = x.shape[0]
    tasks = (rows + _SOFTMAX_ROWS_PER_TASK - 1) // _SOFTMAX_ROWS_PER_TASK
    for task in prange(tasks):
        _softmax_row_range_f32(x, out, task * _SOFTMAX_ROWS_PER_TASK,
                               min(rows, (task + 1) * _SOFTMAX_ROWS_PER_TASK))


@njit(parallel=True, cache=True, fastmath=_REDUCE_FASTMATH)
def _softmax_rows_backward(y, dout, dx):
    rows, n = y.shape
    for r in prange(rows):
        dot = 0.0
        for j in range(n):
            dot += y[r, j] * dout[r, j]
        for j in range(n):
            dx[r, j] = y[r, j] * (dout[r, j] - dot)


def softmax_forward(x):
    """Numerically stable softmax over the last axis. x: (..., n). Returns y and the cache."""
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    y = np.empty_like(x2)
    (_softmax_rows_f32 if x2.dtype == np.float32 else _softmax_rows)(x2, y)
    return y.reshape(x.shape), y


def softmax_backward(dout, cache):
    """dx = y * (dout - sum(dout * y, -1)). Returns dx (same shape)."""
    y = cache
    dx = np.empty_like(y)
    _softmax_rows_backward(y, np.ascontiguousarray(dout).reshape(y.shape), dx)
    return dx.reshape(dout.shape)


# ----------------------------------------------------------------------------------------------
# multi-head self-attention core

_matmul_pool = None


def _forget_matmul_pool():
    global _matmul_pool
    _matmul_pool = None


os.register_at_fork(after_in_child=_forget_matmul_pool)  # a forked child has none of the pool's threads


def _stacked_matmul(a, b, out=None):
    """a @ b for stacks of matrices, (S, ..., M, K) @ (S, ..., K, N) -> (S, ..., M, N), the stack
    split across threads; out: optional array of that shape to write into (any strides whose
    matrices have unit column stride, e.g. a view into another layout).

    NumPy computes a stacked product as one BLAS call per matrix, all on the calling thread, and
    attention's N x N and N x d matrices are too small for BLAS to use a second thread. So the stack
    is cut along its first axis into one slice per Numba thread (numba.get_num_threads()); NumPy
    releases the GIL during the products, so the slices run at the same time. Every matrix gets the
    same BLAS call as in np.matmul(a, b), hence the same bits.
    """
    global _matmul_pool
    parts = min(numba.get_num_threads(), a.shape[0])
    if parts < 2 or a.ndim < 3 or a.shape[:-2] != b.shape[:-2]:
        return np.matmul(a, b, out=out)
    if out is None:
        out = np.empty(a.shape[:-1] + b.shape[-1:], dtype=np.result_type(a, b))
    if _matmul_pool is None:
        _matmul_pool = ThreadPoolExecutor(numba.config.NUMBA_NUM_THREADS, thread_name_prefix="minibvit-matmul")
    bounds = np.linspace(0, a.shape[0], parts + 1).astype(int)
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    futures = [_matmul_pool.submit(np.matmul, a[s], b[s], out=out[s]) for s in slices[1:]]
    np.matmul(a[slices[0]], b[slices[0]], out=out[slices[0]])
    for f in futures:
        f.result()
    return out


class _Identity:
    """Pass-through used where an attention tensor is not quantized."""

    params, buffers = {}, {}

    def forward(self, x, training):
        return x, None

    def backward(self, dout, cache):
        return dout, {}


IDENTITY = _Identity()


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
        _interleave_heads(dq, dk, dv, dqkv)
    return dqkv.reshape(B, N, 3 * H * d)


def split_heads_grad_views(cache, dtype):
    """Three (B, H, N, d) views dq, dk, dv into one fresh d qkv buffer in split_heads_forward's
    layout: attention_backward(..., out=views) writes the gradients there and split_heads_backward
    then returns the buffer without copying."""
    _, B, H, N, d = cache
    return tuple(np.empty((B, N, 3, H, d), dtype=dtype).transpose(2, 0, 3, 1, 4))


@njit(parallel=True, cache=True)
def _interleave_heads(dq, dk, dv, out):
    """out[b, n, :, h] = (dq, dk, dv)[:, b, h, n]: one pass, in parallel over the batch (a NumPy
    strided copy runs on one thread at memory speed)."""
    B, H, N, d = dq.shape
    for b in prange(B):
        for n in range(N):
            for h in range(H):
                for j in range(d):
                    out[b, n, 0, h, j] = dq[b, h, n, j]
                for j in range(d):
                    out[b, n, 1, h, j] = dk[b, h, n, j]
                for j in range(d):
                    out[b, n, 2, h, j] = dv[b, h, n, j]


def merge_heads_forward(x):
    """(B, H, N, d) -> (B, N, H*d)."""
    B, H, N, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, N, H * d), x.shape


def merge_heads_backward(dout, cache):
    B, H, N, d = cache
    return dout.reshape(B, N, H, d).transpose(0, 2, 1, 3)


def attention_forward(q, k, v, quant=None, training=False, attn_drop=0.0, rng=None):
    """Scaled dot-product attention, batched over batch and heads (no Python loop per head).

        S = (Q_q K_q^T) / sqrt(d),  A = softmax(S),  A_q = quant_attn(A),  O = A_q V_q

    with Q_q = quant_q(Q), K_q = quant_k(K), V_q = quant_v(V) (identity in full precision; the
    scale is applied after the product, as in BiT, so that binary Q K^T stays an integer product).

    q, k, v: (B, H, N, d). quant: optional dict with any of the keys "q", "k", "attn", "v" mapping
    to quantizer objects (see minibvit.quant). attn_drop: dropout rate on A_q (training only).
    Returns O: (B, H, N, d) and the cache. O is a view of a (B, N, H, d) array, so that
    merge_heads_forward needs no copy.
    """
    quant = quant or {}
    qz, kz, az, vz = (quant.get(name, IDENTITY) for name in ("q", "k", "attn", "v"))
    scale = 1.0 / math.sqrt(q.shape[-1])
    q_q, cq = qz.forward(q, training)
    k_q, ck = kz.forward(k, training)
    scores = _quantized_matmul(q_q, k_q.swapaxes(-1, -2), qz, cq, kz, ck, transpose_b=True)
    scores *= scores.dtype.type(scale)
    attn, c_soft = softmax_forward(scores)
    a_q, ca = az.forward(attn, training)
    a_d, c_drop = dropout_forward(a_q, attn_drop, rng, training)
    v_q, cv = vz.forward(v, training)
    B, H, N, d = v.shape
    out = np.empty((B, N, H, d), dtype=np.result_type(a_d, v_q)).transpose(0, 2, 1, 3)
    if c_drop is None:
        _quantized_matmul(a_d, v_q, az, ca, vz, cv, out=out)
    else:
        _stacked_matmul(a_d, v_q, out=out)
    return out, (qz, kz, az, vz, cq, ck, ca, cv, q_q, k_q, a_d, v_q, c_soft, c_drop, scale)


def _basis_matmul(form_a, form_b, transpose_b, dtype):
    """(sum_i a_i P_i) @ (sum_j b_j U_j) for operands that are sums of scaled integer bases (GSB):
    sum_ij (a_i b_j) (P_i @ U_j), each P_i @ U_j exact, accumulated in float64 in the order
    (0, 0), (0, 1), ..., then cast, as the packed engine combines its popcount products."""
    (bases_a, scales_a), (bases_b, scales_b) = form_a, form_b
    out = 0.0
    for pa, sa in zip(bases_a, scales_a):
        for pb, sb in zip(bases_b, scales_b):
            product = integer_matmul(pa, pb.swapaxes(-1, -2) if transpose_b else pb)
            out = out + (np.float64(sa) * np.float64(sb)) * product
    return out.astype(dtype)


def _quantized_matmul(a, b, qa, ca, qb, cb, transpose_b=False, out=None):
    """a @ b; when both operands are quantized as levels * scalar scale (quantizer.integer_form),
    computed as (levels_a @ levels_b) * (scale_a * scale_b): the integer product is exact in floating
    point (while its magnitude stays below 2^24 in float32), so an exact 0 stays 0 and the packed
    inference engine, which computes the same integers with popcounts, gets the same bits.
    out: optional array to write the product into (see _stacked_matmul)."""
    ba, bb = getattr(qa, "basis_form", None), getattr(qb, "basis_form", None)
    fa, fb = getattr(qa, "integer_form", None), getattr(qb, "integer_form", None)
    ia = fa(ca) if fa and not (ba and bb) else None
    ib = fb(cb) if fb and not (ba and bb) else None
    if ba and bb:
        product = _basis_matmul(ba(ca), bb(cb), transpose_b, a.dtype)
    elif ia is None or ib is None:
        return _stacked_matmul(a, b, out=out)
    else:
        product = integer_matmul(ia[0], ib[0].swapaxes(-1, -2) if transpose_b else ib[0])
        product *= ia[1] * ib[1]
    if out is None:
        return product
    out[...] = product
    return out


def attention_backward(dout, cache, out=None):
    """Returns dq, dk, dv (each (B, H, N, d)) and a dict of quantizer parameter gradients keyed
    "q.<param>", "k.<param>", "attn.<param>", "v.<param>".
    out: optional (dq, dk, dv) arrays to write the gradients into (split_heads_grad_views)."""
    qz, kz, az, vz, cq, ck, ca, cv, q_q, k_q, a_d, v_q, c_soft, c_drop, scale = cache
    dq_out, dk_out, dv_out = out or (None, None, None)
    grads = {}
    da_d = _stacked_matmul(dout, v_q.swapaxes(-1, -2))
    dv_q = _stacked_matmul(a_d.swapaxes(-1, -2), dout, out=dv_out if vz is IDENTITY else None)
    dv, g = vz.backward(dv_q, cv)
    grads.update({f"v.{n}": t for n, t in g.items()})
    da_q = dropout_backward(da_d, c_drop)
    dattn, g = az.backward(da_q, ca)
    grads.update({f"attn.{n}": t for n, t in g.items()})
    dscores = softmax_backward(dattn, c_soft)
    dscores *= dscores.dtype.type(scale)
    dq_q = _stacked_matmul(dscores, k_q, out=dq_out if qz is IDENTITY else None)
    dk_q = _stacked_matmul(dscores.swapaxes(-1, -2), q_q, out=dk_out if kz is IDENTITY else None)
    dq, g = qz.backward(dq_q, cq)
    grads.update({f"q.{n}": t for n, t in g.items()})
    dk, g = kz.backward(dk_q, ck)
    grads.update({f"k.{n}": t for n, t in g.items()})
    return _written_to(dq, dq_out), _written_to(dk, dk_out), _written_to(dv, dv_out), grads


def _written_to(x, out):
    """x, stored in out when out is given (no copy when x already is out)."""
    if out is None or x is out:
        return x
    out[...] = x
    return out


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


def cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Mean cross-entropy with label smoothing (as torch.nn.functional.cross_entropy):
    target q = (1 - eps) onehot(y) + eps / C;  loss = mean_b( -sum_c q_bc log softmax(z_b)_c ).

    logits: (B, C); labels: (B,) integers in [0, C). Returns the scalar loss and the cache.
    """
    B, C = logits.shape
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},), got {labels.shape}")
    logp = _log_softmax(logits)
    target = np.full_like(logits, label_smoothing / C)
    target[np.arange(B), labels] += 1.0 - label_smoothing
    loss = -(target * logp).sum() / B
    return loss, (logp, target)


def cross_entropy_backward(dloss, cache):
    """d logits = dloss * (softmax(z) - q) / B."""
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
