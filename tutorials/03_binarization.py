# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 3. Binarization: sign, scaling factors, straight-through estimators
#
# A binary network keeps one bit per weight (and per activation), $b \in \{-1, +1\}$, plus a few
# floating-point scales. This tutorial builds the pieces from `minibvit.quant` one at a time:
#
# 1. the sign function, with the convention $\mathrm{sign}(0) = +1$;
# 2. the scaling factor $\alpha$ that makes $\alpha\,\mathrm{sign}(W)$ close to $W$ (XNOR-Net), and
#    BiT's mean-centring;
# 3. the straight-through estimators (STEs) that give the sign a usable gradient, compared;
# 4. BiT's elastic binarizer with a learnable $\alpha$, and two ways to differentiate it with respect
#    to $\alpha$: LSQ's (used by BiT) and GSB's refined one.

# %%
import _common  # noqa: F401  (first: sets the thread pools and finds minibvit)
from _common import pick, plt, save_figure

import numpy as np
import torch

from minibvit import quant

rng = np.random.default_rng(0)
torch.set_default_dtype(torch.float64)

# %% [markdown]
# ## 1. sign(0) = +1
#
# NumPy's `np.sign` maps 0 to 0: three values, which do not fit in one bit. minibvit's binary sign
# sends 0 (and $-0.0$) to $+1$, so that the bit is simply $b = [x \ge 0]$ and the value is $2b - 1$.
# Exact zeros are common in practice (ReLU-like activations, padding, zero-initialised shifts), so the
# convention matters and every binarizer in minibvit follows it.

# %%
x = np.array([-2.0, -0.5, -0.0, 0.0, 0.25, 3.0])
print("x            ", x)
print("np.sign(x)   ", np.sign(x))
print("quant.sign(x)", quant.sign(x))
bits = x >= 0
assert np.array_equal(quant.sign(x), 2.0 * bits - 1)
assert set(np.unique(quant.sign(x))) == {-1.0, 1.0}

# %% [markdown]
# ## 2. Scaling factors
#
# ### XNOR-Net: the best $\alpha$ in closed form
#
# Approximate one output channel $w \in \mathbb{R}^n$ (a row of a weight matrix) by $\alpha\, b$ with
# $b \in \{\pm1\}^n$ and $\alpha > 0$ (Rastegari et al. 2016, arXiv 1603.05279):
#
# $$\| w - \alpha b \|^2 = \|w\|^2 - 2\alpha\, b^\top w + \alpha^2 n .$$
#
# For any $\alpha > 0$ the best $b$ maximises $b^\top w$, so $b = \mathrm{sign}(w)$ and $b^\top w = \|w\|_1$;
# then the quadratic in $\alpha$ is smallest at
#
# $$\alpha^* = \frac{\|w\|_1}{n} = \mathrm{mean}\,|w|, \qquad \min \|w - \alpha b\|^2 = \|w\|^2 - \frac{\|w\|_1^2}{n}.$$
#
# One $\alpha$ per output channel (`scale="channel"`) can only do better than one per tensor
# (`scale="tensor"`): the per-tensor choice is one of the options each channel had. It costs one float
# per output channel, and it folds into the layer's output: $y_c = \alpha_c\, (b_c^\top x)$.

# %%
W = rng.standard_normal((8, 64)) * rng.uniform(0.2, 2.0, (8, 1))  # 8 channels with different scales
out_channel, _ = quant.weight_binarize_forward(W, scale="channel")
out_tensor, _ = quant.weight_binarize_forward(W, scale="tensor")
codes, alpha = quant.weight_binary_codes(W, scale="channel")

assert np.allclose(alpha, np.abs(W).mean(axis=1))
assert np.array_equal(out_channel, alpha[:, None] * codes)
min_error = (W ** 2).sum(1) - np.abs(W).sum(1) ** 2 / W.shape[1]
assert np.allclose(((W - out_channel) ** 2).sum(1), min_error)  # each channel at its closed-form minimum

err_channel = np.linalg.norm(W - out_channel) / np.linalg.norm(W)
err_tensor = np.linalg.norm(W - out_tensor) / np.linalg.norm(W)
print(f"relative error ||W - alpha sign(W)|| / ||W||: per channel {err_channel:.3f}, per tensor {err_tensor:.3f}")
assert err_channel <= err_tensor

