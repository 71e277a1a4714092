# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 2. The whole ViT: patches, tokens, blocks, and one training step by hand
#
# Tutorial 1 checked single ops. Here they are stacked into a Vision Transformer (Dosovitskiy et al.
# 2021, arXiv 2010.11929; the layout of timm's `VisionTransformer` and DeiT), and one full training step
# (forward, loss, backward, AdamW) is checked against PyTorch. Then a short training loop written by
# hand is shown to be exactly what `minibvit.train` does, bit for bit.

# %%
import _common  # noqa: F401  (first: sets the thread pools and finds minibvit)
from _common import REPO, pick, plt, read_log, run_dir, save_figure

import sys

import numpy as np
import torch
import torch.nn.functional as F

from minibvit import data, ops, train
from minibvit.model import ViT, ViTConfig
from minibvit.optim import AdamW, clip_grad_norm, cosine_lr, decays

sys.path.insert(0, str(REPO / "reference_tests"))
from torch_reference import TorchViT  # noqa: E402  (an independent torch ViT, written for the tests)

torch.set_default_dtype(torch.float64)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# %% [markdown]
# ## Images become patches
#
# The data: minibvit's synthetic shapes task (10 classes of shapes at random positions, sizes and
# colours, with noise; it is generated, so it needs no download). A $32\times 32$ RGB image is cut into
# non-overlapping $p\times p$ patches, here $p = 8$: a $4\times4$ grid of $N = 16$ patches, read in
# row-major order. Each patch, flattened to $C p^2 = 192$ numbers, is projected linearly to a
# $D$-dimensional token:
#
# $$t_n = W_{pe}\, \mathrm{vec}(\text{patch}_n) + b_{pe}, \qquad W_{pe} \in \mathbb{R}^{D \times C p^2}.$$
#
# This is a convolution with kernel = stride = $p$, which minibvit computes as a reshape and one
# matmul (`ops.patch_embed_forward`), keeping PyTorch's conv weight layout $(D, C, p, p)$.

# %%
train_set = data.load_dataset("synthetic", "train")
test_set = data.load_dataset("synthetic", "test")
print(f"{len(train_set)} training and {len(test_set)} test images of shape {train_set.images.shape[1:]}, "
      f"classes: {', '.join(train_set.class_names)}")

p = 8
image = train_set.images[7]  # (32, 32, 3) uint8
fig = plt.figure(figsize=(10, 3.2))
ax = fig.add_subplot(1, 3, 1)
ax.imshow(image)
for k in range(0, 33, p):
    ax.axhline(k - 0.5, color="w", lw=1)
    ax.axvline(k - 0.5, color="w", lw=1)
ax.set(title=f"'{train_set.class_names[train_set.labels[7]]}', {p}x{p} patches", xticks=[], yticks=[])
grid = 32 // p
for n in range(grid * grid):
    r, c = divmod(n, grid)
    ax = fig.add_axes([0.38 + 0.0375 * n, 0.35, 0.034, 0.3])
    ax.imshow(image[r * p:(r + 1) * p, c * p:(c + 1) * p])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(str(n), fontsize=7)
fig.text(0.38, 0.75, "the same image as a sequence of 16 patch tokens (row-major order)")
save_figure(fig, "02_patches")

# %% [markdown]
# The check: the reshape-and-matmul patch embedding equals PyTorch's strided convolution.

# %%
rng = np.random.default_rng(0)
D = 32
x, _ = next(data.iterate_batches(train_set, 4, seed=0, epoch=0, train=False))
x = x.astype(np.float64)
w_pe, b_pe = rng.standard_normal((D, 3, p, p)) * 0.02, rng.standard_normal(D) * 0.02
tokens, _ = ops.patch_embed_forward(x, w_pe, b_pe, p)
conv = F.conv2d(torch.tensor(x), torch.tensor(w_pe), torch.tensor(b_pe), stride=p)  # (B, D, 4, 4)
print("patch tokens", tokens.shape, "vs conv2d:", f"{rel_err(tokens, conv.flatten(2).transpose(1, 2).numpy()):.1e}")
assert rel_err(tokens, conv.flatten(2).transpose(1, 2).numpy()) < 1e-13

