"""minibvit.augment: DeiT's augmentation parts by their defining properties, and the soft-target
cross-entropy against PyTorch (float64) and finite differences."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from jpeg_tree import textured_image
from minibvit import augment as A
from minibvit import ops

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)


def jpeg_bytes(height, width, seed):
    buf = io.BytesIO()
    Image.fromarray(textured_image(height, width, seed)).save(buf, "JPEG", quality=90)
    buf.seek(0)
    return buf


# --- random-resized-crop ---------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (64, 64), (20, 400)])
def test_random_resized_crop_within_scale_and_ratio(height, width):
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(3000):
        top, left, h, w = A.random_resized_crop_box(height, width, rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        # w = round(sqrt(A r)), h = round(sqrt(A / r)): bounds hold up to half a pixel per side
        fallback = (h, w) in ((height, width), (height, int(round(height * 4 / 3))),
                              (int(round(width * 3 / 4)), width))
        if not fallback:
            assert (w + 0.5) * (h + 0.5) >= 0.08 * height * width
            assert (w + 0.5) / (h - 0.5) >= 3 / 4 - 1e-12 and (w - 0.5) / (h + 0.5) <= 4 / 3 + 1e-12
        else:
            assert 3 / 4 - 0.5 / h <= w / h <= 4 / 3 + 0.5 / h or (h, w) == (height, width)
        fractions.append(h * w / (height * width))
    if max(height, width) / min(height, width) < 4:  # the crop distribution reaches both ends of the scale range
        assert min(fractions) < 0.1 and max(fractions) > 0.85


def test_random_resized_crop_is_torchvisions_rule_for_extreme_aspect():
    # 20x400 (aspect 20): no random box fits the ratio often; the fallback is the central box of aspect 4/3
    rng = np.random.default_rng(1)
    boxes = {A.random_resized_crop_box(20, 400, rng, scale=(0.9, 1.0)) for _ in range(50)}
    assert (0, (400 - 27) // 2, 20, 27) in boxes


# --- flip, train transform -------------------------------------------------------------------------

def test_flip_is_exact_mirror():
    file = jpeg_bytes(120, 90, 0)
    for seed in range(6):
        plain = A.TrainTransform(size=48, flip_prob=0.0, rand_augment=None)(file, np.random.default_rng(seed))
        flipped = A.TrainTransform(size=48, flip_prob=1.0, rand_augment=None)(file, np.random.default_rng(seed))
        np.testing.assert_array_equal(flipped, plain[:, ::-1])
        assert not np.array_equal(flipped, plain)


def test_train_transform_deterministic_under_its_generator():
    file = jpeg_bytes(120, 90, 1)
    t = A.TrainTransform(size=40)
    a, b = (t(file, np.random.default_rng([7, 1, 2])) for _ in range(2))
    c = t(file, np.random.default_rng([7, 1, 3]))
    assert a.shape == (40, 40, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --- JPEG draft decode -----------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(768, 1024), (1200, 1600)])
def test_draft_decode_is_exact_enough(height, width):
    file = jpeg_bytes(height, width, 3)
    out = {}
    for draft in (True, False):
        for name, box in (("whole", (0, 0, height, width)), ("crop", (10, 20, 2 * 224, 2 * 224 + 30))):
            assert A.draft_factor((width, height), box, 224) >= 2  # the draft path is exercised
            file.seek(0)
            out[name, draft] = A.decode_box(Image.open(file), box, 224, draft=draft).astype(int)
        file.seek(0)
        out["eval", draft] = A.EvalTransform(size=224, draft=draft)(file).astype(int)
    assert A.draft_factor((width, height), (0, 0, height, width), A.eval_resize_size(height, width, 224)) >= 2
    for name in ("whole", "crop", "eval"):
        diff = np.abs(out[name, True] - out[name, False])
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 2


def test_draft_factor_never_upsamples():
    for size in (32, 224):
        for h in range(size, 9 * size, 7):
            d = A.draft_factor((4000, 4000), (0, 0, h, h + 5), size)
            assert d in (1, 2, 4, 8) and h / d >= size and (d == 8 or h / (2 * d) < size)
    assert A.draft_factor((500, 375), (0, 0, 375, 500), A.eval_resize_size(375, 500, 224)) == 1


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (256, 256)])
def test_eval_transform_is_torchvision_resize_then_center_crop(height, width):
    file = jpeg_bytes(height, width, 4)
    out = A.EvalTransform(size=224)(file)
    file.seek(0)
    img = Image.open(file).convert("RGB")
    # torchvision Resize(256): short side 256, long side int(256 * long / short); CenterCrop(224)
    short, long = min(height, width), max(height, width)
    new = (256, int(256 * long / short))
    new_w, new_h = (new[0], new[1]) if width <= height else (new[1], new[0])
    resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
    assert out.shape == (224, 224, 3)
    np.testing.assert_array_equal(out, resized[top:top + 224, left:left + 224])


# --- RandAugment -----------------------------------------------------------------------------------

def test_rand_augment_ops_are_timms_increasing_set():
    assert list(A.RAND_AUGMENT_OPS) == [
        "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
        "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
        "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


@pytest.mark.parametrize("name", list(A.RAND_AUGMENT_OPS))
def test_rand_augment_op_identity_at_zero_and_acts_at_nine(name):
    img = Image.fromarray(textured_image(48, 40, 5))
    op = A.RAND_AUGMENT_OPS[name]
    for seed in range(4):
        at_zero = np.asarray(op(img, 0.0, np.random.default_rng(seed)))
        if name in A.IDENTITY_AT_ZERO:
            np.testing.assert_array_equal(at_zero, np.asarray(img))
        at_nine = np.asarray(op(img, 9.0, np.random.default_rng(seed)))
        assert at_nine.shape == (48, 40, 3) and not np.array_equal(at_nine, np.asarray(img))


@pytest.mark.parametrize("name", list(A.RAND_AUGMENT_OPS))
def test_rand_augment_op_runs_over_the_whole_level_range(name):
    img = Image.fromarray(textured_image(20, 24, 8))
    for level in np.linspace(0.0, 10.0, 21):
        out = A.RAND_AUGMENT_OPS[name](img, float(level), np.random.default_rng(0))
        assert out.size == img.size and out.mode == "RGB"


def test_posterize_keeps_the_top_bits():
    img = Image.fromarray(textured_image(20, 24, 9))
    pixels = np.asarray(img)
    op = A.RAND_AUGMENT_OPS["PosterizeIncreasing"]
    np.testing.assert_array_equal(np.asarray(op(img, 0.0, None)), pixels & 0xF0)  # 4 bits at level 0
    np.testing.assert_array_equal(np.asarray(op(img, 5.0, None)), pixels & 0xC0)  # 4 - int(2.0) = 2 bits
    np.testing.assert_array_equal(np.asarray(op(img, 10.0, None)), np.zeros_like(pixels))  # 0 bits


def test_rand_augment_deterministic_and_magnitude_zero_identity():
    img = Image.fromarray(textured_image(40, 40, 6))
    outs = [np.asarray(A.rand_augment(img, np.random.default_rng([3, s]))) for s in (0, 0, 1, 2, 3)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert any(not np.array_equal(outs[0], o) for o in outs[2:])
    # with only identity-at-zero ops possible the whole chain is the identity at m=0, mstd=0
    cfg = A.RandAugmentConfig(magnitude=0.0, magnitude_std=0.0, prob=1.0, num_ops=3)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        names = list(A.RAND_AUGMENT_OPS)
        chosen = [names[k] for k in np.random.default_rng(seed).integers(0, len(names), 3)]
        out = np.asarray(A.rand_augment(img, rng, cfg))
        if all(n in A.IDENTITY_AT_ZERO for n in chosen):
            np.testing.assert_array_equal(out, np.asarray(img))


# --- random erasing --------------------------------------------------------------------------------

def test_random_erasing_box_area_and_aspect_within_bounds():
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(3000):
        top, left, h, w = A.random_erasing_box(224, 224, rng)
        assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224
        assert (h + 0.5) * (w + 0.5) >= 0.02 * 224 * 224 and (h - 0.5) * (w - 0.5) <= 224 * 224 / 3
        assert (h + 0.5) / (w - 0.5) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3
        fractions.append(h * w / 224 ** 2)
    assert min(fractions) < 0.03 and max(fractions) > 0.3


def test_batch_random_erasing_only_inside_one_box_and_at_its_rate():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (400, 16, 16, 3), dtype=np.uint8)
    labels = np.zeros(400, np.int64)
    aug = A.BatchAugment(num_classes=3, mixup_alpha=0.0, cutmix_alpha=0.0)
    x, y = aug(images, labels, seed=2, epoch=0, step=5)
    assert y is labels
    clean = A.normalize(images)
    changed = (x != clean).any(axis=1)  # (B, H, W)
    erased = changed.any(axis=(1, 2))
    for i in np.flatnonzero(erased):
        rows, cols = np.flatnonzero(changed[i].any(1)), np.flatnonzero(changed[i].any(0))
        box = np.zeros((16, 16), bool)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert changed[i][~box].sum() == 0
    assert abs(erased.mean() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 400)
    # the part of a batch starting at first_index sees the same erasing as in the whole batch
    x_part, _ = aug(images[100:110], labels[100:110], seed=2, epoch=0, step=5, first_index=100)
    np.testing.assert_array_equal(x_part, x[100:110])


def test_normalize_layout_and_values():
    images = np.random.default_rng(2).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    x = A.normalize(images)
    ref = (images.transpose(0, 3, 1, 2) / 255.0 - np.reshape(A.IMAGENET_MEAN, (1, 3, 1, 1))) \
        / np.reshape(A.IMAGENET_STD, (1, 3, 1, 1))
    assert x.dtype == np.float32 and x.shape == (2, 3, 5, 4) and x.flags.c_contiguous
    np.testing.assert_allclose(x, ref, rtol=0, atol=2e-6)


# --- mixup / cutmix --------------------------------------------------------------------------------

def distinct_batch(batch, size=12):
    """Images whose pixels identify the image (value = image index), float32 (B, 3, size, size)."""
    return np.broadcast_to(np.arange(batch, dtype=np.float32).reshape(-1, 1, 1, 1), (batch, 3, size, size)).copy()


def test_mixup_targets_sum_to_one_and_mix_labels():
    labels = np.array([0, 2, 1, 1, 3, 0], np.int64)
    for seed in range(20):
        x = distinct_batch(6)
        out, targets, lam, kind = A.mix_batch(x.copy(), labels, 4, np.random.default_rng(seed), cutmix_alpha=0.0)
        assert kind == "mixup" and 0 <= lam <= 1
        y = A.smoothed_one_hot(labels, 4, 0.1)
        np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=0, atol=1e-7)
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=0, atol=1e-6)
        np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], rtol=1e-6, atol=1e-6)


def test_cutmix_lam_is_exact_box_area_fraction():
    labels = np.arange(5, dtype=np.int64)
    kinds = []
    for seed in range(40):
        x = distinct_batch(5, size=13)
        out, targets, lam, kind = A.mix_batch(x.copy(), labels, 5, np.random.default_rng(seed), mixup_alpha=0.0)
        assert kind == "cutmix"
        pasted = out[0, 0] == x[4, 0, 0, 0]  # image 0 takes pixels from image 4
        assert np.all((out[0, 0] == x[0, 0, 0, 0]) | pasted)
        assert lam == 1 - pasted.sum() / 13 ** 2
        y = A.smoothed_one_hot(labels, 5, 0.1)
        np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=0, atol=1e-7)
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=0, atol=1e-6)
        # the middle image is mixed with itself
        np.testing.assert_array_equal(out[2], x[2])
    for seed in range(400):
        kinds.append(A.mix_batch(distinct_batch(2), labels[:2], 5, np.random.default_rng(seed))[3])
    assert abs(kinds.count("cutmix") / 400 - 0.5) < 5 * math.sqrt(0.25 / 400)


def test_smoothed_one_hot_matches_ops_cross_entropy_smoothing():
    rng = np.random.default_rng(3)
    logits, labels = rng.standard_normal((6, 5)), rng.integers(0, 5, 6)
    soft, _ = ops.soft_target_cross_entropy_forward(logits, A.smoothed_one_hot(labels, 5, 0.1))
    hard, _ = ops.cross_entropy_forward(logits, labels, 0.1)
    assert abs(soft - hard) < 1e-14


def test_batch_augment_deterministic_and_soft_targets():
    images = np.random.default_rng(4).integers(0, 256, (8, 10, 10, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    aug = A.BatchAugment(num_classes=4)
    (x1, t1), (x2, t2), (x3, _) = aug(images, labels, 1, 2, 3), aug(images, labels, 1, 2, 3), aug(images, labels, 1, 2, 4)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(t1, t2)
    assert not np.array_equal(x1, x3)
    assert t1.dtype == np.float32 and t1.shape == (8, 4)
    np.testing.assert_allclose(t1.sum(1), 1.0, atol=1e-6)


# --- soft-target cross-entropy ---------------------------------------------------------------------

def test_soft_target_cross_entropy_matches_torch():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((7, 11)) * 3
    for targets in (rng.dirichlet(np.ones(11), size=7), rng.uniform(0, 1, (7, 11))):  # also rows not summing to 1
        loss, cache = ops.soft_target_cross_entropy_forward(logits, targets)
        dlogits = ops.soft_target_cross_entropy_backward(0.7, cache)
        z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
        ref = torch.nn.functional.cross_entropy(z, torch.tensor(targets, dtype=torch.float64))
        (ref * 0.7).backward()
        assert abs(loss - ref.item()) <= 1e-13 * abs(ref.item())
        np.testing.assert_allclose(dlogits, z.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_soft_target_cross_entropy_finite_differences():
    rng = np.random.default_rng(6)
    logits, targets = rng.standard_normal((4, 6)), rng.dirichlet(np.ones(6), size=4)
    _, cache = ops.soft_target_cross_entropy_forward(logits, targets)
    grad = ops.soft_target_cross_entropy_backward(1.0, cache)
    eps = 1e-6
    numeric = np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        plus, minus = logits.copy(), logits.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (ops.soft_target_cross_entropy_forward(plus, targets)[0]
                        - ops.soft_target_cross_entropy_forward(minus, targets)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-10)


def test_soft_target_cross_entropy_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        ops.soft_target_cross_entropy_forward(np.zeros((2, 3)), np.zeros((2, 4)))


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_decode_to_rgb(mode):
    # ImageNet's train set holds a few of each; draft mode applies to them too
    buf = io.BytesIO()
    Image.fromarray(textured_image(600, 800, 7)).convert(mode).save(buf, "JPEG", quality=90)
    outs = []
    for draft in (True, False):
        buf.seek(0)
        outs.append(A.EvalTransform(size=112, draft=draft)(buf).astype(int))
    assert outs[0].shape == (112, 112, 3)
    if mode == "L":
        assert (outs[1] == outs[1][..., :1]).all()
    assert np.abs(outs[0] - outs[1]).mean() < 1.0