alphas = np.linspace(0.01, 3 * alpha[0], 300)
errors = [((W[0] - a * np.sign(W[0])) ** 2).sum() for a in alphas]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
axes[0].plot(alphas, errors)
axes[0].axvline(alpha[0], color="C1", ls="--", label=r"$\alpha^* = $ mean$|w|$")
axes[0].set(xlabel=r"$\alpha$", ylabel=r"$\|w - \alpha\,\mathrm{sign}(w)\|^2$", title="channel 0")
axes[0].legend()
axes[1].bar(np.arange(8) - 0.2, np.linalg.norm(W - out_channel, axis=1) / np.linalg.norm(W, axis=1), 0.4,
            label="per-channel $\\alpha_c$")
axes[1].bar(np.arange(8) + 0.2, np.linalg.norm(W - out_tensor, axis=1) / np.linalg.norm(W, axis=1), 0.4,
            label="one $\\alpha$ per tensor")
axes[1].set(xlabel="output channel", ylabel="relative error", title="channels with different scales", ylim=(0, 0.95))
axes[1].legend(ncol=2, loc="upper center")
save_figure(fig, "03_scaling_factor")
assert min(errors) >= min_error[0] - 1e-9

# %% [markdown]
# ### BiT: centre each row before the sign
#
# If a channel's weights sit mostly on one side of zero, its bits are mostly $+1$ (or $-1$) and carry
# little information: a bit that is $+1$ with probability $p$ carries $H(p) = -p\log_2 p - (1-p)\log_2(1-p)$
# bits, 1 only at $p = 1/2$. BiT (Liu et al. 2022, arXiv 2205.13016) subtracts each row's mean first,
#
# $$W_c = W - \mathrm{mean}_{\text{row}}(W), \qquad W_b = \alpha\, \mathrm{sign}(W_c), \quad \alpha = \mathrm{mean}|W_c| ,$$
#
# which makes every channel's bits (nearly) balanced. This is the binarizer of all the binary methods in
# minibvit (spec `w_binary`: `WeightBinarizer(scale="channel", center=True, ste="clipped")`).
#
# The centring is differentiable: $\partial W_c/\partial W$ subtracts the row mean, so the backward pass
# subtracts the row mean of the gradient, $dW = dW_c - \mathrm{mean}_{\text{row}}(dW_c)$. The check below
# compares minibvit's backward with PyTorch autograd of the same construction.

# %%
W_offset = rng.standard_normal((6, 50)) * 0.5 + np.linspace(-0.6, 0.6, 6)[:, None]  # rows with offsets


def bit_entropy(codes):
    p = (codes > 0).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


plain, _ = quant.weight_binary_codes(W_offset, scale="channel", center=False)
centred, _ = quant.weight_binary_codes(W_offset, scale="channel", center=True)
for name, channel_codes in (("plain", plain), ("centred", centred)):
    print(f"P(bit = +1) per channel, {name:7s}: {np.round((channel_codes > 0).mean(1), 2)}, "
          f"entropy {np.round(bit_entropy(channel_codes), 2)}")
assert bit_entropy(centred).mean() > bit_entropy(plain).mean()

out, cache = quant.weight_binarize_forward(W_offset, scale="channel", center=True, ste="clipped")
g = rng.standard_normal(W_offset.shape)
dW = quant.weight_binarize_backward(g, cache)

Wt = torch.tensor(W_offset, requires_grad=True)
Wc = Wt - Wt.mean(dim=1, keepdim=True)
value = (Wc.abs().mean(dim=1, keepdim=True) * torch.where(Wc >= 0, 1.0, -1.0)).detach()  # alpha constant
u = Wc.clamp(-1, 1)
out_t = value + (u - u.detach())  # forward: alpha sign(W_c); backward: 1[|W_c| <= 1], not times alpha
(out_t * torch.tensor(g)).sum().backward()
assert np.allclose(out, out_t.detach().numpy(), rtol=1e-14, atol=0)
print(f"centred binarizer backward vs PyTorch autograd: {np.abs(dW - Wt.grad.numpy()).max():.1e}")
assert np.allclose(dW, Wt.grad.numpy(), rtol=0, atol=1e-14)
assert np.abs(dW.sum(axis=1)).max() < 1e-12  # the gradient of a centred row sums to zero