# %% [markdown]
# ## Tokens: the class token and the position embedding
#
# A learnable class token $t_{cls}$ is put in front of the patch tokens, and a learnable position
# embedding $E_{pos} \in \mathbb{R}^{(N+1)\times D}$ is added (attention alone is blind to order):
#
# $$Z_0 = [\,t_{cls};\ t_1;\ \dots;\ t_N\,] + E_{pos}.$$
#
# (DeiT adds a second, distillation token; tutorial 6 uses it.)

# %%
cls_token, pos_embed = rng.standard_normal((1, 1, D)), rng.standard_normal((1, 17, D))
z0, _ = ops.tokens_forward(tokens, pos_embed, cls_token)
assert z0.shape == (4, 17, D)
assert np.array_equal(z0[:, 0], np.broadcast_to(cls_token[0, 0] + pos_embed[0, 0], (4, D)))
assert np.array_equal(z0[:, 1:], tokens + pos_embed[:, 1:])

# %% [markdown]
# ## Blocks
#
# Each of the $L$ blocks is pre-norm: LayerNorm, then multi-head self-attention (tutorial 1), added
# back to the residual stream; LayerNorm, then a two-layer MLP with GELU, added back:
#
# $$Z' = Z + \mathrm{MHSA}(\mathrm{LN}_1(Z)), \qquad
#   Z'' = Z' + W_2\,\mathrm{GELU}(W_1\, \mathrm{LN}_2(Z') + b_1) + b_2 .$$
#
# After the last block a final LayerNorm, and the class token's row goes through a linear head to the
# $K$ class logits.
#
# **Parameter count.** With MLP ratio $h$ ($W_1 \in \mathbb{R}^{hD\times D}$), one block has
# $3D^2 + 3D$ (qkv) $+ D^2 + D$ (proj) $+ 2hD^2 + hD + D$ (MLP) $+ 4D$ (two LayerNorms)
# $= (4 + 2h) D^2 + (9 + h) D$ parameters, $12D^2 + 13D$ for $h = 4$. minibvit names every array as timm
# does, with PyTorch's shapes, so a `state_dict` moves between the two unchanged.

# %%
cfg = ViTConfig(image_size=32, patch_size=p, in_chans=3, embed_dim=D, depth=2, num_heads=4, num_classes=10)
model = ViT(cfg, dtype=np.float64, seed=0)
for name, arr in list(model.params.items())[:16]:
    print(f"  {name:28s} {str(arr.shape):16s} {arr.size:6d}")
print("  ...")
h, C, K, L = cfg.mlp_ratio, cfg.in_chans, cfg.num_classes, cfg.depth
closed_form = (D * C * p * p + D) + D + (cfg.num_patches + 1) * D + L * ((4 + 2 * h) * D ** 2 + (9 + h) * D) \
    + 2 * D + (K * D + K)
total = sum(a.size for a in model.params.values())
print(f"{total} parameters; closed form {closed_form:.0f}")
assert total == closed_form

# %% [markdown]
# ## One training step by hand
#
# **Loss.** Cross-entropy with label smoothing $\varepsilon$ (DeiT uses 0.1): the target of sample $b$
# is $q_b = (1-\varepsilon)\,\mathrm{onehot}(y_b) + \varepsilon/K$, and with $z_b$ the logits
#
# $$\mathcal{L} = -\frac1B \sum_b \sum_c q_{bc} \log \mathrm{softmax}(z_b)_c, \qquad
#   \frac{\partial \mathcal{L}}{\partial z_b} = \frac{\mathrm{softmax}(z_b) - q_b}{B}.$$
#
# **Backward.** `model.backward(dlogits, cache)` runs every op's backward in reverse order and fills
# `model.grads` (same names as the parameters).
#
# **AdamW** (Loshchilov & Hutter 2019), at step $t$ with gradient $g$:
#
# $$m \leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
#   \theta \leftarrow \theta(1 - \eta\lambda) - \eta\,\frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon}.$$
#
# The decay $\lambda$ applies only to weight matrices, never to norms, biases, tokens or the position
# embedding (`minibvit.optim.decays`).
#
# The reference is `reference_tests/torch_reference.py`'s `TorchViT`, a PyTorch ViT written separately
# for the test suite (it shares no code with minibvit), trained with `F.cross_entropy` and
# `torch.optim.AdamW`. Everything in float64.

