"""The fused quantizer kernels (minibvit.kernels.quantize) and the popcount forward products
(ops.packed_matmul, ops.packed_basis_matmul) against the NumPy formulas they replace, bit for bit."""
import numpy as np
import pytest

from minibvit import ops, quant
from minibvit.kernels import pack, quantize

pytestmark = pytest.mark.impl_specific

SHAPES = [(1,), (7,), (8,), (129,), (3, 5, 17), (2, 3, 65, 64), (1000, 33), (70001,), (4, 65, 384)]


def _bits(a):
    return np.asarray(a).tobytes()


def _numpy_path(fn, *args):
    saved = quant.USE_FUSED
    quant.USE_FUSED = False
    try:
        return fn(*args)
    finally:
        quant.USE_FUSED = saved


def _case(rng, shape, dtype):
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    x.flat[::7] = 0  # exact zeros: sign(0) = +1
    x.flat[1::11] = -0.0
    x.flat[2::13] = 0.9  # |q| == 1 exactly at alpha 0.9
    x.flat[3::17] = 0.45  # q == 0.5: round half to even
    return x, rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("signed, alpha_grad", [(True, "lsq"), (True, "gsb"), (False, "lsq")])
def test_elastic_fused_bit_identical(shape, dtype, signed, alpha_grad):
    x, dout = _case(np.random.default_rng(len(shape) * 100 + shape[-1]), shape, dtype)
    alpha = np.array([0.9], dtype)
    out, cache = quant.elastic_binarize_forward(x, alpha, signed, alpha_grad)
    dx, dalpha = quant.elastic_binarize_backward(dout, cache)
    ref_out, ref_cache = _numpy_path(quant.elastic_binarize_forward, x, alpha, signed, alpha_grad)
    ref_dx, ref_dalpha = _numpy_path(quant.elastic_binarize_backward, dout, ref_cache)
    assert cache[-1] is not None and ref_cache[-1] is None  # the fused path ran, and the NumPy one
    for got, want in ((out, ref_out), (dx, ref_dx), (dalpha, ref_dalpha)):
        assert got.dtype == want.dtype and got.shape == want.shape and _bits(got) == _bits(want)
    recomputed = quant.ElasticBinarizer(signed, alpha_grad, dtype).recompute(cache)  # from the bits, signed
    assert recomputed.dtype == out.dtype and recomputed.shape == out.shape and _bits(recomputed) == _bits(out)


def _q_view(x):
    """x (B, H, N, d) placed as the attention's q in a (B, N, 3, H, d) array (split_heads_grad_views'
    layout), the rest NaN: (the view, the whole array)."""
    b, h, n, d = x.shape
    qkv = np.full((b, n, 3, h, d), np.nan, x.dtype)
    view = qkv[:, :, 0].transpose(0, 2, 1, 3)
    view[...] = x
    return view, qkv


@pytest.mark.parametrize("shape", [(2, 3, 65, 64), (1, 2, 9, 7), (2, 1, 300, 130)], ids=str)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("signed, alpha_grad", [(True, "lsq"), (True, "gsb"), (False, "lsq")])
def test_elastic_backward_writes_into_a_view(shape, fused, signed, alpha_grad):
    """out=: dx lands in a view of a larger gradient (the attention's dq in the qkv gradient), with the
    bits of the NumPy path's new array, and nothing outside the view is touched."""
    x, dout = _case(np.random.default_rng(13), shape, np.float32)
    alpha = np.array([0.9], np.float32)
    ref_dx, ref_dalpha = _numpy_path(lambda: quant.elastic_binarize_backward(
        dout, quant.elastic_binarize_forward(x, alpha, signed, alpha_grad)[1]))
    view, whole = _q_view(np.zeros(shape, np.float32))
    run = (lambda f: f()) if fused else _numpy_path
    dx, dalpha = run(lambda: quant.elastic_binarize_backward(
        dout, quant.elastic_binarize_forward(x, alpha, signed, alpha_grad)[1], out=view))
    assert dx is view and _bits(np.ascontiguousarray(dx)) == _bits(ref_dx) and _bits(dalpha) == _bits(ref_dalpha)
    assert np.isnan(whole[:, :, 1:]).all()


