"""GSB quantizers, BinaryViT's GRS and ASM, and the diagnostics, against independent PyTorch code.

The references below are written from the formulas (docs/gsb.md, docs/binaryvit.md), in the style of
the official GSB code, and share no code with minibvit. Discrete outputs and masks are compared bit for
bit; inputs live on a grid of quarters with exact zeros and values planted exactly on the 0.7 / 0.9
max thresholds and on the straight-through window edges.
"""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

torch = pytest.importorskip("torch", reason="the reference implementations are written in PyTorch")

import adapter  # noqa: E402
from adapter import methods, quant  # noqa: E402

# The option lists of the contract, hard-coded (never read from the implementation under test).
GSB_MODES = ("official", "principled")
GSB_MAX_OVER = ("tensor", "row")
ASM_CENTERS = ("mean", "median", "token", "shift")

EPS = 1e-5  # profile minibvit's alpha clamp (the GSB references read the selected profile's, see P())
F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=2e-5, atol=1e-6)


def t(x, grad=False):
    return torch.tensor(np.asarray(x), requires_grad=grad)


def P():
    """The convention profile the GSB references follow (--profile; minibvit/conformance/profiles.py)."""
    return adapter.profile()


def pm_sign(x):
    """sign with sign(0) = +1."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def profile_sign(x):
    """sign with the selected profile's sign(0) (minibvit: +1, gsb-official: 0)."""
    zero = torch.full_like(x, P().sign_zero)
    return torch.where(x > 0, torch.ones_like(x), torch.where(x < 0, -torch.ones_like(x), zero))


def floored(alphas):
    floor = P().scale_floor
    return torch.where(alphas > floor, alphas, torch.full_like(alphas, floor))


def group_scale(mask):
    n = float(mask.sum())
    return 1.0 / math.sqrt(n) if n > 0 else 0.0


def forward_group_scale(mask):
    """1/sqrt(|G|) as the forward computes it: an empty group gives 0 (minibvit) or, under the official
    code's convention, the ZeroDivisionError of its ``1.0 / math.sqrt(T1_mask.sum())``."""
    if P().gsb_empty_group == "zero_division_error" and float(mask.sum()) == 0:
        raise ZeroDivisionError("float division by zero (empty GSB group)")
    return group_scale(mask)


def gsb_groups_empty(x, attention, max_over="tensor"):
    """Is T1 or T2 empty (the case whose convention the profile's gsb_empty_group fixes)?"""
    x = np.asarray(x)
    if attention:
        m = x.max() if max_over == "tensor" else x.max(axis=-1, keepdims=True)
        return not (x > 0.7 * m).any() or not (x > 0.9 * m).any()
    t1 = (x > 0.7 * x.max()) | (x < 0.7 * x.min())
    t2 = (x > 0.9 * x.max()) | (x < 0.9 * x.min())
    return not t1.any() or not t2.any()


def assert_close(actual, expected, what, dtype=np.float64):
    tol = F64 if dtype == np.float64 else F32
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
    np.testing.assert_allclose(actual, expected, err_msg=what, **tol)


def assert_exact(actual, expected, what):
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
    np.testing.assert_array_equal(actual, expected, err_msg=what)


# ------------------------------------------------------------------------------------------------
# PyTorch references: GSB
# ------------------------------------------------------------------------------------------------

class RefGSBValue(torch.autograd.Function):
    """ElasticQuantQKV of the official GSB code (num_bits = 1), with the selected profile's sign(0) for
    the first basis (minibvit: +1), scale floor and empty-group convention, and the 'principled'
    per-group masking of the pass-through as an option."""

    @staticmethod
    def forward(ctx, v, alphas, mode):
        a = floored(alphas)
        T1 = (v > 0.7 * v.max()).to(v.dtype) + (v < 0.7 * v.min()).to(v.dtype)
        T2 = (v > 0.9 * v.max()).to(v.dtype) + (v < 0.9 * v.min()).to(v.dtype)
        forward_group_scale(T1), forward_group_scale(T2)
        vT1, vT2 = v * T1, v * T2
        ctx.save_for_backward(v, a, T1, T2)
        ctx.mode = mode
        return profile_sign(v) * a[0] + torch.sign(vT1) * a[1] + torch.sign(vT2) * a[2]

    @staticmethod
    def backward(ctx, g):
        v, a, T1, T2 = ctx.saved_tensors
        parts = [(v, profile_sign(v), None), (v * T1, torch.sign(v * T1), T1), (v * T2, torch.sign(v * T2), T2)]
        dv = torch.zeros_like(v)
        dalphas = torch.zeros_like(a)
        for k, (vk, sk, mask) in enumerate(parts):
            q = vk / a[k]
            middle = 1.0 - (q < -1).to(v.dtype) - (q > 1).to(v.dtype)
            if ctx.mode == "principled" and mask is not None:
                middle = middle * mask
            dv = dv + middle * g
            count = v.numel() if mask is None else float(mask.sum())
            scale = 1.0 / math.sqrt(count) if count > 0 else 0.0
            dalphas[k] = ((sk - middle * q) * g).sum() * scale
        return dv, dalphas, None


