"""Every op's forward and backward against PyTorch (float64, hypothesis-drawn shapes and values),
by finite differences for the real-valued ops, and the float32 path at float32 tolerance."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import adapter
from adapter import ops

torch = pytest.importorskip("torch", reason="PyTorch is the reference for these tests (pip install torch==2.13.0)")
F = torch.nn.functional

RTOL = 1e-10
ATOL = 1e-12


def tt(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)


def close(actual, expected, name, rtol=RTOL, atol=ATOL):
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=f"{name} differs from the reference")


# values: ordinary, exact zeros, large and small magnitudes
finite = st.one_of(
    st.floats(-3, 3, allow_nan=False, width=64),
    st.just(0.0),
    st.floats(-1e3, 1e3, allow_nan=False, width=64),
    st.floats(-1e-6, 1e-6, allow_nan=False, width=64),
)


def arrays(shape):
    return hnp.arrays(np.float64, shape, elements=finite)


dims = st.integers(1, 7)


@settings(max_examples=40)
@given(data=st.data(), rows=dims, k=dims, n=dims, bias=st.booleans())
def test_linear(data, rows, k, n, bias):
    x = data.draw(arrays((2, rows, k)), label="x")
    w = data.draw(arrays((n, k)), label="w")
    b = data.draw(arrays((n,)), label="b") if bias else None
    y, cache = ops.linear_forward(x, w, b)
    g = data.draw(arrays(y.shape), label="g")
    dx, dw, db = ops.linear_backward(g, cache)
    xt, wt = tt(x), tt(w)
    bt = tt(b) if bias else None
    yt = F.linear(xt, wt, bt)
    yt.backward(torch.from_numpy(g))
    scale = 1e-9 * (1 + np.abs(x).max() * np.abs(w).max() * k)  # cancellation in large sums
    close(y, yt, "linear out", atol=scale)
    close(dx, xt.grad, "linear dx", atol=1e-9 * (1 + np.abs(g).max() * np.abs(w).max() * n))
    close(dw, wt.grad, "linear dw", atol=1e-9 * (1 + np.abs(g).max() * np.abs(x).max() * 2 * rows))
    if bias:
        close(db, bt.grad, "linear db", atol=1e-9 * (1 + np.abs(g).max() * 2 * rows))
    else:
        assert db is None


moderate = st.floats(-4, 4, allow_nan=False, width=64)


@settings(max_examples=40)
@given(data=st.data(), rows=st.integers(1, 20), d=st.integers(2, 33))
def test_layernorm(data, rows, d):
    x = data.draw(hnp.arrays(np.float64, (rows, d), elements=moderate), label="x")
    x[0, 0] = 0.0  # exact zero
    gamma = data.draw(hnp.arrays(np.float64, (d,), elements=moderate), label="gamma")
    beta = data.draw(hnp.arrays(np.float64, (d,), elements=moderate), label="beta")
    g = data.draw(hnp.arrays(np.float64, (rows, d), elements=moderate), label="g")
    y, cache = ops.layernorm_forward(x, gamma, beta, 1e-6)
    dx, dgamma, dbeta = ops.layernorm_backward(g, cache)
    xt, gt, bt = tt(x), tt(gamma), tt(beta)
    yt = F.layer_norm(xt, (d,), gt, bt, eps=1e-6)
    yt.backward(torch.from_numpy(g))
    # a row with tiny variance amplifies rounding by 1/sqrt(var + eps) <= 1e3
    close(y, yt, "layernorm out", rtol=1e-9, atol=1e-9)
    close(dx, xt.grad, "layernorm dx", rtol=1e-8, atol=1e-8)
    close(dgamma, gt.grad, "layernorm dgamma", rtol=1e-9, atol=1e-9)
    close(dbeta, bt.grad, "layernorm dbeta")


def layernorm_in_order(x, gamma, beta, eps):
    """LayerNorm of each row with float64 sums taken element by element in order (the arithmetic the
    packed engine reproduces), in plain Python: the reference for the vectorized kernel's bits."""
    out = np.empty_like(x)
    for r, row in enumerate(x):
        mean = 0.0
        for v in row:
            mean += float(v)
        mean /= row.size
        var = 0.0
        for v in row:
            t = float(v) - mean
            var += t * t
        s = 1.0 / np.sqrt(var / row.size + float(eps))
        out[r] = (row.astype(np.float64) - mean) * s * gamma.astype(np.float64) + beta.astype(np.float64)
    return out


