# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 7. XNOR-popcount: packing bits, the popcount identity, the kernel, the speed
#
# Tutorials 3 to 6 trained binary and ternary ViTs *simulated* in floating point: $\pm1$ stored as
# float32, multiplied by a float matmul. That is right for training, but it throws away the point of
# binarization. With one bit per value, 64 products fit in two 64-bit words, and
#
# $$\text{64 multiply-adds} \;\longrightarrow\; \text{one XOR and one popcount.}$$
#
# This tutorial builds that up from `minibvit.kernels` (Numba kernels, each with a plain NumPy
# `*_reference` beside it, in `kernels.pack`, `kernels.binary`, `kernels.ternary` and `kernels.gsb`;
# `docs/kernels.md` has the details):
#
# 1. packing signs into `uint64` words (bit 0 is $+1$, bit 1 is $-1$, $\mathrm{sign}(0) = +1$);
# 2. the identity $a \cdot w = K - 2\,\mathrm{popcount}(a \oplus w)$, and its $\{0,1\} \times \pm1$ cousin
#    for attention;
# 3. the kernel `binary_gemm` and its fused epilogue (scales and bias), checked against float64;
# 4. ternary weights, briefly;
# 5. a speed table against NumPy's float32 matmul, measured on the machine running this tutorial.

# %%
import _common  # noqa: F401  (first: sets the thread pools and finds minibvit)
from _common import pick, plt, save_figure

import os
import platform
import time

import llvmlite.binding as llvm
import numba
import numpy as np

from minibvit import kernels, ops, quant

rng = np.random.default_rng(0)


def signs(x):
    """The +-1 values of x in float64 (sign(0) = +1): what the packed bits stand for."""
    return quant.sign(np.asarray(x, np.float64))


# %% [markdown]
# ## 1. Packing signs into words
#
# The convention is larq compute-engine's: **bit 0 encodes $+1$, bit 1 encodes $-1$**, so the bit is
# simply $[x < 0]$ and $\mathrm{sign}(0) = +1$ (also for $-0.0$, which is not $< 0$). Bits are packed
# along the reduction axis $K$ (the axis a dot product sums over) into `uint64` words, least
# significant bit first:
#
# $$\text{bit } j \text{ of word } w \;=\; [x_{64w + j} < 0], \qquad W = \lceil K / 64 \rceil \text{ words}.$$
#
# When $K$ is not a multiple of 64, the last word has $64W - K$ unused high bits, and they are **zero**.
# That zero tail is what makes the identity of section 2 work with the true $K$.
#
# An example with $K = 70$: two words, the second holding 6 elements and a tail of 58 zero bits. We
# put $0.0$ and $-0.0$ at the start to see them pack to $+1$.

# %%
K = 70
x = rng.standard_normal(K)
x[0], x[1] = 0.0, -0.0
packed = kernels.pack_signs(x)
print(f"K = {K} -> {packed.size} words of dtype {packed.dtype}")
for w, word in enumerate(packed):
    first, last = 64 * w, min(64 * w + 64, K)
    bits = "".join(str(int(v < 0)) for v in x[first:last])
    tail = 64 - (last - first)
    print(f"word {w}: elements {first:2d}..{last - 1:2d}, bits in element order {bits}"
          + (f" + {tail} tail bits" if tail else ""))
    print(f"        = 0x{int(word):016x}  (printed with bit 63 first: {int(word):064b})")

# the definition, written out with Python integers
for w in range(packed.size):
    expected = sum(int(x[64 * w + j] < 0) << j for j in range(min(64, K - 64 * w)))
    assert int(packed[w]) == expected
assert int(packed[-1]) >> (K - 64) == 0, "the tail of the last word must be zero"
assert packed[0] & 0b11 == 0, "0.0 and -0.0 pack to bit 0 (+1)"
assert np.array_equal(packed, kernels.pack_signs_reference(x))   # np.packbits(bitorder="little")
assert np.array_equal(kernels.unpack_signs(packed, K), signs(x))  # the round trip gives sign(x)

# %% [markdown]
# `pack_signs` works along the last axis of any array (a matrix packs row by row: `[M, K]` becomes
# `[M, W]`), and `pack_bits` packs a $\{0, 1\}$ mask the same way (bit = mask $\neq 0$), for the
# unsigned operands of section 3.