# %%
x, y = next(data.iterate_batches(train_set, 8, seed=0, epoch=0))
x = x.astype(np.float64)
lr, wd, smoothing = 1e-3, 0.05, 0.1

# minibvit: forward, loss, backward, AdamW
logits, cache = model.forward(x, training=True)
loss, loss_cache = ops.cross_entropy_forward(logits, y, smoothing)
model.backward(ops.cross_entropy_backward(1.0, loss_cache), cache)
before = {k: v.copy() for k, v in model.params.items()}
grads = {k: g.copy() for k, g in model.grads.items()}
opt = AdamW(model.parameters(), lr=lr, weight_decay=wd)
opt.step(model.grads)
after = {k: v.copy() for k, v in model.params.items()}

# PyTorch: the same weights, the same step
ref = TorchViT(cfg)
ref.load_numpy(before)
params = ref.named_params()
groups = [{"params": [t for k, t in params.items() if decays(k, before[k])], "weight_decay": wd},
          {"params": [t for k, t in params.items() if not decays(k, before[k])], "weight_decay": 0.0}]
ref_opt = torch.optim.AdamW(groups, lr=lr)
ref_logits = ref(torch.tensor(x))
ref_loss = F.cross_entropy(ref_logits, torch.tensor(y), label_smoothing=smoothing)
ref_loss.backward()
ref_grads = {k: t.grad.numpy().copy() for k, t in params.items()}
ref_opt.step()

print(f"logits: {rel_err(logits, ref_logits.detach().numpy()):.1e}   loss: {float(loss):.6f} vs {ref_loss.item():.6f}")
assert rel_err(logits, ref_logits.detach().numpy()) < 1e-12 and abs(loss - ref_loss.item()) < 1e-12
worst_grad = max(grads, key=lambda k: rel_err(grads[k], ref_grads[k]))
worst_param = max(params, key=lambda k: rel_err(after[k], params[k].detach().numpy()))
print(f"largest gradient error: {rel_err(grads[worst_grad], ref_grads[worst_grad]):.1e} ({worst_grad}), "
      f"over all {len(grads)} arrays")
print(f"largest error after the AdamW step: "
      f"{rel_err(after[worst_param], params[worst_param].detach().numpy()):.1e} ({worst_param})")
assert set(grads) == set(ref_grads)
assert rel_err(grads[worst_grad], ref_grads[worst_grad]) < 1e-10
assert rel_err(after[worst_param], params[worst_param].detach().numpy()) < 1e-9

# %% [markdown]
# The gradients agree to round-off (about $10^{-15}$). After the AdamW step the largest difference is
# larger, and it sits in the attention's key bias. That gradient is exactly zero in exact arithmetic:
# adding the same vector $b_k$ to every key adds $q_i \cdot b_k$ to every score of row $i$, which the
# softmax ignores. In floating point it is round-off, many orders of magnitude below the other
# gradients and different in the two implementations. Adam divides by $\sqrt{\hat v} + \epsilon$, so
# it turns that round-off into steps of $\eta\,|g|/\epsilon$, relatively much larger than the round-off
# itself: harmless, but the reason the tolerance after the step is $10^{-9}$.

