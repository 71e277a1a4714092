"""TerViT's fast training path against the NumPy path it replaces, bit for bit: the fused min-max k-bit
quantizer and the fused ternarizer (minibvit.kernels.quantize_int), np.sum's pairwise order, and the
exact integer products that take their bound from the quantizers (ops.integer_matmul with a_max, b_max),
and the linear layers' byte dot products (8-bit activation codes x ternary or 8-bit weight levels,
ops.byte_matmul) against levels_matmul."""
import numpy as np
import pytest

from minibvit import ops, quant
from minibvit.kernels import quantize_int, ternary

pytestmark = pytest.mark.impl_specific

DTYPES = [np.float32, np.float64]


def _bits(a):
    return np.asarray(a).tobytes()


def _same(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    assert _bits(got) == _bits(want), f"{what}: {np.count_nonzero(got != want)} of {got.size} elements differ"


def _numpy_path(fn, *args, **kwargs):
    saved = quant.USE_FUSED
    quant.USE_FUSED = False
    try:
        return fn(*args, **kwargs)
    finally:
        quant.USE_FUSED = saved


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused kernels, so that a test knows the fused path ran."""
    calls = {"minmax_levels": 0, "ternarize": 0}
    for name in calls:
        kernel = getattr(quantize_int, name)

        def counted(*args, _kernel=kernel, _name=name):
            calls[_name] += 1
            return _kernel(*args)

        monkeypatch.setattr(quantize_int, name, counted)
    return calls


# ---------------------------------------------------------------------------------------------
# np.sum's order


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 127, 128, 129, 136, 255, 256, 257, 1000, 4099, 70001])
def test_pairwise_sum_is_np_sum(n, dtype):
    rng = np.random.default_rng(n)
    a = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(dtype)
    a[::5] = 0
    got = dtype(quantize_int.pairwise_sum(a, dtype(0)))
    _same(got, np.sum(a), f"pairwise_sum of {n}")


# ---------------------------------------------------------------------------------------------
# min-max k-bit


def _qmax(bits, signed):
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def _minmax_case(rng, shape, dtype, bits, signed, axis, kind):
    """x of `shape`: "random" (with exact zeros, -0.), "ties" (every channel's range set so that scale is
    a power of two and x / scale lands on integers and halves: round half to even), or a constant tensor
    ("zeros", "constant": min == max)."""
    if kind == "zeros":
        return np.zeros(shape, dtype)
    if kind == "constant":
        return np.full(shape, -2.5 if signed else 0.75, dtype)
    if kind == "random":
        x = np.asarray(rng.standard_normal(shape) * 2, dtype=dtype)
        x.reshape(-1)[::7] = 0
        x.reshape(-1)[1::11] = -0.0
        return x
    qmax, step = _qmax(bits, signed), 2.0**-3
    lo = -qmax if signed else -int(rng.integers(0, qmax + 1))
    hi = qmax if signed else qmax + lo
    x = np.asarray(rng.integers(2 * lo, 2 * hi + 1, shape) / 2 * step, dtype=dtype)
    channels = x[None] if axis is None else np.moveaxis(x, axis, 0)  # a view of x
    flat = channels.reshape(channels.shape[0], -1).copy()
    flat[:, 0] = hi * step  # each channel's range: [lo, hi] * step (hi only for one element)
    if flat.shape[1] > 1:
        flat[:, -1] = lo * step
    channels[...] = flat.reshape(channels.shape)
    return x


MINMAX_SHAPES = [(1,), (7,), (3, 5, 17), (2, 3, 65, 64), (1000, 33), (4, 65, 384), (2, 3, 4, 5, 6)]
MINMAX_LAYOUTS = [((), None)] + [(shape, axis) for shape in MINMAX_SHAPES for axis in (None, 0, -1)]


@pytest.mark.parametrize("kind", ["random", "ties", "zeros", "constant"])
@pytest.mark.parametrize("bits, signed", [(8, True), (8, False), (2, True), (4, False), (16, True), (16, False)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", MINMAX_LAYOUTS, ids=str)
def test_minmax_fused_bit_identical(shape, axis, dtype, bits, signed, kind, fused_calls):
    x = _minmax_case(np.random.default_rng(len(shape) * 7 + bits), shape, dtype, bits, signed, axis, kind)
    out, cache = quant.minmax_quant_forward(x, bits, signed, axis)
    assert fused_calls["minmax_levels"] == 1
    ref_out, ref_cache = _numpy_path(quant.minmax_quant_forward, x, bits, signed, axis)
    what = f"minmax {shape} {np.dtype(dtype).name} bits={bits} signed={signed} axis={axis} {kind}"
    _same(out, ref_out, f"{what} out")
    _same(cache[0], ref_cache[0], f"{what} levels")
    _same(cache[1], ref_cache[1], f"{what} scale")
    assert cache[2] == ref_cache[2] and cache[2] >= np.abs(cache[0]).max(initial=0), f"{what} level bound"
    codes, scale, zero_point = quant.minmax_codes(x, bits, signed, axis)
    ref_codes, ref_scale, ref_zp = _numpy_path(quant.minmax_codes, x, bits, signed, axis)
    for got, want, name in ((codes, ref_codes, "codes"), (scale, ref_scale, "scale"), (zero_point, ref_zp, "zp")):
        _same(got, want, f"{what} minmax_codes {name}")
    shape_c = quant._broadcast_shape(x.ndim, None if axis is None else axis % x.ndim)
    _same(cache[0], codes.astype(dtype) - zero_point.reshape(shape_c).astype(dtype), f"{what} levels == codes - zp")


def test_minmax_ties_round_half_to_even():
    """The tie case really holds ties: x / scale = k + 0.5 goes to the even neighbour, as np.round."""
    x = np.array([127, -127, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5], np.float32) * np.float32(0.125)
    out, (levels, scale, _, _) = quant.minmax_quant_forward(x, 8, True)
    assert scale[0] == 0.125
    np.testing.assert_array_equal(levels, [127, -127, 0, 2, 2, 0, -2, 126])
    assert not np.signbit(levels[levels == 0]).any(), "round(-0.5) = -0. must give the level +0."


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, -1, 1])
def test_minmax_fused_reads_strided_views(signed, axis, fused_calls):
    """q, k, v of the attention are strided views of the qkv projection; a reversed view too."""
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((4, 9, 3, 3, 16)).astype(np.float32).transpose(2, 0, 3, 1, 4)
    for x in (qkv[1], qkv[0][:, ::-1, :, ::2]):
        assert not x.flags.c_contiguous
        out, cache = quant.minmax_quant_forward(x, 8, signed, axis)
        ref_out, ref_cache = _numpy_path(quant.minmax_quant_forward, x, 8, signed, axis)
        _same(out, ref_out, "strided out")
        _same(cache[0], ref_cache[0], "strided levels")
        assert out.flags.c_contiguous and cache[0].flags.c_contiguous
    assert fused_calls["minmax_levels"] == 2


class _OtherRankCollective:
    """A Collective whose other rank holds values up to `peak` in magnitude (distributed's interface)."""

    def __init__(self, peak):
        self.peak = peak

    def max(self, x):
        return np.maximum(np.asarray(x), np.asarray(x).dtype.type(self.peak))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, 0])
