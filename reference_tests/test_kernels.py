"""minibvit.kernels: the fast bit-packed kernels against their NumPy references and against plain
dense matmuls of the unpacked +-1 / {0,1} / ternary / int8 matrices.

Integer outputs are compared bit for bit. Shapes cover K that is not a multiple of 64 (1, 63, 64,
65, 127, 200), M or N = 1, rows of all-equal signs and exact zeros (sign(0) = +1, -0.0 included).
The last test recompiles the kernels for an AVX2-only CPU (no VPOPCNTQ, no VNNI) and for baseline
x86-64 in subprocesses, so the LLVM fallbacks are exercised on this machine too.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numba import njit

from adapter import kernels as kn  # noqa: E402

EDGE_K = [1, 63, 64, 65, 127, 200]
SETTINGS = settings(max_examples=25, deadline=None)
F64 = dict(rtol=1e-10, atol=1e-10)


def signs(x):
    """+-1 int64 with sign(0) = +1 (also for -0.0)."""
    return np.where(np.asarray(x) >= 0, 1, -1).astype(np.int64)


def k_values():
    return st.one_of(st.sampled_from(EDGE_K), st.integers(1, 300))


def sign_matrix(draw, shape, rng):
    """float32 matrix with a planted all-positive row, all-negative row, exact zeros and -0.0."""
    kind = draw(st.sampled_from(["normal", "zeros", "negative", "mixed"]))
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "zeros":
        x[:] = 0.0
    elif kind == "negative":
        x = -np.abs(x) - 1.0
    elif kind == "mixed":
        x[0] = np.abs(x[0])
        x[-1] = -np.abs(x[-1]) - 1.0
        x[..., ::3] = 0.0
        x[..., 1::5] = -0.0
    return x


@st.composite
def gemm_cases(draw):
    m = draw(st.sampled_from([1, 2, 3, 4, 5, 9, 66]))
    n = draw(st.sampled_from([1, 2, 7, 16, 33, 257, 300]))
    k = draw(k_values())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return sign_matrix(draw, (m, k), rng), sign_matrix(draw, (n, k), rng), rng


# --------------------------------------------------------------------------------------------
# popcount and packing


_popcount = kn.popcount  # a Numba intrinsic: jitted code needs the object itself, not the adapter's namespace


@njit
def _popcounts(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = _popcount(x[i])
    return out


@pytest.mark.parametrize("dtype", [np.uint64, np.uint32, np.int64])
def test_popcount_matches_numpy(dtype):
    """Counts the bits of the two's-complement pattern (np.bitwise_count counts |x| for signed x)."""
    rng = np.random.default_rng(0)
    edges = np.array([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, 0x5555555555555555], np.uint64)
    words = np.concatenate([edges, rng.integers(0, 2**64 - 1, size=500, dtype=np.uint64, endpoint=True)])
    unsigned = words if np.dtype(dtype).itemsize == 8 else words.astype(np.uint32)   # keeps the low bits
    x = unsigned.view(dtype)
    assert _popcount is kn.popcount, "the jitted helper must call the implementation's popcount"
    got = _popcounts(x)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got.view(unsigned.dtype), np.bitwise_count(unsigned))


