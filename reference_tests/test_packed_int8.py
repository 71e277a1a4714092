"""The byte dot-product kernels of TerViT's packed inference (kernels.int8, kernels.ternary_gemm_quads)
against their NumPy references, and the fused 8-bit quantizer passes of engine.ternary_net against
quant.minmax_codes, bit for bit (exact zeros, ties and extremes included)."""
import numpy as np
import pytest

from minibvit import kernels, numerics, quant
from minibvit.engine import ternary_net
from minibvit.kernels import int8

pytestmark = pytest.mark.impl_specific


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 9), (24, 197, 197, 64), (2, 13, 64, 197), (1, 33, 17, 260)])
def test_uint8_int8_bmm_is_exact(shape):
    b, m, n, k = shape
    rng = np.random.default_rng(sum(shape))
    u = rng.integers(0, 256, (b, m, k)).astype(np.uint8)
    s = rng.integers(-128, 128, (b, n, k)).astype(np.int8)
    u[0, 0] = 255
    s[0, 0] = -128
    expected = u.astype(np.int64) @ s.astype(np.int64).swapaxes(-1, -2)
    np.testing.assert_array_equal(int8.uint8_int8_bmm_reference(u, s), expected)
    got = int8.uint8_int8_bmm(u, s)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)


def test_dot4_bmm_offset_and_float_epilogue():
    rng = np.random.default_rng(1)
    u = rng.integers(0, 256, (4, 11, 70)).astype(np.uint8)
    s = rng.integers(-127, 128, (4, 21, 70)).astype(np.int8)
    offset = rng.integers(-10_000, 10_000, (4, 21))
    s1, s2 = np.float32(0.013), np.float32(0.125)
    exact = int8.uint8_int8_bmm_reference(u, s).astype(np.int64) + offset[:, None, :]
    quads, panels = int8.byte_quads(u), int8.byte_panels(s)
    np.testing.assert_array_equal(int8.dot4_bmm(quads, panels, 21, offset), exact)
    got = int8.dot4_bmm(quads, panels, 21, offset, (s1, s2))
    expected = (exact.astype(np.float32) * s1) * s2          # two float32 roundings, in this order
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_dot4_bmm_rejects_bad_layouts():
    quads = int8.byte_quads(np.zeros((2, 3, 8), np.uint8))
    with pytest.raises(ValueError, match="b_panels"):
        int8.dot4_bmm(quads, np.zeros((2, 2, 4 * 16), np.int8), 17)
    with pytest.raises(TypeError, match="uint32"):
        int8.dot4_bmm(quads.astype(np.int32), np.zeros((2, 2, 64), np.int8), 5)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 100, 37), (130, 192, 300), (9, 768, 20)])