# %% [markdown]
# Note the STE above: the weight gradient passes through the sign as if it were the identity (inside
# $[-1, 1]$), and **not** multiplied by $\alpha$, as in BiT's code. Which brings us to the STEs.
#
# ## 3. Straight-through estimators, compared
#
# $\mathrm{sign}$ is flat almost everywhere: its true derivative is 0, which would stop all learning.
# A straight-through estimator keeps the sign in the forward pass and uses in the backward pass the
# derivative $d(x)$ of a smooth surrogate $F$ that looks like the sign:
#
# | STE | surrogate $F(x)$ | pseudo-gradient $d(x)$ | from |
# |---|---|---|---|
# | identity | $x$ | $1$ | Bengio et al. 2013 |
# | clipped | $\mathrm{clip}(x, -1, 1)$ | $1[\,|x| \le 1\,]$ | BNN, Courbariaux et al. 2016 |
# | ApproxSign | $2x - x|x|$ on $[-1, 1]$, $\mathrm{sign}(x)$ outside | $\max(2 - 2|x|, 0)$ | Bi-Real Net, Liu et al. 2018 |
#
# The clipped and ApproxSign surrogates go from $-1$ to $+1$ like the sign, so their pseudo-gradients
# integrate to the sign's jump, $\int d(x)\,dx = 2$; ApproxSign's is the closer fit to the sign (its
# surrogate is the piecewise-quadratic approximation), concentrated near 0 where a small change can
# flip the bit. The identity's surrogate keeps growing, so it also sends full gradient to inputs far
# from zero, whose sign a small update cannot flip. `quant.binarize_forward` / `binarize_backward`
# implement all three; below, their pseudo-gradient curves are checked against finite differences of
# the surrogates.

# %%
xs = np.linspace(-2, 2, pick(4001, 801))
surrogates = {
    "identity": lambda x: x,
    "clipped": lambda x: np.clip(x, -1, 1),
    "approxsign": lambda x: np.where(np.abs(x) <= 1, 2 * x - x * np.abs(x), np.sign(x)),
}
curves = {}
for ste, F in surrogates.items():
    forward, cache = quant.binarize_forward(xs, ste)
    curves[ste] = quant.binarize_backward(np.ones_like(xs), cache)  # d(x), since dout = 1
    assert np.array_equal(forward, quant.sign(xs))  # the forward pass is the sign, whatever the STE
    h = 1e-6
    smooth = np.min(np.abs(np.abs(xs)[:, None] - np.array([0.0, 1.0])), axis=1) > 1e-3  # away from the kinks
    numeric = (F(xs + h) - F(xs - h)) / (2 * h)
    assert np.allclose(curves[ste][smooth], numeric[smooth], atol=1e-6), ste
    inside = np.abs(xs) <= 1
    integral = np.trapezoid(curves[ste][inside], xs[inside])
    print(f"{ste:10s}: d(x) = F'(x) checked; integral over [-1, 1] = {integral:.4f}, "
          f"over the rest of [-2, 2] = {np.trapezoid(np.where(inside, 0, curves[ste]), xs):.2f}")
    if ste != "identity":
        assert abs(integral - 2) < 1e-3 and not curves[ste][~inside].any()

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
axes[0].plot(xs, quant.sign(xs), "k", lw=2, label="sign (forward)")
for ste, F in surrogates.items():
    axes[0].plot(xs, F(xs), "--", label=f"{ste} surrogate")
axes[0].set(xlabel="x", ylim=(-2.1, 2.1), title="forward: sign, and the surrogates the STEs imply")
axes[0].legend(fontsize=8)
for ste in surrogates:
    axes[1].plot(xs, curves[ste], label=ste)
axes[1].set(xlabel="x", ylabel="d(x)", title="backward: pseudo-gradients")
axes[1].legend(fontsize=8)
save_figure(fig, "03_ste_curves")

