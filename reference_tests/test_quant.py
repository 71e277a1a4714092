"""minibvit.quant against independent PyTorch references (float64 autograd).

The references are written from the papers' formulations, not from minibvit's code: small
custom torch.autograd.Function blocks (sign / round / scaled-sign STEs, gradient scaling, a
floor with a pass-through gradient) composed with ordinary torch ops, so autograd derives the
pseudo-gradients (e.g. LSQ's step gradient, the centring gradient, GSB's refined scale
gradient). Inputs are dyadic (multiples of 2^-20) so means are exact and threshold decisions
are identical in NumPy and torch; the strategies put values exactly on the thresholds.
"""

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

torch = pytest.importorskip("torch", reason="the quantizer reference tests compare against PyTorch autograd")

import adapter  # noqa: E402
from adapter import quant as Q  # noqa: E402

# Constants and option lists of the contract, hard-coded (never read from the implementation under test).
SCALE_FLOOR = 1e-5  # profile minibvit's floor, for the hand-valued tests marked profile("minibvit", ...)
STE_KINDS = ("identity", "clipped", "approxsign")
QUANTIZER_SPECS = ("fp", "sign", "w_binary", "w_xnor", "a_elastic_signed", "a_elastic_unsigned", "a_elastic_signed_gsb",
                   "w_ternary_channel", "w_ternary_tensor", "w_lsq8", "a_lsq8", "w_minmax8", "a_minmax8_signed",
                   "a_minmax8_unsigned")

F64 = torch.float64
RTOL = 1e-10
ATOL = 1e-12
SETTINGS = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------------------------
# reference building blocks (torch, float64)


def ste_derivative(x, kind):
    if kind == "identity":
        return torch.ones_like(x)
    if kind == "clipped":
        return (x.abs() <= 1).to(x.dtype)
    # Bi-Real Net ApproxSign: 2 + 2x on [-1, 0], 2 - 2x on (0, 1], 0 elsewhere
    return torch.where((x >= -1) & (x <= 0), 2 + 2 * x, torch.where((x > 0) & (x <= 1), 2 - 2 * x, torch.zeros_like(x)))


def ref_sign(x):
    """sign with the selected profile's sign(0) (minibvit: +1; gsb-official: 0)."""
    zero = torch.full_like(x, adapter.profile().sign_zero)
    return torch.where(x > 0, torch.ones_like(x), torch.where(x < 0, -torch.ones_like(x), zero))


def ref_floor():
    """The selected profile's scale floor (minibvit: 1e-5; gsb-official: float32(1e-5))."""
    return adapter.profile().scale_floor


class SignSTE(torch.autograd.Function):
    """sign(x) (sign(0) from the selected profile); backward g * ste'(x)."""

    @staticmethod
    def forward(ctx, x, kind):
        ctx.save_for_backward(x)
        ctx.kind = kind
        return ref_sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ste_derivative(x, ctx.kind), None


class ScaledCodesSTE(torch.autograd.Function):
    """Forward scale * codes (both given, detached); backward g * ste'(x) straight to x."""

    @staticmethod
    def forward(ctx, x, scale, codes, kind):
        ctx.save_for_backward(x)
        ctx.kind = kind
        return scale * codes

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ste_derivative(x, ctx.kind), None, None, None


class RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class FloorPassThrough(torch.autograd.Function):
    """max(x, floor) with the gradient passed to x unchanged (BiT's eps guard on alpha)."""

    @staticmethod
    def forward(ctx, x, floor):
        return torch.clamp(x, min=floor)

    @staticmethod
    def backward(ctx, g):
        return g, None


class Identity(torch.autograd.Function):
    """Forward returns the given value; backward passes g to x (identity STE)."""

    @staticmethod
    def forward(ctx, x, value):
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


def leaf(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=F64, requires_grad=True)


def run_ref(fn, inputs, dout):
    """Evaluate fn on float64 leaves; return (out, grads of each input) as numpy."""
    leaves = [leaf(a) for a in inputs]
    out = fn(*leaves)
    out.backward(torch.from_numpy(np.asarray(dout, dtype=np.float64)))
    return out.detach().numpy(), [t.grad.numpy() if t.grad is not None else np.zeros(t.shape) for t in leaves]