@SETTINGS
@given(st.lists(st.integers(1, 3), max_size=2), k_values(), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**32 - 1))
def test_pack_signs_matches_reference_and_round_trips(lead, k, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(tuple(lead) + (k,)).astype(dtype)
    x.reshape(-1, k)[:, ::4] = 0.0
    x.reshape(-1, k)[:, 2::7] = -0.0
    packed = kn.pack_signs(x)
    assert packed.shape == tuple(lead) + (-(-k // 64),) and packed.dtype == np.uint64
    np.testing.assert_array_equal(packed, kn.pack_signs_reference(x))
    np.testing.assert_array_equal(kn.unpack_signs(packed, k), signs(x).astype(np.float32))
    tail = 64 * packed.shape[-1] - k
    if tail:
        assert not (packed[..., -1] >> np.uint64(64 - tail)).any(), "tail bits of the last word must be 0"


def test_pack_signs_bit_order():
    x = np.ones(70, np.float32)
    x[[0, 5, 63, 64, 69]] = -1.0
    packed = kn.pack_signs(x)
    assert packed[0] == (1 << 0) | (1 << 5) | (1 << 63)
    assert packed[1] == (1 << 0) | (1 << 5)


@SETTINGS
@given(st.lists(st.integers(1, 3), max_size=2), k_values(), st.booleans(), st.integers(0, 2**32 - 1))
def test_pack_bits_matches_reference_and_round_trips(lead, k, as_bool, seed):
    mask = np.random.default_rng(seed).integers(0, 2, size=tuple(lead) + (k,))
    mask = mask.astype(bool) if as_bool else mask.astype(np.int8)
    packed = kn.pack_bits(mask)
    np.testing.assert_array_equal(packed, kn.pack_bits_reference(mask))
    np.testing.assert_array_equal(kn.unpack_bits(packed, k), mask.astype(np.uint8))


def test_packing_rejects_bad_input():
    with pytest.raises(TypeError, match="float"):
        kn.pack_signs(np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match="K must be >= 1"):
        kn.pack_signs(np.ones((2, 0), np.float32))
    with pytest.raises(ValueError, match="ceil"):
        kn.unpack_signs(np.zeros((2, 2), np.uint64), 200)


# --------------------------------------------------------------------------------------------
# binary GEMM


@SETTINGS
@given(gemm_cases())
@example((np.zeros((1, 1), np.float32), -np.ones((1, 1), np.float32), np.random.default_rng(0)))
def test_binary_gemm_is_exact(case):
    x, w, _ = case
    k = x.shape[1]
    a, wt = kn.pack_signs(x), kn.pack_weight(w)
    assert wt.shape == (-(-k // 64), w.shape[0])
    dense = signs(x) @ signs(w).T
    got = kn.binary_gemm(a, wt, k)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, dense, err_msg="binary_gemm vs integer matmul of the signs")
    np.testing.assert_array_equal(kn.binary_gemm_reference(a, wt, k), dense)
    float_matmul = signs(x).astype(np.float32) @ signs(w).astype(np.float32).T
    np.testing.assert_array_equal(got, float_matmul, err_msg="binary_gemm vs float32 matmul of +-1 matrices")


@SETTINGS
@given(gemm_cases(), st.sampled_from([(True, True, True), (True, False, False), (False, True, False),
                                      (False, False, True)]))
def test_binary_gemm_fused_epilogue(case, which):
    x, w, rng = case
    m, k = x.shape
    n = w.shape[0]
    row_scale = rng.uniform(0.1, 2.0, m).astype(np.float32) if which[0] else None
    col_scale = rng.uniform(0.1, 2.0, n).astype(np.float32) if which[1] else None
    bias = rng.standard_normal(n).astype(np.float32) if which[2] else None
    a, wt = kn.pack_signs(x), kn.pack_weight(w)
    got = kn.binary_gemm(a, wt, k, row_scale, col_scale, bias)
    assert got.dtype == np.float32 and got.shape == (m, n)
    np.testing.assert_array_equal(got, kn.binary_gemm_reference(a, wt, k, row_scale, col_scale, bias),
                                  err_msg="same float32 operations in the same order must agree bit for bit")
    rs = np.ones(m) if row_scale is None else row_scale.astype(np.float64)
    cs = np.ones(n) if col_scale is None else col_scale.astype(np.float64)
    b = np.zeros(n) if bias is None else bias.astype(np.float64)
    expected = (signs(x) @ signs(w).T) * rs[:, None] * cs[None, :] + b[None, :]
    scale = np.abs(expected).max() + 1.0
    np.testing.assert_allclose(got, expected, rtol=3e-7, atol=3e-7 * scale)


def test_binary_gemm_large_tiles_exact():
    """Several row and column blocks of the parallel task grid, with a row and column remainder."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((139, 200)).astype(np.float32)
    w = rng.standard_normal((600, 200)).astype(np.float32)
    got = kn.binary_gemm(kn.pack_signs(x), kn.pack_weight(w), 200)
    np.testing.assert_array_equal(got, signs(x) @ signs(w).T)


def test_empty_outputs():
    """M = 0 or N = 0 give empty results of the right shape and dtype."""
    assert kn.binary_gemm(np.zeros((0, 2), np.uint64), np.zeros((2, 5), np.uint64), 100).shape == (0, 5)
    assert kn.binary_gemm(np.zeros((3, 2), np.uint64), np.zeros((2, 0), np.uint64), 100, bias=np.zeros(0)).dtype == np.float32
    nz, sign = kn.pack_ternary_weight(np.zeros((0, 10), int))
    assert kn.ternary_gemm_int8(np.ones((4, 10), np.int8), nz, sign, 10).shape == (4, 0)


def test_binary_gemm_rejects_bad_input():
    a = np.zeros((3, 2), np.uint64)
    wt = np.zeros((2, 4), np.uint64)
    with pytest.raises(ValueError, match="K=64"):
        kn.binary_gemm(a, wt, 64)
    with pytest.raises(ValueError, match="disagree on W"):
        kn.binary_gemm(a, np.zeros((3, 4), np.uint64), 130)
    with pytest.raises(TypeError, match="uint64"):
        kn.binary_gemm(a.astype(np.int64), wt, 100)
    with pytest.raises(ValueError, match="row_scale"):
        kn.binary_gemm(a, wt, 100, row_scale=np.ones(4, np.float32))


# --------------------------------------------------------------------------------------------
# batched products for attention


@st.composite
def bmm_cases(draw):
    b = draw(st.sampled_from([1, 2, 3]))
    m = draw(st.sampled_from([1, 4, 7, 65]))
    n = draw(st.sampled_from([1, 3, 64, 70]))
    k = draw(k_values())
    return b, m, n, k, np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


@SETTINGS
@given(bmm_cases())
def test_binary_bmm_is_exact(case):
    b, m, n, k, rng = case
    q = rng.standard_normal((b, m, k))
    q[..., ::5] = 0.0
    key = rng.standard_normal((b, n, k))
    key[0] = -1.0
    got = kn.binary_bmm(kn.pack_signs(q), kn.pack_signs(key), k)
    dense = signs(q) @ signs(key).transpose(0, 2, 1)
    np.testing.assert_array_equal(got, dense)
    np.testing.assert_array_equal(kn.binary_bmm_reference(kn.pack_signs(q), kn.pack_signs(key), k), dense)


@SETTINGS
@given(bmm_cases())
def test_and_bmm_is_exact(case):
    b, m, d, k, rng = case
    p = rng.integers(0, 2, size=(b, m, k))
    p[0, 0] = 1
    v = rng.standard_normal((b, k, d))
    v[:, ::3] = 0.0
    p_bits, v_packed = kn.pack_bits(p), kn.pack_signs(v.transpose(0, 2, 1))
    dense = p @ signs(v)
    np.testing.assert_array_equal(kn.and_bmm(p_bits, v_packed, k), dense)
    np.testing.assert_array_equal(kn.and_bmm_reference(p_bits, v_packed, k), dense)


# --------------------------------------------------------------------------------------------
# ternary weights


@st.composite
def ternary_cases(draw):
    x, _, rng = draw(gemm_cases())
    n = draw(st.sampled_from([1, 5, 16, 17, 300]))
    kind = draw(st.sampled_from(["random", "zeros", "ones", "minus"]))
    k = x.shape[1]
    t = {"random": lambda: rng.integers(-1, 2, size=(n, k)), "zeros": lambda: np.zeros((n, k), int),
         "ones": lambda: np.ones((n, k), int), "minus": lambda: -np.ones((n, k), int)}[kind]()
    return x, t.astype(np.int8), rng


@SETTINGS
@given(ternary_cases())
def test_ternary_gemm_binary_is_exact(case):
    x, t, _ = case
    k = x.shape[1]
    nz, sign = kn.pack_ternary_weight(t)
    np.testing.assert_array_equal(kn.unpack_ternary(nz, sign, k), t)
    a = kn.pack_signs(x)
    dense = signs(x) @ t.astype(np.int64).T
    np.testing.assert_array_equal(kn.ternary_gemm_binary(a, nz, sign, k), dense)
    np.testing.assert_array_equal(kn.ternary_gemm_binary_reference(a, nz, sign, k), dense)


@SETTINGS
@given(ternary_cases(), st.booleans())
def test_ternary_gemm_int8_is_exact(case, scaled):
    _, t, rng = case
    n, k = t.shape
    m = rng.integers(1, 10)
    a = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    a[0, :2] = -128
    a[-1, -2:] = 127
    nz, sign = kn.pack_ternary_weight(t)
    dense = a.astype(np.int64) @ t.astype(np.int64).T
    if not scaled:
        got = kn.ternary_gemm_int8(a, nz, sign, k)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, dense)
        np.testing.assert_array_equal(kn.ternary_gemm_int8_reference(a, nz, sign, k), dense)
        return
    rs = rng.uniform(0.01, 1.0, m).astype(np.float32)
    cs = rng.uniform(0.01, 1.0, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    got = kn.ternary_gemm_int8(a, nz, sign, k, rs, cs, bias)
    np.testing.assert_array_equal(got, kn.ternary_gemm_int8_reference(a, nz, sign, k, rs, cs, bias))
    expected = dense * rs[:, None].astype(np.float64) * cs[None, :] + bias[None, :]
    np.testing.assert_allclose(got, expected, rtol=3e-7, atol=3e-7 * (np.abs(expected).max() + 1.0))


def test_ternary_int8_blocks_and_extremes():
    """Every activation at -128 / 127 against all -1 / +1 weights, over several column blocks."""
    k, n = 260, 530
    t = np.where(np.arange(n)[:, None] % 2 == 0, 1, -1) * np.ones((n, k), int)
    a = np.stack([np.full(k, -128), np.full(k, 127)] * 3).astype(np.int8)
    nz, sign = kn.pack_ternary_weight(t)
    np.testing.assert_array_equal(kn.ternary_gemm_int8(a, nz, sign, k), a.astype(np.int64) @ t.T)


def test_ternary_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\{-1, 0, \+1\}"):
        kn.pack_ternary_weight(np.array([[0.5, 1.0]]))
    nz, sign = kn.pack_ternary_weight(np.ones((2, 10), int))
    with pytest.raises(TypeError, match="int8"):
        kn.ternary_gemm_int8(np.ones((3, 10), np.int16), nz, sign, 10)
    with pytest.raises(ValueError, match="columns"):
        kn.ternary_gemm_int8(np.ones((3, 9), np.int8), nz, sign, 10)


# --------------------------------------------------------------------------------------------
# GSB attention product


@SETTINGS
@given(bmm_cases())
def test_gsb_attention_product(case):
    b, m, d, k, rng = case
    bases = rng.integers(0, 2, size=(b, 3, m, k))
    bases[0, 1] = 0                                  # an empty group
    v = rng.standard_normal((b, k, d))
    v[:, ::4] = 0.0
    masks = rng.integers(0, 2, size=(b, 2, k, d))
    masks[:, 1] &= masks[:, 0]                       # T2 inside T1, as GSB builds them
    a_bits = kn.pack_bits(bases)
    s_bits = kn.pack_signs(v.transpose(0, 2, 1))
    t_bits = kn.pack_bits(masks.transpose(0, 1, 3, 2))
    s = signs(v)
    v_bases = [s, masks[:, 0] * s, masks[:, 1] * s]
    dense = np.stack([np.stack([bases[:, i] @ v_bases[j] for j in range(3)], 1) for i in range(3)], 1)
    partial = kn.gsb_partial_products(a_bits, s_bits, t_bits, k)
    np.testing.assert_array_equal(partial, dense, err_msg="integer partial products C_ij")
    np.testing.assert_array_equal(kn.gsb_partial_products_reference(a_bits, s_bits, t_bits, k), dense)
    a_scales = rng.uniform(0.01, 1.0, (b, 3))
    v_scales = rng.uniform(0.01, 2.0, 3)
    got = kn.gsb_attention_product(a_bits, a_scales, s_bits, t_bits, v_scales, k)
    a_q = np.einsum("bi,bimk->bmk", a_scales, bases.astype(np.float64))
    v_q = sum(v_scales[j] * v_bases[j] for j in range(3))
    expected = a_q @ v_q
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * (np.abs(expected).max() + 1.0))
    np.testing.assert_allclose(kn.gsb_attention_product_reference(a_bits, a_scales, s_bits, t_bits, v_scales, k),
                               expected, **F64)


def test_gsb_rejects_bad_shapes():
    a = np.zeros((1, 2, 4, 1), np.uint64)
    with pytest.raises(ValueError, match=r"\[B, 3, M, W\]"):
        kn.gsb_partial_products(a, np.zeros((1, 3, 1), np.uint64), np.zeros((1, 2, 3, 1), np.uint64), 10)


# --------------------------------------------------------------------------------------------
# other CPUs: the kernels compiled for an AVX2-only target and for baseline x86-64

_HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+lzcnt,+mmx,+movbe,"
                     "+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt")
_BASELINE_FEATURES = "+64bit,+cmov,+cx8,+fxsr,+mmx,+sse,+sse2"

_OTHER_CPU_CHECK = textwrap.dedent("""
    import numpy as np
    from minibvit import kernels as kn, ops
    from minibvit.kernels.int8 import uint8_int8_bmm, uint8_int8_bmm_reference
    from minibvit.kernels.ternary import weight_level_quads
    rng = np.random.default_rng(3)
    for m, k, n in [(9, 200, 70), (4, 64, 1), (1, 65, 33)]:
        x = rng.standard_normal((m, k)).astype(np.float32); x[:, ::3] = 0.0
        w = rng.standard_normal((n, k)).astype(np.float32)
        sx, sw = np.where(x >= 0, 1, -1), np.where(w >= 0, 1, -1)
        assert (kn.binary_gemm(kn.pack_signs(x), kn.pack_weight(w), k) == sx @ sw.T).all(), "binary_gemm"
        assert (kn.pack_signs(x) == kn.pack_signs_reference(x)).all(), "pack_signs"
        t = rng.integers(-1, 2, size=(n, k)); nz, sg = kn.pack_ternary_weight(t)
        a = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
        assert (kn.ternary_gemm_int8(a, nz, sg, k) == a.astype(np.int64) @ t.T).all(), "ternary_gemm_int8"
        # 8-bit x 8-bit (TerViT's attention, W8A8, the head): bytes 255 x 127 and 255 x -128 make pair
        # sums past int16, where VPMADDUBSW saturates
        u = rng.integers(0, 256, size=(2, m, k)).astype(np.uint8)
        s = rng.integers(-128, 128, size=(2, n, k)).astype(np.int8)
        u[:, 0], s[0, 0], s[1, 0] = 255, 127, -128
        assert (uint8_int8_bmm(u, s) == uint8_int8_bmm_reference(u, s)).all(), "uint8_int8_bmm"
        levels = rng.integers(-127, 128, size=(n, k)).astype(np.float32); levels[0] = 127
        quads, sums = weight_level_quads(levels)
        codes = u[0].copy(); codes[0] = 0
        got = ops.byte_matmul(codes, 128, np.float32(1), quads, sums, np.float32(1), n)
        assert (got == (codes.astype(np.int64) - 128) @ levels.astype(np.int64).T).all(), "byte_matmul, 8-bit weight"
    print("ok")
""")


def _host_wide_vectors():
    """(host CPU name, host features + "-prefer-256-bit"): the opt-in 512-bit code generation that
    docs/kernels.md describes; on a CPU without AVX-512 it compiles the same code as the default."""
    import llvmlite.binding as llvm
    return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten() + ",-prefer-256-bit"


@pytest.mark.parametrize("cpu_name,features", [("haswell", _HASWELL_FEATURES), ("x86-64", _BASELINE_FEATURES),
                                               _host_wide_vectors()],
                         ids=["avx2-only", "baseline-x86-64", "host-512-bit-vectors"])
@pytest.mark.impl_specific  # imports minibvit.kernels in a subprocess: minibvit's own Numba CPU targets
def test_kernels_on_other_cpus(cpu_name, features):
    env = dict(os.environ, NUMBA_CPU_NAME=cpu_name, NUMBA_CPU_FEATURES=features,
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(kn.__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _OTHER_CPU_CHECK], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (
        f"kernels compiled for {cpu_name} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
