"""Numba row kernels shared by training (minibvit.ops) and the packed engine (minibvit.engine).

These are the hot loops of the full-precision ops, written for speed: parallel over rows, with a
fixed summation order so that the result does not depend on the thread count and so that the
engine, which calls the same functions, reproduces every bit. minibvit.ops holds the readable
op pairs and hands their loops to the functions here for float32 / float64 inputs; the tests
(reference_tests/test_numerics.py) hold both to the same numbers.

    LayerNorm      layernorm / layernorm_backward (on rows; kernels layernorm_rows and
                   layernorm_rows_backward); the float64 row moments (layernorm_moments,
                   layernorm_moments8, sums8) and the normalise step (layernorm_normalize_row) that
                   the engine's fused kernels reuse
    GELU           gelu_rows / gelu_rows_backward (exact erf: libm in float64, a vectorized erfc in
                   float32; tanh form), optionally of x + bias, the bias gradient in the same pass
    softmax        softmax / softmax_backward (on rows); exp_f32_rounded (float32 exp, in Numba
                   code) and exp_f32 (the same on an array); row_max
    sums and adds  column_sums, add_to_rows (bias), add (residual); row_table (a view's rows)
    attention      stacked_matmul (a stack of small matmuls split across threads: a thread pool,
                   forgotten in a forked child), interleave_heads (the heads' gradient layout)

Exactness rules: the forward kernels use no fast-math reassociation (in-order float64 sums, eight
rows at a time as independent chains); reductions that only training uses (dgamma, dbeta, bias
gradients) are reassociated, in ROW_CHUNKS fixed chunks of rows.
"""
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit, prange

from .intrinsics import as_float32, as_float64, fma_f32, fma_f64

# ----------------------------------------------------------------------------------------------
# bias and residual adds


@njit(parallel=True, cache=True)
def add_to_rows(y, b):
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
    """x + y for two C-contiguous arrays of the same shape and dtype, on all threads; out may be x or y."""
    if out is None:
        out = np.empty_like(x)
    n = x.shape[-1] if x.ndim else 1
    _add_rows(x.reshape(-1, n), y.reshape(-1, n), out.reshape(-1, n))
    return out


# ----------------------------------------------------------------------------------------------
# LayerNorm


# The forward sums each row's mean and variance in float64, in order (no reassociation): the packed
# inference engine reproduces these bits. One row's chain of dependent float64 adds is bound by the
# add latency, so rows are summed eight at a time as eight independent chains (the same order per row).

@njit(inline="always")
def sums8(a0, a1, a2, a3, a4, a5, a6, a7):
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
def layernorm_moments(x):
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
def layernorm_moments8(x, r, squares):
    """layernorm_moments of rows r .. r + 7 of x (rows, n), as two tuples of eight: the squared
    deviations go to squares (8, n) float64 first (vectorized), so that the eight chains only add."""
    n = x.shape[1]
    sums = sums8(x[r], x[r + 1], x[r + 2], x[r + 3], x[r + 4], x[r + 5], x[r + 6], x[r + 7])
    for k in range(8):
        xk, sk = x[r + k], squares[k]
        mean = sums[k] / n
        for j in range(n):
            t = xk[j] - mean
            sk[j] = t * t
    square_sums = sums8(squares[0], squares[1], squares[2], squares[3], squares[4], squares[5], squares[6],
                         squares[7])
    means = (sums[0] / n, sums[1] / n, sums[2] / n, sums[3] / n, sums[4] / n, sums[5] / n, sums[6] / n,
             sums[7] / n)
    variances = (square_sums[0] / n, square_sums[1] / n, square_sums[2] / n, square_sums[3] / n,
                 square_sums[4] / n, square_sums[5] / n, square_sums[6] / n, square_sums[7] / n)
    return means, variances


@njit(inline="always")
def layernorm_normalize_row(x, mean, var, gamma, beta, eps, out, xhat):
    """The normalise step of LayerNorm for one row x (n,) from its float64 mean and variance:
    xhat = (x - mean) / sqrt(var + eps), out = xhat * gamma + beta, in float64 arithmetic and
    stored in out's (and xhat's) dtype. xhat may be out itself (only out is wanted: the engine).
    Returns 1 / sqrt(var + eps)."""
    s = 1.0 / math.sqrt(var + eps)
    for j in range(x.shape[0]):
        h = (x[j] - mean) * s
        xhat[j] = h
        out[j] = h * gamma[j] + beta[j]
    return s