@pytest.mark.parametrize("k", [6, 64])
def test_elastic_backward_copies_into_an_out_it_cannot_address(k):
    """An out whose last axis is strided (no row table), or whose rows are short, gets dx by a copy:
    the same bits; an out of another shape is refused."""
    x, dout = _case(np.random.default_rng(14), (4, k), np.float32)
    _, cache = quant.elastic_binarize_forward(x, np.array([0.9], np.float32), True)
    want, _ = quant.elastic_binarize_backward(dout, cache)
    out = np.zeros((k, 4), np.float32).T
    got, _ = quantize.elastic_backward(quantize.SIGNED_LSQ, x, dout, np.float32(0.9), out=out)
    assert got is out and _bits(np.ascontiguousarray(got)) == _bits(want)
    with pytest.raises(ValueError, match="must be a float32 array of shape"):
        quantize.elastic_backward(quantize.SIGNED_LSQ, x, dout, np.float32(0.9), out=np.zeros((4, k + 1), np.float32))


@pytest.mark.parametrize("shape", [(5, 64), (3, 65, 130), (2, 3, 17, 64)], ids=str)
@pytest.mark.parametrize("signed", [True, False])
def test_elastic_packed_form_is_packed_integer_form(shape, signed):
    x, _ = _case(np.random.default_rng(3), shape, np.float32)
    q = quant.make_quantizer("a_elastic_signed" if signed else "a_elastic_unsigned")
    _, cache = q.forward(x, True)
    levels, scale = q.integer_form(cache)
    bits, kind, packed_scale, k = q.packed_form(cache)
    assert kind == ("sign" if signed else "unit") and k == shape[-1] and _bits(packed_scale) == _bits(scale)
    want = pack.pack_signs_reference(levels) if signed else pack.pack_bits_reference(levels)
    assert np.array_equal(bits, want)
    if signed:
        columns, _, _, k2 = q.packed_form(cache, -2)
        assert k2 == shape[-2]
        assert np.array_equal(columns, pack.pack_signs_reference(np.swapaxes(levels, -1, -2)))


def test_column_packers_match_the_reference():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 130, 7)).astype(np.float32)
    x[0, :5] = 0.0
    x[1, 3, 2], x[2, 70, 6] = np.nan, -0.0  # sign(NaN) = -1, sign(-0.) = +1, as quant.sign
    negative = ~(np.swapaxes(x, -1, -2) >= 0)  # quant.sign's -1 (pack_signs_reference: x < 0, NaN as +1)
    assert np.array_equal(quantize.pack_sign_columns(x), pack.pack_bits_reference(negative))
    mask = rng.random((3, 130, 7)) < 0.3
    assert np.array_equal(quantize.pack_mask_columns(mask), pack.pack_bits_reference(np.swapaxes(mask, -1, -2)))