def test_minmax_fused_collective(signed, axis, fused_calls):
    """The statistics go through reduce in the fused path as in the NumPy one (data parallel)."""
    x = np.random.default_rng(6).standard_normal((5, 33)).astype(np.float32)
    reduce = _OtherRankCollective(9.0)
    out, cache = quant.minmax_quant_forward(x, 8, signed, axis, reduce)
    ref_out, ref_cache = _numpy_path(quant.minmax_quant_forward, x, 8, signed, axis, reduce)
    _same(out, ref_out, "collective out")
    _same(cache[1], ref_cache[1], "collective scale")
    local, _ = quant.minmax_quant_forward(x, 8, signed, axis)
    assert not np.array_equal(out, local), "the other rank's range must change the scale"
    assert fused_calls["minmax_levels"] == 2


def test_minmax_backward_passes_dout():
    x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
    dout = np.random.default_rng(8).standard_normal((3, 4)).astype(np.float32)
    q = quant.make_quantizer("a_minmax8_signed")
    _, cache = q.forward(x, True)
    dx, grads = q.backward(dout, cache)
    assert dx is dout and grads == {}


def test_minmax_level_bound():
    """level_bound: qmax (signed) or max(zero_point, qmax - zero_point) (unsigned), at least max|levels|."""
    rng = np.random.default_rng(9)
    for spec, x in (("a_minmax8_signed", rng.standard_normal((4, 8))), ("a_minmax8_unsigned", rng.random((4, 8)) - 0.2),
                    ("w_minmax8", rng.standard_normal((3, 8)))):
        q = quant.make_quantizer(spec)
        _, cache = q.forward(x.astype(np.float32), True)
        levels = q.integer_form(cache)[0]
        _, _, zero_point = quant.minmax_codes(x.astype(np.float32), 8, q.signed, q.channel_axis)
        want = 127 if q.signed else int(max(zero_point.max(), 255 - zero_point.min()))
        assert q.level_bound(cache) == want >= np.abs(levels).max()