def test_ternary_gemm_quads_signed_and_unsigned(m, k, n):
    rng = np.random.default_rng(m + k + n)
    t = rng.integers(-1, 2, (n, k))
    nz, sign = kernels.pack_ternary_weight(t)
    quads = kernels.ternary.ternary_weight_quads(nz, sign, k)
    sums = kernels.ternary_weight_sums(nz, sign)
    a = rng.integers(-127, 128, (m, k)).astype(np.int8)
    a_quads = int8.byte_quads((a.astype(np.int16) + 128).astype(np.uint8)[None])[0]
    expected = kernels.ternary_gemm_int8_reference(a, nz, sign, k)
    np.testing.assert_array_equal(kernels.ternary.ternary_gemm_quads(a_quads, quads, n, -128 * sums), expected)
    codes = rng.integers(0, 256, (m, k)).astype(np.uint8)
    zp = 37
    expected = (codes.astype(np.int64) - zp) @ t.T
    got = kernels.ternary.ternary_gemm_quads(int8.byte_quads(codes[None])[0], quads, n, -zp * sums)
    np.testing.assert_array_equal(got, expected)
    cs = rng.uniform(0.01, 1.0, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    got = kernels.ternary.ternary_gemm_quads(int8.byte_quads(codes[None])[0], quads, n, -zp * sums,
                                             np.ones(m, np.float32), cs, bias)
    np.testing.assert_array_equal(got, expected.astype(np.float32) * cs + bias)


def _tensor(rng, shape):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x.reshape(-1)[:5] = [0.0, -0.0, 1.5, -2.5, 0.5]
    return x


@pytest.mark.parametrize("signed", [True, False])
def test_fused_quantizers_equal_minmax_codes(signed):
    rng = np.random.default_rng(3)
    for x in (_tensor(rng, (37, 70)), np.abs(_tensor(rng, (5, 64))), np.zeros((3, 9), np.float32)):
        codes, scale, zero_point = quant.minmax_codes(x, 8, signed, None)
        k = x.shape[1]
        out = np.empty((x.shape[0], 4 * -(-k // 4)), np.uint8)
        if signed:
            s, zp = ternary_net.minmax_scale(np.abs(x).max(), True)
            ternary_net.signed_quads(x, s, out)
            np.testing.assert_array_equal(out[:, :k].astype(np.int64) - 128, codes)
            assert (out[:, k:] == 128).all()
        else:
            lo, hi = ternary_net.min_max(x)
            assert lo == x.min() and hi == x.max()
            s, zp = ternary_net.minmax_scale((lo, hi), False)
            ternary_net.unsigned_quads(x, s, zp, out)
            np.testing.assert_array_equal(out[:, :k], codes)
        assert s == scale[0] and s.dtype == np.float32 and zp == zero_point[0]


@pytest.mark.parametrize("rows, n", [(1, 1), (13, 197), (75, 18), (64, 64)])
def test_fused_softmax_codes_equal_softmax_then_minmax_codes(rows, n):
    """The softmax's first pass (numerics.softmax_exp_rows, which attention_softmax runs on its score rows)
    + probability_codes give the codes quant.minmax_codes makes of ops.softmax_forward's
    probabilities, with the scale taken from the row sums alone (ties at the row maximum, uniform and
    one-hot rows included)."""
    from minibvit import ops
    rng = np.random.default_rng(rows + n)
    scores = (rng.standard_normal((rows, n)) * 4).astype(np.float32)
    scores[0] = 0.0                                   # a uniform row
    if rows > 2:
        scores[1, : n // 2] = scores[1].max()         # ties at the maximum
        scores[2] = -80.0
        scores[2, -1] = 10.0                          # one probability ~1, the others ~0
    probs, _ = ops.softmax_forward(scores)
    codes, scale, _ = quant.minmax_codes(probs, 8, False, None)
    exps, inv_sums = np.empty_like(scores), np.empty(rows)
    numerics.softmax_exp_rows(scores, exps, inv_sums, 0, rows)
    assert np.float32(inv_sums.max()) == probs.max()
    s, zp = ternary_net.minmax_scale((np.float32(0), np.float32(inv_sums.max())), False)
    assert s == scale[0] and zp == 0
    out = np.full((rows, 4 * -(-n // 4)), 7, np.uint8)
    ternary_net.probability_codes(exps, inv_sums, s, out)
    np.testing.assert_array_equal(out[:, :n], codes)
    assert (out[:, n:] == 0).all()


@pytest.mark.parametrize("n_heads, n_tokens, d", [(1, 1, 4), (3, 197, 64), (2, 30, 20), (5, 49, 33)])
def test_attention_softmax_equals_the_products_then_the_softmax_pass(n_heads, n_tokens, d):
    """attention_softmax (Q K^T on register tiles, its epilogue, the softmax's first pass on each block
    of rows) gives the bits of kernels.int8.dot4_bmm's scores then numerics.softmax_exp_rows on them."""
    from minibvit.kernels.int8 import byte_panels, byte_quads, dot4_bmm
    rng = np.random.default_rng(n_heads * n_tokens + d)
    u = rng.integers(0, 256, (n_heads, n_tokens, d)).astype(np.uint8)
    k = rng.integers(-127, 128, (n_heads, n_tokens, d)).astype(np.int8)
    q_quads, k_panels = byte_quads(u), byte_panels(k)
    k_offset = -128 * k.astype(np.int64).sum(axis=2)
    s_qk, inv_sqrt_d = np.float32(3e-4), np.float32(1 / np.sqrt(d))
    scores = dot4_bmm(q_quads, k_panels, n_tokens, k_offset, (s_qk, inv_sqrt_d)).reshape(-1, n_tokens)
    rows = n_heads * n_tokens
    expected_e, expected_inv = np.empty_like(scores), np.empty(rows)
    numerics.softmax_exp_rows(scores, expected_e, expected_inv, 0, rows)
    e, inv_sums = np.empty_like(scores), np.empty(rows)
    ternary_net.attention_softmax(q_quads, k_panels, k_offset, s_qk, inv_sqrt_d, e, inv_sums)
    np.testing.assert_array_equal(e, expected_e)
    np.testing.assert_array_equal(inv_sums, expected_inv)


@pytest.mark.parametrize("m, k, n", [(1, 5, 3), (45, 77, 96), (200, 192, 576), (131, 64, 600)])
def test_linear_with_stats_equals_the_linear_then_its_statistic(m, k, n):
    """The ternary linear with fc1's GELU and its min / max, or qkv's per-third max |x|, in the GEMM's
    epilogue: the outputs and statistics of the linear (ternary_gemm_quads) then ops.gelu_forward and
    NumPy's min / max, bit for bit (row counts off the 6-row tile, column counts off the 4-group tile)."""
    from minibvit import ops
    from minibvit.kernels.ternary import ternary_gemm_quads, weight_level_quads
    rng = np.random.default_rng(m + k + n)
    w_quads, sums = weight_level_quads(rng.integers(-1, 2, (n, k)).astype(np.float32))
    a_quads = rng.integers(0, 256, (m, 4 * -(-k // 4)), dtype=np.uint8)
    a_quads[:, k:] = 128                                  # the signed codes' K padding
    a_quads = a_quads.view(np.uint32)
    offset = -128 * sums
    scale = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    linear = ternary_gemm_quads(a_quads, w_quads, n, offset, np.ones(m, np.float32), scale, bias, w_max=1)
    out = np.empty((m, n), np.float32)
    lo, hi, _ = ternary_net.linear_with_stats(a_quads, w_quads, offset, scale, bias, ternary_net.LINEAR_GELU_MIN_MAX,
                                              out, 2)
    expected, _ = ops.gelu_forward(linear)
    np.testing.assert_array_equal(out, expected)
    assert lo == expected.min() and hi == expected.max()
    if n % 3 == 0:
        stats = ternary_net.linear_with_stats(a_quads, w_quads, offset, scale, bias, ternary_net.LINEAR_QKV_ABSMAX,
                                              out, 2)
        np.testing.assert_array_equal(out, linear)
        np.testing.assert_array_equal(stats, np.abs(linear.reshape(m, 3, n // 3)).max(axis=(0, 2)))


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 70, 33), (300, 192, 384), (130, 1536, 192)])
def test_binary_gemm_packing_equals_pack_then_gemm(m, k, n):
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x.reshape(-1)[:3] = [0.0, -0.0, np.nan][:x.size]
    w = kernels.pack_weight(rng.standard_normal((n, k)).astype(np.float32))
    a = kernels.pack_signs_reference(x)
    np.testing.assert_array_equal(kernels.binary_gemm_packing(x, w, k), kernels.binary_gemm_reference(a, w, k))
    np.testing.assert_array_equal(kernels.binary_gemm_packing(x.astype(np.float64), w, k),
                                  kernels.binary_gemm_reference(a, w, k))
    cs = rng.uniform(0.01, 1.0, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    np.testing.assert_array_equal(kernels.binary_gemm_packing(x, w, k, col_scale=cs, bias=bias),
                                  kernels.binary_gemm_reference(a, w, k, col_scale=cs, bias=bias))
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.binary_gemm_packing(x.astype(np.float16), w, k)


@pytest.mark.parametrize("max_over", ["tensor", "row"])
def test_gsb_attention_equals_the_nine_products(max_over):
    """engine.gsb_net.gsb_attention against the NumPy composition: gsb's masks, packed bases,
    the reference partial products and kernels.gsb_combine."""
    from minibvit.engine import gsb_net
    from minibvit.gsb import gsb_attn_masks, gsb_value_masks

    rng = np.random.default_rng(5)
    n_images, n_tokens, n_heads, d = 2, 70, 3, 24
    dim = n_heads * d
    logits = rng.standard_normal((n_images * n_heads * n_tokens, n_tokens)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs[0, :5] = 0.0
    qkv = rng.standard_normal((n_images * n_tokens, 3 * dim)).astype(np.float32)
    qkv[0, 2 * dim:2 * dim + 4] = 0.0
    gsb = {"attn_alphas": np.array([0.02, 0.01, 0.03], np.float32),
           "attn_bias": (rng.standard_normal((n_heads, n_tokens, n_tokens)) * 0.01).astype(np.float32),
           "v_alphas": np.array([0.5, 0.25, 0.75], np.float32),
           "v_shift": (rng.standard_normal((n_heads, d)) * 0.1).astype(np.float32)}
    got = gsb_net.gsb_attention(probs, qkv, gsb, n_images, n_tokens, n_heads, max_over)

    y = probs.reshape(n_images, n_heads, n_tokens, n_tokens) + gsb["attn_bias"]
    t1, t2 = gsb_attn_masks(y, max_over)
    level1 = np.clip(np.rint(y / gsb["attn_alphas"][0]), 0, 1) != 0
    a_bases = kernels.pack_bits(np.stack([level1, t1, t2], axis=2).reshape(-1, 3, n_tokens, n_tokens))
    v = qkv.reshape(n_images, n_tokens, 3, n_heads, d)[:, :, 2].transpose(0, 2, 1, 3)
    yv = v - gsb["v_shift"][:, None, :]
    t1v, t2v = gsb_value_masks(yv)
    v_signs = kernels.pack_signs(yv.swapaxes(-1, -2)).reshape(n_images * n_heads, d, -1)
    v_masks = kernels.pack_bits(np.stack([t1v, t2v], axis=2).swapaxes(-1, -2)).reshape(n_images * n_heads, 2, d, -1)
    partial = kernels.gsb_partial_products_reference(a_bases, v_signs, v_masks, n_tokens)
    expected = kernels.gsb_combine(partial.transpose(1, 2, 0, 3, 4), gsb["attn_alphas"], gsb["v_alphas"])
    np.testing.assert_array_equal(got, expected.astype(np.float32))
