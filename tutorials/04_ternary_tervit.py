# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 4. Ternary weights and TerViT
#
# A ternary weight takes three values, $\{-\alpha, 0, +\alpha\}$: $\log_2 3 \approx 1.58$ bits, and the zero
# lets a weight say "no connection", which a binary weight cannot. This tutorial covers
#
# 1. TWN's threshold (Li et al. 2016, arXiv 1605.04711): which weights become zero, and why $0.7\,\mathrm{mean}|W|$;
# 2. one threshold per tensor vs one per output channel, on the weights of a real (briefly trained)
#    model, and why TerViT (Xu et al. 2022, arXiv 2201.08050) uses channel-wise ones;
# 3. TerViT's progressive training, full precision $\to$ 8-bit $\to$ ternary, against ternarizing the
#    full-precision model directly, with `minibvit.train`.

# %%
import _common  # noqa: F401  (first: sets the thread pools and finds minibvit)
from _common import pick, plt, read_log, run_dir, save_figure

import numpy as np

from minibvit import methods, quant, train

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. TWN: the threshold
#
# Approximate $w \in \mathbb{R}^n$ by $\alpha\,t$ with $t \in \{-1, 0, +1\}^n$. For a threshold $\Delta$, set
# $t_i = \mathrm{sign}(w_i)\,1[|w_i| > \Delta]$ and call $I_\Delta$ the kept entries. As for the binary case
# (tutorial 3), the best scale is the mean magnitude of what is kept, and the error follows:
#
# $$\alpha^*(\Delta) = \frac{1}{|I_\Delta|}\sum_{i \in I_\Delta} |w_i|, \qquad
#   \|w - \alpha^* t\|^2 = \|w\|^2 - \frac{\big(\sum_{i\in I_\Delta}|w_i|\big)^2}{|I_\Delta|}.$$
#
# The best threshold maximises $(\sum_{I_\Delta}|w_i|)^2 / |I_\Delta|$. Keeping the $k$ largest magnitudes is
# the only sensible choice for each $k$, so the exact optimum is a scan over $k$ of sorted magnitudes. For
# a distribution it has a closed form: $\Delta^* \approx 0.61\sigma = 0.77\,\mathbb{E}|w|$ for a Gaussian,
# $\Delta^* = a/3 = 0.67\,\mathbb{E}|w|$ for a uniform on $[-a, a]$, $\Delta^* = b = 1.0\,\mathbb{E}|w|$ for a Laplace
# of scale $b$. TWN's rule $\Delta = 0.7\,\mathrm{mean}|w|$ is the compromise, and needs no sort.

# %%
def optimal_threshold(w):
    """Exact best TWN threshold of w: scan k = number of kept entries over the sorted magnitudes."""
    mags = np.sort(np.abs(w).ravel())[::-1]
    k = np.arange(1, mags.size + 1)
    gain = np.cumsum(mags) ** 2 / k
    best = int(np.argmax(gain))
    delta = (mags[best] + mags[best + 1]) / 2 if best + 1 < mags.size else 0.0
    return delta, (np.sum(mags ** 2) - gain[best]) / np.sum(mags ** 2)


def twn_error(w, factor):
    delta = factor * np.abs(w).mean()
    kept = np.abs(w) > delta
    alpha = np.abs(w[kept]).mean()
    return np.sum((w - alpha * np.sign(w) * kept) ** 2) / np.sum(w ** 2)


n = pick(200_000, 20_000)
samples = {"Gaussian": rng.standard_normal(n), "uniform": rng.uniform(-1, 1, n), "Laplace": rng.laplace(size=n)}
closed_form = {"Gaussian": 0.6120 / np.sqrt(2 / np.pi), "uniform": 2 / 3, "Laplace": 1.0}
factors = np.linspace(0.05, 1.6, 63)
fig, ax = plt.subplots(figsize=(6, 3.6))
for name, w in samples.items():
    delta, best_error = optimal_threshold(w)
    best_factor = delta / np.abs(w).mean()
    err_07 = twn_error(w, 0.7)
    print(f"{name:8s}: best Delta = {best_factor:.3f} mean|w| (closed form {closed_form[name]:.3f}), "
          f"error {best_error:.4f}; at 0.7 mean|w|: {err_07:.4f}")
    assert abs(best_factor - closed_form[name]) < 0.05 and best_error <= err_07
    line, = ax.plot(factors, [twn_error(w, f) for f in factors], label=name)
    ax.plot(best_factor, best_error, "o", color=line.get_color())
