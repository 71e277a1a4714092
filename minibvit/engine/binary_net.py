"""binary / binaryvit with every decision tabulated: the whole network in one parallel region.

Waking OpenMP's sleeping worker and waiting for it at the end of a region cost ~50 us each on
the 2-core VM these were measured on, and a forward ran ~10 Numba regions per block: at batch 8
two threads were no faster than one. Here each thread takes a contiguous share of the images
and runs all blocks on them, a few images at a time; the blocks treat every image on its own, so
the bits are those of the per-kernel path. The popcount products call kernels' one-thread core
(kernels.binary.panel_rows on aligned weight panels, the layout of kernels.binary_gemm's tasks).
"""
from collections import namedtuple

import numpy as np
from numba import njit, prange

from ..intrinsics import popcount
from ..kernels.binary import aligned_empty, column_blocks, copy_panel, panel_rows
from .fused import (pack_heads_intervals, pack_interval_rows, pack_qkv_intervals, residual_norm_pack_rows,
                    score_softmax_rows)

BinaryNet = namedtuple("BinaryNet", [
    "norm1_weight", "norm1_bias", "qkv_threshold",        # [L, D] float32: norm1, qkv input binarizer
    "qkv_panels", "qkv_lo", "qkv_span", "qkv_flip",       # panels [L, blocks, Wd, width]; intervals [L, 3D]
    "exp_tables", "exp_tables64", "exp_monotone",         # [L, 2d+1, 2d+1] float32 / float64, [L] bool
    "attn_alpha", "attn_level_min",                       # [L] float32: alpha, level_threshold(alpha)
    "heads_lo", "heads_span", "heads_flip",               # proj input intervals [L, D]
    "proj_panels", "proj_scale", "proj_bias",             # proj epilogue [L, D]
    "norm2_weight", "norm2_bias", "fc1_threshold",        # [L, D]
    "fc1_panels", "fc1_lo", "fc1_span", "fc1_flip",       # fc2 input intervals [L, Hd]
    "fc2_panels", "fc2_colsum", "fc2_scale", "fc2_bias",  # fc2 epilogue [L, D]
    "eps"])


@njit(cache=True)
def weight_panels(w_packed_T):
    """A packed weight [W, N] as kernels' aligned, zero-padded panels [blocks, W, width]."""
    n_words, n_cols = w_packed_T.shape
    blocks, width = column_blocks(n_cols)
    panels = aligned_empty(blocks * n_words, width, np.uint64).reshape((blocks, n_words, width))
    planes = w_packed_T.reshape((1, n_words, n_cols))
    for cb in range(blocks):
        panels[cb] = copy_panel(planes, 0, cb * width, min(width, n_cols - cb * width), width)
    return panels


@njit(inline="always")
def _gemm_rows(a, panels, row_offset, row_scale, col_scale, bias, out):
    """out[0] = binary_gemm of a[0] [M, W] with the weight of `panels` (see weight_panels), one
    thread: int32 (row_scale None) or its float32 epilogue."""
    n_cols, width = out.shape[2], panels.shape[2]
    for cb in range(panels.shape[0]):
        n0 = cb * width
        panel_rows(a, 0, 0, a.shape[1], panels[cb], None, n0, min(width, n_cols - n0), width,
                            row_offset, None, row_scale, col_scale, bias, out)


@njit(inline="always")
def _batched_rows(a, t, x_planes, y_planes, row_offset, out):
    """out[t] = the popcount-matmul product (kernels.binary) of a[t] with the planes of batch entry t, one
    thread: x_planes given: row_offset - 2 popcount(a ^ x) (binary_bmm); y_planes given:
    row_offset - 2 popcount(a & y) (and_bmm)."""
    n_cols = out.shape[2]
    blocks, width = column_blocks(n_cols)
    for cb in range(blocks):
        n0 = cb * width
        nb = min(width, n_cols - n0)
        panel_rows(a, t, 0, a.shape[1], copy_panel(x_planes, t, n0, nb, width),
                            copy_panel(y_planes, t, n0, nb, width), n0, nb, width, row_offset, None, None,
                            None, None, out)