# ---------------------------------------------------------------------------------------------
# ternary


def _ternary_case(rng, shape, dtype):
    w = (rng.standard_normal(shape) * 0.05).astype(dtype)
    w.reshape(-1)[::9] = 0
    w.reshape(-1)[1::13] = -0.0
    if shape[0] > 1:
        w[1] = 0  # an all-zero channel: alpha 0
    if shape[0] > 2 and w[2].size >= 3:  # |w| == Delta at delta_factor 0.5: mean 2, Delta 1, the 1 maps to 0
        row = np.full(w[2].size, 2.0)
        row[0], row[1] = 1.0, 3.0
        w[2] = row.reshape(w[2].shape)
    return w


TERNARY_SHAPES = [(1, 1), (5, 7), (3, 8), (4, 129), (192, 192), (768, 192), (6, 3, 4, 4), (3, 1000), (2, 70001)]


@pytest.mark.parametrize("ste", ["identity", "clipped"])
@pytest.mark.parametrize("delta_factor", [0.7, 0.5])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TERNARY_SHAPES, ids=str)
def test_ternary_fused_bit_identical(shape, dtype, per_channel, delta_factor, ste, fused_calls):
    w = _ternary_case(np.random.default_rng(shape[-1]), shape, dtype)
    out, cache = quant.ternarize_forward(w, per_channel, delta_factor, ste)
    assert fused_calls["ternarize"] == 1
    ref_out, ref_cache = _numpy_path(quant.ternarize_forward, w, per_channel, delta_factor, ste)
    what = f"ternary {shape} {np.dtype(dtype).name} per_channel={per_channel} {delta_factor}"
    _same(out, ref_out, f"{what} out")
    _same(cache[1], ref_cache[1], f"{what} levels")
    _same(cache[2], ref_cache[2], f"{what} alpha")
    assert (cache[0] is None) == (ste == "identity")
    if cache[0] is not None:
        _same(cache[0], ref_cache[0], f"{what} ste derivative")
    _, _, delta = quantize_int.ternarize(w, per_channel, delta_factor)[1:]
    _same(delta, quant.ternary_codes(w, per_channel, delta_factor)[2], f"{what} delta")
    if per_channel and shape[0] > 2 and delta_factor == 0.5 and w[2].size >= 3:
        assert delta[2] == 1 and cache[1][2].reshape(-1)[0] == 0, "|w| == Delta maps to 0"
    if per_channel and shape[0] > 1:
        assert cache[2][1] == 0 and not cache[1][1].any(), "an all-zero channel: alpha 0, codes 0"


def test_ternary_strided_weight_takes_the_numpy_path(fused_calls):
    w = _ternary_case(np.random.default_rng(10), (64, 48), np.float32).T
    out, cache = quant.ternarize_forward(w)
    assert fused_calls["ternarize"] == 0
    ref_out, _ = _numpy_path(quant.ternarize_forward, w)
    _same(out, ref_out, "strided ternary out")


# ---------------------------------------------------------------------------------------------
# exact integer products with the quantizers' bounds


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, level", [(192, 127), (768, 255), (1100, 127), (64, 1)])
def test_integer_matmul_with_bounds_is_exact(k, level, dtype):
    """A given bound chooses the float32 or the float64 product (K * max|a| * max|b| against 2^24); both
    are exact, so any bound >= the true one gives the bits of the scanned one and of float64."""
    rng = np.random.default_rng(k)
    a = rng.integers(-level, level + 1, (2, 3, 17, k)).astype(dtype)
    b = rng.integers(-127, 128, (2, 3, k, 9)).astype(dtype)
    a[0, 0, 0, :] = level  # the bound is reached
    b[0, 0, :, 0] = 127
    want = (a.astype(np.float64) @ b.astype(np.float64)).astype(dtype)
    _same(ops.integer_matmul(a, b), want, "scanned bound")
    _same(ops.integer_matmul(a, b, level, 127), want, "given bound")
    _same(ops.integer_matmul(a, b, 2 * level, 1000), want, "loose bound (float64 product)")
    scale = rng.random(9).astype(dtype)
    _same(ops.levels_matmul(a, dtype(0.25), b, scale, level, 127), want * (dtype(0.25) * scale), "levels_matmul")