def assert_close(actual, expected, what, rtol=RTOL, atol=ATOL):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def assert_exact(actual, expected, what):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    if not np.array_equal(actual, expected):
        bad = np.argwhere(actual != expected)[:5]
        got, want = actual[tuple(bad.T)], expected[tuple(bad.T)]
        raise AssertionError(f"{what}: not bit-exact at {bad.tolist()}: got {got}, want {want}")


def rows(t):
    """Axes of one output channel's row of a weight tensor."""
    return tuple(range(1, t.ndim))


# --------------------------------------------------------------------------------------------
# strategies: dyadic values (exact sums) with plenty of exact zeros and threshold values

GRID = 2.0**-20
dyadic = st.integers(-4 * 2**20, 4 * 2**20).map(lambda k: k * GRID)
special = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 2.0, -2.0, 0.25, 3.0])
values = st.one_of(special, dyadic)


def arrays(min_dims=1, max_dims=3, elements=values):
    shapes = hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=6)
    return hnp.arrays(np.float64, shapes, elements=elements)


def with_dout(array_strategy):
    """(x, dout) pairs; dout dyadic as well."""
    return array_strategy.flatmap(lambda x: st.tuples(st.just(x), hnp.arrays(np.float64, x.shape, elements=dyadic)))


# positive scales: dyadic, so scale * k is exact and (scale * k) / scale == k for small k
scales = st.sampled_from([0.25, 0.75, 1.0, 1.25, 3.0, 0.09375, 2.0**-12])


# --------------------------------------------------------------------------------------------
# sign and binarize


@pytest.mark.profile("selected", "sign_zero")
@SETTINGS
@given(with_dout(arrays()), st.sampled_from(STE_KINDS))
def test_binarize_matches_torch(x_dout, ste):
    x, dout = x_dout
    out, cache = Q.binarize_forward(x, ste)
    dx = Q.binarize_backward(dout, cache)
    ref_out, (ref_dx,) = run_ref(lambda t: SignSTE.apply(t, ste), [x], dout)
    assert_exact(out, ref_out, f"sign forward ({ste})")
    assert_exact(Q.sign(x), ref_out, "sign()")
    assert_close(dx, ref_dx, f"binarize dx ({ste})")
    assert out.dtype == x.dtype


def test_clipped_ste_passes_gradient_up_to_and_including_one():
    """BNN's clipped STE is 1[|x| <= 1]: |x| = 1 passes the gradient (no zeros here: any sign(0))."""
    x = np.array([-1.5, -1.0, -0.5, 0.5, 1.0, 1.5])
    _, cache = Q.binarize_forward(x, "clipped")
    assert_exact(Q.binarize_backward(np.ones_like(x), cache), np.array([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]),
                 "clipped STE at x = -1.5, -1, -0.5, 0.5, 1, 1.5")


@pytest.mark.profile("minibvit", "sign_zero")
def test_sign_of_zero_is_plus_one():
    x = np.array([0.0, -0.0, 1e-300, -1e-300])
    assert_exact(Q.sign(x), np.array([1.0, 1.0, 1.0, -1.0]), "sign(±0)")


def test_approxsign_values_on_breakpoints():
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    _, cache = Q.binarize_forward(x, "approxsign")
    want = np.array([0.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0])
    assert_exact(Q.binarize_backward(np.ones_like(x), cache), want, "approxsign")


# --------------------------------------------------------------------------------------------
# weight binarizer


def ref_weight_binarize(w, scale, center, ste):
    w_c = w - w.mean(dim=rows(w), keepdim=True) if center else w
    if scale == "channel":
        alpha = w_c.abs().mean(dim=rows(w), keepdim=True)
    elif scale == "tensor":
        alpha = w_c.abs().mean().reshape([1] * w.ndim)
    else:
        alpha = torch.ones([1] * w.ndim, dtype=w.dtype)
    codes = ref_sign(w_c)
    return ScaledCodesSTE.apply(w_c, alpha.detach(), codes.detach(), ste), codes, alpha


@pytest.mark.profile("selected", "sign_zero")
@SETTINGS
@given(
    with_dout(arrays(min_dims=2)),
    st.sampled_from(["channel", "tensor", "none"]),
    st.booleans(),
    st.sampled_from(["identity", "clipped"]),
)
# rows centred to exact zeros (row 0) and to exactly +-1 / +-2 (row 1)
@example((np.array([[1.0, 2.0, 3.0], [0.0, 2.0, -2.0]]), np.array([[1.0, -2.0, 0.5], [3.0, 1.0, 1.0]])), "channel", True,
         "clipped")