# %%
k_bias = slice(D, 2 * D)  # qkv rows are ordered q, k, v
for i in range(cfg.depth):
    g_k = grads[f"blocks.{i}.attn.qkv.bias"][k_bias]
    print(f"block {i}: largest |dL/d b_k| = {np.abs(g_k).max():.1e}, largest |dL/d b_q| = "
          f"{np.abs(grads[f'blocks.{i}.attn.qkv.bias'][:D]).max():.1e}")
    assert np.abs(g_k).max() < 1e-12 * np.abs(grads[f"blocks.{i}.attn.qkv.bias"]).max() + 1e-15

# %% [markdown]
# Two more checks that need no PyTorch.
#
# **Finite differences** through the whole network, for a few entries spread over the model.
#
# **AdamW's first step in closed form.** At $t = 1$ the bias corrections make $\hat m = g$ and
# $\hat v = g^2$, so each parameter moves by
# $\theta_1 - \theta_0 = -\eta\lambda\theta_0\,[\text{decays}] - \eta\, g/(|g| + \epsilon)$: about
# $\eta$ times the sign of its gradient, whatever the gradient's size.

# %%
def model_loss():
    z, _ = model.forward(x, training=True)
    return float(ops.cross_entropy_forward(z, y, smoothing)[0])


model.load_state_dict(before)
probes = [("cls_token", (0, 0, 3)), ("pos_embed", (0, 5, 7)), ("patch_embed.proj.weight", (1, 2, 3, 4)),
          ("blocks.0.attn.qkv.weight", (40, 9)), ("blocks.1.mlp.fc1.weight", (17, 5)),
          ("blocks.1.norm2.weight", (11,)), ("head.bias", (3,))]
for name, index in probes:
    arr = model.params[name]
    old = arr[index]
    arr[index] = old + 1e-5
    up = model_loss()
    arr[index] = old - 1e-5
    down = model_loss()
    arr[index] = old
    numeric = (up - down) / 2e-5
    err = abs(numeric - grads[name][index]) / max(abs(grads[name][index]), 1e-8)
    print(f"  d loss / d {name}{list(index)}: backward {grads[name][index]: .6e}, finite difference {numeric: .6e}")
    assert err < 1e-6, name

for name, g in grads.items():
    expected = before[name] * (1 - lr * wd * decays(name, before[name])) - lr * g / (np.abs(g) + 1e-8)
    assert np.allclose(after[name], expected, rtol=1e-12, atol=1e-17), name
print("first AdamW step = -lr * g / (|g| + eps) (plus decay) for every parameter")

# %% [markdown]
# ## The training loop by hand is `minibvit.train`
#
# A training run is this step in a loop, with a learning rate that warms up linearly for one epoch and
# then follows a cosine to `min_lr`, and with the global gradient norm clipped at 5. Below, the loop is
# written out by hand in float32, then the same run is launched through the training API,
# `minibvit.train.run(TrainConfig(...))`, which writes `<out>/<stage>/log.jsonl` and checkpoints. The
# trainer's batches and augmentation depend only on (seed, epoch, step), so the two runs see the same
# data and must end with **bit-identical** weights.

# %%
run_config = train.TrainConfig(dataset="synthetic", method="fp", out=run_dir("fp"), embed_dim=64, depth=2,
                               num_heads=2, patch_size=8, batch_size=pick(64, 32), epochs=pick(10, 5),
                               limit_per_class=pick(None, 40), lr=2e-3)
cfg_run = train.resolve_config(run_config)
train_data = data.load_dataset("synthetic", "train", limit_per_class=cfg_run.limit_per_class)
steps = data.steps_per_epoch(len(train_data), cfg_run.batch_size, drop_last=True)
total_steps, warmup = cfg_run.epochs * steps, int(round(cfg_run.warmup_epochs * steps))
model = ViT(train.model_config(cfg_run, False, 10, 3, 32), seed=cfg_run.seed)  # float32
opt = AdamW(model.parameters(), lr=cfg_run.lr, weight_decay=cfg_run.weight_decay)
losses = []
for epoch in range(cfg_run.epochs):
    for step, (xb, yb) in enumerate(data.iterate_batches(train_data, cfg_run.batch_size, cfg_run.seed, epoch)):
        lr_now = cosine_lr(epoch * steps + step, total_steps, cfg_run.lr, warmup, cfg_run.min_lr)
        logits, cache = model.forward(xb, training=True)
        loss, loss_cache = ops.cross_entropy_forward(logits, yb, cfg_run.label_smoothing)
        model.backward(ops.cross_entropy_backward(1.0, loss_cache), cache)
        clip_grad_norm(model.grads, cfg_run.clip_grad)
        opt.step(model.grads, lr=lr_now)
        losses.append(float(loss))
