"""minibvit.numerics (the Numba row kernels) against its definitions, bit for bit where the kernels
promise bits (in-order float64 sums, the float32 exp, products and copies), the NumPy bodies of
minibvit.ops against the numerics they dispatch to, and the engine's reuse of the same kernels."""
import ast
import math
import pathlib

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from minibvit import kernels, numerics, ops
from minibvit.engine import fused

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

PACKAGE = pathlib.Path(numerics.__file__).parent


def bits_equal(actual, expected, what):
    actual, expected = np.atleast_1d(actual), np.atleast_1d(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    np.testing.assert_array_equal(actual.view(np.uint8), expected.view(np.uint8), err_msg=what)


def in_order_sum(values):
    """sum of float64(values) from 0.0, one addition at a time, left to right."""
    total = 0.0
    for v in values:
        total += float(v)
    return total


def moments_in_order(row):
    n = row.size
    mean = in_order_sum(row) / n
    deviations = [float(v) - mean for v in row]
    var = in_order_sum([t * t for t in deviations]) / n  # t * t, not t ** 2: pow() is not always the rounded square
    return mean, var


rows_f32 = st.integers(1, 12).flatmap(
    lambda d: hnp.arrays(np.float32, st.tuples(st.integers(1, 20), st.just(d)),
                         elements=st.floats(-1e3, 1e3, width=32)))


# ---------------------------------------------------------------------------------------------
# LayerNorm building blocks: the float64 moments and the normalise step (shared with the engine)

@settings(max_examples=30)
@given(x=rows_f32)
def test_layernorm_moments_are_in_order_sums(x):
    for r in range(x.shape[0]):
        assert numerics.layernorm_moments(x[r]) == moments_in_order(x[r]), f"row {r}"


@settings(max_examples=30)
@given(x=hnp.arrays(np.float32, st.tuples(st.just(8), st.integers(1, 40)), elements=st.floats(-1e3, 1e3, width=32)))
def test_eight_row_moments_equal_one_row_moments(x):
    """layernorm_moments8 runs eight rows as independent chains: each row keeps its in-order bits."""
    means, variances = numerics.layernorm_moments8(x, 0, np.empty((8, x.shape[1]), np.float64))
    for k in range(8):
        assert (means[k], variances[k]) == numerics.layernorm_moments(x[k]), f"row {k}"


def test_normalize_row_with_xhat_in_out_gives_the_same_out(rng):
    """The engine passes out as xhat (it wants only out): the same bits as a separate xhat."""
    x = rng.standard_normal(37).astype(np.float32)
    gamma, beta = rng.standard_normal(37).astype(np.float32), rng.standard_normal(37).astype(np.float32)
    mean, var = numerics.layernorm_moments(x)
    out, xhat = np.empty_like(x), np.empty_like(x)
    rstd = numerics.layernorm_normalize_row(x, mean, var, gamma, beta, np.float32(1e-6), out, xhat)
    alone = np.empty_like(x)
    rstd_alone = numerics.layernorm_normalize_row(x, mean, var, gamma, beta, np.float32(1e-6), alone, alone)
    bits_equal(alone, out, "out with xhat = out")
    assert rstd == rstd_alone == 1.0 / math.sqrt(var + float(np.float32(1e-6)))
    bits_equal(xhat, ((x.astype(np.float64) - mean) * rstd).astype(np.float32), "xhat")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 63, 64, 65, 130])
def test_layernorm_rows_are_the_in_order_definition(rng, dtype, rows):
    """numerics.layernorm: every row from its in-order float64 moments, whatever its place in the
    eight-row blocks and 64-row tasks; xhat and rstd stored in the input dtype."""
    d = 23
    x = (rng.standard_normal((rows, d)) * 10).astype(dtype)
    gamma, beta = rng.standard_normal(d).astype(dtype), rng.standard_normal(d).astype(dtype)
    out, xhat, rstd = numerics.layernorm(x, gamma, beta, 1e-6)
    eps = dtype(1e-6)
    for r in range(rows):
        mean, var = moments_in_order(x[r])
        s = 1.0 / math.sqrt(var + float(eps))
        h = (x[r].astype(np.float64) - mean) * s
        bits_equal(out[r], (h * gamma.astype(np.float64) + beta.astype(np.float64)).astype(dtype), f"out row {r}")
        bits_equal(xhat[r], h.astype(dtype), f"xhat row {r}")
        bits_equal(rstd[r], dtype(s), f"rstd row {r}")


