"""Ternary-weight matrix products (TerViT): binary activations x ternary weights on the popcount
core, and 8-bit activations x ternary weights on byte dot products. Each with a NumPy reference.
"""
import numpy as np
from numba import njit, prange
from numba.extending import overload

from ..intrinsics import DOT4_LANES, dot4_tile
from .binary import (aligned_empty, column_blocks, epilogue_args, popcount_matmul,
                     popcount_sum_reference, row_tasks, store_row)
from .pack import check_k, check_words, row_popcount, threads_for, unpack_ternary

_PARALLEL_MIN_MACS = 1 << 24        # int8 x ternary: M * N * K multiply-adds
_PARALLEL_MIN_ELEMENTS = 1 << 18    # expanding the weight quads: elements


def ternary_weight_sums(w_nonzero, w_sign):
    """sum_k T[n, k] of a ternary weight from its word-major bit-planes [W, N]: int64 [N] =
    popcount(nonzero) - 2 popcount(nonzero & sign) per column (the zero-point corrections of the
    8-bit kernels)."""
    return row_popcount(w_nonzero.T) - 2 * row_popcount((w_nonzero & w_sign).T)


def ternary_gemm_binary(a_packed, w_nonzero, w_sign, K, row_scale=None, col_scale=None, bias=None):
    """Binary activations x ternary weights:  out = A @ T.T, A +-1 [M, K], T {-1,0,+1} [N, K].

    Inputs:
        a_packed:  uint64 [M, W]  pack_signs(A)
        w_nonzero, w_sign: uint64 [W, N]  pack_ternary_weight(T)
        K, row_scale, col_scale, bias: as in binary_gemm
    Returns:
        int32 [M, N] = popcount(nz & ~(a ^ s)) - popcount(nz & (a ^ s))
                     = popcount(nz) - 2 popcount(nz & (a ^ s)),   or the float32 epilogue.
    Zero tails required, as in binary_gemm (not checked here).
    """
    a = check_words(a_packed, "a_packed", 2)
    nz = check_words(w_nonzero, "w_nonzero", 2)
    sign = check_words(w_sign, "w_sign", 2)
    if nz.shape != sign.shape or a.shape[1] != nz.shape[0]:
        raise ValueError(f"a_packed {a.shape}, w_nonzero {nz.shape}, w_sign {sign.shape}: need [M, W], [W, N], [W, N]")
    check_k(K, a.shape[1], "a_packed")
    n_rows, n_cols = a.shape[0], nz.shape[1]
    epilogue = epilogue_args(n_rows, n_cols, row_scale, col_scale, bias)
    col_offset = row_popcount(nz.T)[None]
    return popcount_matmul(a[None], sign[None], nz[None], np.zeros((1, n_rows), np.int64), col_offset,
                   epilogue, n_cols)[0]


def ternary_gemm_binary_reference(a_packed, w_nonzero, w_sign, K, row_scale=None, col_scale=None, bias=None):
    """NumPy reference of ternary_gemm_binary, computed literally as the two popcounts."""
    a = check_words(a_packed, "a_packed", 2)
    nz = check_words(w_nonzero, "w_nonzero", 2)
    sign = check_words(w_sign, "w_sign", 2)
    agree = popcount_sum_reference(~a, sign, nz)      # nz & ~(a ^ s) = nz & (~a ^ s)
    disagree = popcount_sum_reference(a, sign, nz)
    dot = agree - disagree
    epilogue = epilogue_args(a.shape[0], nz.shape[1], row_scale, col_scale, bias)
    if epilogue is None:
        return dot.astype(np.int32)
    rs, cs, bias = epilogue
    return dot.astype(np.float32) * rs[:, None] * cs[None, :] + bias[None, :]