class RefGSBAttn(torch.autograd.Function):
    """ElasticQuantAttention of the official GSB code (num_bits = 1), per-tensor or per-row max, and the
    'principled' LSQ ramp per basis as an option."""

    @staticmethod
    def forward(ctx, A, alphas, mode, max_over):
        a = floored(alphas)
        M = A.max() if max_over == "tensor" else A.amax(dim=-1, keepdim=True)
        T1 = (A > 0.7 * M).to(A.dtype)
        T2 = (A > 0.9 * M).to(A.dtype)
        forward_group_scale(T1), forward_group_scale(T2)
        ctx.save_for_backward(A, a, T1, T2, M * torch.ones_like(A))
        ctx.mode = mode
        m1, m2 = (T1.float(), T2.float()) if P().gsb_mask_dtype == "float32" else (T1, T2)
        return (A / a[0]).round().clamp(0, 1) * a[0] + m1 * a[1] + m2 * a[2]

    @staticmethod
    def backward(ctx, g):
        A, a, T1, T2, M = ctx.saved_tensors
        q = A / a[0]
        small, big = (q < 0).to(A.dtype), (q > 1).to(A.dtype)
        middle = 1.0 - small - big
        dalphas = torch.zeros_like(a)
        dalphas[0] = ((big + middle * (q.round() - q)) * g).sum() / math.sqrt(A.numel())
        if ctx.mode == "official":
            dA = middle * g + T1 * g * a[1] + T2 * g * a[2]
            dalphas[1] = (T1 * g).sum() * group_scale(T1)
            dalphas[2] = (T2 * g).sum() * group_scale(T2)
            return dA, dalphas, None, None
        dA = middle * g
        for k, (T, frac) in ((1, (T1, 0.7)), (2, (T2, 0.9))):
            offset = A - frac * M
            window = ((offset).abs() <= a[k] / 2).to(A.dtype)
            dA = dA + window * g
            dalphas[k] = ((T - window * (offset / a[k])) * g).sum() * group_scale(T)
        return dA, dalphas, None, None


def ref_value_init(v):
    """minibvit: mean |v| over each set with the documented fallbacks; gsb-official: exact zeros left
    out of alpha1's set (count_nonzero) and 0/0 = NaN for an empty set."""
    v = torch.as_tensor(v)
    T1 = (v > 0.7 * v.max()) | (v < 0.7 * v.min())
    T2 = (v > 0.9 * v.max()) | (v < 0.9 * v.min())
    everything = torch.ones_like(T1)
    outside = ~T1 & (v != 0) if P().gsb_init_count == "nonzero" else ~T1
    return 2 * torch.stack([mean_abs_first(v, [outside, everything]),
                            mean_abs_first(v, [T1 & ~T2, T1, everything]),
                            mean_abs_first(v, [T2, everything])])


def ref_attn_init(A, max_over):
    A = torch.as_tensor(A)
    M = A.max() if max_over == "tensor" else A.amax(dim=-1, keepdim=True)
    T1, T2 = A > 0.7 * M, A > 0.9 * M
    everything = torch.ones_like(T1)
    return 4 * torch.stack([A.abs().mean(), mean_abs_first(A, [T1 & ~T2, T1, everything]),
                            mean_abs_first(A, [T2, everything])])


def mean_abs_first(x, masks):
    """mean |x| over the first non-empty mask (minibvit's fallbacks); under the official convention
    only the first mask counts, and an empty one gives 0/0 = NaN."""
    if P().gsb_empty_init_group == "nan":
        return x[masks[0]].abs().sum() / masks[0].sum()
    for m in masks:
        if m.any():
            return x[m].abs().mean()
    raise AssertionError("the last mask covers everything")


# ------------------------------------------------------------------------------------------------
# hypothesis inputs
# ------------------------------------------------------------------------------------------------

@st.composite
def gsb_values(draw, attention):
    """(x, alphas): x on a grid of quarters (attention: eighths, mostly >= 0) with exact zeros and
    entries planted exactly on the group thresholds; alphas random (incl. <= 0, hitting the clamp) or
    placed so that straight-through windows end exactly on an element."""
    b, h, n = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
    shape = (b, h, n, n) if attention else (b, h, n, draw(st.integers(1, 5)))
    low, unit = (-2, 0.125) if attention else (-8, 0.25)
    x = draw(arrays(np.int64, shape, elements=st.integers(low, 8))).astype(np.float64) * unit
    flat = x.reshape(-1)
    top, bottom = flat.max(), flat.min()
    fractions = [0.7, 0.9] if attention else [0.7, 0.9, -0.7, -0.9]
    for i, f in draw(st.lists(st.tuples(st.integers(0, flat.size - 1), st.sampled_from(fractions)),
                              max_size=4)):
        if flat[i] not in (top, bottom) and (top > 0 if f > 0 else bottom < 0):
            flat[i] = f * top if f > 0 else -f * bottom
    if attention:  # also exactly on the per-row thresholds
        rows = x.reshape(-1, n)
        for r, j, f in draw(st.lists(st.tuples(st.integers(0, rows.shape[0] - 1), st.integers(0, n - 1),
                                               st.sampled_from(fractions)), max_size=4)):
            row_top = rows[r].max()
            if rows[r, j] != row_top and row_top > 0:
                rows[r, j] = f * row_top
    alphas = []
    for k in range(3):
        kind = draw(st.sampled_from(["random", "element", "double", "window"]))
        i = draw(st.integers(0, flat.size - 1))
        if kind == "random":
            alphas.append(draw(st.floats(-0.5, 3.0)))
        elif kind == "element":
            alphas.append(abs(flat[i]))
        elif kind == "double":
            alphas.append(2 * abs(flat[i]))
        else:  # window edge of the principled attention ramp of basis k
            frac = (0.7, 0.9)[k - 1] if k else 0.5
            alphas.append(2 * abs(flat[i] - frac * top))
    return x, np.array(alphas, dtype=np.float64)


def grid_dout(draw, shape):
    return draw(arrays(np.int64, shape, elements=st.integers(-4, 4)), label="dout").astype(np.float64) * 0.5


# ------------------------------------------------------------------------------------------------
# GSB value quantizer
# ------------------------------------------------------------------------------------------------

