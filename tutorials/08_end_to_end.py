# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 8. End to end: train, distil, export to packed bits, run, compare
#
# The tutorials so far took the pieces apart. This one puts them back together, the way a user of
# minibvit would:
#
# 1. train a small full-precision teacher and distil a BinaryViT student from it (`minibvit.train`,
#    one call runs the whole recipe: teacher, then binary + GRS + ASM with soft distillation);
# 2. export the student to packed bits (`minibvit.engine.export`): sign bits in `uint64` words,
#    per-channel scales, ASM thresholds folded;
# 3. run the packed model (`engine.PackedViT`) on the whole test split and check that its logits have
#    **the same bits** as the simulated forward that training used;
# 4. compare, in one table, the full-precision teacher and the binary student: accuracy, size on
#    disk, operations (`minibvit.cost`) and measured speed (packed engine, NumPy float model, PyTorch
#    float32).
#
# Everything is tiny: a 64-wide, 2-block ViT on the generated 10-class `synthetic` shapes task
# (32×32 images, 8×8 patches: 16 patch tokens and a class token). **The accuracies here are not the
# papers' ImageNet numbers**; they show that the pipeline works, not how good BinaryViT is at scale.

# %%
import _common  # noqa: F401  (first: sets the thread pools and finds minibvit)
from _common import FAST, REPO, pick, plt, run_dir, save_figure

import os
import platform
import sys
import time

import numpy as np

from minibvit import cost, data, engine, train

# %% [markdown]
# ## 1. Train a teacher, distil a binary student
#
# `method="binaryvit"` runs two stages into `<out>/teacher/` and `<out>/binaryvit/`:
#
# - **teacher**: the same ViT in full precision (float32), trained with cross-entropy (label
#   smoothing 0.1), AdamW and a cosine schedule;
# - **binaryvit**: initialised from the teacher's weights; block linears (qkv, proj, fc1, fc2) with
#   binary weights ($\pm\alpha_c$ per output channel) and binary inputs, binary $Q$, $K$, $V$ and
#   $\{0, \alpha\}$ attention probabilities, ASM thresholds before every binarizer except the
#   attention, GRS on the latent weights (tutorial 5). The patch embedding and the head stay 8-bit.
#   The loss is $\tfrac12\,\mathrm{CE}(z, y) + \tfrac12\,\mathrm{KL}(\mathrm{softmax}(z_{\text{teacher}}) \,\|\,
#   \mathrm{softmax}(z))$: soft distillation from the teacher.
#
# Each stage keeps the checkpoint of its best test accuracy (`best.safetensors`). Fast mode trains a
# smaller model on 50 images per class for a few epochs: its accuracies mean nothing.

# %%
model_size = pick(dict(embed_dim=64, depth=2, num_heads=2), dict(embed_dim=32, depth=1, num_heads=2))
config = train.TrainConfig(dataset="synthetic", method="binaryvit", out=run_dir("end-to-end"), patch_size=8,
                           batch_size=pick(64, 50), limit_per_class=pick(None, 50),
                           teacher_epochs=pick(15, 6), epochs=pick(20, 4), **model_size)
t0 = time.perf_counter()
results = train.run(config)
train_seconds = time.perf_counter() - t0
(teacher_path, teacher_acc), (student_path, student_acc) = results["teacher"], results["binaryvit"]
print(f"trained in {train_seconds:.0f} s: teacher test accuracy {teacher_acc:.3f}, "
      f"binaryvit student {student_acc:.3f}")

teacher, _ = train.load_model(teacher_path)
student, student_meta = train.load_model(student_path)
assert student_meta["scheme"] == "binaryvit" and teacher.cfg.embed_dim == student.cfg.embed_dim
assert set(teacher.params) == set(student.params), "the student has the teacher's parameters (and its quantizers)"
test_set = data.load_dataset("synthetic", "test")
assert len(test_set) == 1000
# the recorded best accuracies are those of the loaded checkpoints, evaluated again
assert train.evaluate(teacher, test_set, 256)[0] == teacher_acc
assert train.evaluate(student, test_set, 256)[0] == student_acc

# %% [markdown]
# ## 2. Export to packed bits
#
# `engine.export(checkpoint, out)` quantizes every latent weight with the model's own quantizer and
# stores its integer form: for a binary linear $W \in \mathbb{R}^{N \times K}$, the signs of
# $W - \overline{W}_{\text{row}}$ packed 64 to a `uint64` word along $K$ (`kernels.pack_weight`,
# word-major $[\lceil K/64 \rceil, N]$; tutorial 7) and one float32 $\alpha_n$ per output channel; for
# every activation binarizer its elastic $\alpha$ and its ASM threshold (running centre + learnt shift,
# folded into one float32 per channel). Biases, LayerNorms, tokens and the position embedding stay
# float32, the patch embedding and head weights are int8 codes with a scale per channel.
#
# The `ExportReport` gives the file size and its ratio to the FP32 parameter bytes (4 bytes per
# parameter of the same ViT), broken down by kind.