# ---------------------------------------------------------------------------------------------
# 8-bit activations x ternary weights (TerViT)
#
# a (int8) * t (ternary) summed in groups of 4 along K with an unsigned-by-signed byte dot
# product: with u = a + 128 (uint8, = a XOR 0x80), sum_k a_k t_k = sum_k u_k t_k - 128 sum_k t_k.
# Activations are grouped into uint32 words of 4 consecutive K; weights are expanded from their
# bit-planes into int8 quads [ceil(K/4), N, 4]. One 512-bit step multiplies 16 columns x 4 K.
# The instruction is chosen when the kernel is compiled, from the CPU features Numba compiles for:
#   avx512vnni  VPDPBUSD: 64 multiply-adds in one instruction
#   avx2        VPMADDUBSW + VPMADDWD on 256-bit halves: one VPMADDUBSW where |w| <= 64 (ternary), else
#               the activation bytes split in nibbles (VPMADDUBSW saturates its int16 pair sums; a nibble's
#               are at most 2*15*128: exact for 8-bit weights too)
#   otherwise   portable LLVM IR (widen, multiply, add groups of 4): correct, slow
# ---------------------------------------------------------------------------------------------

_QUAD_GROUP = DOT4_LANES  # int32 lanes (output columns) per 512-bit step


@njit(parallel=True, cache=True)
def _expand_ternary_quads(w_nonzero, w_sign, k, n_cols_padded):
    """int8 [ceil(K/4), 4 * n_cols_padded] with [kq, 4n + q] = ternary weight (n, 4kq + q), 0-padded,
    each row starting on a 64-byte boundary (n_cols_padded is a multiple of 16)."""
    n_cols = w_nonzero.shape[1]
    n_quads = (k + 3) // 4
    out = aligned_empty(n_quads, 4 * n_cols_padded, np.int8)
    for kq in prange(n_quads):
        row = out[kq]
        row[:] = 0
        for q in range(4):
            kk = 4 * kq + q
            if kk < k:
                word, bit = kk // 64, np.uint64(kk % 64)
                nz_row = w_nonzero[word]
                sign_row = w_sign[word]
                for n in range(n_cols):
                    nonzero = np.int8((nz_row[n] >> bit) & np.uint64(1))
                    negative = np.int8((sign_row[n] >> bit) & np.uint64(1))
                    row[4 * n + q] = nonzero - 2 * (nonzero & negative)
    return out


TILE_ROWS = 6        # activation rows of a register tile (each weight vector loaded once for them)
_TILE_GROUPS = 4     # column groups of 16 of a register tile: 6 x 4 int32 accumulators of 16 lanes
_tile_full, _tile_rows = dot4_tile(TILE_ROWS, _TILE_GROUPS), dot4_tile(TILE_ROWS, 1)
_tile_groups, _tile_one = dot4_tile(1, _TILE_GROUPS), dot4_tile(1, 1)


def _tile_columns(a_quads, m, panel, n_groups, accs, small_weights, tile, last_groups):
    g = 0
    while g + _TILE_GROUPS <= n_groups:
        tile(accs, g, a_quads, m, panel, small_weights)
        g += _TILE_GROUPS
    while g < n_groups:
        last_groups(accs, g, a_quads, m, panel, small_weights)
        g += 1


overload(_tile_columns, inline="always")(
    lambda a_quads, m, panel, n_groups, accs, small_weights, tile, last_groups: _tile_columns)


def dot4_rows(a_quads, m, rows, panel, n_groups, accs, small_weights):
    """accs[r, :16 n_groups] = sum_kq dot4(a_quads[m + r, kq], panel[kq, :64 n_groups]) for r < rows
    (<= TILE_ROWS): register tiles of TILE_ROWS rows x 4 column groups (intrinsics.dot4_tile), one
    row at a time when rows < TILE_ROWS. a_quads uint32 [M, Kq]; panel int8 [Kq, >= 64 n_groups];
    accs int32 [TILE_ROWS, >= 16 n_groups]; small_weights: every |panel| <= 64."""
    if rows == TILE_ROWS:
        _tile_columns(a_quads, m, panel, n_groups, accs, small_weights, _tile_full, _tile_rows)
    else:
        for r in range(rows):
            _tile_columns(a_quads, m + r, panel, n_groups, accs[r:], small_weights, _tile_groups, _tile_one)