@pytest.mark.profile("selected", "sign_zero", "scale_floor", "gsb_empty_group")
@pytest.mark.parametrize("mode", GSB_MODES)
@settings(max_examples=75, deadline=None)
@given(data=st.data())
def test_gsb_value_matches_torch(data, mode):
    v, alphas = data.draw(gsb_values(attention=False), label="v, alphas")
    g = grid_dout(data.draw, v.shape)
    if P().gsb_empty_group == "zero_division_error" and gsb_groups_empty(v, attention=False):
        with pytest.raises(ZeroDivisionError):
            methods.gsb_value_forward(v, alphas, mode=mode)
        return
    out, cache = methods.gsb_value_forward(v, alphas, mode=mode)
    dv, dalphas = methods.gsb_value_backward(g, cache)

    vt, at = t(v, True), t(alphas, True)
    ref = RefGSBValue.apply(vt, at, mode)
    ref.backward(t(g))
    assert_exact(out, ref, f"GSB value forward ({mode})")
    assert_exact(dv, vt.grad, f"GSB value dv ({mode})")
    assert_close(dalphas, at.grad, f"GSB value dalphas ({mode})")
    t1, t2 = methods.gsb_value_masks(v)
    assert_exact(t1, (v > 0.7 * v.max()) | (v < 0.7 * v.min()), "T1 mask")
    assert not (t2 & ~t1).any(), "T2 must lie inside T1"


@pytest.mark.profile("selected", "sign_zero", "gsb_empty_group")
@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (2, 3, 4, 5), elements=st.floats(-3, 3)), st.floats(0.05, 2.0),
       st.floats(0.05, 2.0), st.floats(0.05, 2.0))
def test_gsb_value_modes_are_autograd_of_their_surrogates(v, a1, a2, a3):
    """official = autograd of sum_k a_k sign_ste(clamp(v_k/a_k)) with v_k = v*T_k passed straight
    through the mask; principled = the same with the chain rule through the mask (dv_k/dv = T_k)."""
    assume(not (P().gsb_empty_group == "zero_division_error" and gsb_groups_empty(v, attention=False)))
    alphas = np.array([a1, a2, a3])
    g = np.cos(np.arange(v.size)).reshape(v.shape)
    for mode in GSB_MODES:
        out, cache = methods.gsb_value_forward(v, alphas, mode=mode)
        dv, dalphas = methods.gsb_value_backward(g, cache)
        vt, at = t(v, True), t(alphas, True)
        T1 = ((vt > 0.7 * vt.max()) | (vt < 0.7 * vt.min())).double()
        T2 = ((vt > 0.9 * vt.max()) | (vt < 0.9 * vt.min())).double()
        total = 0
        for k, mask in enumerate((None, T1, T2)):
            if mask is None:
                vk, sk = vt, profile_sign(vt)
            else:
                vk = vt * mask if mode == "principled" else (vt * mask - vt).detach() + vt
                sk = torch.sign(vt * mask)
            q = (vk / at[k]).clamp(-1, 1)
            total = total + at[k] * ((sk - q).detach() + q)  # value sign, gradient of the clamp
        total.backward(t(g))
        lsq_scale = [1 / math.sqrt(v.size), group_scale(T1), group_scale(T2)]
        np.testing.assert_allclose(out, total.detach().numpy(), rtol=1e-12, atol=1e-12, err_msg=mode)
        assert_close(dv, vt.grad, f"dv vs surrogate ({mode})")
        assert_close(dalphas, at.grad * t(lsq_scale), f"dalphas vs surrogate ({mode})")


@pytest.mark.profile("minibvit", "sign_zero")
def test_gsb_value_official_pass_through_reaches_three_outside_groups():
    v = np.array([[[[0.0, 0.1, -0.2, 5.0, -5.0, 4.0]]]])  # T1: |v| > 3.5, T2: |v| > 4.5
    out, cache = methods.gsb_value_forward(v, np.array([1.0, 1.0, 1.0]), mode="official")
    dv, _ = methods.gsb_value_backward(np.ones_like(v), cache)
    assert_exact(dv[0, 0, 0, :3], [3.0, 3.0, 3.0], "official: outside T1 every indicator is 1")
    out_p, cache_p = methods.gsb_value_forward(v, np.array([1.0, 1.0, 1.0]), mode="principled")
    dv_p, _ = methods.gsb_value_backward(np.ones_like(v), cache_p)
    assert_exact(dv_p[0, 0, 0, :3], [1.0, 1.0, 1.0], "principled: only the first basis outside T1")
    assert_exact(out, out_p, "the modes share the forward")
    assert_exact(out[0, 0, 0], [1, 1, -1, 3, -3, 2], "levels a1, a1+a2, a1+a2+a3; sign(0) = +1")


@pytest.mark.profile("selected", "gsb_init_count", "gsb_empty_init_group")
@settings(max_examples=60, deadline=None)
@given(st.data())
def test_gsb_value_init_matches_torch(data):
    v, _ = data.draw(gsb_values(attention=False), label="v, alphas")
    alphas = methods.gsb_value_init(v)
    assert alphas.shape == (3,) and alphas.dtype == v.dtype
    assert np.isfinite(alphas).all() or P().gsb_empty_init_group == "nan", "GSB value init is not finite"
    assert_close(alphas, ref_value_init(v), "GSB value init")


@pytest.mark.profile("minibvit", "gsb_empty_group", "gsb_empty_init_group")
def test_gsb_value_init_and_grads_on_empty_groups():
    # T1 = T2 = {10, -10}: T1 minus T2 is empty -> alpha2 falls back to T1.
    v = np.array([10.0, -10.0, 1.0, 0.5]).reshape(1, 1, 1, 4)
    assert_close(methods.gsb_value_init(v), np.array([1.5, 20.0, 20.0]), "fallback T1 minus T2 -> T1")
    # all zeros: every group but "everything" is empty; no NaN anywhere and zero alpha2/alpha3 grads.
    z = np.zeros((1, 2, 3, 2))
    alphas = methods.gsb_value_init(z)
    assert_exact(alphas, np.zeros(3), "all-zero init")
    for mode in GSB_MODES:
        out, cache = methods.gsb_value_forward(z, alphas, mode=mode)
        dv, dalphas = methods.gsb_value_backward(np.ones_like(z), cache)
        assert np.isfinite(out).all() and np.isfinite(dv).all() and np.isfinite(dalphas).all()
        assert dalphas[1] == 0 and dalphas[2] == 0, f"empty groups must give zero alpha grads ({mode})"