@njit(cache=True)
def _binary_net_chunk(x, n_images, n_tokens, n_heads, net):
    """Every block of the binary network on the stream x [b*N, D] of n_images images, in place."""
    rows, dim = x.shape
    d = dim // n_heads
    hidden = net.fc1_lo.shape[1]
    bh = n_images * n_heads
    d_words, n_words = (d + 63) // 64, (n_tokens + 63) // 64
    bits = np.empty((1, rows, (dim + 63) // 64), np.uint64)
    h_bits = np.empty((1, rows, (hidden + 63) // 64), np.uint64)
    qkv = np.empty((1, rows, 3 * dim), np.int32)
    q_bits = np.empty((bh, n_tokens, d_words), np.uint64)
    k_words = np.empty((bh, d_words, n_tokens), np.uint64)
    v_words = np.empty((bh, n_words, d), np.uint64)
    scores = np.empty((bh, n_tokens, n_tokens), np.int32)
    p_bits = np.empty((bh, n_tokens, n_words), np.uint64)
    p_count = np.empty((bh, n_tokens), np.int64)
    o = np.empty((bh, n_tokens, d), np.int32)
    proj = np.empty((1, rows, dim), np.float32)
    fc1 = np.empty((1, rows, hidden), np.int32)
    fc2 = np.empty((1, rows, dim), np.int32)
    dim_offset = np.full((1, rows), dim, np.int64)
    hidden_offset = np.full((1, rows), hidden, np.int64)
    d_offset = np.full((bh, n_tokens), d, np.int64)
    ones = np.ones(rows, np.float32)
    no_probs = np.empty((0, n_tokens), np.float32)
    colsum, scale, bias = net.fc2_colsum[0], net.fc2_scale[0], net.fc2_bias[0]
    residual_norm_pack_rows(x, x, fc2[0], colsum, scale, bias, 0, net.norm1_weight[0], net.norm1_bias[0], net.eps,
                             net.qkv_threshold[0], bits[0], x, 1, 0, rows)
    depth = net.norm1_weight.shape[0]
    for layer in range(depth):
        _gemm_rows(bits, net.qkv_panels[layer], dim_offset, None, None, None, qkv)
        pack_qkv_intervals(qkv[0], net.qkv_lo[layer], net.qkv_span[layer], net.qkv_flip[layer], n_images, n_tokens,
                            n_heads, q_bits, k_words, v_words)
        for t in range(bh):
            _batched_rows(q_bits, t, k_words, None, d_offset, scores)
            score_softmax_rows(scores[t], net.exp_tables[layer], net.exp_tables64[layer], net.exp_monotone[layer],
                          no_probs, net.attn_alpha[layer], net.attn_level_min[layer], p_bits[t], 0, n_tokens)
            for n in range(n_tokens):
                count = 0
                for w in range(n_words):
                    count += popcount(p_bits[t, n, w])
                p_count[t, n] = count
            _batched_rows(p_bits, t, None, v_words, p_count, o)
        pack_heads_intervals(o, net.heads_lo[layer], net.heads_span[layer], net.heads_flip[layer], n_tokens, n_heads,
                              bits[0])
        _gemm_rows(bits, net.proj_panels[layer], dim_offset, ones, net.proj_scale[layer], net.proj_bias[layer], proj)
        residual_norm_pack_rows(x, proj[0], fc2[0], colsum, scale, bias, 1, net.norm2_weight[layer],
                                 net.norm2_bias[layer], net.eps, net.fc1_threshold[layer], bits[0], x, 1, 0, rows)
        _gemm_rows(bits, net.fc1_panels[layer], dim_offset, None, None, None, fc1)
        pack_interval_rows(fc1[0], net.fc1_lo[layer], net.fc1_span[layer], net.fc1_flip[layer], h_bits[0])
        _gemm_rows(h_bits, net.fc2_panels[layer], hidden_offset, None, None, None, fc2)
        following = min(layer + 1, depth - 1)
        residual_norm_pack_rows(x, proj[0], fc2[0], net.fc2_colsum[layer], net.fc2_scale[layer], net.fc2_bias[layer],
                                 2, net.norm1_weight[following], net.norm1_bias[following], net.eps,
                                 net.qkv_threshold[following], bits[0], x, 1 if layer + 1 < depth else 0, 0, rows)


@njit(parallel=True, cache=True)
def run_binary_net(x, n_images, n_tokens, n_heads, net, groups, step):
    """Every block on the stream x [B*N, D] (float32, in place): one parallel task per group of
    images (contiguous shares), each run through _binary_net_chunk `step` images at a time."""
    for g in prange(groups):
        i0, i1 = g * n_images // groups, (g + 1) * n_images // groups
        for s0 in range(i0, i1, step):
            s1 = min(s0 + step, i1)
            _binary_net_chunk(x[s0 * n_tokens:s1 * n_tokens], s1 - s0, n_tokens, n_heads, net)