def test_weight_binarize_matches_torch(w_dout, scale, center, ste):
    w, dout = w_dout
    out, cache = Q.weight_binarize_forward(w, scale, center, ste)
    dw = Q.weight_binarize_backward(dout, cache)
    ref_out, (ref_dw,) = run_ref(lambda t: ref_weight_binarize(t, scale, center, ste)[0], [w], dout)
    assert_close(out, ref_out, f"weight binarize out ({scale}, center={center})")
    assert_close(dw, ref_dw, f"weight binarize dw ({scale}, center={center}, {ste})")

    codes, alpha = Q.weight_binary_codes(w, scale, center)
    _, ref_codes, ref_alpha = ref_weight_binarize(torch.from_numpy(w), scale, center, ste)
    assert codes.dtype == np.int8
    assert_exact(codes, ref_codes.numpy().astype(np.int8), "weight binary codes")
    assert_close(alpha, ref_alpha.numpy().reshape(-1), "weight binary alpha")
    assert_close(alpha.reshape([-1] + [1] * (w.ndim - 1)) * codes, out, "codes * alpha == forward")


# --------------------------------------------------------------------------------------------
# elastic binarizer (BiT, GSB)


def ref_elastic(x, alpha, signed, alpha_grad):
    a = GradScale.apply(FloorPassThrough.apply(alpha, ref_floor()), 1.0 / math.sqrt(x.numel()))
    if signed:
        # "lsq" (BiT): the scale inside the sign is a constant -> dalpha = sum(sign(x) g s)
        # "gsb": d/dalpha of alpha * sign(x / alpha) with the clipped STE
        inner = a.detach() if alpha_grad == "lsq" else a
        return a * SignSTE.apply(x / inner, "clipped")
    return a * RoundSTE.apply(torch.clamp(x / a, 0, 1))


def elastic_case(draw, signed):
    alpha = draw(scales)
    ks = [0.0, 0.5, 1.0, 1.5, 2.0, 0.25] + ([-0.5, -1.0, -1.5, -0.25] if signed else [-0.5, -1.0])
    k = draw(arrays(elements=st.one_of(st.sampled_from(ks), dyadic)))
    dout = draw(hnp.arrays(np.float64, k.shape, elements=dyadic))
    return k * alpha, np.array([alpha]), dout


@st.composite
def elastic_cases(draw):
    signed = draw(st.booleans())
    x, alpha, dout = elastic_case(draw, signed)
    return x, alpha, dout, signed, draw(st.sampled_from(["lsq", "gsb"]))


@pytest.mark.profile("selected", "sign_zero", "scale_floor")
@SETTINGS
@given(elastic_cases())
def test_elastic_binarize_matches_torch(case):
    x, alpha, dout, signed, alpha_grad = case
    out, cache = Q.elastic_binarize_forward(x, alpha, signed, alpha_grad)
    dx, dalpha = Q.elastic_binarize_backward(dout, cache)
    ref_out, (ref_dx, ref_dalpha) = run_ref(lambda t, a: ref_elastic(t, a, signed, alpha_grad), [x, alpha], dout)
    what = f"elastic (signed={signed}, {alpha_grad})"
    assert_exact(out, ref_out, f"{what} out")
    assert_close(dx, ref_dx, f"{what} dx")
    assert dalpha.shape == (1,)
    assert_close(dalpha, ref_dalpha, f"{what} dalpha")