@pytest.mark.parametrize("rows", [1, 8, 15, 16, 17, 40])
def test_engine_fused_layernorm_is_numerics_layernorm(rng, rows):
    """The engine's residual + LayerNorm kernel (out_mode 2: the float32 LayerNorm output) calls the
    same moments and normalise step: the bits of numerics.layernorm (rows cross its 8-row blocks and
    16-row tasks)."""
    d = 40
    x = (rng.standard_normal((rows, d)) * 3).astype(np.float32)
    gamma, beta = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    expected, _, _ = numerics.layernorm(x.copy(), gamma, beta, np.float32(1e-6))
    h = np.empty_like(x)
    dummy_f, dummy_i, dummy_v = np.zeros((1, 1), np.float32), np.zeros((1, 1), np.int32), np.zeros(1, np.float32)
    fused.residual_norm_pack(x, dummy_f, dummy_i, dummy_i[0], dummy_v, dummy_v, 0, gamma, beta, np.float32(1e-6),
                             np.zeros(d, np.float32), np.zeros((rows, 1), np.uint64), h, 2)
    bits_equal(h, expected, "engine LayerNorm")


# ---------------------------------------------------------------------------------------------
# exp, softmax

def test_exp_f32_is_float32_of_the_float64_exp():
    x = np.concatenate([np.linspace(-110, 95, 200_001, dtype=np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -103.97, 88.72], np.float32)])
    with np.errstate(over="ignore"):
        expected = np.exp(x.astype(np.float64)).astype(np.float32)
    bits_equal(numerics.exp_f32(x), expected, "exp_f32")


def test_engine_exp_table_uses_the_softmax_exp():
    d, s_qk, inv_sqrt_d = 8, np.float32(0.37), np.float32(1 / math.sqrt(8))
    table = fused.exp_table(d, s_qk, inv_sqrt_d)
    x = (np.arange(-d, d + 1).astype(np.float32) * s_qk) * inv_sqrt_d
    bits_equal(table, numerics.exp_f32(x[None, :] - x[:, None]), "exp table")


@pytest.mark.parametrize("rows", [1, 5, 8, 63, 64, 65, 200])
def test_float32_softmax_is_its_in_order_definition(rng, rows):
    n = 19
    x = (rng.standard_normal((rows, n)) * 4).astype(np.float32)
    y = numerics.softmax(x)
    for r in range(rows):
        e = numerics.exp_f32(x[r] - x[r].max())
        bits_equal(y[r], (e.astype(np.float64) * (1.0 / in_order_sum(e))).astype(np.float32), f"row {r}")


def test_row_max_of_ints_and_floats():
    assert numerics.row_max(np.array([3, -7, 9, 9, 2], np.int32)) == 9
    assert numerics.row_max(np.array([-3.5, -0.25, -8.0], np.float32)) == np.float32(-0.25)


# ---------------------------------------------------------------------------------------------
# products, copies and adds: the same bits as NumPy; reductions independent of the thread count

def test_stacked_matmul_has_numpy_bits(rng):
    a, b = rng.standard_normal((6, 3, 17, 8)).astype(np.float32), rng.standard_normal((6, 3, 8, 11)).astype(np.float32)
    bits_equal(numerics.stacked_matmul(a, b), np.matmul(a, b), "stacked matmul")
    out = np.empty((6, 17, 3, 11), np.float32).transpose(0, 2, 1, 3)  # a view into another layout
    numerics.stacked_matmul(a, b, out=out)
    bits_equal(np.ascontiguousarray(out), np.matmul(a, b), "stacked matmul into a view")


def test_interleave_heads_and_adds_have_numpy_bits(rng):
    dq, dk, dv = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    out = np.empty((2, 5, 3, 3, 4))
    numerics.interleave_heads(dq, dk, dv, out)
    bits_equal(out, np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4), "interleave_heads")
    x, y = rng.standard_normal((70, 33)).astype(np.float32), rng.standard_normal((70, 33)).astype(np.float32)
    bits_equal(numerics.add(x, y), x + y, "add")
    b = rng.standard_normal(33).astype(np.float32)
    expected = x + b
    numerics.add_to_rows(x, b)
    bits_equal(x, expected, "add_to_rows")