# %% [markdown]
# ## 4. The elastic binarizer and the gradient of its scale
#
# Activations change from input to input, so their scale is learnt. BiT's elastic binarizer has a
# learnable $\alpha$ and, with $q = x/\alpha$,
#
# $$\text{signed: } \hat x = \alpha\, \mathrm{sign}(x) \in \{-\alpha, +\alpha\}, \qquad
#   \text{unsigned: } \hat x = \alpha\, \mathrm{clip}(\mathrm{round}(q), 0, 1) \in \{0, \alpha\}$$
#
# (the unsigned one for non-negative inputs, e.g. after the softmax or GELU). In backward the input gets
# the clipped STE on $q$: $\partial \hat x / \partial x = 1[|q| \le 1]$ (signed).
#
# **The gradient with respect to $\alpha$.** The signed forward is linear in $\alpha$, so its exact
# derivative is $\mathrm{sign}(x)$. BiT uses that, with LSQ's gradient scale $1/\sqrt N$ for a scale
# shared by $N$ elements (Esser et al. 2020):
#
# $$\text{LSQ (BiT): } \frac{\partial \mathcal L}{\partial \alpha} = \frac{1}{\sqrt N}\sum_i \mathrm{sign}(x_i)\, g_i .$$
#
# GSB (Gao et al. 2024, arXiv 2305.07931) differentiates instead the surrogate that the STE implies,
# $\alpha\,\mathrm{sign}_{ste}(\mathrm{clip}(x/\alpha, -1, 1))$, in which $\alpha$ also moves the clipping
# window. The chain rule adds a second term:
#
# $$\text{GSB: } \frac{\partial \mathcal L}{\partial \alpha} = \frac{1}{\sqrt N}\sum_i
#   \big(\mathrm{sign}(x_i) - 1[|q_i| \le 1]\, q_i\big)\, g_i .$$
#
# The unsigned binarizer is LSQ's 1-bit quantizer and has LSQ's gradient,
# $\sum_i (1[q_i > 1] + 1[0 \le q_i \le 1](\mathrm{round}(q_i) - q_i))\, g_i / \sqrt N$.
# The checks: each formula is PyTorch autograd of its surrogate, and the LSQ one is also the finite
# difference of the true forward pass.

# %%
N = 500
x = rng.standard_normal(N) * 0.7 + 0.1
g = rng.standard_normal(N)
alpha = np.array([0.8])
print("first-batch initialisation: 2 mean|x| (signed) =", quant.elastic_alpha_init(x, signed=True),
      " 4 mean|x| (unsigned) =", quant.elastic_alpha_init(x, signed=False))

grad_scale = 1 / np.sqrt(N)
ours = {}
for signed, kind in ((True, "lsq"), (True, "gsb"), (False, "lsq")):
    out, cache = quant.elastic_binarize_forward(x, alpha, signed, alpha_grad=kind)
    ours[signed, kind] = quant.elastic_binarize_backward(g, cache)
    expected = alpha * (quant.sign(x) if signed else np.clip(np.round(x / alpha), 0, 1))
    assert np.array_equal(out, expected)


def surrogate(signed, kind):
    """PyTorch autograd of the surrogate each alpha gradient differentiates."""
    xt, at = torch.tensor(x, requires_grad=True), torch.tensor(alpha, requires_grad=True)
    a = at * grad_scale + (at - at * grad_scale).detach()  # value alpha, gradient scaled by 1/sqrt(N)
    if signed:
        q = (xt / (a if kind == "gsb" else a.detach())).clamp(-1, 1)  # LSQ: alpha does not move the window
        out = a * (q + (torch.where(q >= 0, 1.0, -1.0) - q).detach())
    else:
        q = (xt / a).clamp(0, 1)
        out = a * (q + (torch.round(q) - q).detach())
    (out * torch.tensor(g)).sum().backward()
    return xt.grad.numpy(), at.grad.numpy()


for key, (dx, dalpha) in ours.items():
    ref_dx, ref_dalpha = surrogate(*key)
    name = f"{'signed' if key[0] else 'unsigned'}, {key[1]}"
    print(f"{name:14s}: dalpha = {dalpha[0]: .6f} (PyTorch {ref_dalpha[0]: .6f}), dx max error "
          f"{np.abs(dx - ref_dx).max():.1e}")
    assert np.allclose(dx, ref_dx, rtol=0, atol=1e-14) and np.allclose(dalpha, ref_dalpha, rtol=1e-12), name