@pytest.mark.profile("minibvit", "sign_zero")
def test_elastic_gradients_on_thresholds_by_hand():
    alpha = np.array([2.0])
    x = np.array([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0])  # q = -1.5, -1, -0.5, 0, 0.5, 1, 1.5
    g = np.ones_like(x)
    s = 1 / math.sqrt(x.size)
    out, cache = Q.elastic_binarize_forward(x, alpha, signed=True, alpha_grad="gsb")
    dx, dalpha = Q.elastic_binarize_backward(g, cache)
    assert_exact(out, 2 * np.array([-1, -1, -1, 1, 1, 1, 1.0]), "signed out")
    assert_exact(dx, np.array([0, 1, 1, 1, 1, 1, 0.0]), "signed dx")
    sign_x = np.array([-1, -1, -1, 1, 1, 1, 1.0])
    q_inside = np.array([0, -1, -0.5, 0, 0.5, 1, 0])
    assert_close(dalpha, [s * np.sum(sign_x - q_inside)], "gsb dalpha")
    out, cache = Q.elastic_binarize_forward(x, alpha, signed=False)
    dx, dalpha = Q.elastic_binarize_backward(g, cache)
    assert_exact(out, np.array([0, 0, 0, 0, 0, 2, 2.0]), "unsigned out (round(0.5) = 0)")
    assert_exact(dx, np.array([0, 0, 0, 1, 1, 1, 0.0]), "unsigned dx")
    assert_close(dalpha, [s * (0 + 0 + -0.5 + 0 + 1)], "unsigned dalpha")


@pytest.mark.profile("minibvit", "sign_zero", "scale_floor")
def test_elastic_alpha_below_floor_is_floored_and_still_gets_gradient():
    x = np.array([-1.0, 0.0, 2.0])
    for alpha in (np.array([0.0]), np.array([-3.0])):
        out, cache = Q.elastic_binarize_forward(x, alpha, signed=True)
        assert_exact(out, SCALE_FLOOR * np.array([-1.0, 1.0, 1.0]), "floored alpha")
        _, dalpha = Q.elastic_binarize_backward(np.ones(3), cache)
        assert np.all(np.isfinite(dalpha)) and dalpha[0] != 0


def test_elastic_alpha_init():
    x = np.array([[-1.0, 2.0], [0.0, 3.0]])
    assert_close(Q.elastic_alpha_init(x, signed=True), [2 * 1.5], "signed init")
    assert_close(Q.elastic_alpha_init(x, signed=False), [4 * 1.5], "unsigned init")


# --------------------------------------------------------------------------------------------
# learnable shift


@SETTINGS
@given(with_dout(arrays()), st.data())
def test_shift_matches_torch(x_dout, data):
    x, dout = x_dout
    shift = data.draw(hnp.arrays(np.float64, (x.shape[-1],), elements=values))
    out, cache = Q.shift_forward(x, shift)
    dx, dshift = Q.shift_backward(dout, cache)
    ref_out, (ref_dx, ref_dshift) = run_ref(lambda t, s: t - s, [x, shift], dout)
    assert_exact(out, ref_out, "shift out")
    assert_exact(dx, ref_dx, "shift dx")
    assert_close(dshift, ref_dshift, "shift dshift")


# --------------------------------------------------------------------------------------------
# ternary (TWN / TerViT)


def ref_ternary(w, per_channel, delta_factor, ste):
    dims = rows(w) if per_channel else tuple(range(w.ndim))
    absw = w.detach().abs()
    delta = delta_factor * absw.mean(dim=dims, keepdim=True)
    mask = (absw > delta).to(w.dtype)
    count = mask.sum(dim=dims, keepdim=True)
    total = (absw * mask).sum(dim=dims, keepdim=True)
    alpha = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(count))
    codes = ref_sign(w.detach()) * mask
    return ScaledCodesSTE.apply(w, alpha, codes, ste), codes, alpha, delta


@pytest.mark.profile("selected", "sign_zero")
@SETTINGS
@given(
    with_dout(arrays(min_dims=2)),
    st.booleans(),
    st.sampled_from([0.7, 0.5, 0.25]),
    st.sampled_from(["identity", "clipped"]),
)
@example((np.array([[1.0, 3.0], [0.0, 0.0]]), np.ones((2, 2))), True, 0.5, "identity")  # |w| == delta, zero row
@example((np.array([[7.0, 13.0] + [10.0] * 8]), np.ones((1, 10))), True, 0.7, "clipped")  # 0.7 * 10 == 7 exactly
def test_ternarize_matches_torch(w_dout, per_channel, delta_factor, ste):
    w, dout = w_dout
    out, cache = Q.ternarize_forward(w, per_channel, delta_factor, ste)
    dw = Q.ternarize_backward(dout, cache)
    ref_out, (ref_dw,) = run_ref(lambda t: ref_ternary(t, per_channel, delta_factor, ste)[0], [w], dout)
    what = f"ternary (per_channel={per_channel}, {delta_factor}, {ste})"
    assert_close(out, ref_out, f"{what} out")
    assert_exact(dw, ref_dw, f"{what} dw")

    codes, alpha, delta = Q.ternary_codes(w, per_channel, delta_factor)
    _, ref_codes, ref_alpha, ref_delta = ref_ternary(torch.from_numpy(w), per_channel, delta_factor, ste)
    assert codes.dtype == np.int8
    assert_exact(codes, ref_codes.numpy().astype(np.int8), f"{what} codes")
    assert_exact(delta, ref_delta.numpy().reshape(-1), f"{what} delta")
    assert_close(alpha, ref_alpha.numpy().reshape(-1), f"{what} alpha")
    assert alpha.shape == ((w.shape[0],) if per_channel else (1,))