@pytest.mark.parametrize("spec_a, spec_b", [("a_minmax8_signed", "w_ternary_channel"), ("a_minmax8_unsigned", "w_minmax8"),
                                            ("a_minmax8_signed", "w_ternary_tensor")])
def test_linear_product_from_quantizer_bounds(spec_a, spec_b):
    """The model's quantized linear (integer_form, level_bound, levels_matmul) equals the product of
    the float outputs computed exactly, and the scanning product, bit for bit."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 65, 768)).astype(np.float32)
    w = (rng.standard_normal((192, 768)) * 0.05).astype(np.float32)
    qa, qb = quant.make_quantizer(spec_a), quant.make_quantizer(spec_b)
    (_, ca), (_, cb) = qa.forward(x, True), qb.forward(w, True)
    (la, sa), (lb, sb) = qa.integer_form(ca), qb.integer_form(cb)
    got = ops.levels_matmul(la.reshape(-1, 768), sa, lb.T, sb, qa.level_bound(ca), qb.level_bound(cb))
    scanned = ops.levels_matmul(la.reshape(-1, 768), sa, lb.T, sb)
    exact = (la.reshape(-1, 768).astype(np.float64) @ lb.T.astype(np.float64)).astype(np.float32) * (sa * sb)
    _same(got, scanned, f"{spec_a} x {spec_b}")
    _same(got, exact, f"{spec_a} x {spec_b} exact")


# ---------------------------------------------------------------------------------------------
# byte dot products: the codes, the weight quads and ops.byte_matmul


@pytest.mark.parametrize("kind", ["random", "ties", "zeros", "constant"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 17), (2, 3, 65, 64), (2, 3, 4, 5, 6)], ids=str)
def test_minmax_byte_codes_are_the_levels_plus_offset(shape, signed, kind):
    """The fused pass's byte codes: levels = codes - offset (128 for signed, the zero point for
    unsigned), the other outputs unchanged; none per channel, above 8 bits or on the NumPy path."""
    x = _minmax_case(np.random.default_rng(len(shape)), shape, np.float32, 8, signed, None, kind)
    out, cache = quant.minmax_quant_forward(x, 8, signed, None, byte_codes=True)
    plain_out, plain_cache = quant.minmax_quant_forward(x, 8, signed, None)
    _same(out, plain_out, "out with byte codes")
    assert cache[0] is None and plain_cache[3] is None, "the byte codes replace the float levels"
    _same(quant.minmax_levels_of(cache), plain_cache[0], "levels from the byte codes")
    codes, offset = cache[3]
    assert codes.dtype == np.uint8 and codes.shape == x.shape and codes.flags.c_contiguous
    _, _, zero_point = quant.minmax_codes(x, 8, signed)
    assert offset == (128 if signed else int(zero_point[0]))
    _same(codes.astype(np.float32) - np.float32(offset), plain_cache[0], "codes - offset")
    q = quant.make_quantizer("a_minmax8_signed" if signed else "a_minmax8_unsigned")
    _same(q.recompute(cache), out, "recompute from the byte codes")
    _same(q.integer_form(cache)[0], plain_cache[0], "integer_form from the byte codes")
    assert quant.minmax_quant_forward(x, 8, signed, -1, byte_codes=True)[1][3] is None, "per channel: no bytes"
    assert quant.minmax_quant_forward(x, 16, signed, None, byte_codes=True)[1][3] is None, "16 bits: no bytes"
    assert _numpy_path(quant.minmax_quant_forward, x, 8, signed, None, byte_codes=True)[1][3] is None


def test_minmax_byte_codes_of_strided_views():
    qkv = np.random.default_rng(12).standard_normal((4, 9, 3, 3, 16)).astype(np.float32).transpose(2, 0, 3, 1, 4)
    for x in (qkv[1], qkv[0][:, ::-1, :, ::2]):
        _, (_, _, _, (codes, offset)) = quant.minmax_quant_forward(x, 8, True, None, byte_codes=True)
        _, (levels, _, _, _) = quant.minmax_quant_forward(x, 8, True, None)
        _same(codes.astype(np.float32) - np.float32(offset), levels, "strided codes - offset")


@pytest.mark.parametrize("n, k", [(1, 1), (5, 3), (16, 4), (17, 5), (192, 768), (33, 65)])
def test_weight_level_quads_layout(n, k):
    """quads[kq, 4 n + q] = T[n, 4 kq + q] (zero-padded to 4 * Npad columns, rows 64-byte aligned),
    sums = T's row sums; for ternary levels, ternary_weight_quads' layout of the packed weight."""
    rng = np.random.default_rng(n * k)
    levels = rng.integers(-127, 128, (n, k)).astype(np.float32)
    quads, sums = ternary.weight_level_quads(levels)
    n_pad = -(-n // 16) * 16
    assert quads.dtype == np.int8 and quads.shape == (-(-k // 4), 4 * n_pad) and quads.ctypes.data % 64 == 0
    want = np.zeros((-(-k // 4) * 4, n_pad), np.int8)
    want[:k, :n] = levels.T
    _same(quads, want.reshape(-1, 4, n_pad).transpose(0, 2, 1).reshape(quads.shape), "quads")
    _same(sums, levels.astype(np.int64).sum(axis=1), "sums")
    t = rng.integers(-1, 2, (n, k)).astype(np.float32)
    from minibvit.kernels import pack
    nz, sg = pack.pack_ternary_weight(t)
    _same(ternary.weight_level_quads(t)[0][:, :4 * n], ternary.ternary_weight_quads(nz, sg, k)[:, :4 * n],
          "ternary quads")


def _byte_case(rng, m, k, n, signed, weight_bits):
    x = rng.standard_normal((m, k)).astype(np.float32)
    if not signed:
        x = np.abs(x) - np.float32(0.1)
    x.reshape(-1)[::5] = 0
    qa = quant.make_quantizer("a_minmax8_signed" if signed else "a_minmax8_unsigned")
    qb = quant.make_quantizer("w_ternary_channel" if weight_bits == 2 else "w_minmax8")
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    (_, ca), (_, cb) = qa.forward(x, True), qb.forward(w, True)
    return qa, ca, qb, cb


@pytest.mark.parametrize("weight_bits", [2, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (7, 3, 5), (33, 65, 17), (130, 192, 576), (65, 768, 192)])
def test_byte_matmul_is_levels_matmul(m, k, n, signed, weight_bits):
    """ops.byte_matmul of the quantizers' byte forms has the bits of levels_matmul on their levels."""
    qa, ca, qb, cb = _byte_case(np.random.default_rng(m + k + n), m, k, n, signed, weight_bits)
    (codes, offset, sa), (quads, sums, sb) = qa.byte_form(ca), qb.weight_quad_form(cb)
    got = ops.byte_matmul(codes, offset, sa, quads, sums, sb, n)
    la, _ = qa.integer_form(ca)
    lb, _ = qb.integer_form(cb)
    want = ops.levels_matmul(la, sa, lb.T, sb)
    _same(got, want, f"byte_matmul {m}x{k}x{n} signed={signed} w{weight_bits}")
    exact = (la.astype(np.float64) @ lb.T.astype(np.float64)).astype(np.float32) * (sa * sb)
    _same(got, exact, "against float64")
    zero_scale = sb.copy()
    zero_scale[::2] = 0  # an all-zero ternary channel has alpha 0: the unscaled kernel, then the scale
    _same(ops.byte_matmul(codes, offset, sa, quads, sums, zero_scale, n), ops.levels_matmul(la, sa, lb.T, zero_scale),
          "with zero scales")


def test_tervit_linears_take_the_byte_product(monkeypatch):
    """A TerViT model's linear layers go through ops.byte_matmul on the fused path (and not on the NumPy
    path); test_fused_train holds the two paths' training steps equal bit for bit."""
    from minibvit import methods
    from minibvit.model import ViT, ViTConfig

    calls = []
    real = ops.byte_matmul
    monkeypatch.setattr(ops, "byte_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    cfg = ViTConfig(image_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    x = np.random.default_rng(13).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for table in ("tervit", "tervit_w8a8"):
        model = ViT(cfg, quantizers=methods.build_quantizers(cfg, table), seed=0)
        calls.clear()
        logits, _ = model.forward(x, training=True, rng=np.random.default_rng(0))
        assert len(calls) >= 4, f"{table}: the block linears must use the byte product, got {len(calls)} calls"
        calls.clear()
        ref, _ = _numpy_path(model.forward, x, training=True, rng=np.random.default_rng(0))
        assert not calls
        _same(logits, ref, f"{table} logits")