# LSQ's signed alpha gradient is the exact derivative of the forward (linear in alpha): finite differences
h = 1e-6
loss = lambda a: (quant.elastic_binarize_forward(x, np.array([a]), True)[0] * g).sum()  # noqa: E731
numeric = (loss(alpha[0] + h) - loss(alpha[0] - h)) / (2 * h)
print(f"finite difference of the forward: {numeric * grad_scale:.6f} = LSQ's {ours[True, 'lsq'][1][0]:.6f}")
assert abs(numeric * grad_scale - ours[True, "lsq"][1][0]) < 1e-8

# %% [markdown]
# ### Where do the two $\alpha$ gradients point?
#
# A picture on the simplest objective, reconstructing $x$ itself:
# $\mathcal L(\alpha) = \tfrac{1}{2N}\|\alpha\,\mathrm{sign}(x) - x\|^2$, so $g = (\hat x - x)/N$. LSQ's gradient is
# the true derivative here, and it vanishes at XNOR-Net's $\alpha^* = \mathrm{mean}|x|$, the minimiser. GSB's
# extra term works out to $-\frac1N\sum_{|x_i| \le \alpha} |x_i|(\alpha - |x_i|)/\alpha \le 0$, so GSB's gradient is
# smaller and its zero lies at a larger $\alpha$: a wider clipping window, so that more inputs receive
# gradient through the STE. Which one trains better is an empirical question of
# the downstream task (tutorial 6 measures the whole GSB method); on pure reconstruction LSQ's is exact.

# %%
x = rng.standard_normal(pick(20000, 4000))
alphas = np.linspace(0.2, 2.0, pick(181, 61))


def alpha_gradient(a, kind):
    out, cache = quant.elastic_binarize_forward(x, np.array([a]), True, alpha_grad=kind)
    return quant.elastic_binarize_backward((out - x) / x.size, cache)[1][0] * np.sqrt(x.size)  # undo 1/sqrt(N)


def zero_of(kind, lo=0.2, hi=2.0):
    for _ in range(60):  # bisection: the gradient goes from negative to positive
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if alpha_gradient(mid, kind) < 0 else (lo, mid)
    return (lo + hi) / 2


zeros = {kind: zero_of(kind) for kind in ("lsq", "gsb")}
print(f"mean|x| = {np.abs(x).mean():.4f}; zero of the LSQ gradient {zeros['lsq']:.4f}, of GSB's {zeros['gsb']:.4f}")
assert abs(zeros["lsq"] - np.abs(x).mean()) < 1e-6 and zeros["gsb"] > zeros["lsq"]

fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
grid = np.linspace(-2.5, 2.5, 1001)
for signed, label in ((True, "signed"), (False, "unsigned")):
    axes[0].plot(grid, quant.elastic_binarize_forward(grid, np.array([0.8]), signed)[0], label=f"{label}, alpha = 0.8")
axes[0].set(xlabel="x", title="elastic binarizer, forward")
axes[0].legend(fontsize=8)
losses = [0.5 * np.mean((a * quant.sign(x) - x) ** 2) for a in alphas]
axes[1].plot(alphas, losses, "k", label=r"$\mathcal{L}(\alpha)$")
for kind, color in (("lsq", "C0"), ("gsb", "C3")):
    axes[1].plot(alphas, [alpha_gradient(a, kind) for a in alphas], color=color, label=f"{kind.upper()} dL/dalpha")
    axes[1].axvline(zeros[kind], color=color, ls=":", lw=1)
axes[1].axhline(0, color="gray", lw=0.5)
axes[1].set(xlabel=r"$\alpha$", title=r"reconstruction of $x \sim N(0, 1)$")
axes[1].legend(fontsize=8)
save_figure(fig, "03_elastic_alpha")

# %% [markdown]
# Every learnable scale is floored at `quant.SCALE_FLOOR` ($10^{-5}$) in the forward pass, with its
# gradient passed to the raw parameter, so a scale that training drives to zero recovers instead of
# dividing by zero. Tutorial 5 puts these binarizers into the ViT of tutorial 2 and watches the latent
# weights and the activation bits during training.