# ------------------------------------------------------------------------------------------------
# GSB attention quantizer
# ------------------------------------------------------------------------------------------------

@pytest.mark.profile("selected", "scale_floor", "gsb_mask_dtype", "gsb_empty_group")
@pytest.mark.parametrize("max_over", GSB_MAX_OVER)
@pytest.mark.parametrize("mode", GSB_MODES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_gsb_attn_matches_torch(data, mode, max_over):
    a, alphas = data.draw(gsb_values(attention=True), label="a, alphas")
    g = grid_dout(data.draw, a.shape)
    if P().gsb_empty_group == "zero_division_error" and gsb_groups_empty(a, attention=True, max_over=max_over):
        with pytest.raises(ZeroDivisionError):
            methods.gsb_attn_forward(a, alphas, mode=mode, max_over=max_over)
        return
    out, cache = methods.gsb_attn_forward(a, alphas, mode=mode, max_over=max_over)
    da, dalphas = methods.gsb_attn_backward(g, cache)

    at, alt = t(a, True), t(alphas, True)
    ref = RefGSBAttn.apply(at, alt, mode, max_over)
    ref.backward(t(g))
    assert_exact(out, ref, f"GSB attn forward ({mode}, {max_over})")
    assert_exact(da, at.grad, f"GSB attn da ({mode}, {max_over})")
    assert_close(dalphas, alt.grad, f"GSB attn dalphas ({mode}, {max_over})")


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (2, 2, 5, 5), elements=st.one_of(st.just(0.0), st.floats(1e-3, 1))), st.floats(0.01, 0.5),
       st.floats(0.01, 0.5), st.floats(0.01, 0.5), st.sampled_from(GSB_MAX_OVER))
def test_gsb_attn_principled_is_lsq_autograd_per_basis(a, a1, a2, a3, max_over):
    """principled = autograd of sum_k a_k round_ste(clamp((A - t_k)/a_k + 1/2, 0, 1)), t_1 = a_1/2,
    with LSQ's gradient scale: each basis' own straight-through estimator (docs/gsb.md)."""
    alphas = np.array([a1, a2, a3])
    g = np.sin(np.arange(a.size)).reshape(a.shape)
    out, cache = methods.gsb_attn_forward(a, alphas, mode="principled", max_over=max_over)
    da, dalphas = methods.gsb_attn_backward(g, cache)
    At, alt = t(a, True), t(alphas, True)
    M = (At.max() if max_over == "tensor" else At.amax(dim=-1, keepdim=True)).detach()
    total, lsq_scale = 0, [1 / math.sqrt(a.size)]
    for k in range(3):
        if k:
            lsq_scale.append(group_scale(At > (0.7, 0.9)[k - 1] * M))
        u = At / alt[k] if k == 0 else (At - (0.7, 0.9)[k - 1] * M) / alt[k] + 0.5
        u = u.clamp(0, 1)
        total = total + alt[k] * ((u.round() - u).detach() + u)
    total.backward(t(g))
    # continuous inputs: the round of a ramp can differ from the strict mask only on exact ties
    np.testing.assert_allclose(out, total.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert_close(da, At.grad, "principled da vs per-basis LSQ autograd")
    assert_close(dalphas, alt.grad * t(lsq_scale), "principled dalphas vs per-basis LSQ autograd")


@pytest.mark.profile("selected", "gsb_empty_init_group")
@pytest.mark.parametrize("max_over", GSB_MAX_OVER)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_gsb_attn_init_matches_torch(data, max_over):
    a, _ = data.draw(gsb_values(attention=True), label="a, alphas")
    alphas = methods.gsb_attn_init(a, max_over)
    assert alphas.shape == (3,)
    assert np.isfinite(alphas).all() or P().gsb_empty_init_group == "nan", "GSB attn init is not finite"
    assert_close(alphas, ref_attn_init(a, max_over), f"GSB attn init ({max_over})")


@pytest.mark.profile("selected", "gsb_empty_group", "gsb_empty_init_group")
def test_gsb_empty_groups_follow_the_profile():
    """The cases whose outcome is a convention: an all-zero value tensor (T1 and T2 empty), a value
    tensor whose large entries all lie in T2 (T1 minus T2 empty), negative attention (T1, T2 empty)."""
    z = np.zeros((1, 1, 2, 2))
    negative = -np.arange(1.0, 5.0).reshape(1, 1, 2, 2) / 4
    alphas = np.array([0.5, 0.5, 0.5])
    two_levels = np.array([10.0, -10.0, 1.0, 0.5]).reshape(1, 1, 1, 4)
    if P().gsb_empty_group == "zero_division_error":
        with pytest.raises(ZeroDivisionError):
            methods.gsb_value_forward(z, alphas)
        with pytest.raises(ZeroDivisionError):
            methods.gsb_attn_forward(negative, alphas)
    else:
        for fwd, bwd, x in ((methods.gsb_value_forward, methods.gsb_value_backward, z),
                            (methods.gsb_attn_forward, methods.gsb_attn_backward, negative)):
            out, cache = fwd(x, alphas)
            _, dalphas = bwd(np.ones_like(x), cache)
            assert dalphas[1] == 0 and dalphas[2] == 0, f"{fwd.__name__}: empty groups must give zero scale grads"
    init = methods.gsb_value_init(two_levels)
    if P().gsb_empty_init_group == "nan":
        assert np.isnan(init[1]) and not np.isnan(init[[0, 2]]).any(), f"T1 minus T2 empty: NaN alpha2, got {init}"
    else:
        assert_close(init, np.array([1.5, 20.0, 20.0]), "T1 minus T2 empty: alpha2 falls back to T1")


@pytest.mark.profile("minibvit", "gsb_empty_group", "gsb_empty_init_group")
def test_gsb_attn_empty_groups():
    uniform = np.full((1, 1, 4, 4), 0.25)  # every entry is the max: T1 = T2 = all, T1 minus T2 empty
    assert_close(methods.gsb_attn_init(uniform), np.array([1.0, 1.0, 1.0]), "uniform attention init")
    negative = -np.arange(1.0, 17.0).reshape(1, 1, 4, 4) / 16  # max < 0: T1 and T2 are empty
    for mode in GSB_MODES:
        for max_over in GSB_MAX_OVER:
            alphas = methods.gsb_attn_init(negative, max_over)
            out, cache = methods.gsb_attn_forward(negative, alphas, mode=mode, max_over=max_over)
            da, dalphas = methods.gsb_attn_backward(np.ones_like(negative), cache)
            assert np.isfinite(alphas).all() and np.isfinite(da).all() and np.isfinite(dalphas).all()
            assert dalphas[1] == 0 and dalphas[2] == 0, f"empty groups: zero grads ({mode}, {max_over})"
            assert_exact(out, np.zeros_like(negative), "negative attention quantizes to 0")


def test_gsb_attn_row_max_is_batch_independent():
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.ones(6), size=(2, 3, 6))
    alphas = np.array([0.1, 0.05, 0.05])
    both, _ = methods.gsb_attn_forward(a, alphas, max_over="row")
    first, _ = methods.gsb_attn_forward(a[:1], alphas, max_over="row")
    assert_exact(both[:1], first, "per-row masks must not depend on the rest of the batch")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gsb_dtype_is_preserved_and_float32_matches_torch(dtype):
    rng = np.random.default_rng(1)
    v = rng.normal(size=(2, 3, 5, 4)).astype(dtype)
    a = rng.dirichlet(np.ones(5), size=(2, 3, 5)).astype(dtype)
    g = rng.normal(size=v.shape).astype(dtype)
    ga = rng.normal(size=a.shape).astype(dtype)
    for mode in GSB_MODES:
        for x, grad, fwd, bwd, ref, init, extra in (
                (v, g, methods.gsb_value_forward, methods.gsb_value_backward, RefGSBValue,
                 methods.gsb_value_init, ()),
                (a, ga, methods.gsb_attn_forward, methods.gsb_attn_backward, RefGSBAttn,
                 methods.gsb_attn_init, ("tensor",))):
            alphas = init(x)
            out, cache = fwd(x, alphas, mode, *extra)
            dx, dalphas = bwd(grad, cache)
            assert out.dtype == dx.dtype == dalphas.dtype == alphas.dtype == dtype
            xt, alt = t(x, True), t(alphas, True)
            r = ref.apply(xt, alt, mode, *extra)
            r.backward(t(grad))
            assert_close(out, r, f"{fwd.__name__} {mode} {dtype}", dtype)
            assert_close(dx, xt.grad, f"{bwd.__name__} dx {mode} {dtype}", dtype)
            assert_close(dalphas, alt.grad, f"{bwd.__name__} dalphas {mode} {dtype}", dtype)