_LAYERNORM_ROWS_PER_TASK = 64


@njit(cache=True, fastmath=False)
def _layernorm_row_range(x, gamma, beta, eps, out, xhat, rstd, r0, r1):
    squares = np.empty((8, x.shape[1]), np.float64)
    r = r0
    while r + 8 <= r1:
        means, variances = layernorm_moments8(x, r, squares)
        for k in range(8):
            rstd[r + k] = layernorm_normalize_row(x[r + k], means[k], variances[k], gamma, beta, eps, out[r + k],
                                                  xhat[r + k])
        r += 8
    while r < r1:
        mean, var = layernorm_moments(x[r])
        rstd[r] = layernorm_normalize_row(x[r], mean, var, gamma, beta, eps, out[r], xhat[r])
        r += 1


@njit(parallel=True, cache=True)
def layernorm_rows(x, gamma, beta, eps, out, xhat, rstd):
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
ROW_CHUNKS = 16


@njit(parallel=True, cache=True, fastmath=_REDUCE_FASTMATH)
def _column_sum_chunks(x, chunks):
    rows, n = x.shape
    parts = chunks.shape[0]
    for c in prange(parts):
        for r in range(c * rows // parts, (c + 1) * rows // parts):
            for j in range(n):
                chunks[c, j] += x[r, j]


@njit(parallel=True, cache=True, fastmath=_REDUCE_FASTMATH)
def _column_sum_chunks_rows(flat, starts, chunks):
    """_column_sum_chunks of the rows flat[starts[r]:starts[r] + n] (row_table)."""
    rows, (parts, n) = starts.size, chunks.shape
    for c in prange(parts):
        for r in range(c * rows // parts, (c + 1) * rows // parts):
            row = flat[starts[r]:starts[r] + n]
            for j in range(n):
                chunks[c, j] += row[j]


def column_sums(x):
    """The sum over every axis but the last of x (..., n) -> (n,) (x.sum(axis=0) of a 2-D array), in
    parallel: partial sums over ROW_CHUNKS fixed row ranges (the same result for any thread count),
    then their sum. A view whose rows lie apart (the attention's dq in the qkv gradient) is read where
    it lies (row_table)."""
    n = x.shape[-1]
    chunks = np.zeros((ROW_CHUNKS, n), dtype=x.dtype)
    table = None if x.flags.c_contiguous else row_table(x)
    if table is None:
        _column_sum_chunks(np.ascontiguousarray(x).reshape(-1, n), chunks)
    else:
        _column_sum_chunks_rows(table[0], table[1], chunks)
    return chunks.sum(axis=0)


CONTIGUOUS_ROWS = np.zeros(0, np.int64)


def row_table(x):
    """(flat, starts) of an (..., K) array x whose last axis is contiguous (a view of a C-contiguous
    array, such as the attention's dq in the qkv gradient): element j of row r (x's leading indices in
    C order) is flat[starts[r] + j]; starts is empty for a C-contiguous x. None when x's layout has
    no such table."""
    if x.flags.c_contiguous:
        return x.reshape(-1), CONTIGUOUS_ROWS
    item = x.itemsize
    if x.ndim == 0 or x.strides[-1] != item or any(s < 0 or s % item for s in x.strides):
        return None
    owner = x
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    offset = x.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
    if not (owner.flags.c_contiguous and owner.dtype == x.dtype and offset % item == 0):
        return None
    return owner.reshape(-1), _row_starts(offset // item, x.shape[:-1], tuple(s // item for s in x.strides[:-1]))


@functools.lru_cache(maxsize=32)
def _row_starts(first, shape, steps):
    """row_table's starts (int64, C order of the leading indices), kept per layout: a training step
    asks for the same few views of every block's q, k and v many times. Shared: never written to."""
    starts = np.full(1, first, np.int64)
    for n, step in zip(shape, steps):
        starts = (starts[:, None] + np.arange(n, dtype=np.int64) * step).reshape(-1)
    return starts


@njit(parallel=True, cache=True, fastmath=_REDUCE_FASTMATH)
def layernorm_rows_backward(dout, xhat, rstd, gamma, dx, dgamma_chunks, dbeta_chunks):
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


def layernorm(x, gamma, beta, eps):
    """LayerNorm of the rows of a C-contiguous x (rows, n): (out, xhat, rstd), x's dtype; the
    moments in float64, in order (layernorm_rows)."""
    out = np.empty_like(x)
    xhat = np.empty_like(x)
    rstd = np.empty(x.shape[0], dtype=x.dtype)
    layernorm_rows(x, gamma.astype(x.dtype), beta.astype(x.dtype), x.dtype.type(eps), out, xhat, rstd)
    return out, xhat, rstd


def layernorm_backward(dout, xhat, rstd, gamma):
    """(dx, dgamma, dbeta) of LayerNorm from a C-contiguous dout (rows, n) and the forward's xhat
    and rstd; dgamma and dbeta summed in ROW_CHUNKS fixed chunks of rows."""
    dx = np.empty_like(dout)
    dgamma = np.zeros((ROW_CHUNKS, dout.shape[1]), dtype=dout.dtype)  # partial sums of dout * xhat and dout
    dbeta = np.zeros((ROW_CHUNKS, dout.shape[1]), dtype=dout.dtype)
    layernorm_rows_backward(dout, xhat, rstd, gamma.astype(dout.dtype), dx, dgamma, dbeta)
    return dx, dgamma.sum(axis=0), dbeta.sum(axis=0)

# ----------------------------------------------------------------------------------------------
# GELU


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# No "contract"/"reassoc": the vectorized body and the scalar remainder of a loop must round alike,
# so that an element's value does not depend on where it falls in the thread chunks.
EXACT_FASTMATH = {"nnan", "ninf", "nsz"}
# error_model="numpy": a float division by zero gives inf instead of raising ZeroDivisionError; the
# check for it would keep LLVM from vectorizing the loops.


@njit(inline="always")
def _horner_f32(t, coeffs):
    """coeffs[0] + coeffs[1] t + coeffs[2] t^2 + ... by Horner's rule with fused multiply-adds."""
    acc = coeffs[-1]
    for i in range(len(coeffs) - 2, -1, -1):
        acc = fma_f32(acc, t, coeffs[i])
    return acc


# 2^f for |f| <= 1/2 (degree 6) and Numerical Recipes' erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2)
_EXP2_COEFFS = tuple(np.float32(c) for c in (
    1.0, 0.6931471805599453, 0.2402265069591007, 0.05550410866482158, 0.009618129107628477,
    0.0013333558146428443, 0.00015403530393381606))
_ERFC_COEFFS = tuple(np.float32(c) for c in (
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
    -0.82215223, 0.17087277))


@njit(inline="always", fastmath=EXACT_FASTMATH)
def _exp_f32_fast(x):
    """exp(x) for float32 as 2^n * 2^f (n = round(x log2 e), |f| <= 1/2, degree-6 polynomial for
    2^f, relative error < 2e-6): unlike libm's expf it vectorizes, which makes the GELU kernels
    several times faster."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    y = x * np.float32(1.4426950408889634)
    n = np.floor(y + np.float32(0.5))  # float32 (math.floor would give an int64 and float64 arithmetic)
    return _horner_f32(y - n, _EXP2_COEFFS) * as_float32((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(inline="always", fastmath=EXACT_FASTMATH)
def phi_f32(v):
    """Phi(v) = erfc(-v / sqrt 2) / 2 through Numerical Recipes' Chebyshev erfc (relative error
    < 1.2e-7) and _exp_f32_fast; about 2e-6 relative in all (up to 1e-5 far in the negative tail).
    Branch-free so the loop vectorizes."""
    z = abs(v) * np.float32(0.7071067811865476)
    t = np.float32(1.0) / fma_f32(np.float32(0.5), z, np.float32(1.0))
    half_erfc = np.float32(0.5) * t * _exp_f32_fast(fma_f32(-z, z, _horner_f32(t, _ERFC_COEFFS)))  # = Phi(-|v|)
    return half_erfc if v < 0 else np.float32(1.0) - half_erfc


# The float32 GELU evaluates Phi and the normal density at v clamped to [-12, 12]: beyond it their
# values (below 2e-33 and 3e-32) would go through subnormals, which cost x86 cores about a hundred
# cycles an operation (a GELU over pre-activations of standard deviation 12 ran 10x slower). Clamped,
# every intermediate stays normal, the bits are those of the formulas up to |v| = 12, and beyond it
# the GELU is v (v > 12) or v Phi(-12) (v < -12, |error| < 2e-33 |v|), its derivative 1 or
# v pdf(12) + Phi(-12).
GELU_CLAMP = np.float32(12.0)


@njit(inline="always", fastmath=EXACT_FASTMATH)
def gelu_tail_clamped(v):
    """v clamped to [-GELU_CLAMP, GELU_CLAMP] (NaN stays NaN): where the float32 GELU evaluates Phi."""
    c = GELU_CLAMP if v > GELU_CLAMP else v
    return -GELU_CLAMP if c < -GELU_CLAMP else c


@njit(inline="always", fastmath=EXACT_FASTMATH)
def gelu_f32(v):
    """GELU(v) = v Phi(v) in float32, Phi at gelu_tail_clamped(v)."""
    return v * phi_f32(gelu_tail_clamped(v))


# The GELU kernels work on rows: x (rows, n) is the output of the preceding linear layer before its
# bias (n,), or the pre-activation itself when bias is None (Numba compiles that case without it).
# The backward kernels also sum dx over the rows into the bias gradient, in ROW_CHUNKS fixed
# chunks of rows (partial sums in x's dtype: float64 ones would double the float32 kernel's time), in
# the same pass.


@njit(parallel=True, cache=True, fastmath=EXACT_FASTMATH, error_model="numpy")
def _gelu_erf_f32(x, bias, out):
    rows, n = x.shape
    for r in prange(rows):
        for j in range(n):
            v = x[r, j] if bias is None else x[r, j] + bias[j]
            out[r, j] = gelu_f32(v)


@njit(parallel=True, cache=True, fastmath=EXACT_FASTMATH, error_model="numpy")
def _gelu_erf_f32_backward(x, bias, dout, dx, dbias_chunks):
    rows, n = x.shape
    chunks = dbias_chunks.shape[0]
    for c in prange(chunks):
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            for j in range(n):
                v = x[r, j] if bias is None else x[r, j] + bias[j]
                vc = gelu_tail_clamped(v)
                pdf = np.float32(0.3989422804014327) * _exp_f32_fast(np.float32(-0.5) * vc * vc)
                g = dout[r, j] * fma_f32(v, pdf, phi_f32(vc))
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


def gelu_rows(x, bias, approximate):
    """GELU of x (rows, n) (+ bias (n,) or None) -> out (rows, n), x's dtype. approximate "none":
    x Phi(x) (libm erf in float64, phi_f32 in float32); "tanh": the tanh form."""
    out = np.empty_like(x)
    if approximate == "none" and x.dtype == np.float32:
        _gelu_erf_f32(x, bias, out)
    else:
        kernel = _gelu_erf if approximate == "none" else _gelu_tanh
        kernel(x, bias, out, *_gelu_constants(approximate, x.dtype))
    return out


def gelu_rows_backward(x, bias, dout, approximate):
    """dx = dout * GELU'(x + bias) (rows, n) and the column sums of dx (n,) (the bias gradient;
    zeros when bias is None), summed in ROW_CHUNKS fixed chunks of rows."""
    dx = np.empty_like(x)
    dbias = np.zeros((ROW_CHUNKS, x.shape[1]), dtype=x.dtype)
    if approximate == "none" and x.dtype == np.float32:
        _gelu_erf_f32_backward(x, bias, dout, dx, dbias)
    else:
        kernel = _gelu_erf_backward if approximate == "none" else _gelu_tanh_backward
        kernel(x, bias, dout, dx, dbias, *_gelu_constants(approximate, x.dtype))
    return dx, dbias.sum(axis=0)


# ----------------------------------------------------------------------------------------------
# softmax (last axis)


# exp(r) for |r| <= ln(2) / 2: Taylor coefficients 1 / k!, k = 0 .. 12 (truncation < 2e-16 relative);
# ln 2 split as in fdlibm, so that n * _LN2_HI is exact for the |n| <= 151 used here.
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(13))
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


@njit(inline="always")
def exp_f32_rounded(x):
    """float32(exp(x)) for float32 x, evaluated in float64 as 2^n exp(r), n = round(x / ln 2), with a
    degree-12 polynomial for exp(r) by Horner's rule with fused multiply-adds (fma_f64: half the
    operations of separate multiplies and adds, which LLVM does not fuse by itself): about 3e-16
    relative before the one rounding to float32, so the result is the correctly rounded exp(x) unless
    exp(x) lies that close to a float32 rounding boundary (measured: no difference from
    float32(numpy.exp(float64(x))) on 2 x 10^7 points, normal and uniform on [-104, 89]). Branch-free, so the
    loops vectorize (libm's expf does not). exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN."""
    v = min(max(np.float64(x), -104.0), 89.0)  # exp(-104) rounds to 0 and exp(89) to inf in float32
    n = np.floor(v * 1.4426950408889634 + 0.5)
    r = (v - n * _LN2_HI) - n * _LN2_LO
    p = _EXP_TAYLOR[12]
    for k in range(11, -1, -1):
        p = fma_f64(p, r, _EXP_TAYLOR[k])
    y = np.float32(p * as_float64((np.int64(n) + np.int64(1023)) << np.int64(52)))
    return y if x == x else x


def exp_f32(x):
    """Element-wise exp of a float32 array with the bits of the float32 softmax (exp_f32_rounded;
    Numba code such as engine.fused.exp_table calls that directly)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _exp_f32_array(x.reshape(-1), out.reshape(-1))
    return out


@njit(cache=True)
def _exp_f32_array(x, out):
    for i in range(x.shape[0]):
        out[i] = exp_f32_rounded(x[i])


@njit(inline="always")
def row_max(x):
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
        m = row_max(x[r])
        s = 0.0
        for j in range(n):
            e = math.exp(x[r, j] - m)
            out[r, j] = e
            s += e
        _scale_row(out[r], 1.0 / s)


_SOFTMAX_ROWS_PER_TASK = 64


@njit(cache=True)
def softmax_exp_rows(x, e, inv_sums, r0, r1):
    """The first pass of the float32 softmax on rows r0 .. r1 - 1 of x: e = float32(exp(x - max))
    (vectorized) and inv_sums[r] = 1 / the float64 sum of the row's e in order (eight rows as
    independent chains). The probabilities are float32(e * inv_sums[r]) (engine.ternary_net reads
    them from here without writing them)."""
    for r in range(r0, r1):
        m = row_max(x[r])
        xr, er = x[r], e[r]
        for j in range(x.shape[1]):
            er[j] = exp_f32_rounded(xr[j] - m)
    r = r0
    while r + 8 <= r1:
        sums = sums8(e[r], e[r + 1], e[r + 2], e[r + 3], e[r + 4], e[r + 5], e[r + 6], e[r + 7])
        for k in range(8):
            inv_sums[r + k] = 1.0 / sums[k]
        r += 8
    while r < r1:
        s = 0.0
        for j in range(x.shape[1]):
            s += e[r, j]
        inv_sums[r] = 1.0 / s
        r += 1


@njit(parallel=True, cache=True)
def _softmax_rows_f32(x, out):
    """Float32 softmax: softmax_exp_rows into out, then out = float32(out * inv_sum) per row."""
    rows = x.shape[0]
    inv_sums = np.empty(rows)
    tasks = (rows + _SOFTMAX_ROWS_PER_TASK - 1) // _SOFTMAX_ROWS_PER_TASK
    for task in prange(tasks):
        r0, r1 = task * _SOFTMAX_ROWS_PER_TASK, min(rows, (task + 1) * _SOFTMAX_ROWS_PER_TASK)
        softmax_exp_rows(x, out, inv_sums, r0, r1)
        for r in range(r0, r1):
            _scale_row(out[r], inv_sums[r])


@njit(parallel=True, cache=True, fastmath=_REDUCE_FASTMATH)
def _softmax_rows_backward(y, dout, dx):
    rows, n = y.shape
    for r in prange(rows):
        dot = 0.0
        for j in range(n):
            dot += y[r, j] * dout[r, j]
        for j in range(n):
            dx[r, j] = y[r, j] * (dout[r, j] - dot)


def softmax(x):
    """Softmax of the rows of a C-contiguous x (rows, n) in x's dtype: float32 through
    exp_f32_rounded with float64 in-order sums (eight rows as independent chains), float64 (and
    other dtypes) through libm's exp."""
    y = np.empty_like(x)
    (_softmax_rows_f32 if x.dtype == np.float32 else _softmax_rows)(x, y)
    return y


def softmax_backward(y, dout):
    """dx = y * (dout - sum(dout * y, -1)) for rows of y and a C-contiguous dout (rows, n)."""
    dx = np.empty_like(y)
    _softmax_rows_backward(y, dout, dx)
    return dx

# ----------------------------------------------------------------------------------------------
# attention: stacks of small matrix products, the heads' gradient layout


_matmul_pool = None


def _forget_matmul_pool():
    global _matmul_pool
    _matmul_pool = None


os.register_at_fork(after_in_child=_forget_matmul_pool)  # a forked child has none of the pool's threads


def stacked_matmul(a, b, out=None):
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


@njit(parallel=True, cache=True)
def interleave_heads(dq, dk, dv, out):
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