def test_reductions_do_not_depend_on_the_thread_count(rng):
    threads = numba.get_num_threads()
    x = rng.standard_normal((301, 29)).astype(np.float32)
    d = rng.standard_normal((301, 29)).astype(np.float32)
    gamma, beta = rng.standard_normal(29).astype(np.float32), rng.standard_normal(29).astype(np.float32)
    results = []
    for n in sorted({1, threads}):
        numba.set_num_threads(n)
        try:
            _, xhat, rstd = numerics.layernorm(x, gamma, beta, 1e-6)
            results.append((numerics.column_sums(x), numerics.layernorm_backward(d, xhat, rstd, gamma),
                            numerics.gelu_rows_backward(x, beta, d, "none")))
        finally:
            numba.set_num_threads(threads)
    for other in results[1:]:
        for k, (got, first) in enumerate(zip(_flat(other), _flat(results[0]))):
            bits_equal(got, first, f"result {k} at {threads} threads")
    np.testing.assert_allclose(results[0][0], x.sum(axis=0, dtype=np.float64), rtol=1e-5, atol=1e-4)


def _flat(nested):
    for item in nested:
        if isinstance(item, tuple):
            yield from _flat(item)
        else:
            yield item


# ---------------------------------------------------------------------------------------------
# ops' NumPy bodies (ops.USE_NUMERICS = False) compute what numerics computes

def both_paths(monkeypatch, fn):
    fast = fn()
    monkeypatch.setattr(ops, "USE_NUMERICS", False)
    plain = fn()
    monkeypatch.setattr(ops, "USE_NUMERICS", True)
    return fast, plain


def assert_close_tree(fast, plain, what, rtol, atol):
    for k, (a, b) in enumerate(zip(_flat(fast), _flat(plain))):
        if a is None or isinstance(a, dict):
            assert b is None or b == a, what
            continue
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{what} [{k}]")


TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-5)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numpy_bodies_match_numerics(monkeypatch, rng, dtype):
    tol = TOL[dtype]
    x = rng.standard_normal((4, 9, 12)).astype(dtype)
    d = rng.standard_normal((4, 9, 12)).astype(dtype)
    gamma, beta = rng.standard_normal(12).astype(dtype), rng.standard_normal(12).astype(dtype)
    w, b = rng.standard_normal((7, 12)).astype(dtype), rng.standard_normal(7).astype(dtype)
    dy = rng.standard_normal((4, 9, 7)).astype(dtype)

    def layernorm():
        y, c = ops.layernorm_forward(x, gamma, beta)
        return y, ops.layernorm_backward(d, c)

    def gelu(approximate, bias):
        y, c = ops.gelu_forward(x, approximate, bias=bias)
        return y, ops.gelu_backward(d, c)

    def softmax():
        y, c = ops.softmax_forward(x)
        return y, ops.softmax_backward(d, c)

    def linear():
        y, c = ops.linear_forward(x, w, b)
        return y, ops.linear_backward(dy, c)

    def attention():
        qkv = rng.standard_normal((2, 6, 3 * 8)).astype(dtype)
        (q, k, v), c_split = ops.split_heads_forward(qkv, 2)
        o, c = ops.attention_forward(q, k, v)
        m, c_merge = ops.merge_heads_forward(o)
        dq, dk, dv, _ = ops.attention_backward(ops.merge_heads_backward(np.cos(m), c_merge), c)
        return m, ops.split_heads_backward(dq, dk, dv, c_split)

    cases = {"layernorm": layernorm, "softmax": softmax, "linear": linear, "add": lambda: ops.add(x, d),
             "gelu none": lambda: gelu("none", None), "gelu none + bias": lambda: gelu("none", beta),
             "gelu tanh": lambda: gelu("tanh", None), "gelu tanh + bias": lambda: gelu("tanh", beta)}
    for name, fn in cases.items():
        fast, plain = both_paths(monkeypatch, fn)
        assert_close_tree(fast if isinstance(fast, tuple) else (fast,), plain if isinstance(plain, tuple) else (plain,),
                          name, **tol)
    state = rng.bit_generator.state
    fast = attention()
    rng.bit_generator.state = state
    monkeypatch.setattr(ops, "USE_NUMERICS", False)
    plain = attention()
    assert_close_tree(fast, plain, "attention", **tol)


# ---------------------------------------------------------------------------------------------
# where things live

def _decorated_intrinsics(path):
    tree = ast.parse(path.read_text())
    return [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            for dec in node.decorator_list if getattr(dec, "id", getattr(dec, "attr", None)) == "intrinsic"]


def test_every_intrinsic_lives_in_minibvit_intrinsics():
    elsewhere = {str(p.relative_to(PACKAGE)): names for p in PACKAGE.rglob("*.py")
                 if p.name != "intrinsics.py" and (names := _decorated_intrinsics(p))}
    assert not elsewhere, f"@intrinsic outside minibvit/intrinsics.py: {elsewhere}"
    assert "popcount" in _decorated_intrinsics(PACKAGE / "intrinsics.py")