ax.axvline(0.7, color="gray", ls="--", lw=1, label="TWN: 0.7")
ax.set(xlabel=r"threshold $\Delta$ / mean$|w|$", ylabel=r"$\|w - \alpha t\|^2 / \|w\|^2$",
       title="ternary reconstruction error vs threshold")
ax.legend()
save_figure(fig, "04_twn_threshold")

# %% [markdown]
# `quant.ternary_codes` is TWN's rule, per tensor or per output channel; `quant.ternarize_forward` returns
# $\alpha\,t$ and passes the gradient straight through in backward (identity STE). The check: its output
# is the closed form above, channel by channel.

# %%
W = rng.standard_normal((6, 40)) * rng.uniform(0.1, 2.0, (6, 1))
codes, alpha, delta = quant.ternary_codes(W, per_channel=True)
for c in range(W.shape[0]):
    kept = np.abs(W[c]) > 0.7 * np.abs(W[c]).mean()
    assert np.isclose(delta[c], 0.7 * np.abs(W[c]).mean()) and np.isclose(alpha[c], np.abs(W[c][kept]).mean())
    assert np.array_equal(codes[c], np.sign(W[c]) * kept)
out, _ = quant.ternarize_forward(W, per_channel=True)
assert np.array_equal(out, alpha[:, None] * codes)
print("zeros per channel:", (codes == 0).mean(axis=1).round(2))

# %% [markdown]
# ## 2. Per tensor or per channel? Real weights decide
#
# One $\Delta$ and one $\alpha$ for a whole matrix work when all its output channels have the same scale.
# Trained weights do not: some output channels grow, others shrink. With one threshold per tensor, a
# channel of small weights falls entirely below $\Delta$ and becomes all zeros, and a channel of large
# weights is represented by an $\alpha$ that is too small. TerViT computes $\Delta_c$ and $\alpha_c$ per
# output channel, which costs one float per channel and folds into the layer's output like the binary
# $\alpha_c$.
#
# The real weights: a full-precision ViT (64 wide, 2 blocks; 32 wide, 1 block in fast mode) trained
# briefly on the synthetic shapes task with `minibvit.train.run`.

# %%
model_size = pick(dict(embed_dim=64, depth=2, num_heads=2), dict(embed_dim=32, depth=1, num_heads=2))
common = dict(dataset="synthetic", out=run_dir("tervit"), patch_size=8, batch_size=pick(64, 50),
              limit_per_class=pick(None, 30), **model_size)
fp_epochs = pick(15, 4)
train.run(train.TrainConfig(method="fp", epochs=fp_epochs, **common))
fp_model, _ = train.load_model(f"{common['out']}/fp/last.safetensors")  # the weights at the end

ternary_roles = [role for role, spec in methods.resolve(fp_model.cfg, "tervit").items() if spec == "w_ternary_channel"]
rows, total = [], {"tensor": 0.0, "channel": 0.0, "norm": 0.0}
for role in ternary_roles:
    W = fp_model.params[role]
    scales = np.abs(W).mean(axis=1)
    errs = {}
    for mode, per_channel in (("tensor", False), ("channel", True)):
        out, _ = quant.ternarize_forward(W, per_channel=per_channel)
        errs[mode] = np.sum((W - out) ** 2)
        total[mode] += errs[mode]
    total["norm"] += np.sum(W ** 2)
    dead = np.mean(np.all(quant.ternary_codes(W, per_channel=False)[0] == 0, axis=1))
    rows.append((role, scales, errs["tensor"] / np.sum(W ** 2), errs["channel"] / np.sum(W ** 2), dead))
    print(f"{role:26s} channel scales {scales.min():.4f}..{scales.max():.4f} (x{scales.max() / scales.min():.1f})  "
          f"error per tensor {rows[-1][2]:.3f}, per channel {rows[-1][3]:.3f}; all-zero channels per tensor {dead:.0%}")