def test_ternary_threshold_is_strict():
    w = np.array([[7.0, 13.0] + [10.0] * 8, [0.0] * 10])
    codes, alpha, delta = Q.ternary_codes(w, per_channel=True)
    assert delta[0] == 7.0 and codes[0, 0] == 0, "an entry equal to delta must map to 0"
    assert_exact(codes[1], np.zeros(10, dtype=np.int8), "all-zero channel codes")
    assert alpha[1] == 0.0, "all-zero channel must have alpha 0"
    assert_close(alpha[0], (13.0 + 8 * 10.0) / 9, "alpha = mean of the entries above delta")


# --------------------------------------------------------------------------------------------
# LSQ


def ref_lsq(x, step, bits, signed, channel_axis):
    qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    per_step = x.numel() if channel_axis is None else x.numel() // x.shape[channel_axis]
    s = GradScale.apply(FloorPassThrough.apply(step, ref_floor()), 1.0 / math.sqrt(per_step * qp))
    if channel_axis is not None:
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        s = s.reshape(shape)
    return RoundSTE.apply(torch.clamp(x / s, qn, qp)) * s


@st.composite
def lsq_cases(draw):
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    signed = draw(st.booleans())
    qn, qp = Q.lsq_range(bits, signed)
    ks = [qn, qp, qn - 0.5, qp + 0.5, qn - 1, qp + 1, 0.0, 0.5, -0.5, 1.5, 2.5, -1.5]
    half_integers = st.integers(2 * qn - 4, 2 * qp + 4).map(lambda i: i / 2)
    k = draw(arrays(elements=st.one_of(st.sampled_from(ks), half_integers, dyadic)))
    channel_axis = draw(st.sampled_from([None, 0, -1]))
    n_steps = 1 if channel_axis is None else k.shape[channel_axis]
    step = np.array(draw(st.lists(scales, min_size=n_steps, max_size=n_steps)))
    if channel_axis is None:
        x = k * step[0]
    else:
        shape = [1] * k.ndim
        shape[channel_axis] = -1
        x = k * step.reshape(shape)
    dout = draw(hnp.arrays(np.float64, k.shape, elements=dyadic))
    return x, step, dout, bits, signed, channel_axis


@pytest.mark.profile("selected", "scale_floor")
@SETTINGS
@given(lsq_cases())
def test_lsq_matches_torch(case):
    x, step, dout, bits, signed, channel_axis = case
    out, cache = Q.lsq_forward(x, step, bits, signed, channel_axis)
    dx, dstep = Q.lsq_backward(dout, cache)
    ref_out, (ref_dx, ref_dstep) = run_ref(lambda t, s: ref_lsq(t, s, bits, signed, channel_axis), [x, step], dout)
    what = f"lsq (bits={bits}, signed={signed}, axis={channel_axis})"
    assert_exact(out, ref_out, f"{what} out")
    assert_close(dx, ref_dx, f"{what} dx")
    assert dstep.shape == step.shape
    assert_close(dstep, ref_dstep, f"{what} dstep")
    codes = Q.lsq_codes(x, step, bits, signed, channel_axis)
    assert np.issubdtype(codes.dtype, np.integer)
    s = step if channel_axis is None else step.reshape([-1 if a == channel_axis % x.ndim else 1 for a in range(x.ndim)])
    assert_exact(codes * s, out, f"{what} codes * step == forward")