@settings(max_examples=20)
@given(data=st.data(), rows=st.integers(1, 150), d=st.integers(1, 40))
def test_layernorm_float32_bits_are_in_order_sums(data, rows, d):
    """The float32 forward sums eight rows at a time (and 64-row tasks in parallel), yet every row has
    the bits of the in-order float64 sums: rows counts cross both block sizes."""
    x = data.draw(hnp.arrays(np.float32, (rows, d), elements=st.floats(-1e3, 1e3, width=32)), label="x")
    x[0, 0] = 0.0
    gamma = data.draw(hnp.arrays(np.float32, (d,), elements=st.floats(-4, 4, width=32)), label="gamma")
    beta = data.draw(hnp.arrays(np.float32, (d,), elements=st.floats(-4, 4, width=32)), label="beta")
    y, _ = ops.layernorm_forward(x, gamma, beta, 1e-6)
    expected = layernorm_in_order(x, gamma, beta, np.float32(1e-6))
    np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32),
                                  err_msg="float32 LayerNorm differs from the in-order float64 sums")


@settings(max_examples=60)
@given(data=st.data(), x=hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), elements=finite),
       approximate=st.sampled_from(["none", "tanh"]), with_bias=st.booleans())
def test_gelu(data, x, approximate, with_bias):
    """GELU(x) and GELU(x + bias) (the fused bias of the linear layer before it)."""
    b = data.draw(arrays((x.shape[-1],)), label="b") if with_bias else None
    y, cache = ops.gelu_forward(x, approximate, bias=b)
    g = np.cos(np.arange(x.size)).reshape(x.shape)
    dx, db = ops.gelu_backward(g, cache)
    xt = tt(x)
    bt = tt(b) if with_bias else None
    yt = F.gelu(xt + bt if with_bias else xt, approximate=approximate)
    yt.backward(torch.from_numpy(g))
    close(y, yt, f"gelu[{approximate}] out")
    close(dx, xt.grad, f"gelu[{approximate}] dx")
    if with_bias:
        close(db, bt.grad, f"gelu[{approximate}] dbias", atol=1e-10)
    else:
        assert db is None


@settings(max_examples=40)
@given(x=hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=4, max_side=9), elements=finite))
def test_softmax(x):
    y, cache = ops.softmax_forward(x)
    g = np.sin(np.arange(x.size) + 0.5).reshape(x.shape)
    dx = ops.softmax_backward(g, cache)
    xt = tt(x)
    yt = torch.softmax(xt, dim=-1)
    yt.backward(torch.from_numpy(g))
    close(y, yt, "softmax out")
    close(dx, xt.grad, "softmax dx")