def test_gsb_bad_inputs_raise():
    v = np.ones((1, 1, 2, 2))
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        methods.gsb_value_forward(v, np.ones(2))
    with pytest.raises(ValueError, match="mode"):
        methods.gsb_value_forward(v, np.ones(3), mode="paper")
    with pytest.raises(ValueError, match="max_over"):
        methods.gsb_attn_forward(v, np.ones(3), max_over="column")
    with pytest.raises(ValueError, match="NaN"):
        methods.gsb_attn_forward(v, np.array([1.0, np.nan, 1.0]))
    with pytest.raises(TypeError):
        methods.gsb_value_forward(np.ones((1, 1, 2, 2), dtype=int), np.ones(3))


# ------------------------------------------------------------------------------------------------
# GSB wrappers
# ------------------------------------------------------------------------------------------------

def first_forward_scales(alpha, step, y=None):
    """The scales the forward uses: the stored ones, except in the initialising forward (step 0) under
    the official convention, which uses alpha2 - alpha1 and alpha3 - alpha2 (the gradient still
    reaches the stored parameter unchanged). For the value quantizer (y given) the official code
    subtracts the means sum(alpha1*T1)/sum(T1) and sum((alpha2'+alpha1)*T2)/sum(T2), over float32
    masks under gsb_mask_dtype = "float32"."""
    if step or P().gsb_first_forward == "stored":
        return alpha
    raw = alpha.detach()
    if y is None:
        a2 = raw[1] - raw[0]
        local = torch.stack([raw[0], a2, raw[2] - (a2 + raw[0])])
    else:
        y = y.detach()
        T1 = ((y > 0.7 * y.max()) | (y < 0.7 * y.min()))
        T2 = ((y > 0.9 * y.max()) | (y < 0.9 * y.min()))
        T1, T2 = (T1.float(), T2.float()) if P().gsb_mask_dtype == "float32" else (T1.to(y.dtype), T2.to(y.dtype))
        a2 = raw[1] - (raw[0] * T1).sum() / T1.sum()
        local = torch.stack([raw[0], a2, raw[2] - ((a2 + raw[0]) * T2).sum() / T2.sum()])
    return alpha + (local - raw)