# %%
X = rng.standard_normal((5, 130)).astype(np.float32)
X[:, ::7] = 0.0
X_packed = kernels.pack_signs(X)
print(f"X {X.shape} {X.dtype} -> packed {X_packed.shape} {X_packed.dtype}: "
      f"{X.nbytes} bytes -> {X_packed.nbytes} bytes")
assert X_packed.shape == (5, 3) and np.array_equal(kernels.unpack_signs(X_packed, 130), signs(X))
mask = rng.random((5, 130)) < 0.3
assert np.array_equal(kernels.unpack_bits(kernels.pack_bits(mask), 130), mask)
assert np.array_equal(kernels.pack_bits(mask), kernels.pack_bits_reference(mask))

# %% [markdown]
# ## 2. The popcount identity
#
# Take $a, w \in \{\pm1\}^K$. Each product $a_k w_k$ is $+1$ where the two signs agree and $-1$ where
# they differ, and the signs differ exactly where the bits differ, i.e. where $a \oplus w$ (XOR) has a 1.
# With $d = \mathrm{popcount}(a \oplus w)$ differing positions,
#
# $$a \cdot w = \underbrace{(K - d)}_{\text{agree}} - \underbrace{d}_{\text{differ}}
#   = K - 2\,\mathrm{popcount}(a \oplus w), \qquad
#   \mathrm{popcount}(a \oplus w) = \sum_{w=0}^{W-1} \mathrm{popcount}(a_w \oplus w_w).$$
#
# (XNOR-Net writes it with XNOR, $a \cdot w = 2\,\mathrm{popcount}(\overline{a \oplus w}) - K$; same thing.)
# The tails are zero in both operands, so they XOR to zero and count nothing: $K$ is the **true** length,
# not $64W$. Checked below on random vectors (with exact zeros) for many $K$, multiples of 64 or not,
# against the float64 dot product of the $\pm1$ vectors:

# %%
print(f"{'K':>5} {'words':>5} {'tail':>5} | {'popcount':>8} {'K - 2 popcount':>14} {'float dot':>9}")
for K in (1, 7, 63, 64, 65, 70, 128, 192, 200, 768):
    for trial in range(20):
        a, w = rng.standard_normal(K), rng.standard_normal(K)
        a[rng.random(K) < 0.1] = 0.0
        w[rng.random(K) < 0.1] = 0.0
        pa, pw = kernels.pack_signs(a), kernels.pack_signs(w)
        d = int(np.bitwise_count(pa ^ pw).sum())
        float_dot = signs(a) @ signs(w)
        assert K - 2 * d == float_dot, (K, d, float_dot)
        # with 64 W in place of K the result is off by exactly the tail length
        assert 64 * pa.size - 2 * d == float_dot + (64 * pa.size - K)
    print(f"{K:5d} {pa.size:5d} {64 * pa.size - K:5d} | {d:8d} {K - 2 * d:14d} {float_dot:9.0f}")

# %% [markdown]
# A picture of the $K = 70$ case: the bits of $a$ and $w$, their XOR, and the zero tail of the second
# word (grey), which never contributes.

# %%
K = 70
a, w = rng.standard_normal(K), rng.standard_normal(K)
a[0] = 0.0
pa, pw = kernels.pack_signs(a), kernels.pack_signs(w)
rows = np.stack([kernels.unpack_bits(p, 128) for p in (pa, pw, pa ^ pw)]).astype(float)  # 2 words = 128 bits
rows[:, K:] = 0.5                                                                           # the tail, drawn grey
d = int(np.bitwise_count(pa ^ pw).sum())
assert rows[2, :K].sum() == d and K - 2 * d == signs(a) @ signs(w)