@pytest.mark.parametrize("a_kind", ["sign", "unit"])
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("zero_scale", [False, True])
def test_packed_matmul_equals_levels_matmul(a_kind, weight, zero_scale):
    rng = np.random.default_rng(5)
    k, m, n = 130, 9, 11
    if a_kind == "sign":
        a_levels = np.where(rng.random((2, 3, m, k)) < 0.5, -1.0, 1.0).astype(np.float32)
        a_bits = pack.pack_signs(a_levels)
    else:
        a_levels = (rng.random((2, 3, m, k)) < 0.5).astype(np.float32)
        a_bits = pack.pack_bits(a_levels)
    b_shape = (n, k) if weight else (2, 3, n, k)
    b_levels = np.where(rng.random(b_shape) < 0.5, -1.0, 1.0).astype(np.float32)
    a_scale = np.float32(0.37).reshape(())
    b_scale = rng.random(n).astype(np.float32) if weight else np.float32(1.7).reshape(())
    if zero_scale:  # a zero scale: -0. where the integer is negative (the epilogue would give +0.)
        b_scale = np.where(np.arange(n) == 0, 0, b_scale).astype(np.float32) if weight else np.float32(0).reshape(())
    got = ops.packed_matmul(a_bits, a_kind, a_scale, pack.pack_signs(b_levels), "sign", b_scale, k)
    a2 = a_levels.reshape(-1, k) if weight else a_levels
    want = ops.levels_matmul(a2, a_scale, np.swapaxes(b_levels, -1, -2), b_scale)
    assert _bits(got.reshape(want.shape)) == _bits(want)


def test_packed_basis_matmul_equals_basis_matmul():
    rng = np.random.default_rng(6)
    lead, m, k, d = (2, 3), 17, 70, 8
    a_bases = [(rng.random(lead + (m, k)) < p).astype(np.float32) for p in (0.5, 0.2, 0.1)]
    signs = np.where(rng.random(lead + (k, d)) < 0.5, -1.0, 1.0).astype(np.float32)
    t1 = rng.random(lead + (k, d)) < 0.3
    t2 = t1 & (rng.random(lead + (k, d)) < 0.5)
    a_scales = np.array([0.3, 0.2, 0.1], np.float32)
    v_scales = np.array([1.1, 0.7, 0.4], np.float32)
    want = ops.basis_matmul(a_bases, a_scales, [signs, t1 * signs, t2 * signs], v_scales, np.float32)
    got = ops.packed_basis_matmul(np.stack([pack.pack_bits(b) for b in a_bases], axis=-3), a_scales,
                                  quantize.pack_sign_columns(signs),
                                  np.stack([quantize.pack_mask_columns(t1), quantize.pack_mask_columns(t2)], axis=-3),
                                  v_scales, k, np.float32)
    assert got.dtype == want.dtype and _bits(got) == _bits(want)


@pytest.mark.parametrize("signed", [True, False])
def test_elastic_fused_nan_as_numpy(signed):
    x = np.array([np.nan, 0.0, -0.0, 0.3, -2.0, np.nan, 1.7, -0.2] * 9, np.float32)
    alpha = np.array([0.9], np.float32)
    out, cache = quant.elastic_binarize_forward(x, alpha, signed)
    ref_out, _ = _numpy_path(quant.elastic_binarize_forward, x, alpha, signed)
    assert cache[-1] is not None and _bits(out) == _bits(ref_out)
    assert _bits(quant.ElasticBinarizer(signed).recompute(cache)) == _bits(out)


@pytest.mark.parametrize("shape", [(3, 5, 17), (2, 65, 192)], ids=str)
@pytest.mark.parametrize("signed", [True, False])
def test_elastic_fused_shift_is_numpy_subtraction(shape, signed):
    rng = np.random.default_rng(7)
    x, dout = _case(rng, shape, np.float32)
    shift = rng.standard_normal(shape[-1]).astype(np.float32)
    shift[:3] = x.reshape(-1, shape[-1])[0, :3]  # exact zeros after the shift
    alpha = np.array([0.9], np.float32)
    strided = np.swapaxes(np.swapaxes(x, 0, -2).copy(), 0, -2)  # the same values, not C-contiguous
    out, cache = quant.elastic_binarize_forward(strided, alpha, signed, shift=shift)
    ref_out, ref_cache = _numpy_path(quant.elastic_binarize_forward, x - shift, alpha, signed)
    assert cache[-1] is not None and cache[0].flags.c_contiguous
    assert _bits(out) == _bits(ref_out) and _bits(cache[0]) == _bits(ref_cache[0])
    dx, dalpha = quant.elastic_binarize_backward(dout, cache)
    ref_dx, ref_dalpha = _numpy_path(quant.elastic_binarize_backward, dout, ref_cache)
    assert _bits(dx) == _bits(ref_dx) and _bits(dalpha) == _bits(ref_dalpha)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 7, 64, 192, 200, 768, 1000])