@pytest.mark.profile("selected", "sign_zero", "scale_floor", "gsb_init_count", "gsb_first_forward", "gsb_mask_dtype")
@pytest.mark.parametrize("mode", GSB_MODES)
def test_gsb_value_quantizer_matches_torch(mode):
    rng = np.random.default_rng(2)
    B, H, N, D = 2, 3, 5, 4
    q = methods.GSBValueQuantizer(H, D, mode=mode, dtype=np.float64)
    assert q.params["shift"].shape == (H, D) and np.isnan(q.params["alpha"]).all()
    if adapter.is_minibvit():  # the error and its wording are minibvit's
        with pytest.raises(ValueError, match="not initialised"):
            q.forward(rng.normal(size=(B, H, N, D)), training=False)
    q.params["shift"][...] = rng.normal(size=(H, D)) * 0.1  # the init must see the shifted values
    for step in range(2):
        v, g = rng.normal(size=(B, H, N, D)), rng.normal(size=(B, H, N, D))
        out, cache = q.forward(v, training=True)
        dv, grads = q.backward(g, cache)
        vt, shift_t, at = t(v, True), t(q.params["shift"], True), t(q.params["alpha"], True)
        y = vt - shift_t[None, :, None, :]
        if step == 0:
            assert_close(q.params["alpha"], ref_value_init(y.detach()), "alpha init from shifted v")
        ref = RefGSBValue.apply(y, first_forward_scales(at, step, y), mode)
        ref.backward(t(g))
        assert_exact(out, ref, "value wrapper forward")
        assert_close(dv, vt.grad, "value wrapper dv")
        assert_close(grads["shift"], shift_t.grad, "value wrapper dshift")
        assert_close(grads["alpha"], at.grad, "value wrapper dalpha")
        q.params["shift"] -= 0.1 * grads["shift"]  # in place, like an optimizer
        q.params["alpha"] -= 0.1 * grads["alpha"]
    if adapter.is_minibvit():
        assert "mode" in repr(q)


@pytest.mark.profile("selected", "scale_floor", "gsb_first_forward", "gsb_mask_dtype")
@pytest.mark.parametrize("mode", GSB_MODES)
@pytest.mark.parametrize("max_over", GSB_MAX_OVER)
def test_gsb_attn_quantizer_matches_torch(mode, max_over):
    rng = np.random.default_rng(3)
    B, H, N = 2, 3, 5
    q = methods.GSBAttnQuantizer(H, N, mode=mode, max_over=max_over, dtype=np.float64)
    assert q.params["bias"].shape == (H, N, N) and not q.params["bias"].any()
    for step in range(2):
        a, g = rng.dirichlet(np.ones(N), size=(B, H, N)), rng.normal(size=(B, H, N, N))
        out, cache = q.forward(a, training=True)
        da, grads = q.backward(g, cache)
        at, bt, alt = t(a, True), t(q.params["bias"], True), t(q.params["alpha"], True)
        y = at + bt
        if step == 0:
            assert_close(q.params["alpha"], ref_attn_init(y.detach(), max_over), "attn alpha init")
        ref = RefGSBAttn.apply(y, first_forward_scales(alt, step), mode, max_over)
        ref.backward(t(g))
        assert_exact(out, ref, "attn wrapper forward")
        assert_close(da, at.grad, "attn wrapper da")
        assert_close(grads["bias"], bt.grad, "attn wrapper dbias")
        assert_close(grads["alpha"], alt.grad, "attn wrapper dalpha")
        q.params["bias"] -= 0.01 * grads["bias"]
        q.params["alpha"] -= 0.01 * grads["alpha"]
    out_eval, _ = q.forward(a, training=False)
    assert out_eval.shape == a.shape


def test_gsb_wrappers_reject_bad_inputs():
    q = methods.GSBValueQuantizer(2, 3)
    with pytest.raises(ValueError, match="shape"):
        q.forward(np.zeros((1, 3, 4, 3), np.float32), training=True)
    with pytest.raises(TypeError, match="dtype"):
        q.forward(np.zeros((1, 2, 4, 3)), training=True)
    qa = methods.GSBAttnQuantizer(2, 4, dtype=np.float64)
    with pytest.raises(ValueError, match="shape"):
        qa.forward(np.zeros((1, 2, 4, 5)), training=True)


# ------------------------------------------------------------------------------------------------
# GRS
# ------------------------------------------------------------------------------------------------

weights = st.one_of(
    arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 6)),
           elements=st.integers(-8, 8).map(lambda i: i * 0.25)),
    arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
           elements=st.floats(-2, 2, allow_subnormal=False)))


@settings(max_examples=60, deadline=None)
@given(weights, st.floats(0, 3))
def test_grs_l2_is_autograd_of_its_energy(w, lam):
    wt = t(w, True)
    dims = tuple(range(1, w.ndim))
    alpha = wt.abs().mean(dim=dims, keepdim=True).detach()
    s = pm_sign(wt).detach()  # |w| = w s with the subgradient sign(0) = +1
    energy = lam / 2 * ((wt * s - alpha) ** 2).sum()
    energy.backward()
    assert_close(methods.grs_gradient(w, lam, "l2"), wt.grad, "GRS l2 vs autograd of (lam/2) sum(|W|-a)^2")


@settings(max_examples=60, deadline=None)
@given(weights, st.floats(0, 3))
def test_grs_l1_closed_form(w, lam):
    alpha = np.abs(w).mean(axis=tuple(range(1, w.ndim)), keepdims=True)
    expected = lam * np.where(np.abs(w) - alpha >= 0, 1.0, -1.0) * np.where(w >= 0, 1.0, -1.0)
    assert_exact(methods.grs_gradient(w, lam, "l1"), expected, "GRS l1 closed form")
    off_ties = (w != 0) & (np.abs(w) != alpha)
    wt = t(w, True)
    energy = lam * ((wt.abs() - t(alpha)).abs()).sum()
    energy.backward()
    assert_close(methods.grs_gradient(w, lam, "l1")[off_ties], wt.grad.numpy()[off_ties],
                 "GRS l1 vs autograd away from ties")