def test_float32_exp_is_rounded_float64_exp():
    """The float32 softmax's exp (vectorized, float64 inside) gives float32(exp(x)) computed in float64,
    bit for bit, on 2 * 10^6 points across the whole float32 range and on the edge cases."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-110, 95, 10**6), rng.uniform(-20, 0, 10**6),
                        [0.0, -0.0, np.inf, -np.inf, np.nan, -103.97, -103.96, -87.34, 88.72, 88.73,
                         1e-30, -1e-30]]).astype(np.float32)
    with np.errstate(over="ignore"):
        expected = np.exp(x.astype(np.float64)).astype(np.float32)
    got = ops.exp_f32(x)
    differ = (got.view(np.uint32) != expected.view(np.uint32)) & ~(np.isnan(got) & np.isnan(expected))
    assert not differ.any(), f"exp_f32 differs at x = {x[differ][:5]}: {got[differ][:5]} vs {expected[differ][:5]}"


def softmax_in_order(x):
    """float32 softmax of each row as the kernel defines it, in plain Python: e = float32(exp(x - max))
    (exp in float64), the float64 sum of e in order, out = float32(e * (1 / sum))."""
    out = np.empty_like(x)
    for r, row in enumerate(x):
        e = np.exp((row - row.max()).astype(np.float64)).astype(np.float32)
        total = 0.0
        for v in e:
            total += float(v)
        out[r] = e.astype(np.float64) * (1.0 / total)
    return out


@settings(max_examples=20)
@given(data=st.data(), rows=st.integers(1, 150), n=st.integers(1, 70))
def test_softmax_float32_bits_are_in_order_sums(data, rows, n):
    """The float32 softmax sums eight rows at a time (64-row tasks in parallel), yet every row has the
    bits of the in-order definition: row counts cross both block sizes."""
    x = data.draw(hnp.arrays(np.float32, (rows, n), elements=st.floats(-60, 60, width=32)), label="x")
    x[0, 0] = 0.0
    y, _ = ops.softmax_forward(x)
    np.testing.assert_array_equal(y.view(np.uint32), softmax_in_order(x).view(np.uint32),
                                  err_msg="float32 softmax differs from its in-order definition")


@settings(max_examples=30)
@given(data=st.data(), b=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(1, 9), d=st.integers(1, 6))
def test_attention_and_heads(data, b, h, n, d):
    """split heads -> softmax(Q K^T / sqrt(d)) V -> merge heads, against torch's SDPA."""
    qkv = data.draw(hnp.arrays(np.float64, (b, n, 3 * h * d), elements=moderate), label="qkv")
    (q, k, v), c_split = ops.split_heads_forward(qkv, h)
    o, c_attn = ops.attention_forward(q, k, v)
    m, c_merge = ops.merge_heads_forward(o)
    g = data.draw(hnp.arrays(np.float64, m.shape, elements=moderate), label="g")
    dq, dk, dv, qgrads = ops.attention_backward(ops.merge_heads_backward(g, c_merge), c_attn)
    assert qgrads == {}
    dqkv = ops.split_heads_backward(dq, dk, dv, c_split)

    qkvt = tt(qkv)
    qt, kt, vt = qkvt.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    mt = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).reshape(b, n, h * d)
    mt.backward(torch.from_numpy(g))
    close(m, mt, "attention out")
    close(dqkv, qkvt.grad, "attention d qkv")

    if not adapter.is_minibvit():
        return
    # impl_specific (memory sharing): the gradients written straight into d qkv's layout (no
    # interleaving copy): the same bits
    views = ops.split_heads_grad_views(c_split, qkv.dtype)
    dq2, dk2, dv2, _ = ops.attention_backward(ops.merge_heads_backward(g, c_merge), c_attn, out=views)
    dqkv2 = ops.split_heads_backward(dq2, dk2, dv2, c_split)
    assert np.shares_memory(dqkv2, views[0]), "split_heads_backward copied gradients already in place"
    np.testing.assert_array_equal(dqkv2, dqkv)
    assert np.shares_memory(m, o), "merge_heads_forward copied the attention output"


@settings(max_examples=30)
@given(data=st.data(), b=st.integers(1, 3), c=st.integers(1, 3), p=st.integers(1, 4), gh=st.integers(1, 3),
       gw=st.integers(1, 3), dim=st.integers(1, 5))
def test_patch_embed(data, b, c, p, gh, gw, dim):
    x = data.draw(hnp.arrays(np.float64, (b, c, gh * p, gw * p), elements=moderate), label="x")
    w = data.draw(hnp.arrays(np.float64, (dim, c, p, p), elements=moderate), label="w")
    bias = data.draw(hnp.arrays(np.float64, (dim,), elements=moderate), label="bias")
    y, cache = ops.patch_embed_forward(x, w, bias, p)
    g = data.draw(hnp.arrays(np.float64, y.shape, elements=moderate), label="g")
    dx, dw, db = ops.patch_embed_backward(g, cache)
    xt, wt, bt = tt(x), tt(w), tt(bias)
    yt = F.conv2d(xt, wt, bt, stride=p).flatten(2).transpose(1, 2)
    yt.backward(torch.from_numpy(g))
    close(y, yt, "patch_embed out")
    close(dx, xt.grad, "patch_embed dx")
    close(dw, wt.grad, "patch_embed dw")
    close(db, bt.grad, "patch_embed db")


@settings(max_examples=30)
@given(data=st.data(), b=st.integers(1, 3), n=st.integers(1, 6), d=st.integers(1, 5), distilled=st.booleans(),
       mode=st.sampled_from(["token", "mean"]))
def test_tokens_and_pool(data, b, n, d, distilled, mode):
    x = data.draw(hnp.arrays(np.float64, (b, n, d), elements=moderate), label="x")
    prefix = 2 if distilled else 1
    pos = data.draw(hnp.arrays(np.float64, (1, n + prefix, d), elements=moderate), label="pos")
    cls = data.draw(hnp.arrays(np.float64, (1, 1, d), elements=moderate), label="cls")
    dist = data.draw(hnp.arrays(np.float64, (1, 1, d), elements=moderate), label="dist") if distilled else None
    t, c_tok = ops.tokens_forward(x, pos, cls, dist)
    pooled, c_pool = ops.pool_forward(t, mode, prefix)
    g = data.draw(hnp.arrays(np.float64, pooled.shape, elements=moderate), label="g")
    dx, dpos, dcls, ddist = ops.tokens_backward(ops.pool_backward(g, c_pool), c_tok)

    xt, post, clst = tt(x), tt(pos), tt(cls)
    parts = [clst.expand(b, -1, -1)]
    if distilled:
        distt = tt(dist)
        parts.append(distt.expand(b, -1, -1))
    tt_ = torch.cat(parts + [xt], dim=1) + post
    pt = tt_[:, 0] if mode == "token" else tt_[:, prefix:].mean(dim=1)
    pt.backward(torch.from_numpy(g))
    close(pooled, pt, "pool out")
    close(dx, xt.grad, "tokens dx")
    close(dpos, post.grad, "dpos_embed")
    close(dcls, clst.grad, "dcls_token")
    if distilled:
        close(ddist, distt.grad, "ddist_token")
    else:
        assert ddist is None