print(f"all ternary layers: relative error per tensor {total['tensor'] / total['norm']:.4f}, "
      f"per channel {total['channel'] / total['norm']:.4f}")
assert total["channel"] < total["tensor"]

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for role, scales, *_ in rows:
    axes[0].plot(np.sort(scales)[::-1] / scales.mean(), label=role.replace("blocks.", "b"))
axes[0].set(xlabel="output channel (sorted)", ylabel="mean|W| of the channel / layer mean",
            title="trained weights: channel scales differ")
axes[0].legend(fontsize=7)
pos = np.arange(len(rows))
axes[1].bar(pos - 0.2, [r[2] for r in rows], 0.4, label="per tensor (TWN)")
axes[1].bar(pos + 0.2, [r[3] for r in rows], 0.4, label="per channel (TerViT)")
axes[1].set_xticks(pos, [r[0].replace("blocks.", "b").replace(".weight", "") for r in rows], rotation=45, ha="right",
                     fontsize=7)
axes[1].set(ylabel=r"$\|W - \alpha T\|^2 / \|W\|^2$", title="ternary reconstruction error")
axes[1].legend(fontsize=8)
save_figure(fig, "04_per_tensor_vs_channel")

# %% [markdown]
# The same effect, exaggerated so that it is unmistakable: channels whose scales span two orders of
# magnitude. The per-tensor threshold zeros out the small channels completely; they carry no signal at
# all after ternarization.

# %%
W = rng.standard_normal((16, 64)) * np.logspace(-1, 1, 16)[:, None]
per_tensor, _ = quant.ternarize_forward(W, per_channel=False)
per_channel, _ = quant.ternarize_forward(W, per_channel=True)
channel_error = lambda out: np.linalg.norm(W - out, axis=1) / np.linalg.norm(W, axis=1)  # noqa: E731
print("relative error per channel, per-tensor threshold: ", channel_error(per_tensor).round(2))
print("relative error per channel, per-channel threshold:", channel_error(per_channel).round(2))
assert np.all(per_tensor[0] == 0) and np.all(channel_error(per_channel) < 0.6)

# %% [markdown]
# ## 3. Progressive training: 8-bit first, then ternary
#
# Ternarizing a full-precision model in one jump changes every weight at once. TerViT goes through an
# intermediate stage: first 8-bit weights and activations (a small perturbation the model absorbs
# quickly), then ternary weights with 8-bit activations, each stage initialised from the one before.
# In minibvit this is the recipe of `method="tervit"`:
#
# | stage | scheme | weights | activations |
# |---|---|---|---|
# | `fp` | `fp` | float | float |
# | `tervit_w8a8` | `tervit_w8a8` | 8-bit min-max per channel | 8-bit min-max per tensor |
# | `tervit` | `tervit` | ternary per channel (blocks), 8-bit (patch embedding, head) | 8-bit |
#
# The fp stage above is reused (same directory and model). The direct alternative trains only the last
# stage, from the full-precision checkpoint (`init_from`). Progressive training spends one more stage of
# epochs, so a second direct run gets twice the epochs: the same total budget.

# %%
stage_epochs = pick(5, 2)
# `epochs` is the total of the quantized stages (the budget rule): stage_epochs for each of the two
progressive = train.run(train.TrainConfig(method="tervit", epochs=2 * stage_epochs, teacher_epochs=fp_epochs, **common))
fp_checkpoint = f"{common['out']}/fp/best.safetensors"
direct = {}
for epochs in (stage_epochs, 2 * stage_epochs):
    config = {**common, "out": run_dir(f"tervit-direct-{epochs}")}
    direct[epochs] = train.run(train.TrainConfig(method="tervit", epochs=epochs, init_from=fp_checkpoint, **config))

