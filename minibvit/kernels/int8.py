"""8-bit x 8-bit batched matrix products on byte dot products (TerViT's attention products
Q_q K_q^T and A_q V_q), each with a NumPy reference.

    out[b, m, n] = col_offset[b, n] + sum_k u[b, m, k] * s[b, n, k]      u uint8, s int8

exact in int32 (the callers' sums stay far below 2^31: 64 * 255 * 127 for Q K^T, 197 * 255 * 127 for
A V), or its float32 epilogue float32(out) * s1 * s2 (two roundings, no fused multiply-add), which is
ops.levels_matmul's "float32 integer product, times the scale" followed by a second scale (the
attention's 1/sqrt(d)). A signed left operand a enters as u = a + 128 with
col_offset = -128 * sum_k s[b, n, k] (as kernels.ternary_gemm_int8 does).

Layouts (the packed engine writes them directly; byte_quads / byte_panels build them from plain
arrays):
    a_quads  uint32 [B, M, ceil(K/4)]        4 consecutive K of one row per word (bytes of u)
    b_panels int8 [B, ceil(K/4), 4 * Npad]   [b, kq, 4n + q] = s[b, n, 4kq + q], Npad = N rounded up
                                             to 16, zero-padded along K and N
The inner step is kernels.ternary's register tile (VPDPBUSD on AVX512-VNNI, 16 columns x 4 K per
instruction; on AVX2, VPMADDUBSW on the activation bytes' nibbles, exact for every u8 x s8).
"""
import numpy as np
from numba import njit, prange

from ..intrinsics import DOT4_LANES
from .binary import aligned_empty
from .ternary import TILE_ROWS, dot4_rows

_GROUP = DOT4_LANES


def padded_columns(n_cols):
    """N rounded up to whole 16-column groups (the width of b_panels is 4 times this)."""
    return -(-n_cols // _GROUP) * _GROUP


@njit(cache=True, boundscheck=False)
def dot4_bmm_rows(a_quads, b_panels, col_offset, s1, s2, t, out):
    """out[t] of dot4_bmm, one thread."""
    n_rows, n_cols = out.shape[1], out.shape[2]
    groups = b_panels.shape[2] // (4 * _GROUP)
    accs = aligned_empty(TILE_ROWS, _GROUP * groups, np.int32)
    a, panel = a_quads[t], b_panels[t]
    for m in range(0, n_rows, TILE_ROWS):
        rows = min(TILE_ROWS, n_rows - m)
        dot4_rows(a, m, rows, panel, groups, accs, False)
        for r in range(rows):
            acc, orow = accs[r], out[t, m + r]
            if col_offset is None:
                if s1 is None:
                    for j in range(n_cols):
                        orow[j] = acc[j]
                else:
                    for j in range(n_cols):
                        orow[j] = np.float32(acc[j]) * s1 * s2
            else:
                coff = col_offset[t]
                if s1 is None:
                    for j in range(n_cols):
                        orow[j] = coff[j] + acc[j]
                else:
                    for j in range(n_cols):
                        orow[j] = np.float32(coff[j] + acc[j]) * s1 * s2


@njit(parallel=True, cache=True, boundscheck=False)
def _dot4_bmm(a_quads, b_panels, col_offset, s1, s2, out):
    for t in prange(out.shape[0]):
        dot4_bmm_rows(a_quads, b_panels, col_offset, s1, s2, t, out)


def dot4_bmm(a_quads, b_panels, n_cols, col_offset=None, scales=None):
    """Batched byte dot-product matmul (see the module docstring).

    Inputs:
        a_quads:    uint32 [B, M, Kq]
        b_panels:   int8 [B, Kq, 4 * padded_columns(n_cols)]
        n_cols:     N
        col_offset: optional int32/int64 [B, N], added to every row
        scales:     optional (s1, s2) float32: float32 output float32(dot) * s1 * s2
    Returns:
        int32 [B, M, N] (exact), or float32 [B, M, N] with scales.
    """
    a = np.asarray(a_quads)
    b = np.asarray(b_panels)
    if a.dtype != np.uint32 or a.ndim != 3 or b.dtype != np.int8 or b.ndim != 3:
        raise TypeError(f"a_quads must be uint32 [B, M, Kq] and b_panels int8 [B, Kq, 4*Npad]; got {a.dtype} "
                        f"{a.shape} and {b.dtype} {b.shape}")
    if b.shape[:2] != (a.shape[0], a.shape[2]) or b.shape[2] != 4 * padded_columns(n_cols):
        raise ValueError(f"b_panels {b.shape} must be [B, Kq, 4 * padded_columns(N)] = "
                         f"[{a.shape[0]}, {a.shape[2]}, {4 * padded_columns(n_cols)}] for a_quads {a.shape}, N={n_cols}")
    if col_offset is not None:
        col_offset = np.ascontiguousarray(col_offset, np.int64)
        if col_offset.shape != (a.shape[0], n_cols):
            raise ValueError(f"col_offset must have shape ({a.shape[0]}, {n_cols}), got {col_offset.shape}")
    s1, s2 = (None, None) if scales is None else (np.float32(scales[0]), np.float32(scales[1]))
    out = np.empty((a.shape[0], a.shape[1], n_cols), np.int32 if scales is None else np.float32)
    if out.size:
        _dot4_bmm(np.ascontiguousarray(a), np.ascontiguousarray(b), col_offset, s1, s2, out)
    return out


def byte_quads(u):
    """uint8 [B, M, K] -> uint32 [B, M, ceil(K/4)] (K zero-padded)."""
    u = np.asarray(u, np.uint8)
    k = u.shape[-1]
    padded = np.zeros(u.shape[:-1] + (4 * -(-k // 4),), np.uint8)
    padded[..., :k] = u
    return padded.view("<u4").astype(np.uint32, copy=False)


def byte_panels(s):
    """int8 [B, N, K] -> int8 [B, ceil(K/4), 4 * padded_columns(N)] (the b_panels layout)."""
    s = np.asarray(s, np.int8)
    n_batch, n_cols, k = s.shape
    kq = -(-k // 4)
    panels = np.zeros((n_batch, kq, padded_columns(n_cols), 4), np.int8)
    padded = np.zeros((n_batch, n_cols, 4 * kq), np.int8)
    padded[..., :k] = s
    panels[:, :, :n_cols, :] = padded.reshape(n_batch, n_cols, kq, 4).transpose(0, 2, 1, 3)
    return panels.reshape(n_batch, kq, -1)


def uint8_int8_bmm(u, s):
    """out[b] = u[b] @ s[b].T for uint8 u [B, M, K] and int8 s [B, N, K]: int32 [B, M, N], exact."""
    u, s = np.asarray(u), np.asarray(s)
    if u.dtype != np.uint8 or s.dtype != np.int8 or u.ndim != 3 or s.ndim != 3 \
            or u.shape[0] != s.shape[0] or u.shape[2] != s.shape[2]:
        raise ValueError(f"need uint8 u [B, M, K] and int8 s [B, N, K]; got {u.dtype} {u.shape}, {s.dtype} {s.shape}")
    return dot4_bmm(byte_quads(u), byte_panels(s), s.shape[1])


def uint8_int8_bmm_reference(u, s):
    """NumPy reference of uint8_int8_bmm: int64 matmul."""
    return np.matmul(np.asarray(u).astype(np.int64), np.asarray(s).astype(np.int64).swapaxes(-1, -2)).astype(np.int32)