def test_residual():
    x, y = np.arange(6.0), np.ones(6)
    out, cache = ops.residual_forward(x, y)
    np.testing.assert_array_equal(out, x + y)
    dx, dy = ops.residual_backward(np.full(6, 2.0), cache)
    np.testing.assert_array_equal(dx, np.full(6, 2.0))
    np.testing.assert_array_equal(dy, np.full(6, 2.0))


@settings(max_examples=40)
@given(data=st.data(), b=st.integers(1, 6), c=st.integers(2, 7), smoothing=st.sampled_from([0.0, 0.1, 0.37]))
def test_cross_entropy(data, b, c, smoothing):
    z = data.draw(hnp.arrays(np.float64, (b, c), elements=st.floats(-30, 30, allow_nan=False, width=64)), label="z")
    y = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=b, max_size=b), label="y"))
    loss, cache = ops.cross_entropy_forward(z, y, smoothing)
    dz = ops.cross_entropy_backward(1.0, cache)
    zt = tt(z)
    lt = F.cross_entropy(zt, torch.from_numpy(y), label_smoothing=smoothing)
    lt.backward()
    close(loss, lt, "cross-entropy loss")
    close(dz, zt.grad, "cross-entropy dlogits")


@settings(max_examples=40)
@given(data=st.data(), b=st.integers(1, 6), c=st.integers(2, 7), tau=st.sampled_from([1.0, 2.0, 4.0]))
def test_kd_soft(data, b, c, tau):
    s = data.draw(hnp.arrays(np.float64, (b, c), elements=st.floats(-20, 20, allow_nan=False, width=64)), label="s")
    t = data.draw(hnp.arrays(np.float64, (b, c), elements=st.floats(-20, 20, allow_nan=False, width=64)), label="t")
    loss, cache = ops.kd_soft_forward(s, t, tau)
    ds = ops.kd_soft_backward(1.0, cache)
    st_ = tt(s)
    lt = F.kl_div(F.log_softmax(st_ / tau, -1), F.log_softmax(torch.from_numpy(t) / tau, -1),
                  reduction="batchmean", log_target=True) * tau * tau
    lt.backward()
    close(loss, lt, "KD loss", atol=1e-10)
    close(ds, st_.grad, "KD dlogits")


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31), p=st.sampled_from([0.0, 0.1, 0.5]), shape=hnp.array_shapes(min_dims=2, max_dims=3, max_side=6))
def test_dropout_and_drop_path(seed, p, shape):
    x = np.random.default_rng(0).standard_normal(shape)
    for fwd, bwd in ((ops.dropout_forward, ops.dropout_backward), (ops.drop_path_forward, ops.drop_path_backward)):
        y1, c1 = fwd(x, p, np.random.default_rng(seed), True)
        y2, _ = fwd(x, p, np.random.default_rng(seed), True)
        np.testing.assert_array_equal(y1, y2, err_msg="same seed must give the same mask")
        kept = y1 != 0
        np.testing.assert_allclose(y1[kept], x[kept] / (1 - p), rtol=1e-15)
        mask = bwd(np.ones_like(x), c1)  # the backward multiplies by the same scaled mask
        assert set(np.unique(mask)) <= {0.0, 1.0 / (1 - p)}
        np.testing.assert_array_equal(mask * x, y1)
        assert fwd(x, p, None, False)[0] is x  # identity at evaluation
    # drop-path drops whole samples
    y, c = ops.drop_path_forward(np.ones((64, 3, 2)), 0.5, np.random.default_rng(seed), True)
    per_sample = y.reshape(64, -1)
    assert np.all((per_sample == 0).all(1) | (per_sample == 2).all(1))


# ---------------------------------------------------------------------------------------------
# finite differences for the real-valued ops