# %%
packed_path = run_dir("student.packed.safetensors")
report = engine.export(student_path, packed_path)
print(report.summary())
assert report.file_bytes == os.path.getsize(packed_path)
assert report.fp32_bytes == 4 * sum(p.size for p in student.params.values())
assert report.fp32_bytes == 4 * sum(p.size for p in teacher.params.values())  # the teacher's size in FP32
assert sum(report.bytes_by_kind.values()) == report.file_bytes

# a binary linear's weight: 64 signs per word, the bits are sign(W - row mean) (bit 1 = -1)
D = student.cfg.embed_dim
packed = engine.PackedViT.load(packed_path)
w = student.params["blocks.0.mlp.fc1.weight"]                              # (hidden, D) latent float32
bits = packed.tensors["blocks.0.mlp.fc1.weight_bits"]                      # uint64 [ceil(D/64), hidden]
signs = np.unpackbits(bits.T.copy().view(np.uint8), axis=1, bitorder="little")[:, :D]
assert bits.dtype == np.uint64 and bits.shape == (-(-D // 64), w.shape[0])
assert np.array_equal(signs, (w - w.mean(axis=1, keepdims=True)) < 0)
print(f"blocks.0.mlp.fc1: latent weight {w.shape} float32 = {w.nbytes} bytes -> "
      f"{bits.nbytes} bytes of sign bits + {packed.tensors['blocks.0.mlp.fc1.weight_scale'].nbytes} bytes of scales")

# %% [markdown]
# ## 3. Run the packed model: the same bits as the simulated forward
#
# During training the binary student is *simulated*: $\pm1$ values in float32 arrays, multiplied on
# their integer levels and rescaled, `y = float32(x_levels @ w_levels.T) * (s_x s_w) + bias`.
# `PackedViT.forward` computes the same integers with XOR-popcount kernels and repeats every float
# operation of the model in the same order (`docs/engine.md` explains how: decision intervals on the
# integer accumulators, an exp table for the softmax of binary scores). So its logits should not be
# *close* to the simulated ones, they should be **equal**, bit for bit.
#
# The 8-bit patch embedding and head take a min-max scale over the whole batch, so a logit depends on
# the batch it was computed in, in both implementations. We run both on the same batches: the test
# split in batches of 256 in order, as `train.evaluate` does.

# %%
packed_logits, simulated_logits, labels = [], [], []
for x, y in data.iterate_batches(test_set, 256, seed=0, epoch=0, train=False, augment=False):
    packed_logits.append(packed.forward(x))
    simulated_logits.append(student.forward(x, training=False)[0])
    labels.append(y)
packed_logits, simulated_logits, labels = (np.concatenate(a) for a in (packed_logits, simulated_logits, labels))

identical_rows = int(np.all(packed_logits == simulated_logits, axis=1).sum())
print(f"{len(labels)} test images: {identical_rows} logit rows bit-identical, "
      f"max |difference| {np.abs(packed_logits - simulated_logits).max():.1e}")
assert packed_logits.dtype == simulated_logits.dtype == np.float32
assert np.array_equal(packed_logits.view(np.uint32), simulated_logits.view(np.uint32)), "packed != simulated bits"
assert np.array_equal(packed_logits.argmax(1), simulated_logits.argmax(1))
packed_acc = float((packed_logits.argmax(1) == labels).mean())
assert packed_acc == student_acc
print(f"packed accuracy {packed_acc:.3f} = simulated accuracy {student_acc:.3f}")

# %% [markdown]
# ## 4. Size and operations: what `minibvit.cost` counts
#
# `cost.model_cost(cfg, method)` accounts for the same model layer by layer without building it:
# storage as deployed (bit-packed weights padded to whole 64-bit words, every scale and threshold,
# the full-precision leftovers) and operations, $\text{OPs} = \text{FLOPs} + \text{BOPs}/64$ (Bi-Real
# Net's convention, used by BiT and BinaryViT: a 1-bit × 1-bit MAC is one BOP, 64 of them fit one
# 64-bit instruction; an 8-bit × 8-bit MAC is 64 BOPs). Its ratios compare with the FP32 model of the
# same shape.
#
# The exported file differs from the accounting only by the safetensors header (tensor names,
# shapes and the JSON metadata), which at this tiny size is a large part of the file: counting the
# tensors alone, cost's packed bytes equal the exported tensor bytes exactly (checked below).

# %%
student_cost = cost.model_cost(student.cfg, "binaryvit")
print(cost.format_report(student_cost))
tensor_bytes = report.file_bytes - report.bytes_by_kind["safetensors header"]
assert student_cost.reference.fp32_bytes == report.fp32_bytes, "cost counts the same FP32 parameters"
assert student_cost.reference.packed_bytes == report.fp32_bytes
print(f"exported tensors {tensor_bytes:,} bytes, file {report.file_bytes:,} bytes (header "
      f"{report.bytes_by_kind['safetensors header']:,}); cost's accounting {student_cost.totals.packed_bytes:,.0f} bytes")
assert tensor_bytes == student_cost.totals.packed_bytes, "cost predicts the exported tensor bytes exactly"
print(f"size ratio: file {report.ratio:.2f}x, tensors {report.fp32_bytes / tensor_bytes:.2f}x, "
      f"cost {student_cost.size_ratio:.2f}x;  OPs ratio (cost) {student_cost.ops_ratio:.2f}x")
assert student_cost.ops_ratio > 1 and student_cost.size_ratio > 1

# %% [markdown]
# ## 5. Speed on this machine
#
# The same batch of test images through three implementations:
#
# - the **packed engine** running the binary student;
# - the **NumPy float model**: the teacher through `ViT.forward` (float32, NumPy BLAS and minibvit's
#   Numba kernels), which is what the simulated student costs too, plus its quantizers;
# - **PyTorch float32**: the teacher's weights in `reference_tests/torch_reference.TorchViT` (an
#   independent PyTorch ViT), under `torch.inference_mode()`, if PyTorch is installed. Its logits
#   are checked against the NumPy teacher first.
#
# Each is run once to warm up, then a few times interleaved, and we report the median images/s.
# The numbers are from **whatever machine runs this tutorial**, with the thread pools pinned to one
# thread (`_common.py`); they are noisy on a shared machine and nothing is asserted on them. At this
# tiny size (17 tokens of width 64) per-call overheads weigh a lot: `scripts/bench_inference.py`
# measures DeiT-Tiny and DeiT-Small, where the packed engine's advantage is clearer.

# %%
batch = 256
x, _ = next(data.iterate_batches(test_set, batch, seed=0, epoch=0, train=False, augment=False))
runners = {"packed binaryvit": packed.forward,
           "NumPy float32 (teacher)": lambda x: teacher.forward(x, training=False)[0]}
try:
    import torch

    sys.path.insert(0, str(REPO / "reference_tests"))
    from torch_reference import TorchViT

    torch.set_num_threads(1)
    torch_teacher = TorchViT(teacher.cfg, dtype=torch.float32)
    torch_teacher.load_numpy(teacher.state_dict())

    def torch_forward(x):
        with torch.inference_mode():
            return torch_teacher.forward(torch.from_numpy(x), training=False).numpy()

    torch_logits, numpy_logits = torch_forward(x), teacher.forward(x, training=False)[0]
    assert np.allclose(torch_logits, numpy_logits, rtol=1e-4, atol=1e-4 * np.abs(numpy_logits).max())
    runners["PyTorch float32 (teacher)"] = torch_forward
except ImportError:
    print("PyTorch is not installed: no PyTorch column")

repeats = pick(7, 3)
times = {label: [] for label in runners}
for run in runners.values():
    run(x)  # warm-up: compilation, allocation
for _ in range(repeats):
    for label, run in runners.items():
        start = time.perf_counter()
        run(x)
        times[label].append(time.perf_counter() - start)
speed = {label: batch / float(np.median(t)) for label, t in times.items()}
print(f"batch {batch}, median of {repeats} runs, on {platform.processor() or platform.machine()} "
      f"({os.cpu_count()} cores):")
for label, images_per_s in speed.items():
    print(f"  {label:28s} {images_per_s:9.0f} images/s")

# %% [markdown]
# ## 6. The comparison in one table

# %%
teacher_cost = cost.model_cost(teacher.cfg, "fp")
fp_speed = speed.get("PyTorch float32 (teacher)", speed["NumPy float32 (teacher)"])
rows = [("test accuracy (1000 images)", f"{teacher_acc:.3f}", f"{student_acc:.3f} (packed = simulated)", ""),
        ("size on disk: exported file vs FP32 parameters", f"{report.fp32_bytes:,} B", f"{report.file_bytes:,} B",
         f"{report.ratio:.2f}x smaller"),
        ("size, cost.model_cost accounting", f"{student_cost.reference.packed_bytes:,.0f} B",
         f"{student_cost.totals.packed_bytes:,.0f} B", f"{student_cost.size_ratio:.2f}x smaller"),
        ("OPs per image (FLOPs + BOPs/64), cost.model_cost", f"{teacher_cost.totals.ops / 1e6:.3f} M",
         f"{student_cost.totals.ops / 1e6:.3f} M", f"{student_cost.ops_ratio:.2f}x fewer"),
        (f"speed, batch {batch} (this machine)",
         ", ".join(f"{label.split(' (')[0]} {v:.0f}" for label, v in speed.items() if "teacher" in label) + " img/s",
         f"{speed['packed binaryvit']:.0f} img/s", f"{speed['packed binaryvit'] / fp_speed:.2f}x vs "
                                                   f"{'PyTorch' if 'PyTorch float32 (teacher)' in speed else 'NumPy'}")]
assert teacher_cost.totals.ops == student_cost.reference.ops
print("| | full-precision teacher | binaryvit student | ratio |\n|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")

fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
bars = [("test accuracy", ["teacher\nfp32", "student\nsimulated", "student\npacked"],
         [teacher_acc, student_acc, packed_acc]),
        ("size (KiB)", ["FP32\nparameters", "packed\nfile", "cost.model_cost\nbinaryvit"],
         [report.fp32_bytes / 1024, report.file_bytes / 1024, student_cost.totals.packed_bytes / 1024]),
        ("OPs per image (M)", ["fp32", "binaryvit"], [teacher_cost.totals.ops / 1e6, student_cost.totals.ops / 1e6]),
        ("images/s (this machine)", [label.replace(" ", "\n") for label in speed], list(speed.values()))]
for ax, (title, names, values) in zip(axes, bars):
    ax.bar(range(len(values)), values, color=[f"C{k}" for k in range(len(values))])
    ax.set_xticks(range(len(values)), names, fontsize=8)
    ax.set_title(title)
    for k, v in enumerate(values):
        ax.text(k, v, f"{v:.3g}" if v < 100 else f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
fig.suptitle(f"end to end, tiny scale ({'fast mode, ' if FAST else ''}{D}-wide, depth {student.cfg.depth}, "
             "synthetic task): not ImageNet numbers", y=1.04)
save_figure(fig, "08_end_to_end")

# %% [markdown]
# ## What we measured
#
# Full mode, our run (2-core machine shared with other jobs; the speeds will differ on yours):
#
# | | full-precision teacher | binaryvit student | ratio |
# |---|---|---|---|
# | test accuracy (1000 images) | 0.953 | 0.828 (packed = simulated) | |
# | size on disk: exported file vs FP32 parameters | 457,000 B | 55,248 B | 8.27x smaller |
# | size, cost.model_cost accounting | 457,000 B | 46,608 B | 9.81x smaller |
# | OPs per image (FLOPs + BOPs/64), cost.model_cost | 1.942 M | 0.225 M | 8.65x fewer |
# | speed, batch 256, one thread | NumPy 7,672, PyTorch 11,836 img/s | 18,424 img/s | 1.56x vs PyTorch |
#
# (2 min 3 s for the whole tutorial, 2 min of it training.)
#
# - The packed engine's logits had the same bits as the simulated forward on all 1000 test images, so
#   the packed model's accuracy *is* the student's accuracy: exporting loses nothing.
# - The file is several times smaller than the FP32 parameters, but far from the $\approx 32\times$ of the
#   binary weights alone: in a 64-wide model the float32 leftovers (biases, LayerNorms, position
#   embedding, per-channel scales and thresholds), the 8-bit patch embedding and head, and the
#   safetensors header are a large share. At DeiT-Small size the same export is 20.8x smaller
#   (`docs/engine.md`), and `cost.model_cost` gives the accounting for any size.
# - The OPs ratio counts a 1-bit MAC as 1/64 of a float MAC but an 8-bit MAC as a whole one, so in
#   this tiny model the 8-bit patch embedding (0.20 M of the 1.94 M MACs) is 0.20 M of the binary
#   model's 0.22 M OPs. The measured speed-up over PyTorch was smaller (1.6x): LayerNorm, softmax and
#   residuals are float work that OPs leave out, and per-call overheads weigh a lot at 17 tokens.
#   `scripts/bench_inference.py` measures DeiT-Tiny and DeiT-Small (about 3-4x over PyTorch at
#   batch 64, `docs/engine.md`).
# - These are tiny-scale accuracies on a synthetic task. They are **not** the papers' ImageNet
#   results (BinaryViT reports DeiT-S on ImageNet-1k); they show the pipeline, end to end, is exact.