def test_grs_hand_values_and_schedule():
    w = np.array([[2.0, -1.0, 0.0, 1.0], [0.5, 0.5, -0.5, -0.5]], dtype=np.float32)
    # alpha = [1.0, 0.5]; sign(0) = +1
    assert_exact(methods.grs_gradient(w, 2.0, "l2"), 2 * np.array([[1, 0, -1, 0], [0, 0, 0, 0]]), "l2")
    assert_exact(methods.grs_gradient(w, 1.0, "l1"), np.array([[1, -1, -1, 1], [1, 1, -1, -1]]), "l1")
    assert methods.grs_gradient(w, 1.0).dtype == np.float32
    assert methods.grs_lambda(0, 0.1, 100) == 0.0
    assert methods.grs_lambda(50, 0.1, 100) == pytest.approx(0.05)
    assert methods.grs_lambda(500, 0.1, 100) == pytest.approx(0.1)
    assert methods.grs_lambda(0, 0.1, 0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="variant"):
        methods.grs_gradient(w, 1.0, "l3")
    with pytest.raises(ValueError, match="lambda"):
        methods.grs_gradient(w, -1.0)


# ------------------------------------------------------------------------------------------------
# ASM
# ------------------------------------------------------------------------------------------------

class RefElasticSigned(torch.autograd.Function):
    """BiT's signed elastic binarizer with the GSB alpha gradient (quant.elastic_binarize_forward)."""

    @staticmethod
    def forward(ctx, x, alpha):
        a = torch.where(alpha > EPS, alpha, torch.full_like(alpha, EPS))
        ctx.save_for_backward(x, a)
        return a * pm_sign(x)

    @staticmethod
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        q = x / a
        inside = (q.abs() <= 1).to(x.dtype)
        dalpha = ((pm_sign(x) - inside * q) * g).sum().reshape(1) / math.sqrt(x.numel())
        return inside * g, dalpha


class RefASM:
    """ASM written from its definition: out = binarizer(x - (c + r))."""

    def __init__(self, center, channels, momentum):
        self.center, self.momentum = center, momentum
        self.running = torch.full((channels,), float("nan"), dtype=torch.float64)
        self.shift = torch.zeros(channels, dtype=torch.float64)
        self.alpha = None  # the inner's alpha, set from the first batch

    def step(self, x, g, training, alpha_in_use):
        """One forward/backward; the binarizer runs with `alpha_in_use` (the implementation's value, so
        that ties |y| = alpha resolve the same way) after the reference's own init is recorded."""
        xt, rt = t(x, True), self.shift.clone().requires_grad_(True)
        flat = xt.detach().reshape(-1, x.shape[-1])
        if self.center in ("mean", "median"):
            if training:
                stat = flat.mean(0) if self.center == "mean" else torch.quantile(flat, 0.5, dim=0)
                if torch.isnan(self.running).any():
                    self.running = stat
                else:
                    self.running = self.running * (1 - self.momentum) + self.momentum * stat
            c = self.running
        elif self.center == "token":
            c = xt.mean(dim=-1, keepdim=True)
        else:
            c = 0
        y = xt - (c + rt)
        if self.alpha is None:
            self.alpha = 2 * y.detach().abs().mean().reshape(1)  # the inner's first-batch init
        at = t(alpha_in_use, True)
        out = RefElasticSigned.apply(y, at)
        out.backward(t(g))
        return out.detach(), xt.grad, rt.grad, at.grad


@settings(max_examples=40, deadline=None)
@given(st.data(), st.sampled_from(ASM_CENTERS), st.sampled_from([0.1, 0.5, 1.0]))
def test_asm_matches_torch(data, center, momentum):
    lead = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple))
    C = data.draw(st.integers(1, 6))
    asm = methods.ASM(quant.ElasticBinarizer(signed=True, alpha_grad="gsb", dtype=np.float64), C,
                      center=center, momentum=momentum, dtype=np.float64)
    ref = RefASM(center, C, momentum)
    for step, training in enumerate([True, True, True, False]):
        x = data.draw(arrays(np.int64, lead + (C,), elements=st.integers(-8, 8))).astype(np.float64) * 0.25
        g = data.draw(arrays(np.int64, lead + (C,), elements=st.integers(-4, 4))).astype(np.float64) * 0.5
        before = {k: b.copy() for k, b in asm.buffers.items()}
        out, cache = asm.forward(x, training)
        dx, grads = asm.backward(g, cache)
        r_out, r_dx, r_dshift, r_dalpha = ref.step(x, g, training, asm.params["alpha"].copy())
        what = f"ASM center={center} step {step} training={training}"
        if center in ("mean", "median"):
            assert_exact(asm.buffers["running_center"], ref.running, f"{what}: running_center")
            if not training:
                assert_exact(asm.buffers["running_center"], before["running_center"], f"{what}: frozen")
        assert_exact(np.sign(out), torch.sign(r_out), f"{what}: forward signs")
        assert_close(out, r_out, f"{what}: forward")
        assert_close(dx, r_dx, f"{what}: dx")
        assert_close(grads["shift"], r_dshift, f"{what}: dshift")
        assert_close(grads["alpha"], r_dalpha, f"{what}: dalpha (inner)")
        assert_close(asm.params["alpha"], ref.alpha, f"{what}: inner alpha (first-batch init)")
        assert set(grads) == {"shift", "alpha"}
        if training:  # a learning step, in place; the reference continues from the same state
            asm.params["shift"] -= 0.5 * grads["shift"]
            asm.params["alpha"] -= 0.5 * grads["alpha"]
            ref.shift = torch.tensor(asm.params["shift"])
            ref.alpha = torch.tensor(asm.params["alpha"])