@pytest.mark.parametrize("scale, center", [("channel", True), ("channel", False), ("tensor", True), ("none", False)])
@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_weight_binarizer_fused_bit_identical(k, dtype, scale, center, ste):
    rng = np.random.default_rng(k)
    w = (rng.standard_normal((9, k)) * 0.02).astype(dtype)
    w[0] = 0.0  # a constant row: W_c = 0, sign(0) = +1, alpha 0
    w[1, ::3] = -0.0
    w[2] *= 100  # |W_c| > 1 here and there: the clipped STE's derivative is 0 there
    w[3, :3] = [1.0, -1.0, np.nan] if k >= 3 else w[3, :3]  # |W_c| == 1 without centring; NaN
    dout = rng.standard_normal(w.shape).astype(dtype)
    dout[4, ::5] = -0.0
    out, cache = quant.weight_binarize_forward(w, scale, center, ste)
    ref_out, ref_cache = _numpy_path(quant.weight_binarize_forward, w, scale, center, ste)
    assert cache[4] is not None and ref_cache[4] is None
    assert _bits(out) == _bits(ref_out) and _bits(cache[2]) == _bits(ref_cache[2]) and _bits(cache[3]) == _bits(ref_cache[3])
    assert (cache[0] is None) == (ref_cache[0] is None)  # the STE's derivative: none for the identity
    assert cache[0] is None or _bits(cache[0]) == _bits(ref_cache[0])
    assert np.array_equal(cache[4], pack.pack_signs_reference(ref_cache[2]))
    got = quant.weight_binarize_backward(dout, cache)
    want = _numpy_path(quant.weight_binarize_backward, dout, ref_cache)
    assert got.dtype == want.dtype and _bits(got) == _bits(want)


def _gsb_case(rng, shape, dtype, kind):
    x = rng.standard_normal(shape).astype(dtype) if kind == "v" else rng.random(shape).astype(dtype) * 0.1
    flat = x.reshape(-1)
    flat[::7] = 0.0
    flat[1::11] = -0.0
    flat[5] = flat.max() * 0.95 if kind == "a" else flat[5]
    return x, rng.standard_normal(shape).astype(dtype)


def _counting(monkeypatch, names):
    from minibvit.kernels import gsb as gsb_kernels

    calls = []
    for name in names:
        fn = getattr(gsb_kernels, name)
        monkeypatch.setattr(gsb_kernels, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    return calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["official", "principled"])
@pytest.mark.parametrize("shape", [(2, 3, 65, 64), (1, 1, 5, 3), (3, 2, 129, 32)], ids=str)
@pytest.mark.parametrize("special", ["none", "zeros", "nan"])
def test_gsb_value_fused_bit_identical(monkeypatch, shape, mode, dtype, special):
    from minibvit import gsb

    x, dout = _gsb_case(np.random.default_rng(shape[2]), shape, dtype, "v")
    if special == "zeros":
        x[...] = 0.0  # every group but the first empty: zero alpha gradients, no NaN
    elif special == "nan":
        x.reshape(-1)[3] = np.nan
    alphas = np.array([0.8, 0.3, 0.2], dtype)
    calls = _counting(monkeypatch, ["value_forward", "value_backward"])
    out, cache = gsb.gsb_value_forward(x, alphas, mode)
    dv, da = gsb.gsb_value_backward(dout, cache)
    ref_out, ref_cache = _numpy_path(gsb.gsb_value_forward, x, alphas, mode)
    ref_dv, ref_da = _numpy_path(gsb.gsb_value_backward, dout, ref_cache)
    assert calls == ["value_forward", "value_backward"]
    for got, want in ((out, ref_out), (dv, ref_dv), (da, ref_da), (cache[2], ref_cache[2]), (cache[3], ref_cache[3]),
                      (cache[4], ref_cache[4])):
        assert got.dtype == want.dtype and got.shape == want.shape and _bits(got) == _bits(want)
    quantizer = gsb.GSBValueQuantizer(shape[1], shape[3], mode, dtype)  # the backward's recompute: out again
    recomputed = _counting(monkeypatch, ["value_output"])
    assert _bits(quantizer.recompute(cache)) == _bits(ref_out) and recomputed == ["value_output"]
    assert _bits(_numpy_path(quantizer.recompute, ref_cache)) == _bits(ref_out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 65, 65), (1, 1, 5, 5), (3, 2, 17, 17)], ids=str)