def test_lsq_step_init():
    x = np.arange(12.0).reshape(3, 4) - 5
    assert_close(Q.lsq_step_init(x, 8, True), [2 * np.abs(x).mean() / math.sqrt(127)], "per tensor")
    want = 2 * np.abs(x).mean(axis=1) / math.sqrt(15)
    assert_close(Q.lsq_step_init(x, 4, False, channel_axis=0), want, "per channel")


# --------------------------------------------------------------------------------------------
# min-max


def ref_minmax(x, bits, signed, channel_axis):
    """Returns (out with identity STE, codes, scale, zero_point)."""
    xd = x.detach()
    if channel_axis is None:
        dims = tuple(range(x.ndim))
    else:
        dims = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)

    def amax(t):  # torch reduces over everything for dim=(); a 1-D per-channel input reduces over nothing
        return t.amax(dim=dims, keepdim=True) if dims else t

    def amin(t):
        return t.amin(dim=dims, keepdim=True) if dims else t

    if signed:
        qmax = 2 ** (bits - 1) - 1
        scale = amax(xd.abs()) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.zeros_like(scale)
        codes = torch.clamp(torch.round(xd / scale), -qmax, qmax)
    else:
        qmax = 2**bits - 1
        lo = amin(xd).clamp(max=0)
        hi = amax(xd).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(-lo / scale)
        codes = torch.clamp(torch.round(xd / scale) + zero_point, 0, qmax)
    return Identity.apply(x, (codes - zero_point) * scale), codes, scale, zero_point