def test_engine_names_no_method():
    """engine code branches on packed_kind(scheme), read from the method registry's QuantizerTable.packed:
    it never compares `scheme` with ==, and no method name appears in it as a string constant."""
    elsewhere = []
    for path in (PACKAGE / "engine").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            # "binary" and "gsb" are also packed kinds; these names are only methods or tables
            if isinstance(node, ast.Constant) and node.value in ("fp", "binaryvit", "tervit", "tervit_w8a8", "gsb_stage1"):
                elsewhere.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Eq, ast.NotEq)) for o in node.ops):
                sides = [node.left, *node.comparators]
                assert not any(getattr(side, "id", getattr(side, "attr", None)) == "scheme" for side in sides), \
                    f"{path.name}:{node.lineno} compares a method name"
    assert not elsewhere, f"method names in the engine: {elsewhere}"


def test_ternary_weight_sums_are_the_row_sums_of_the_weight(rng):
    """kernels.ternary_weight_sums (the 8-bit kernels' and the engine's zero-point correction)."""
    w = rng.integers(-1, 2, size=(37, 130)).astype(np.float32)
    nonzero, sign = kernels.pack_ternary_weight(w)
    np.testing.assert_array_equal(kernels.ternary_weight_sums(nonzero, sign), w.sum(axis=1).astype(np.int64))


def test_float32_gelu_never_forms_a_subnormal_and_keeps_its_accuracy_in_the_tails():
    """The float32 GELU evaluates Phi and the density at v clamped to [-12, 12] (numerics.GELU_CLAMP):
    no value it forms is subnormal (they cost ~100 cycles an operation), up to 12 the formulas are
    unchanged, beyond it the GELU is v or v Phi(-12), its derivative 1 or about v pdf(12); against
    float64 the error stays within 1e-5 relative (the kernel: ~2e-6, up to 1e-5 far in the negative
    tail) plus what the clamp leaves, below 1e-30 absolute for |v| <= 40."""
    clamp = np.float32(numerics.GELU_CLAMP)
    above = np.nextafter(clamp, np.float32(99))
    v = np.concatenate([np.linspace(-40, 40, 4001), [clamp, -clamp, above, -above, 0.0, -0.0]])
    x = v.astype(np.float32).reshape(1, -1)
    out = numerics.gelu_rows(x, None, "none")
    dx, _ = numerics.gelu_rows_backward(x, None, np.ones_like(x), "none")
    tiny = np.finfo(np.float32).tiny
    for name, got in (("gelu", out), ("gelu'", dx)):
        assert ((got == 0) | (np.abs(got) >= tiny)).all(), f"{name}: a subnormal value"
    x64 = x.astype(np.float64)
    phi = 0.5 * np.vectorize(math.erfc)(-x64 / math.sqrt(2))
    pdf = np.exp(-0.5 * x64 ** 2) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(out, x64 * phi, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(dx, phi + x64 * pdf, rtol=1e-5, atol=1e-7)  # atol: its zero near v = -0.75
    beyond = x > clamp
    assert (out[beyond] == x[beyond]).all() and (dx[beyond] == 1).all()
    inside = np.abs(x) <= clamp  # the formulas themselves: the same bits as Phi at v
    bits = numerics.gelu_rows(np.where(inside, x, 0).astype(np.float32), None, "none")
    assert (bits[inside] == out[inside]).all()
    assert np.isnan(numerics.gelu_rows(np.full((1, 3), np.nan, np.float32), None, "none")).all()


def test_column_sums_read_a_view_where_it_lies(rng):
    """column_sums of the attention's q view of a qkv array (rows apart, row_table) is the column sum of
    its rows in order of its leading indices: the bits of the same rows made contiguous."""
    qkv = rng.standard_normal((5, 33, 3, 2, 16)).astype(np.float32)
    view = qkv[:, :, 1].transpose(0, 2, 1, 3)
    flat, starts = numerics.row_table(view)
    assert np.shares_memory(flat, qkv) and starts.size == 5 * 2 * 33
    rows = np.stack([flat[s:s + 16] for s in starts])
    np.testing.assert_array_equal(rows, np.ascontiguousarray(view).reshape(-1, 16))
    bits_equal(numerics.column_sums(view), numerics.column_sums(rows), "column_sums of the view")
    np.testing.assert_allclose(numerics.column_sums(view), view.sum(axis=(0, 1, 2), dtype=np.float64), rtol=1e-5,
                               atol=1e-5)
    assert numerics.row_table(np.zeros((4, 6), np.float32).T) is None  # a strided last axis: no table
