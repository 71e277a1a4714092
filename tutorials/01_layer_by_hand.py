# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 1. A layer by hand: LayerNorm and attention, forward and backward
#
# minibvit has no autograd. Every operation is a pair of functions written by hand, in the style of
# CS231n and llm.c:
#
# ```python
# out, cache = op_forward(x, params...)    # cache: what the backward pass needs
# dx, dparams... = op_backward(dout, cache)  # dout = dL/dout, returns dL/dx, dL/dparams
# ```
#
# This tutorial derives the two ops that make a transformer a transformer, LayerNorm and scaled
# dot-product attention, and checks minibvit's implementation (`minibvit.ops`) in two independent
# ways: against PyTorch's autograd, and against finite differences of the loss. Everything runs in
# float64, so the checks can be tight.
#
# Run it as a script (`python tutorials/01_layer_by_hand.py`) or as a notebook
# (`jupytext --to notebook tutorials/01_layer_by_hand.py`).

# %%
import _common  # noqa: F401  (first: sets the thread pools and finds minibvit)
from _common import pick, plt, save_figure

import math

import numpy as np
import torch
import torch.nn.functional as F

from minibvit import ops

rng = np.random.default_rng(0)
torch.set_default_dtype(torch.float64)


def rel_err(a, b):
    """max |a - b| / max |b|: one number that says how far apart two arrays are."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def t(x):
    """NumPy -> torch leaf tensor that records its gradient."""
    return torch.tensor(x, requires_grad=True)


# %% [markdown]
# ## Finite differences: the check that needs nothing
#
# For any scalar loss $L(x)$, the central difference
#
# $$\frac{\partial L}{\partial x_i} \approx \frac{L(x + h e_i) - L(x - h e_i)}{2h}$$
#
# has a truncation error $O(h^2)$ (the $h^3$ terms of the Taylor series cancel) and a round-off error
# $O(\varepsilon/h)$ with $\varepsilon \approx 10^{-16}$ in float64. The sum is smallest near
# $h \approx \varepsilon^{1/3} \approx 10^{-5}$, where it is about $10^{-10}$ relative: precise enough to
# catch any wrong term in a hand-written backward.
#
# To turn an op with a tensor output into a scalar loss we contract it with a fixed random tensor:
# $L = \sum y \odot g$. Then $\partial L / \partial y = g$, so `dout = g` is exactly what the backward
# pass receives.

# %%
def numerical_gradient(loss, x, h=1e-5, indices=None):
    """Central differences of loss() with respect to the entries `indices` of x (all by default);
    x is perturbed in place and restored."""
    grad = np.zeros_like(x)
    for i in (np.ndindex(x.shape) if indices is None else indices):
        old = x[i]
        x[i] = old + h
        up = loss()
        x[i] = old - h
        down = loss()
        x[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad


# %% [markdown]
# ## LayerNorm
#
# For one token $x \in \mathbb{R}^D$ (LayerNorm normalises each token over its $D$ channels):
#
# $$\mu = \frac1D \sum_j x_j, \qquad \sigma^2 = \frac1D \sum_j (x_j - \mu)^2, \qquad
#   r = \frac{1}{\sqrt{\sigma^2 + \epsilon}}, \qquad \hat x_j = (x_j - \mu)\, r, \qquad
#   y_j = \gamma_j \hat x_j + \beta_j .$$
#
# **Backward.** Differentiating $\hat x$ gives
# $\partial \hat x_j / \partial x_i = r\,(\delta_{ij} - \tfrac1D - \tfrac1D \hat x_i \hat x_j)$
# (the $-1/D$ from the mean, the $\hat x_i \hat x_j$ term from the variance). With
# $g_j = \gamma_j\, \partial L/\partial y_j$ the chain rule collapses to
#
# $$\frac{\partial L}{\partial x_i} = r\Big(g_i - \frac1D\sum_j g_j - \hat x_i\,\frac1D\sum_j g_j \hat x_j\Big),
#   \qquad \frac{\partial L}{\partial \gamma_j} = \sum_{\text{tokens}} \frac{\partial L}{\partial y_j}\hat x_j,
#   \qquad \frac{\partial L}{\partial \beta_j} = \sum_{\text{tokens}} \frac{\partial L}{\partial y_j}.$$
#
# The gradient with respect to $x$ has zero mean and is orthogonal to $\hat x$ (up to $\epsilon$):
# LayerNorm's output does not change when $x$ is shifted, nor (for $\epsilon = 0$) when it is scaled,
# so neither direction can carry gradient.
# `minibvit.ops.layernorm_forward` is written as these formulas in NumPy; for float32 and float64 inputs
# it hands the loop over rows (tokens) to a Numba kernel in `minibvit.numerics`, which computes the
# same thing in parallel, with the mean and variance summed in a fixed order (`ops.USE_NUMERICS = False`
# runs the NumPy lines instead). Here is the formula in four lines of NumPy next to it.

# %%
B, N, D = 2, 5, 8
eps = 1e-6
x = rng.standard_normal((B, N, D)) * 3 + 1
gamma = rng.standard_normal(D)
beta = rng.standard_normal(D)

y, ln_cache = ops.layernorm_forward(x, gamma, beta, eps)

mu = x.mean(axis=-1, keepdims=True)
var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
x_hat = (x - mu) / np.sqrt(var + eps)
print("LayerNorm forward vs the formula:", rel_err(y, x_hat * gamma + beta))
assert rel_err(y, x_hat * gamma + beta) < 1e-14

# %% [markdown]
# The backward pass, then the same gradients from PyTorch's `F.layer_norm` and autograd:

# %%
g = rng.standard_normal((B, N, D))  # dL/dy for L = sum(y * g)
dx, dgamma, dbeta = ops.layernorm_backward(g, ln_cache)

xt, gammat, betat = t(x), t(gamma), t(beta)
(F.layer_norm(xt, (D,), gammat, betat, eps=eps) * torch.tensor(g)).sum().backward()
for name, ours, theirs in (("dx", dx, xt.grad), ("dgamma", dgamma, gammat.grad), ("dbeta", dbeta, betat.grad)):
    print(f"{name:7s} relative error vs PyTorch: {rel_err(ours, theirs.numpy()):.1e}")
    assert rel_err(ours, theirs.numpy()) < 1e-12, name

# Read off the formula, per token: sum_i dx_i = 0 exactly, and sum_i dx_i x_hat_i = 0 up to epsilon
# (sum_i x_hat_i^2 = D var / (var + eps) instead of D), so the residual has a closed form.
assert np.abs(dx.sum(axis=-1)).max() < 1e-12
g_gamma = g * gamma
residual = (g_gamma * x_hat).sum(-1) * (1 - (x_hat ** 2).mean(-1)) / np.sqrt(var[..., 0] + eps)
assert np.allclose((dx * x_hat).sum(axis=-1), residual, rtol=1e-6, atol=1e-14)
print(f"largest |sum dx * x_hat| per token: {np.abs(residual).max():.1e} (vanishes as eps -> 0)")

# %% [markdown]
# And by finite differences, for every entry of $x$, $\gamma$ and $\beta$:

# %%
def ln_loss():
    return float((ops.layernorm_forward(x, gamma, beta, eps)[0] * g).sum())


for name, arr, ours in (("dx", x, dx), ("dgamma", gamma, dgamma), ("dbeta", beta, dbeta)):
    err = rel_err(ours, numerical_gradient(ln_loss, arr))
    print(f"{name:7s} relative error vs finite differences: {err:.1e}")
    assert err < 1e-8, name

# %% [markdown]
# ### How small should $h$ be?
#
# The V-shaped curve below is the error of the central difference for one entry of $\partial L/\partial x$
# as $h$ shrinks: truncation ($\propto h^2$) on the right, round-off ($\propto \varepsilon/h$) on the
# left, the minimum near $\varepsilon^{1/3}$.

# %%
hs = np.logspace(-13, -1, 25)
errors = [abs(numerical_gradient(ln_loss, x, h, indices=[(0, 0, 0)])[0, 0, 0] - dx[0, 0, 0]) / abs(dx[0, 0, 0])
          for h in hs]
best = hs[int(np.argmin(errors))]
fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.loglog(hs, errors, "o-", ms=3)
left, right = hs < best, hs > best  # fit the constants of the two error terms to each arm
ax.loglog(hs, np.median(np.array(errors)[left] * hs[left]) / hs, "--", lw=0.8, label=r"round-off $\propto \varepsilon/h$")
ax.loglog(hs, np.median(np.array(errors)[right] / hs[right] ** 2) * hs ** 2, ":", lw=0.8,
          label=r"truncation $\propto h^2$")
ax.axvline(np.finfo(float).eps ** (1 / 3), color="gray", lw=0.8, label=r"$\varepsilon^{1/3}$")
ax.set(xlabel="h", ylabel="relative error of the central difference", ylim=(1e-13, 1),
       title="LayerNorm dL/dx[0,0,0]: finite difference vs backward")
ax.legend(fontsize=8)
save_figure(fig, "01_finite_difference_error")
print(f"best h = {best:.0e}, error {min(errors):.1e}")
assert 1e-8 <= best <= 1e-3 and min(errors) < 1e-8
assert errors[0] > 100 * min(errors) and errors[-1] > 100 * min(errors)  # both arms of the V

# %% [markdown]
# ## Softmax
#
# Attention normalises each row of scores with a softmax, $y_j = e^{s_j} / \sum_k e^{s_k}$ (computed
# after subtracting the row maximum, which changes nothing mathematically and avoids overflow). Its
# Jacobian is $\partial y_j/\partial s_i = y_j(\delta_{ij} - y_i)$, i.e. $J = \mathrm{diag}(y) - y y^\top$,
# and the backward pass never builds it:
#
# $$\frac{\partial L}{\partial s_i} = \sum_j \frac{\partial L}{\partial y_j} y_j(\delta_{ij} - y_i)
#   = y_i\Big(\frac{\partial L}{\partial y_i} - \sum_j \frac{\partial L}{\partial y_j} y_j\Big).$$

# %%
s = rng.standard_normal((3, 6)) * 1.5
p, sm_cache = ops.softmax_forward(s)
dout = rng.standard_normal(s.shape)
ds = ops.softmax_backward(dout, sm_cache)

jacobians = [np.diag(row) - np.outer(row, row) for row in p]  # (6, 6) per row, symmetric
ds_from_jacobian = np.stack([J @ d for J, d in zip(jacobians, dout)])
print("softmax backward vs explicit Jacobian:", rel_err(ds, ds_from_jacobian))
assert rel_err(ds, ds_from_jacobian) < 1e-14
assert np.allclose(p.sum(axis=-1), 1) and np.abs(ds.sum(axis=-1)).max() < 1e-14  # rows of J sum to 0

fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
axes[0].bar(range(6), p[0])
axes[0].set(title="softmax probabilities y (one row)", xlabel="j")
im = axes[1].imshow(jacobians[0], cmap="RdBu_r", vmin=-0.25, vmax=0.25)
axes[1].set(title=r"Jacobian $\mathrm{diag}(y) - y y^\top$", xlabel="j", ylabel="i")
fig.colorbar(im, ax=axes[1])
save_figure(fig, "01_softmax_jacobian")

# %% [markdown]
# ## Scaled dot-product attention
#
# Per batch element and head, with $Q, K, V \in \mathbb{R}^{N \times d}$:
#
# $$S = \frac{Q K^\top}{\sqrt d}, \qquad A = \mathrm{softmax}_{\text{rows}}(S), \qquad O = A V .$$
#
# **Backward**, given $dO = \partial L/\partial O$: the two matrix products give
#
# $$dV = A^\top dO, \qquad dA = dO\, V^\top,$$
#
# the softmax turns $dA$ into $dS$ row by row (above), and the scaled product gives
#
# $$dQ = \frac{dS\, K}{\sqrt d}, \qquad dK = \frac{dS^\top Q}{\sqrt d}.$$
#
# `ops.attention_forward` does this batched over (batch, heads) with `np.matmul`, as three smaller pairs:
# `attention_scores_forward` ($S = QK^\top/\sqrt d$), `softmax_forward` and `attention_values_forward`
# ($O = AV$). It is plain full-precision attention, and PyTorch's `F.scaled_dot_product_attention` must
# agree with it. The low-bit methods of the later tutorials put quantizers on $Q$, $K$, $A$ and $V$
# between those steps; `minibvit.model` composes them, the ops never see a quantizer.

# %%
B, H, N, d = 2, 3, pick(7, 5), 4
q, k, v = (rng.standard_normal((B, H, N, d)) for _ in range(3))
o, attn_cache = ops.attention_forward(q, k, v)
do = rng.standard_normal(o.shape)
dq, dk, dv, quant_grads = ops.attention_backward(do, attn_cache)
assert quant_grads == {}  # attention has no parameters (the model's quantized attention returns its quantizers' here)

qt, kt, vt = t(q), t(k), t(v)
ot = F.scaled_dot_product_attention(qt, kt, vt)
(ot * torch.tensor(do)).sum().backward()
print("attention forward vs PyTorch:", f"{rel_err(o, ot.detach().numpy()):.1e}")
assert rel_err(o, ot.detach().numpy()) < 1e-13
for name, ours, theirs in (("dq", dq, qt.grad), ("dk", dk, kt.grad), ("dv", dv, vt.grad)):
    print(f"{name} relative error vs PyTorch: {rel_err(ours, theirs.numpy()):.1e}")
    assert rel_err(ours, theirs.numpy()) < 1e-12, name


def attn_loss():
    return float((ops.attention_forward(q, k, v)[0] * do).sum())


for name, arr, ours in (("dq", q, dq), ("dk", k, dk), ("dv", v, dv)):
    err = rel_err(ours, numerical_gradient(attn_loss, arr))
    print(f"{name} relative error vs finite differences: {err:.1e}")
    assert err < 1e-8, name

# %% [markdown]
# ## A whole multi-head self-attention layer
#
# In a ViT block the three inputs come from one fused projection of the (normalised) tokens
# $X \in \mathbb{R}^{N\times D}$, and the heads are merged and projected back:
#
# $$[Q\,|\,K\,|\,V] = X W_{qkv}^\top + b_{qkv}, \quad
#   \text{split into } H \text{ heads of width } d = D/H, \quad
#   O_h = \mathrm{softmax}\Big(\frac{Q_h K_h^\top}{\sqrt d}\Big) V_h, \quad
#   Y = [O_1 | \dots | O_H]\, W_{o}^\top + b_o .$$
#
# minibvit composes it from `linear`, `split_heads`, `attention`, `merge_heads` and `linear`, and the
# backward pass runs the same list in reverse. Its weight layout is timm's, which is also that of
# `torch.nn.MultiheadAttention` (`in_proj_weight` = $W_{qkv}$, rows ordered q, k, v and heads
# contiguous), so PyTorch's own module is an independent reference for the whole layer.

# %%
B, N, D, H = 2, pick(9, 6), 12, 3
X = rng.standard_normal((B, N, D))
W_qkv, b_qkv = rng.standard_normal((3 * D, D)) / math.sqrt(D), rng.standard_normal(3 * D) * 0.1
W_o, b_o = rng.standard_normal((D, D)) / math.sqrt(D), rng.standard_normal(D) * 0.1


def mhsa_forward(X):
    qkv, c1 = ops.linear_forward(X, W_qkv, b_qkv)
    (q, k, v), c2 = ops.split_heads_forward(qkv, H)
    o, c3 = ops.attention_forward(q, k, v)
    o, c4 = ops.merge_heads_forward(o)
    Y, c5 = ops.linear_forward(o, W_o, b_o)
    return Y, (c1, c2, c3, c4, c5)


def mhsa_backward(dY, cache):
    c1, c2, c3, c4, c5 = cache
    do, dW_o, db_o = ops.linear_backward(dY, c5)
    do = ops.merge_heads_backward(do, c4)
    dq, dk, dv, _ = ops.attention_backward(do, c3)
    dqkv = ops.split_heads_backward(dq, dk, dv, c2)
    dX, dW_qkv, db_qkv = ops.linear_backward(dqkv, c1)
    return dX, dW_qkv, db_qkv, dW_o, db_o


Y, cache = mhsa_forward(X)
dY = rng.standard_normal(Y.shape)
grads = dict(zip(("X", "W_qkv", "b_qkv", "W_o", "b_o"), mhsa_backward(dY, cache)))

mha = torch.nn.MultiheadAttention(D, H, batch_first=True)
with torch.no_grad():
    mha.in_proj_weight.copy_(torch.tensor(W_qkv))
    mha.in_proj_bias.copy_(torch.tensor(b_qkv))
    mha.out_proj.weight.copy_(torch.tensor(W_o))
    mha.out_proj.bias.copy_(torch.tensor(b_o))
Xt = t(X)
Yt, _ = mha(Xt, Xt, Xt, need_weights=False)
(Yt * torch.tensor(dY)).sum().backward()
reference = {"X": Xt.grad, "W_qkv": mha.in_proj_weight.grad, "b_qkv": mha.in_proj_bias.grad,
             "W_o": mha.out_proj.weight.grad, "b_o": mha.out_proj.bias.grad}
print(f"layer output vs torch.nn.MultiheadAttention: {rel_err(Y, Yt.detach().numpy()):.1e}")
assert rel_err(Y, Yt.detach().numpy()) < 1e-12
for name, ours in grads.items():
    err = rel_err(ours, reference[name].numpy())
    print(f"d{name:6s} relative error vs PyTorch: {err:.1e}")
    assert err < 1e-12, name

# finite differences on every entry of W_qkv (a sample of 20 in fast mode)
def mhsa_loss():
    return float((mhsa_forward(X)[0] * dY).sum())


entries = list(np.ndindex(W_qkv.shape))
entries = pick(entries, [entries[i] for i in rng.choice(len(entries), 20, replace=False)])
numeric = numerical_gradient(mhsa_loss, W_qkv, indices=entries)
err = max(abs(numeric[i] - grads["W_qkv"][i]) for i in entries) / np.abs(grads["W_qkv"]).max()
print(f"dW_qkv vs finite differences on {len(entries)} entries: {err:.1e}")
assert err < 1e-8

# %% [markdown]
# Each op passed two independent checks: PyTorch's autograd (a different implementation of the same
# math) and finite differences (no implementation at all, just the forward pass). The next tutorial
# stacks these ops into a whole Vision Transformer and checks one full training step.