def test_asm_state_fold_and_errors():
    rng = np.random.default_rng(4)
    inner = quant.ElasticBinarizer(signed=True, dtype=np.float64)
    asm = methods.ASM(inner, 3, center="median", dtype=np.float64)
    assert asm.params["alpha"] is inner.params["alpha"], "params must share the inner's arrays"
    assert np.isnan(asm.buffers["running_center"]).all()
    x = rng.normal(size=(4, 5, 3)) + np.array([1.0, -2.0, 0.5])
    with pytest.raises(ValueError, match="not initialised"):
        asm.forward(x, training=False)
    with pytest.raises(ValueError, match="not initialised"):
        methods.asm_fold_threshold(asm)
    asm.forward(x, training=True)
    assert_close(asm.buffers["running_center"], np.median(x.reshape(-1, 3), axis=0), "first batch sets c")
    asm.params["shift"][...] = [0.1, -0.2, 0.3]
    threshold = methods.asm_fold_threshold(asm)
    out, _ = asm.forward(x, training=False)
    assert_exact(out, inner.params["alpha"] * np.where(x - threshold >= 0, 1.0, -1.0),
                 "the folded threshold reproduces the eval output")
    assert "median" in repr(asm) and "ElasticBinarizer" in repr(asm)
    token = methods.ASM(quant.ElasticBinarizer(dtype=np.float64), 3, center="token", dtype=np.float64)
    assert "running_center" not in token.buffers
    with pytest.raises(ValueError, match="token"):
        methods.asm_fold_threshold(token)
    shift = methods.ASM(quant.ElasticBinarizer(dtype=np.float64), 3, center="shift", dtype=np.float64)
    assert_exact(methods.asm_fold_threshold(shift), np.zeros(3), "center shift: threshold = shift")
    with pytest.raises(ValueError, match="collide"):
        methods.ASM(quant.Shifted(quant.ElasticBinarizer(), 3), 3)
    with pytest.raises(ValueError, match="center"):
        methods.ASM(quant.ElasticBinarizer(), 3, center="mode")
    with pytest.raises(ValueError, match="channels"):
        asm.forward(np.zeros((2, 4)), training=True)


def test_asm_median_centre_gives_one_bit_per_channel():
    rng = np.random.default_rng(5)
    x = np.exp(rng.normal(size=(64, 8))) + np.arange(8)  # skewed, off-centre channels
    plain = methods.sign_entropy(x)
    asm = methods.ASM(quant.ElasticBinarizer(dtype=np.float64), 8, center="median", dtype=np.float64)
    asm.forward(x, training=True)
    shifted = methods.sign_entropy(x - methods.asm_fold_threshold(asm))
    assert plain == 0.0 and shifted == pytest.approx(1.0), (plain, shifted)


# ------------------------------------------------------------------------------------------------
# diagnostics
# ------------------------------------------------------------------------------------------------

def test_diagnostics_closed_forms():
    prev = np.array([[1.0, -1.0, 0.0, 2.0]])
    now = np.array([[1.0, 1.0, -0.5, 0.0]])
    assert methods.sign_flip_rate(prev, now) == 0.5

    w = np.array([[1.0, -1.0, 0.05, 2.0], [0.0, 0.0, 0.0, 4.0]])  # alpha = [1.0125, 1.0]
    assert methods.near_zero_mass(w) == 0.5
    assert methods.near_zero_mass(w, frac=0.01) == 3 / 8

    assert methods.bimodality(np.array([[-1.0, 1.0, 1.0, -1.0], [3.0, -3.0, -3.0, 3.0]])) == pytest.approx(1.0)
    assert methods.bimodality(np.array([[-2.0, 0.0, 0.0, 2.0]])) == pytest.approx(0.5)  # m2=2, m4=8
    assert np.isnan(methods.bimodality(np.ones((2, 3))))
    rng = np.random.default_rng(6)
    assert methods.bimodality(rng.normal(size=(50, 4000))) == pytest.approx(1 / 3, abs=0.01)
    assert methods.bimodality(rng.uniform(-1, 1, size=(50, 4000))) == pytest.approx(5 / 9, abs=0.01)

    counts, edges = methods.weight_histogram(np.array([[1.0, -1.0, 1.0, -1.0]]), bins=2, limit=2.0)
    assert_exact(counts, [2, 2], "histogram counts")
    assert_exact(edges, [-2.0, 0.0, 2.0], "histogram edges")
    counts, _ = methods.weight_histogram(np.array([[10.0, 0.0, 0.0, 0.0]]), bins=3, limit=3.0)
    assert_exact(counts, [0, 3, 1], "out-of-range values land in the edge bins")  # W/alpha = [4, 0, 0, 0]

    x = np.array([[1.0, 1.0, -1.0], [-1.0, 1.0, -1.0], [0.0, 2.0, -1.0], [-3.0, 0.0, 0.0]])
    p2 = 0.25
    h2 = -(p2 * np.log2(p2) + (1 - p2) * np.log2(1 - p2))
    assert methods.sign_entropy(x) == pytest.approx((1.0 + 0.0 + h2) / 3, rel=1e-12)

    assert methods.binarization_error(np.array([3.0, -1.0]), 1.0, 0.0) == pytest.approx(2 / np.sqrt(10))
    assert methods.binarization_error(np.array([[0.0, 2.0]]), np.array([1.0, 2.0]), np.array([0.5, 0.0])) \
        == pytest.approx(1 / 2)  # sign(-0.5) = -1, sign(2) = +1: residual [1, 0]
    with pytest.raises(ValueError, match="all-zero"):
        methods.binarization_error(np.zeros(3), 1.0, 0.0)
    with pytest.raises(ValueError, match="equal shapes"):
        methods.sign_flip_rate(np.zeros(2), np.zeros(3))