@pytest.mark.parametrize("special", ["none", "zeros", "nan", "ties"])
def test_gsb_attn_fused_bit_identical(monkeypatch, shape, dtype, special):
    from minibvit import gsb

    a, dout = _gsb_case(np.random.default_rng(shape[2] + 1), shape, dtype, "a")
    alphas = np.array([0.1, 0.03, 0.02], dtype)
    if special == "zeros":
        a[...] = 0.0
    elif special == "nan":
        a.reshape(-1)[2] = np.nan
    elif special == "ties":
        ties = alphas[0] * np.array([0.5, 1.5, 1.0, 2.5], dtype).repeat(6)  # round half to even
        a.reshape(-1)[:ties.size] = ties[:a.size]
    calls = _counting(monkeypatch, ["attn_forward", "attn_backward_official"])
    out, cache = gsb.gsb_attn_forward(a, alphas)
    da, dal = gsb.gsb_attn_backward(dout, cache)
    ref_out, ref_cache = _numpy_path(gsb.gsb_attn_forward, a, alphas)
    ref_da, ref_dal = _numpy_path(gsb.gsb_attn_backward, dout, ref_cache)
    assert calls == ["attn_forward", "attn_backward_official"]
    for got, want in ((out, ref_out), (da, ref_da), (dal, ref_dal), (cache[2], ref_cache[2]), (cache[3], ref_cache[3]),
                      (cache[4], ref_cache[4]), (cache[5], ref_cache[5])):
        assert np.asarray(got).dtype == np.asarray(want).dtype and _bits(got) == _bits(want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 7, 64, 192, 200, 768])
@pytest.mark.parametrize("variant", ["l2", "l1"])
@pytest.mark.parametrize("spec", ["w_binary", "w_xnor"])  # centred latent, and W itself
def test_grs_hook_fused_bit_identical(monkeypatch, k, dtype, variant, spec):
    from minibvit import binaryvit

    rng = np.random.default_rng(k)
    w = (rng.standard_normal((9, k)) * 0.02).astype(dtype)
    w[0] = 0.0  # a constant row: W_c = 0, sign(0) = +1, alpha 0
    w[1, ::3] = -0.0
    w[2] = np.where(np.arange(k) % 2, -1, 1) / 64  # +-2^-6: |W| - alpha = 0 exactly (l1's sign(0) = +1)
    grad = rng.standard_normal(w.shape).astype(dtype)

    class Model:
        def __init__(self):
            self.params, self.grads = {"w": w.copy()}, {"w": grad.copy()}
            self.quantizers = {"w": quant.make_quantizer(spec)}

    def run():
        model = Model()
        binaryvit.GRSHook(["w"], 0.3, variant)(model, 0)
        return model.grads["w"]

    calls = []
    real = quantize.grs_gradient_added
    monkeypatch.setattr(quantize, "grs_gradient_added", lambda *a: calls.append(1) or real(*a))
    got = run()
    want = _numpy_path(run)
    assert calls and got.dtype == want.dtype and _bits(got) == _bits(want)