@st.composite
def minmax_cases(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    signed = draw(st.booleans())
    channel_axis = draw(st.sampled_from([None, 0, -1]))
    if draw(st.booleans()):
        x = draw(arrays())  # generic dyadic, zeros and small specials
    else:  # a grid where x / scale lands on integers and ties (.5) exactly
        qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        lo = -qmax if signed else -draw(st.integers(0, qmax))
        hi = qmax if signed else qmax + lo
        k = draw(arrays(elements=st.integers(2 * lo, 2 * hi).map(lambda i: i / 2)))
        k.flat[0] = hi if draw(st.booleans()) or not signed else lo
        if not signed and k.size > 1:
            k.flat[-1] = lo
        x = k * draw(scales)
    dout = draw(hnp.arrays(np.float64, x.shape, elements=dyadic))
    return x, dout, bits, signed, channel_axis


@SETTINGS
@given(minmax_cases())
@example((np.zeros((2, 3)), np.ones((2, 3)), 8, True, None))
@example((np.zeros((2, 3)), np.ones((2, 3)), 8, False, 0))
@example((np.full((2, 3), 0.75), np.ones((2, 3)), 8, False, None))  # constant non-zero tensor
def test_minmax_matches_torch(case):
    x, dout, bits, signed, channel_axis = case
    out, cache = Q.minmax_quant_forward(x, bits, signed, channel_axis)
    dx = Q.minmax_quant_backward(dout, cache)
    ref_out, (ref_dx,) = run_ref(lambda t: ref_minmax(t, bits, signed, channel_axis)[0], [x], dout)
    what = f"minmax (bits={bits}, signed={signed}, axis={channel_axis})"
    assert np.all(np.isfinite(out)), f"{what}: non-finite output"
    assert_exact(out, ref_out, f"{what} out")
    assert_exact(dx, ref_dx, f"{what} dx")
    codes, scale, zero_point = Q.minmax_codes(x, bits, signed, channel_axis)
    _, ref_codes, ref_scale, ref_zp = ref_minmax(torch.from_numpy(x), bits, signed, channel_axis)
    assert_exact(codes.astype(np.float64), ref_codes.numpy(), f"{what} codes")
    assert_exact(scale, ref_scale.numpy().reshape(-1), f"{what} scale")
    assert_exact(zero_point.astype(np.float64), ref_zp.numpy().reshape(-1), f"{what} zero point")
    if bits == 8:
        assert codes.dtype == (np.int8 if signed else np.uint8)


# --------------------------------------------------------------------------------------------
# float32 path agrees with float64


def float32_cases():
    rng = np.random.default_rng(1234)
    w = rng.normal(size=(5, 7, 3)) * 0.3
    a = rng.normal(size=(2, 9, 6))
    g = rng.normal(size=a.shape)
    gw = rng.normal(size=w.shape)
    alpha = np.array([0.8])
    step_t = np.array([0.05])
    step_c = np.abs(rng.normal(size=6)) * 0.05 + 0.01
    shift = rng.normal(size=6) * 0.1
    yield "binarize", lambda d: Q.binarize_forward(a.astype(d), "approxsign"), Q.binarize_backward, g
    yield "w_binary", lambda d: Q.weight_binarize_forward(w.astype(d), "channel", True, "clipped"), \
        Q.weight_binarize_backward, gw
    yield "elastic_gsb", lambda d: Q.elastic_binarize_forward(a.astype(d), alpha.astype(d), True, "gsb"), \
        Q.elastic_binarize_backward, g
    yield "elastic_unsigned", lambda d: Q.elastic_binarize_forward(a.astype(d), alpha.astype(d), False), \
        Q.elastic_binarize_backward, g
    yield "shift", lambda d: Q.shift_forward(a.astype(d), shift.astype(d)), Q.shift_backward, g
    yield "ternary", lambda d: Q.ternarize_forward(w.astype(d), True, 0.7, "clipped"), Q.ternarize_backward, gw
    yield "lsq_tensor", lambda d: Q.lsq_forward(a.astype(d), step_t.astype(d), 4, True), Q.lsq_backward, g
    yield "lsq_channel", lambda d: Q.lsq_forward(a.astype(d), step_c.astype(d), 8, False, -1), Q.lsq_backward, g
    yield "minmax", lambda d: Q.minmax_quant_forward(a.astype(d), 8, False, -1), Q.minmax_quant_backward, g


@pytest.mark.parametrize("name, forward, backward, dout", list(float32_cases()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_float32_agrees_with_float64(name, forward, backward, dout):
    out64, cache64 = forward(np.float64)
    out32, cache32 = forward(np.float32)
    assert out32.dtype == np.float32, f"{name}: float32 input gave {out32.dtype} output"
    assert_close(out32, out64, f"{name} out float32 vs float64", rtol=1e-5, atol=1e-5)
    grads64 = backward(dout, cache64)
    grads32 = backward(dout.astype(np.float32), cache32)
    grads64 = grads64 if isinstance(grads64, tuple) else (grads64,)
    grads32 = grads32 if isinstance(grads32, tuple) else (grads32,)
    for i, (g32, g64) in enumerate(zip(grads32, grads64)):
        assert g32.dtype == np.float32, f"{name}: gradient {i} is {g32.dtype}, not float32"
        assert_close(g32, g64, f"{name} gradient {i} float32 vs float64", rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# wrappers


def test_elastic_wrapper_lazy_init():
    quantizer = Q.ElasticBinarizer(signed=False)
    alpha = quantizer.params["alpha"]
    assert alpha.dtype == np.float32 and alpha.shape == (1,) and np.isnan(alpha).all()
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="not initialised"):
        quantizer.forward(x, training=False)
    out, cache = quantizer.forward(x, training=True)
    assert quantizer.params["alpha"] is alpha, "alpha must be filled in place, not rebound"
    assert_close(alpha, [4 * np.abs(x.astype(np.float64)).mean()], "unsigned alpha init", rtol=1e-6)
    ref_out, _ = Q.elastic_binarize_forward(x, alpha, signed=False)
    assert_exact(out, ref_out, "wrapper forward == pure forward")
    dx, grads = quantizer.backward(np.ones_like(x), cache)
    assert set(grads) == {"alpha"} and grads["alpha"].dtype == np.float32
    alpha[...] = 5.0  # a second training forward must not re-initialise
    quantizer.forward(x, training=True)
    assert alpha[0] == 5.0
    quantizer.forward(x, training=False)


def test_lsq_wrapper_lazy_init_per_channel():
    x = np.random.default_rng(1).normal(size=(2, 5, 3))
    quantizer = Q.LSQQuantizer(bits=4, signed=True, per_channel=True, channel_axis=-1, channels=3, dtype=np.float64)
    with pytest.raises(ValueError, match="not initialised"):
        quantizer.forward(x, training=False)
    quantizer.forward(x, training=True)
    assert_close(quantizer.params["step"], 2 * np.abs(x).mean(axis=(0, 1)) / math.sqrt(7), "per-channel step init")
    _, cache = quantizer.forward(x, training=False)
    _, grads = quantizer.backward(np.ones_like(x), cache)
    assert grads["step"].shape == (3,)
    with pytest.raises(ValueError, match="channels"):
        Q.LSQQuantizer(per_channel=True)
    wrong = Q.LSQQuantizer(per_channel=True, channels=4, dtype=np.float64)
    with pytest.raises(ValueError, match="shape"):
        wrong.forward(x, training=True)
    assert np.isnan(wrong.params["step"]).all(), "a failed init must leave the param untouched"


def test_shifted_wrapper():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 4))
    dout = rng.normal(size=(3, 4))
    quantizer = Q.Shifted(Q.ElasticBinarizer(signed=True, dtype=np.float64), channels=4, dtype=np.float64)
    assert set(quantizer.params) == {"shift", "alpha"}
    assert_exact(quantizer.params["shift"], np.zeros(4), "shift init")
    quantizer.params["shift"][...] = [0.1, -0.2, 0.0, 0.3]
    out, cache = quantizer.forward(x, training=True)
    dx, grads = quantizer.backward(dout, cache)
    assert quantizer.params["alpha"] is quantizer.inner.params["alpha"]
    ref_out, (ref_dx, ref_dshift, ref_dalpha) = run_ref(
        lambda t, s, a: ref_elastic(t - s, a, True, "lsq"),
        [x, quantizer.params["shift"], quantizer.params["alpha"]],
        dout,
    )
    assert_close(out, ref_out, "shifted out")
    assert_close(dx, ref_dx, "shifted dx")
    assert_close(grads["shift"], ref_dshift, "shifted dshift")
    assert_close(grads["alpha"], ref_dalpha, "shifted dalpha")
    assert "Shifted(ElasticBinarizer(" in repr(quantizer)


@pytest.mark.parametrize("spec", list(QUANTIZER_SPECS))
def test_factory_builds_every_spec(spec):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 5))
    first = Q.make_quantizer(spec, dtype=np.float64)
    second = Q.make_quantizer(spec, dtype=np.float64)
    for name in first.params:
        assert first.params[name] is not second.params[name], f"{spec}: two instances share param {name!r}"
        assert first.params[name].dtype == np.float64
    out, cache = first.forward(x, training=True)
    dx, grads = first.backward(np.ones_like(x), cache)
    assert out.shape == x.shape and dx.shape == x.shape
    assert set(grads) == set(first.params)
    assert all(np.all(np.isfinite(v)) for v in [out, dx, *grads.values()])
    first.forward(x, training=False)
    assert type(first).__name__ in repr(first)