fig, ax = plt.subplots(figsize=(12, 2.0))
ax.imshow(rows, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
ax.axvline(63.5, color="C3", lw=2)
ax.axvline(K - 0.5, color="C0", lw=2, ls="--")
ax.set_yticks(range(3), ["a", "w", "a XOR w"])
ax.set_xticks([0, 32, 64, 96, 127])
ax.set_xlabel(f"bit position 64 w + j   (red: word 0 | word 1; blue dashed: K = {K}, then the zero tail)")
ax.set_title(f"black = bit 1 (-1), white = bit 0 (+1), grey = zero tail;  "
             f"popcount(a XOR w) = {d},  a.w = {K} - 2*{d} = {K - 2 * d}")
save_figure(fig, "07_bits")

# %% [markdown]
# ### The popcount instruction
#
# `np.bitwise_count` is NumPy's popcount. Inside Numba code, `kernels.popcount` is an intrinsic (it
# lives with minibvit's few other hand-written LLVM operations in `minibvit.intrinsics`) that emits
# LLVM's `ctpop`, which becomes one `POPCNT` instruction per word, or `VPOPCNTQ` (4 or 8 words at once)
# in vectorised loops on CPUs with AVX512-VPOPCNTDQ, or a short bit-trick sequence on older CPUs. A
# Numba function using it:

# %%
@numba.njit
def popcount_sum(words):
    total = 0
    for word in words:
        total += np.int64(kernels.popcount(word))   # uint64 -> int64 (int64 + uint64 is float64 in Numba)
    return total


words = rng.integers(0, 2**63, size=1000, dtype=np.uint64) | (rng.integers(0, 2, 1000, dtype=np.uint64) << 63)
assert popcount_sum(words) == np.bitwise_count(words).sum()
assert popcount_sum(np.array([0, 1, 2**64 - 1], np.uint64)) == 0 + 1 + 64
features = llvm.get_host_cpu_features()
print(f"this CPU: {llvm.get_host_cpu_name()}; "
      + ", ".join(f"{f}: {'yes' if features.get(f) else 'no'}" for f in ("popcnt", "avx2", "avx512f", "avx512vpopcntdq")))

# %% [markdown]
# ## 3. $\{0, 1\} \times \pm1$: the AND-popcount for attention
#
# Binary attention has two matrix products per head. The scores $Q K^\top$ are $\pm1 \times \pm1$: the
# identity above, batched (`kernels.binary_bmm`, both operands packed along the head dimension).
# The output $A V$ is different: the binarized attention probabilities are **unsigned**, $A = \alpha_A P$
# with $P \in \{0, 1\}$ (BiT's elastic binarizer with `signed=False`: a token is attended or not), and
# $V = \alpha_V S$ with $S \in \{\pm1\}$. Packing $P$ with `pack_bits` (bit = 1 where attended) and $S$ with
# `pack_signs` (bit $s$ = 1 where $-1$), for one row $p$ and one column $s$ over the $K$ tokens:
#
# $$p \cdot S = \sum_{p_k = 1} (\pm 1)_k = \underbrace{\mathrm{popcount}(p \wedge \neg s)}_{\text{attended, } +1}
#   - \underbrace{\mathrm{popcount}(p \wedge s)}_{\text{attended, } -1}
#   = \mathrm{popcount}(p) - 2\,\mathrm{popcount}(p \wedge s).$$
#
# One AND and one popcount per word, plus $\mathrm{popcount}(p)$ once per row (the number of attended
# tokens). The zero tail of $p$ makes the tail of $s$ irrelevant. `kernels.and_bmm` computes it; $V$ is
# passed transposed, `[B, D, W]`, so that both operands are packed along the shared token axis.
#
# Below: 6 heads, $K = 65$ tokens (64 patches and the class token: not a multiple of 64), head dimension 32,
# with the attention quantized by `minibvit.quant`'s elastic binarizers.

# %%
heads, tokens, head_dim = 6, 65, 32
q, k, v = (rng.standard_normal((heads, tokens, head_dim)) for _ in range(3))

scores = kernels.binary_bmm(kernels.pack_signs(q), kernels.pack_signs(k), head_dim)   # sign(q) @ sign(k).T
assert scores.dtype == np.int32 and np.array_equal(scores, signs(q) @ signs(k).transpose(0, 2, 1))

probs, _ = ops.softmax_forward(scores / np.sqrt(head_dim))
alpha_a, alpha_v = quant.elastic_alpha_init(probs, signed=False), quant.elastic_alpha_init(v, signed=True)
a_q, _ = quant.elastic_binarize_forward(probs, alpha_a, signed=False)               # {0, alpha_a}
v_q, _ = quant.elastic_binarize_forward(v, alpha_v, signed=True)                    # {-alpha_v, +alpha_v}
p = a_q > 0                                                                           # {0,1}: attended or not
p_bits, v_bits = kernels.pack_bits(p), kernels.pack_signs(v.transpose(0, 2, 1))      # [B, M, W], [B, D, W]
print(f"P bits {p_bits.shape}, V^T sign bits {v_bits.shape}; attended tokens per row: "
      f"{p.sum(-1).min()}..{p.sum(-1).max()} of {tokens}")

counts = kernels.and_bmm(p_bits, v_bits, tokens)                                     # int32 [B, M, D]
assert np.array_equal(counts, p @ signs(v))                                           # exact
assert np.array_equal(counts, kernels.and_bmm_reference(p_bits, v_bits, tokens))     # the literal two popcounts
out = alpha_a[0] * alpha_v[0] * counts                                                # the scales, applied once
assert np.allclose(out, a_q @ v_q, rtol=1e-13, atol=1e-13 * np.abs(a_q @ v_q).max())
print(f"A_q @ V_q from AND-popcounts vs float64: max |diff| {np.abs(out - a_q @ v_q).max():.1e}")

# %% [markdown]
# ## 4. The kernel: `binary_gemm`
#
# A binary linear layer $y = x W^\top$ with $x \in \{\pm1\}^{M \times K}$ (tokens) and $W \in \{\pm1\}^{N \times K}$
# computes, for every output,
#
# $$\mathrm{dot}_{mn} = K - 2 \sum_{w} \mathrm{popcount}\big(a_{m,w} \oplus b_{w,n}\big).$$
#
# `binary_gemm(a_packed, w_packed_T, K)` takes the activations packed row by row, `[M, W]`, and the
# weight packed offline by `pack_weight` in a **word-major** layout `[W, N]`. That layout is what makes
# it fast: for one row $m$ and one word $w$, the activation word $a_{m,w}$ is broadcast and XORed with the
# contiguous row $b_{w,:}$, so the inner loop over $N$ is a vector loop (XOR, popcount, add, several words
# per instruction). Around it (details in `docs/kernels.md`): the output is cut into tasks of about 128
# rows × at most 256 columns, run in parallel; each task copies its weight columns into an aligned
# buffer that stays in L1/L2; three words are summed per accumulator update.
#
# The NumPy reference `binary_gemm_reference` computes the same sum one word at a time with
# `np.bitwise_count`. Both are checked here on odd shapes, with exact zeros, against the float64 matmul
# of the $\pm1$ matrices (exact: integers):

# %%
for M, K, N in ((1, 1, 1), (37, 64, 45), (37, 200, 45), (130, 768, 300)):
    x = rng.standard_normal((M, K)).astype(np.float32)
    wt = rng.standard_normal((N, K)).astype(np.float32)
    x[:, ::5] = 0.0
    x_packed, w_packed_T = kernels.pack_signs(x), kernels.pack_weight(wt)
    assert w_packed_T.shape == (-(-K // 64), N)
    dot = kernels.binary_gemm(x_packed, w_packed_T, K)
    assert dot.dtype == np.int32 and np.array_equal(dot, signs(x) @ signs(wt).T), (M, K, N)
    assert np.array_equal(dot, kernels.binary_gemm_reference(x_packed, w_packed_T, K))
    print(f"M={M:4d} K={K:4d} N={N:4d}: binary_gemm == float64 sign(x) @ sign(w).T == NumPy reference")

# %% [markdown]
# ### The fused epilogue
#
# A real binary layer has scales and a bias: per output channel $\alpha_n = \mathrm{mean}|W_n - \bar W_n|$
# (BiT's centred weight binarizer, `quant.weight_binary_codes(..., center=True)`), a per-token activation
# scale $\beta_m$ (here XNOR-Net's $\beta_m = \mathrm{mean}_k |x_{mk}|$), and a bias $c_n$:
#
# $$y_{mn} = \beta_m\,\alpha_n\,\mathrm{dot}_{mn} + c_n .$$
#
# Written as a second NumPy pass, this reads and writes the whole $M \times N$ output again. `binary_gemm`
# applies it per row in the kernel, while the integer row is still in L1, when given `row_scale`,
# `col_scale` and `bias`: it returns `float32(dot) * row_scale[m] * col_scale[n] + bias[n]` in float32. The
# reference does the same float32 operations in the same order, so the two must agree **bit for bit**;
# against a float64 evaluation the only difference is float32 rounding (three roundings, so a relative
# error of a few $2^{-24}$).

# %%
M, K, N = pick((520, 768, 192), (65, 200, 48))
x = rng.standard_normal((M, K)).astype(np.float32)
weight = (rng.standard_normal((N, K)) * 0.05 + rng.normal(0, 0.02, (N, 1))).astype(np.float32)
bias = rng.standard_normal(N).astype(np.float32)
x[:, :3] = 0.0

codes, alpha = quant.weight_binary_codes(weight, scale="channel", center=True)    # int8 +-1 [N, K], alpha [N]
beta = np.abs(x).mean(axis=1)                                                      # [M]
w_packed_T = kernels.pack_weight(codes.astype(np.float32))                         # offline, once
y = kernels.binary_gemm(kernels.pack_signs(x), w_packed_T, K, row_scale=beta, col_scale=alpha, bias=bias)

x_b = beta[:, None].astype(np.float64) * signs(x)                                  # the simulated layer, float64
w_b = alpha[:, None].astype(np.float64) * codes
y64 = x_b @ w_b.T + bias
rel = np.abs(y - y64) / (np.abs(x_b @ w_b.T) + np.abs(bias))
print(f"y {y.shape} {y.dtype}: max error relative to the magnitude of the terms {rel.max():.2e} "
      f"(float32 eps = {np.finfo(np.float32).eps:.2e})")
assert y.dtype == np.float32 and rel.max() <= 4 * np.finfo(np.float32).eps
assert np.array_equal(y, kernels.binary_gemm_reference(kernels.pack_signs(x), w_packed_T, K,
                                                       row_scale=beta, col_scale=alpha, bias=bias))
dot = kernels.binary_gemm(kernels.pack_signs(x), w_packed_T, K)                   # the unfused way, for comparison
assert np.array_equal(y, dot.astype(np.float32) * beta[:, None] * alpha[None, :] + bias)

# %% [markdown]
# ## 5. Ternary weights, briefly
#
# TerViT's weights are ternary, $T \in \{-1, 0, +1\}$ (tutorial 4). Two bits per weight: a **nonzero** plane
# $z = [T \neq 0]$ and a **sign** plane $s = [T < 0]$, both word-major `[W, N]` (`pack_ternary_weight`).
#
# - **Binary activations × ternary weights** (`ternary_gemm_binary`): only the nonzero positions count,
#   $a \cdot T = \mathrm{popcount}(z \wedge \neg(a \oplus s)) - \mathrm{popcount}(z \wedge (a \oplus s))
#   = \mathrm{popcount}(z) - 2\,\mathrm{popcount}(z \wedge (a \oplus s))$: the binary kernel with one extra AND.
# - **8-bit activations × ternary weights** (`ternary_gemm_int8`), what TerViT actually runs (its
#   activations are 8-bit): no popcount here. With $u = a + 128 \in [0, 255]$ (unsigned bytes),
#   $\sum_k a_k T_k = \sum_k u_k T_k - 128 \sum_k T_k$, and $\sum_k u_k T_k$ is an unsigned-by-signed byte dot
#   product, one `VPDPBUSD` instruction per 64 products on CPUs with AVX512-VNNI (`VPMADDUBSW` + `VPMADDWD`
#   on AVX2, whose int16 pair sums are exact for ternary weights and saturate for 8-bit ones: those split
#   the activation bytes in nibbles, docs/kernels.md). The weight planes are expanded to int8 once per call.
#
# Both are exact integer products; checked against the int64 matmul, with the 8-bit activation codes
# from `quant.lsq_codes` and the ternary codes from `quant.ternary_codes`:

# %%
M, K, N = 65, 200, 48
x = rng.standard_normal((M, K)).astype(np.float32)
t_codes, t_alpha, _ = quant.ternary_codes(rng.standard_normal((N, K)).astype(np.float32))   # {-1,0,1} [N, K]
w_nonzero, w_sign = kernels.pack_ternary_weight(t_codes)
print(f"ternary weight [N, K] = {t_codes.shape}: {np.mean(t_codes == 0):.0%} zeros; planes {w_nonzero.shape} x 2")
assert np.array_equal(kernels.unpack_ternary(w_nonzero, w_sign, K), t_codes)
assert not (w_sign & ~w_nonzero).any(), "sign bits are 0 wherever the weight is 0"

dot_binary = kernels.ternary_gemm_binary(kernels.pack_signs(x), w_nonzero, w_sign, K)
assert np.array_equal(dot_binary, signs(x) @ t_codes.T)

step = quant.lsq_step_init(x, bits=8, signed=True)
a_int8 = quant.lsq_codes(x, step, bits=8, signed=True)                                       # int8 [M, K]
assert a_int8.dtype == np.int8
dot_int8 = kernels.ternary_gemm_int8(a_int8, w_nonzero, w_sign, K)
assert np.array_equal(dot_int8, a_int8.astype(np.int64) @ t_codes.T.astype(np.int64))
y = kernels.ternary_gemm_int8(a_int8, w_nonzero, w_sign, K, row_scale=np.full(M, step[0]), col_scale=t_alpha)
y64 = (step[0] * a_int8.astype(np.float64)) @ (t_alpha[:, None] * t_codes.astype(np.float64)).T
assert np.abs(y - y64).max() <= 4 * np.finfo(np.float32).eps * np.abs(y64).max()
print(f"int8 x ternary with scales vs float64: max |diff| / max |y| = {np.abs(y - y64).max() / np.abs(y64).max():.1e}; "
      f"AVX512-VNNI on this CPU: {'yes' if features.get('avx512vnni') else 'no'}")

# %% [markdown]
# ## 6. How fast, on this machine
#
# Now the question the packing is for. We time three ways of computing one binary linear layer
# $x W^\top$ on ViT shapes: $M = 8 \cdot 65 = 520$ rows (a batch of 8 images of 64 patches plus the class
# token) and $K, N \in \{192, 768\}$ (DeiT-Tiny's width and the width of its MLP, or DeiT-Base's):
#
# - **float32**: NumPy's `x @ w.T` (OpenBLAS), what the simulated model does;
# - **binary, packed**: `binary_gemm` on activations packed beforehand (as when the previous layer emits
#   bits);
# - **binary + packing**: `pack_signs(x)` then `binary_gemm`, what a binary layer pays when its input
#   arrives as floats.
#
# The weight is packed once, outside the timing (it is a constant of the model). Each time is the median
# over several repeats, the three interleaved; every binary result is checked against the float matmul
# of the signs before it is timed. **These numbers come from whatever machine runs this tutorial** (its
# CPU, its load, its thread settings): they are printed, never asserted. The project's benchmark, with
# more shapes, one and two threads and PyTorch for comparison, is `scripts/bench_gemm.py`
# (`docs/kernels.md` has its results).
#
# `_common.py` pins NumPy's BLAS and Numba to one thread each (unless you set `OPENBLAS_NUM_THREADS`,
# `OMP_NUM_THREADS` or `NUMBA_NUM_THREADS` yourself), so by default this is a **one-core** comparison.

# %%
M = pick(8 * 65, 64)
dims = pick((192, 768), (64, 192))
repeats = pick(15, 3)
min_seconds = pick(0.02, 0.002)   # each repeat runs a call often enough to last at least this long


def calls_per_repeat(fn):
    """How many back-to-back calls of fn last at least min_seconds (doubling from 1)."""
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - t0 >= min_seconds:
            return number
        number *= 2


def median_times(candidates):
    """{name: median seconds per call}, over `repeats` interleaved repeats."""
    numbers = {name: calls_per_repeat(fn) for name, fn in candidates.items()}   # also warms up
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / numbers[name])
    return {name: float(np.median(s)) for name, s in samples.items()}


print(f"CPU {llvm.get_host_cpu_name()} ({platform.machine()}), {os.cpu_count()} logical cores, "
      f"load average {os.getloadavg()[0]:.1f}")
print(f"threads: NumPy BLAS OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')} "
      f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; Numba {numba.get_num_threads()}")
print(f"{'M':>4} {'K':>4} {'N':>4} | {'float32 ms':>10} {'packed ms':>9} {'+pack ms':>8} | "
      f"{'x packed':>8} {'x w/ pack':>9}")
shapes, results = [], []
for K in dims:
    for N in dims:
        x = rng.standard_normal((M, K), dtype=np.float32)
        wt = rng.standard_normal((N, K), dtype=np.float32)
        x[:, 0] = 0.0
        x_packed, w_packed_T = kernels.pack_signs(x), kernels.pack_weight(wt)
        sign_product = signs(x).astype(np.float32) @ signs(wt).astype(np.float32).T
        assert np.array_equal(kernels.binary_gemm(x_packed, w_packed_T, K), sign_product), (M, K, N)
        assert np.array_equal(kernels.binary_gemm(kernels.pack_signs(x), w_packed_T, K), sign_product)
        t = median_times({
            "float32": lambda: x @ wt.T,
            "packed": lambda: kernels.binary_gemm(x_packed, w_packed_T, K),
            "with packing": lambda: kernels.binary_gemm(kernels.pack_signs(x), w_packed_T, K),
        })
        shapes.append((M, K, N))
        results.append(t)
        print(f"{M:4d} {K:4d} {N:4d} | {t['float32'] * 1e3:10.3f} {t['packed'] * 1e3:9.3f} "
              f"{t['with packing'] * 1e3:8.3f} | {t['float32'] / t['packed']:8.1f} "
              f"{t['float32'] / t['with packing']:9.1f}")
print(f"median over repeats ({repeats} repeats); speedup = float32 time / binary time; "
      f"{'fast mode: small shapes, too few repeats to mean much' if _common.FAST else 'full mode'}")

# %%
names = ("float32", "packed", "with packing")
labels = {"float32": "NumPy float32 matmul", "packed": "binary_gemm (packed input)",
          "with packing": "pack_signs + binary_gemm"}
pos = np.arange(len(shapes))
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for i, name in enumerate(names):
    axes[0].bar(pos + 0.27 * (i - 1), [r[name] * 1e3 for r in results], 0.27, label=labels[name])
    if name != "float32":
        axes[1].bar(pos + 0.2 * (2 * i - 3), [r["float32"] / r[name] for r in results], 0.4, label=labels[name],
                    color=f"C{i}")
tick_labels = [f"K={k}\nN={n}" for _, k, n in shapes]
axes[0].set_xticks(pos, tick_labels)
axes[0].set(ylabel="ms per call (median, log scale)", yscale="log", title=f"time per call, M = {M} rows")
axes[0].yaxis.set_major_formatter("{x:g}")
axes[0].yaxis.set_minor_formatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else "")  # 2, 5, 20, 50...
axes[0].legend(fontsize=8)
axes[1].set_xticks(pos, tick_labels)
axes[1].axhline(1.0, color="gray", ls=":", lw=1)
axes[1].set(ylabel="speedup over float32", title=f"speedup ({numba.get_num_threads()} Numba thread(s), "
            f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS')}; this machine)")
axes[1].legend(fontsize=8)
save_figure(fig, "07_speed")

# %% [markdown]
# ## What we measured
#
# On the machine this tutorial was written on (an Intel Rocket Lake with AVX-512 and `VPOPCNTQ`, 2 cores
# shared with other jobs, load average 1.6 to 2.2), full mode, one thread for NumPy and one for Numba,
# median of 15 repeats, two runs:
#
# | M | K | N | float32 ms | binary, packed ms | binary + packing ms | speedup packed | speedup with packing |
# |---|---|---|---|---|---|---|---|
# | 520 | 192 | 192 | 0.27-0.28 | 0.038-0.041 | 0.047-0.051 | 6.8-6.9x | 5.4-5.7x |
# | 520 | 192 | 768 | 1.05 | 0.14 | 0.16 | 7.5x | 6.5x |
# | 520 | 768 | 192 | 1.08-1.11 | 0.12 | 0.17 | 9.3-9.4x | 6.5-6.7x |
# | 520 | 768 | 768 | 4.0-4.3 | 0.44-0.48 | 0.52-0.55 | 9.0-9.2x | 7.7-7.8x |
#
# - The binary product is **7 to 9 times faster** than OpenBLAS's float32 matmul on one core here, and still
#   5.4 to 7.8 times faster when the activations arrive as floats and must be packed first. The speedup
#   grows with $K$: each output's fixed costs (the epilogue, the store) are spread over more words.
# - Packing costs most when $N$ is small next to $K$ (768 → 192): the $M 	imes K$ floats are read once for
#   only 192 outputs per row.
# - `scripts/bench_gemm.py --threads 1 --rows 520 --dims 192 768` on the same machine a minute later (it
#   takes the minimum of single calls, so per-call overhead weighs more): 5.2x to 8.1x packed,
#   5.1x to 7.4x with packing, median 7.0x and 5.9x.
# - Why not 64x, when one 64-bit word holds 64 products? Each vector of words costs several instructions
#   (an XOR, a popcount, an add, plus loads and the accumulator traffic), while one float32 FMA
#   instruction does 8 or 16 multiply-adds and two can issue per cycle. `docs/kernels.md` explains the
#   kernel's organisation, including why its popcount step is written on explicit 512-bit vectors.
#   (The table above was measured before that change; what the cell prints on your machine is current.)
#
# On another machine the numbers will differ (a CPU without `VPOPCNTQ` runs popcount as a short
# sequence of byte lookups; a different BLAS changes the float32 column): the table printed above is the
# one that counts for yours. The correctness checks, unlike the timings, hold everywhere.