hand_acc, _ = train.evaluate(model, test_set, 256)
print(f"by hand: {len(losses)} steps, test accuracy {hand_acc:.3f}")

# The loop body above is `minibvit.train.train_step` (forward, teacher, loss, backward, the method's
# gradient hooks such as BinaryViT's GRS, clipping, the AdamW step); the trainer wraps it with
# logging, checkpoints and evaluation. Its first steps give the same losses:
step_model = ViT(train.model_config(cfg_run, False, 10, 3, 32), seed=cfg_run.seed)
step_opt = AdamW(step_model.parameters(), lr=cfg_run.lr, weight_decay=cfg_run.weight_decay)


def cross_entropy(logits, y, teacher_logits):
    loss, loss_cache = ops.cross_entropy_forward(logits, y, cfg_run.label_smoothing)
    return loss, ops.cross_entropy_backward(1.0, loss_cache)


for step, (xb, yb) in zip(range(3), data.iterate_batches(train_data, cfg_run.batch_size, cfg_run.seed, 0)):
    loss, _, _ = train.train_step(step_model, step_opt, xb, yb, lr=cosine_lr(step, total_steps, cfg_run.lr, warmup, cfg_run.min_lr),
                                  rng=None, loss_fn=cross_entropy, clip_grad=cfg_run.clip_grad)
    assert float(loss) == losses[step]
print("train.train_step reproduces the first steps of the loop by hand")

results = train.run(run_config)
trained, _ = train.load_model(f"{run_config.out}/fp/last.safetensors")
steps_log, epochs_log = read_log(run_config.out, "fp")
print(f"minibvit.train: test accuracy {epochs_log[-1]['test_acc']:.3f} (best {results['fp'][1]:.3f})")
assert [r["loss"] for r in steps_log] == losses, "the logged losses differ from the loop by hand"
for name, arr in model.params.items():
    assert np.array_equal(arr, trained.params[name]), f"{name} differs between the hand loop and the trainer"
assert epochs_log[-1]["test_acc"] == hand_acc
print("the hand-written loop and minibvit.train end with bit-identical weights")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
kernel = np.ones(10) / 10
axes[0].plot(losses, lw=0.6, alpha=0.5, label="per step")
axes[0].plot(np.arange(9, len(losses)), np.convolve(losses, kernel, "valid"), label="mean of 10 steps")
axes[0].set(xlabel="step", ylabel="training loss (label smoothing 0.1)", title="the loop by hand")
axes[0].legend()
axes[1].plot([r["epoch"] + 1 for r in epochs_log], [r["test_acc"] for r in epochs_log], "o-", label="test")
axes[1].plot([r["epoch"] + 1 for r in epochs_log], [r["train_acc"] for r in epochs_log], "s--", label="train")
axes[1].axhline(0.1, color="gray", lw=0.8, ls=":", label="chance")
axes[1].set(xlabel="epoch", ylabel="accuracy", title="minibvit.train's log.jsonl")
axes[1].legend()
save_figure(fig, "02_training")
assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05, "the loss did not go down"

# %% [markdown]
# The full-precision model learns the shapes task (about 82 % test accuracy after ten epochs with this
# 64-wide, 2-block model; the fast mode trains on 400 images for 60 steps only, far from converged).
# The next tutorials replace the weights and activations of exactly this model by 1-bit and ternary
# values.