overload(dot4_rows, inline="always")(lambda a_quads, m, rows, panel, n_groups, accs, small_weights: dot4_rows)


@njit(cache=True, boundscheck=False)
def _quad_panel_rows(a_quads, m0, m1, panel, n0, nb, row_offset, col_offset, row_scale, col_scale, bias, out,
                     small_weights):
    """Rows m0..m1-1 against the weight quads of columns n0..n0+nb-1, epilogue included."""
    accs = aligned_empty(TILE_ROWS, _QUAD_GROUP * ((nb + _QUAD_GROUP - 1) // _QUAD_GROUP), np.int32)
    n_groups = accs.shape[1] // _QUAD_GROUP
    coff = col_offset[0, n0:n0 + nb]
    cs = None if col_scale is None else col_scale[n0:n0 + nb]
    bi = None if bias is None else bias[n0:n0 + nb]
    for m in range(m0, m1, TILE_ROWS):
        rows = min(TILE_ROWS, m1 - m)
        dot4_rows(a_quads, m, rows, panel, n_groups, accs, small_weights)
        for r in range(rows):
            rs = None if row_scale is None else row_scale[m + r]
            store_row(accs[r], 1, out[0, m + r, n0:n0 + nb], row_offset[0, m + r], coff, rs, cs, bi)


@njit(parallel=True, cache=True, boundscheck=False)
def _quad_matmul(a_quads, w_quads, row_offset, col_offset, row_scale, col_scale, bias, out, threads, small_weights):
    """out[0, m, n] = row_offset[0, m] + col_offset[0, n] + sum_kq dot4(a_quads[m, kq], w_quads[kq, n]),
    or its float epilogue (see store_row). Same task grid as _popcount_matmul_tasks; the weight quads
    are read in place (their rows are 64-byte aligned)."""
    n_rows = a_quads.shape[0]
    n_cols = out.shape[2]
    col_blocks, width = column_blocks(n_cols)
    row_blocks, height = row_tasks(n_rows, col_blocks, threads)
    for task in prange(row_blocks * col_blocks):
        row_block = task // col_blocks
        col_block = task % col_blocks
        n0 = col_block * width
        nb = min(width, n_cols - n0)
        m0 = row_block * height
        m1 = min(m0 + height, n_rows)
        padded = _QUAD_GROUP * ((nb + _QUAD_GROUP - 1) // _QUAD_GROUP)
        panel = w_quads[:, 4 * n0:4 * (n0 + padded)]
        _quad_panel_rows(a_quads, m0, m1, panel, n0, nb, row_offset, col_offset, row_scale, col_scale, bias, out,
                         small_weights)


def _int8_quads(a_int8, k):
    """uint32 [M, ceil(K/4)]: bytes a + 128 (= a XOR 0x80 as uint8), K zero-padded (a=0 -> 128)."""
    n_rows = a_int8.shape[0]
    n_quads = (k + 3) // 4
    shifted = np.full((n_rows, 4 * n_quads), 0x80, np.uint8)
    shifted[:, :k] = a_int8.view(np.uint8) ^ np.uint8(0x80)
    return shifted.view("<u4").astype(np.uint32, copy=False)


def ternary_gemm_int8(a_int8, w_nonzero, w_sign, K, row_scale=None, col_scale=None, bias=None):
    """8-bit activations x ternary weights (TerViT):  out = A @ T.T, A int8 [M, K], T {-1,0,+1} [N, K].

    Inputs:
        a_int8:            int8 [M, K] quantized activations (not packed)
        w_nonzero, w_sign: uint64 [ceil(K/64), N]  pack_ternary_weight(T)
        K:                 int
        row_scale, col_scale, bias: optional float32 [M], [N], [N] as in binary_gemm
    Returns:
        int32 [M, N] = sum_k a[m, k] * T[n, k] (exact), or the float32 epilogue
        float32(dot) * row_scale[m] * col_scale[n] + bias[n].
    Computed with byte dot products (VPDPBUSD on AVX512-VNNI); see the section comment.
    Zero tails required in the weight planes, as in binary_gemm (not checked here): the products
    read only the first K bits, but the zero-point correction sum_k T[n, k] counts tail bits too.
    """
    a = np.asarray(a_int8)
    if a.dtype != np.int8 or a.ndim != 2:
        raise TypeError(f"a_int8 must be a 2-D int8 array, got {a.dtype} with shape {a.shape}")
    nz = check_words(w_nonzero, "w_nonzero", 2)
    sign = check_words(w_sign, "w_sign", 2)
    if nz.shape != sign.shape:
        raise ValueError(f"w_nonzero {nz.shape} and w_sign {sign.shape} must have the same shape")
    k = check_k(K, nz.shape[0], "w_nonzero")
    if a.shape[1] != k:
        raise ValueError(f"a_int8 has {a.shape[1]} columns but K={k}")
    n_rows, n_cols = a.shape[0], nz.shape[1]
    epilogue = epilogue_args(n_rows, n_cols, row_scale, col_scale, bias)
    n_cols_padded = -(-n_cols // _QUAD_GROUP) * _QUAD_GROUP
    with threads_for(n_cols * k, _PARALLEL_MIN_ELEMENTS):
        w_quads = _expand_ternary_quads(nz, sign, k, n_cols_padded)
    # sum_k a t = sum_k (a + 128) t - 128 sum_k t
    col_offset = -128 * ternary_weight_sums(nz, sign)[None]
    a_quads = np.ascontiguousarray(_int8_quads(np.ascontiguousarray(a), k))
    row_offset = np.zeros((1, n_rows), np.int64)
    out = np.empty((1, n_rows, n_cols), np.int32 if epilogue is None else np.float32)
    if out.size:
        with threads_for(out.size * k, _PARALLEL_MIN_MACS) as threads:
            _quad_matmul(a_quads, w_quads, row_offset, col_offset, *(epilogue or (None, None, None)), out, threads,
                         True)
    return out[0]


def ternary_gemm_int8_reference(a_int8, w_nonzero, w_sign, K, row_scale=None, col_scale=None, bias=None):
    """NumPy reference of ternary_gemm_int8: exact int64 matmul of the unpacked ternary weight."""
    a = np.asarray(a_int8)
    dot = a.astype(np.int64) @ unpack_ternary(w_nonzero, w_sign, K).astype(np.int64).T
    epilogue = epilogue_args(a.shape[0], dot.shape[1], row_scale, col_scale, bias)
    if epilogue is None:
        return dot.astype(np.int32)
    rs, cs, bias = epilogue
    return dot.astype(np.float32) * rs[:, None] * cs[None, :] + bias[None, :]


def ternary_weight_quads(w_nonzero, w_sign, K):
    """A ternary weight's bit-planes [W, N] expanded once into the int8 quads [ceil(K/4), 4 * Npad]
    that ternary_gemm_quads reads (Npad = N rounded up to 16; rows 64-byte aligned, zero-padded):
    what ternary_gemm_int8 builds on every call, for a caller that keeps it (the packed engine)."""
    nz = check_words(w_nonzero, "w_nonzero", 2)
    sign = check_words(w_sign, "w_sign", 2)
    k = check_k(K, nz.shape[0], "w_nonzero")
    n_cols = nz.shape[1]
    with threads_for(n_cols * k, _PARALLEL_MIN_ELEMENTS):
        return _expand_ternary_quads(nz, sign, k, -(-n_cols // _QUAD_GROUP) * _QUAD_GROUP)


@njit(parallel=True, cache=True)
def _level_quads(levels, n_cols_padded, quads, sums):
    """quads[kq, 4n + q] = levels[n, 4kq + q] as int8 (zero-padded), sums[n] = sum_k levels[n, k]."""
    n_cols, k = levels.shape
    for kq in prange(quads.shape[0]):
        quads[kq, :] = 0
        for q in range(min(4, k - 4 * kq)):
            for n in range(n_cols):
                quads[kq, 4 * n + q] = np.int8(levels[n, 4 * kq + q])
    for n in prange(n_cols):
        total = 0
        for j in range(k):
            total += np.int64(levels[n, j])
        sums[n] = total


def weight_level_quads(levels):
    """A weight's integer levels [N, K] (float, each in [-127, 127]: ternary T, or 8-bit codes) as the
    int8 quads [ceil(K/4), 4 * Npad] that ternary_gemm_quads reads, laid out as ternary_weight_quads
    lays out a packed ternary weight, and their row sums int64 [N] (the zero-point corrections)."""
    levels = np.ascontiguousarray(levels)
    n_cols, k = levels.shape
    quads = aligned_empty(-(-k // 4), 4 * (-(-n_cols // _QUAD_GROUP) * _QUAD_GROUP), np.int8)
    sums = np.empty(n_cols, np.int64)
    with threads_for(n_cols * k, _PARALLEL_MIN_ELEMENTS):
        _level_quads(levels, quads.shape[1] // 4, quads, sums)
    return quads, sums


def ternary_gemm_quads(a_quads, w_quads, n_cols, col_offset, row_scale=None, col_scale=None, bias=None, w_max=127):
    """ternary_gemm_int8's product on operands laid out beforehand:

        out[m, n] = col_offset[n] + sum_kq dot4(a_quads[m, kq], w_quads[kq, 4n:4n+4])

    a_quads:    uint32 [M, Kq], 4 unsigned activation bytes per word (K zero-padded; a signed
                activation a enters as a + 128 with col_offset = -128 * ternary_weight_sums)
    w_quads:    int8 [Kq, 4 * Npad] from ternary_weight_quads
    col_offset: int64 [N]
    row_scale, col_scale, bias: optional float32 [M], [N], [N] as in binary_gemm
    w_max:      a bound of |w_quads| (1 for ternary weights; the default 127 holds for every 8-bit level):
                up to 64, one VPMADDUBSW a step on AVX2 CPUs, else two (intrinsics._dot4_step)
    Returns int32 [M, N] (exact) or the float32 epilogue float32(dot) * row_scale * col_scale + bias."""
    a = np.asarray(a_quads)
    w = np.asarray(w_quads)
    if a.dtype != np.uint32 or a.ndim != 2 or w.dtype != np.int8 or w.ndim != 2 or w.shape[0] != a.shape[1] \
            or w.shape[1] != 4 * (-(-n_cols // _QUAD_GROUP) * _QUAD_GROUP):
        raise ValueError(f"a_quads must be uint32 [M, Kq] and w_quads int8 [Kq, 4 * Npad] (ternary_weight_quads) "
                         f"for N={n_cols}; got {a.dtype} {a.shape} and {w.dtype} {w.shape}")
    n_rows = a.shape[0]
    epilogue = epilogue_args(n_rows, n_cols, row_scale, col_scale, bias)
    col_offset = np.ascontiguousarray(np.asarray(col_offset, np.int64).reshape(1, n_cols))
    out = np.empty((1, n_rows, n_cols), np.int32 if epilogue is None else np.float32)
    if out.size:
        with threads_for(out.size * 4 * a.shape[1], _PARALLEL_MIN_MACS) as threads:
            _quad_matmul(np.ascontiguousarray(a), w, np.zeros((1, n_rows), np.int64), col_offset,
                         *(epilogue or (None, None, None)), out, threads, bool(w_max <= 64))
    return out[0]