curves = {"fp": read_log(common["out"], "fp")[1],
          "8-bit stage": read_log(common["out"], "tervit_w8a8")[1],
          "ternary, progressive": read_log(common["out"], "tervit")[1]}
print(f"full precision:                    {progressive['fp'][1]:.3f}")
print(f"8-bit (W8A8) stage:                {progressive['tervit_w8a8'][1]:.3f}")
print(f"ternary, progressive:              {progressive['tervit'][1]:.3f}  ({2 * stage_epochs} epochs after fp)")
for epochs, result in direct.items():
    print(f"ternary, direct, {epochs:2d} epochs:         {result['tervit'][1]:.3f}")

fig, ax = plt.subplots(figsize=(7, 3.8))
ax.plot([r["epoch"] + 1 - fp_epochs for r in curves["fp"]], [r["test_acc"] for r in curves["fp"]], "k.-", label="fp")
ax.plot([r["epoch"] + 1 for r in curves["8-bit stage"]], [r["test_acc"] for r in curves["8-bit stage"]], "o-",
        color="C0", alpha=0.6, label="progressive: 8-bit stage")
ax.plot([r["epoch"] + 1 + stage_epochs for r in curves["ternary, progressive"]],
        [r["test_acc"] for r in curves["ternary, progressive"]], "o-", color="C0", label="progressive: ternary stage")
for (epochs, _), color in zip(direct.items(), ("C3", "C1")):
    log = read_log(run_dir(f"tervit-direct-{epochs}"), "tervit")[1]
    ax.plot([r["epoch"] + 1 for r in log], [r["test_acc"] for r in log], "s--", color=color,
            label=f"direct ternary, {epochs} epochs")
ax.axvline(0, color="gray", lw=0.8)
ax.set(xlabel="epoch (0 = end of full-precision training)", ylabel="test accuracy",
       title="TerViT on the synthetic task (tiny scale)")
ax.legend(fontsize=8)
save_figure(fig, "04_progressive_vs_direct")

# %% [markdown]
# The trained weights really are ternary: every block weight, passed through its quantizer, is
# $\alpha_c\,t$ with $t \in \{-1, 0, 1\}$, and 40-45 % of them are zero (for a Gaussian, the
# fraction below $0.7\,\mathbb{E}|w|$ is $P(|z| < 0.56) = 0.42$).

# %%
ternary_model, _ = train.load_model(progressive["tervit"][0])
zeros = []
for role in ternary_roles:
    W = ternary_model.params[role]
    w_q, _ = ternary_model.quantizers[role].forward(W, training=False)
    codes, alpha, _ = quant.ternary_codes(W, per_channel=True)
    assert np.array_equal(w_q, alpha[:, None] * codes) and set(np.unique(codes)) <= {-1, 0, 1}
    zeros.append(np.mean(codes == 0))
print(f"fraction of zero weights in the ternary layers: {np.mean(zeros):.2f}")

# %% [markdown]
# **What this measured.** On this task and scale (a 64-wide, 2-block ViT on a synthetic 10-class
# problem, not ImageNet), our full-mode run gave: full precision 0.916, the 8-bit stage 0.939, ternary
# after progressive training 0.975, ternary trained directly from full precision 0.938 after 5 epochs
# and 0.966 after 10. So progressive training wins clearly at an equal number of ternary epochs, and
# still by about one point at an equal total budget; most of the first gap is the extra training. (The
# quantized models beat the full-precision one because they trained for more epochs in all.) On the
# trained weights, channel-wise ternarization had the lower error in every layer (0.20 vs 0.25 relative
# error over all of them), most in the MLP's first layer, whose channel scales differ the most. In fast
# mode the runs are a few steps long and the accuracies mean nothing; the checks (TWN's optimum, the
# ternary codes, channel-wise beating per-tensor on real weights) still hold.