def fd_check(f, x, g, analytic, name, eps=1e-6):
    """Central differences of <g, f(x)> against the analytic gradient."""
    num = np.zeros_like(x)
    flat = x.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = np.vdot(g, f(x))
        flat[i] = old - eps
        fm = np.vdot(g, f(x))
        flat[i] = old
        num.reshape(-1)[i] = (fp - fm) / (2 * eps)
    np.testing.assert_allclose(analytic, num, rtol=1e-6, atol=1e-7, err_msg=f"{name}: analytic vs finite differences")


def test_finite_differences(rng):
    x = rng.standard_normal((2, 3, 5))
    gamma, beta = rng.standard_normal(5), rng.standard_normal(5)
    g = rng.standard_normal((2, 3, 5))
    _, c = ops.layernorm_forward(x, gamma, beta)
    dx, dgamma, _ = ops.layernorm_backward(g, c)
    fd_check(lambda a: ops.layernorm_forward(a, gamma, beta)[0], x, g, dx, "layernorm dx")
    fd_check(lambda a: ops.layernorm_forward(x, a, beta)[0], gamma.copy(), g, dgamma, "layernorm dgamma")
    for approx in ("none", "tanh"):
        _, c = ops.gelu_forward(x, approx, bias=beta)
        dx, dbias = ops.gelu_backward(g, c)
        fd_check(lambda a: ops.gelu_forward(a, approx, bias=beta)[0], x.copy(), g, dx, f"gelu {approx}")
        fd_check(lambda a: ops.gelu_forward(x, approx, bias=a)[0], beta.copy(), g, dbias, f"gelu {approx} bias")
    _, c = ops.softmax_forward(x)
    fd_check(lambda a: ops.softmax_forward(a)[0], x.copy(), g, ops.softmax_backward(g, c), "softmax")
    q, k, v = (rng.standard_normal((2, 2, 4, 3)) for _ in range(3))
    go = rng.standard_normal((2, 2, 4, 3))
    _, c = ops.attention_forward(q, k, v)
    dq, dk, dv, _ = ops.attention_backward(go, c)
    fd_check(lambda a: ops.attention_forward(a, k, v)[0], q.copy(), go, dq, "attention dq")
    fd_check(lambda a: ops.attention_forward(q, a, v)[0], k.copy(), go, dk, "attention dk")
    fd_check(lambda a: ops.attention_forward(q, k, a)[0], v.copy(), go, dv, "attention dv")
    z, y = rng.standard_normal((3, 4)), np.array([0, 3, 1])
    _, c = ops.cross_entropy_forward(z, y, 0.1)
    fd_check(lambda a: np.array(ops.cross_entropy_forward(a, y, 0.1)[0]), z.copy(), np.array(1.0),
             ops.cross_entropy_backward(1.0, c), "cross-entropy")
    t = rng.standard_normal((3, 4))
    _, c = ops.kd_soft_forward(z, t, 2.0)
    fd_check(lambda a: np.array(ops.kd_soft_forward(a, t, 2.0)[0]), z.copy(), np.array(1.0),
             ops.kd_soft_backward(1.0, c), "KD")


def test_float32_path_matches_float64(rng):
    """The float32 training path agrees with float64 at float32 tolerance, and stays float32."""
    x = rng.standard_normal((4, 9, 16))
    gamma, beta = rng.standard_normal(16), rng.standard_normal(16)
    g = rng.standard_normal(x.shape)
    for fwd, bwd, args in (
        (ops.layernorm_forward, ops.layernorm_backward, (gamma, beta)),
        (lambda x, b: ops.gelu_forward(x, bias=b), ops.gelu_backward, (beta,)),
        (ops.softmax_forward, ops.softmax_backward, ()),
    ):
        y64, c64 = fwd(x, *args)
        y32, c32 = fwd(x.astype(np.float32), *(a.astype(np.float32) for a in args))
        op = bwd.__name__.removesuffix("_backward")
        assert y32.dtype == np.float32, f"{op} forward left float32"
        np.testing.assert_allclose(y32, y64, rtol=2e-5, atol=2e-5, err_msg=f"{op} forward float32")
        d64 = bwd(g, c64)
        d32 = bwd(g.astype(np.float32), c32)
        d64 = d64 if isinstance(d64, tuple) else (d64,)
        d32 = d32 if isinstance(d32, tuple) else (d32,)
        for a32, a64 in zip(d32, d64):
            assert a32.dtype == np.float32
            np.testing.assert_allclose(a32, a64, rtol=1e-4, atol=1e-4, err_msg=f"{bwd.__name__} float32")