def test_factory_rejects_unknown_spec():
    with pytest.raises(ValueError, match="valid specs: .*w_binary"):
        Q.make_quantizer("w_binry")


def test_factory_spec_options():
    assert repr(Q.make_quantizer("w_binary")) == "WeightBinarizer(scale='channel', center=True, ste='clipped')"
    assert repr(Q.make_quantizer("a_elastic_signed_gsb")) == "ElasticBinarizer(signed=True, alpha_grad='gsb')"
    per_channel = Q.make_quantizer("w_lsq8", per_channel=True, channels=6)
    assert per_channel.params["step"].shape == (6,)


# --------------------------------------------------------------------------------------------
# input validation


def test_bad_inputs_raise_helpful_errors():
    x = np.ones((2, 3))
    with pytest.raises(TypeError, match="floating"):
        Q.binarize_forward(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="ste"):
        Q.binarize_forward(x, "tanh")
    with pytest.raises(ValueError, match="ndim >= 2"):
        Q.weight_binarize_forward(np.ones(3))
    with pytest.raises(ValueError, match="shape"):
        Q.elastic_binarize_forward(x, np.ones(2), signed=True)
    with pytest.raises(ValueError, match="shape"):
        Q.lsq_forward(x, np.ones(2), 8, True, channel_axis=-1)
    with pytest.raises(ValueError, match="bits"):
        Q.lsq_forward(x, np.ones(1), 1, True)
    with pytest.raises(ValueError, match="delta_factor"):
        Q.ternarize_forward(x, delta_factor=1.0)
    with pytest.raises(ValueError, match="shift"):
        Q.shift_forward(x, np.zeros(2))
