"""DeiT's ImageNet augmentation and evaluation transform (the soft-target cross-entropy it needs is ops.soft_target_cross_entropy_*).

Two halves, split where the pixels leave uint8:

- Per image, in the loader's worker processes (``TrainTransform``, ``EvalTransform``): Pillow
  decode (with JPEG draft mode where exact enough, see ``decode_box``), random-resized-crop,
  horizontal flip, RandAugment. Output: uint8 (S, S, 3).
- Per batch, in the trainer (``BatchAugment``): normalisation to float32 (B, 3, S, S), random
  erasing (it fills with N(0, 1) noise in normalised space, which uint8 cannot hold), then mixup /
  cutmix with label-smoothed soft targets.

Defaults are DeiT's (Touvron et al. 2021, "Training data-efficient image transformers", Table 9 and
its main.py), the recipe the three papers' DeiT-S ImageNet runs start from; which parts a paper keeps
for its low-bit stages is for its recipe script to set (every part is a switch). RandAugment follows timm's
``rand-m9-mstd0.5-inc1`` (timm/data/auto_augment.py): the "increasing" op set, two ops per image
drawn uniformly with replacement, each applied with probability 1/2, magnitude ~ N(9, 0.5) clipped to
[0, 10] per op, fill colour = the ImageNet mean in uint8 (124, 116, 104), bicubic resampling (DeiT's
--train-interpolation bicubic). Every random number comes from a numpy Generator the caller seeds by
(seed, epoch, step, image index), so a worker reproduces any image of any batch on its own.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104), as timm
EVAL_CROP_RATIO = 0.875  # DeiT: resize to int(224 / 0.875) = 256, center-crop 224
RESAMPLE = Image.Resampling.BICUBIC

# Domain tags keeping the random streams apart (the loader seeds [seed, tag, epoch, step, index]).
CROP_STREAM, ERASE_STREAM, MIX_STREAM = 10, 11, 12


# ---------------------------------------------------------------------------------------------------
# Random-resized-crop and decode
# ---------------------------------------------------------------------------------------------------

def random_resized_crop_box(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params: a box (top, left, h, w) of the (height, width) image.

    Up to 10 tries: area fraction ~ U(scale), aspect w/h ~ logU(ratio), w = round(sqrt(A r)),
    h = round(sqrt(A / r)); accepted if it fits. Otherwise the largest central box whose aspect is
    clamped to ratio.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def eval_resize_size(height, width, size, crop_ratio=EVAL_CROP_RATIO):
    """torchvision's Resize(int(size / crop_ratio)) output (width, height): the short side becomes
    int(size / crop_ratio), the long side int(short * long / short_original)."""
    short = int(size / crop_ratio)
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def _pair(out_size):
    return (out_size, out_size) if isinstance(out_size, (int, np.integer)) else tuple(out_size)


def draft_factor(image_size, box, out_size):
    """The JPEG DCT reduction (1, 2, 4 or 8) "exact enough" for resizing box to out_size.

    image_size: (width, height); box: (top, left, h, w); out_size: an int or (width, height).

    libjpeg can decode at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``), far faster than a full decode.
    We reduce by d only while the reduced box still has at least out_size pixels in both directions,
    so the final bicubic resize is still a (antialiased) downscale and never upsamples detail that a
    full decode would have kept. The difference to the full decode is then only that of libjpeg's
    DCT-domain downscale against Pillow's antialiasing filter for the first factor d. "Exact enough"
    means: mean absolute difference to the full decode under 1 of 255 levels and 99 % of the pixels
    within 2 levels (measured on textured 1024x768 and 1600x1200 JPEGs: means 0.30-0.58, 99th
    percentile 1-2, max 4; held by reference_tests/test_augment.py). Typical ImageNet images
    (~500x375) at 224 output are decoded in full: no factor keeps 224 pixels across a crop.
    """
    _, _, h, w = box
    out_w, out_h = _pair(out_size)
    d = 1
    while d < 8 and h / (2 * d) >= out_h and w / (2 * d) >= out_w and min(image_size) // (2 * d) >= 1:
        d *= 2
    return d


def decode_box(img, box, out_size, draft=True):
    """Decode an opened, not yet loaded PIL image (``Image.open``) and resize its box (top, left, h, w)
    to out_size (an int or (width, height)), bicubic. Returns uint8 (out_h, out_w, 3).

    With draft=True, JPEGs are decoded at the reduction ``draft_factor`` allows and the box is mapped
    to the reduced image with float coordinates. Without a reduction and with an integer box this is
    torchvision's resized_crop on PIL: crop, then resize the crop alone.
    """
    width, height = img.size
    top, left, h, w = box
    if draft and img.format == "JPEG":
        d = draft_factor((width, height), box, out_size)
        if d > 1:
            img.draft("RGB", (width // d, height // d))
    reduced = round(width / img.size[0])  # libjpeg scales by exactly 1/d (the last pixel partial)
    rgb = img.convert("RGB")
    if reduced == 1 and all(float(v).is_integer() for v in box):
        out = rgb.crop((int(left), int(top), int(left + w), int(top + h))).resize(_pair(out_size), RESAMPLE)
    else:
        r = 1.0 / reduced
        out = rgb.resize(_pair(out_size), RESAMPLE, box=(left * r, top * r, (left + w) * r, (top + h) * r))
    return np.asarray(out, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------
# RandAugment (timm's rand-m9-mstd0.5-inc1)
# ---------------------------------------------------------------------------------------------------

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitude m maps to the fraction m / 10 of each op's range
TRANSLATE_FRACTION = 0.45  # TranslateXRel/YRel: up to 45 % of the image side


def _signed(value, rng):
    """timm's _randomly_negate: -value with probability 1/2."""
    return -value if rng.random() > 0.5 else value


def _affine(img, matrix):
    return img.transform(img.size, Image.AFFINE, matrix, resample=RESAMPLE, fillcolor=FILL)


def _enhance_factor(level, rng):
    """The 'increasing' enhancement factor: 1 +- 0.9 * level / 10, at least 0.1 (1 is identity)."""
    return max(0.1, 1.0 + _signed(level / MAX_LEVEL * 0.9, rng))


def _posterize(img, bits):
    """Keep the `bits` most significant bits of every channel; 0 bits gives black (as Pillow's
    posterize did before it refused bits=0, which level 10 of PosterizeIncreasing asks for)."""
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _solarize_add(img, add, threshold=128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


# name -> op(img, level, rng). level in [0, 10]; ops without a magnitude ignore it.
RAND_AUGMENT_OPS = {
    "AutoContrast": lambda img, level, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng: ImageOps.equalize(img),
    "Invert": lambda img, level, rng: ImageOps.invert(img),
    "Rotate": lambda img, level, rng: img.rotate(_signed(level / MAX_LEVEL * 30.0, rng),
                                                 resample=RESAMPLE, fillcolor=FILL),
    # keeps 4 - int(0.4 level) bits: 4 bits at level 0 (so not the identity there), 0 bits at 10
    "PosterizeIncreasing": lambda img, level, rng: _posterize(img, 4 - int(level / MAX_LEVEL * 4)),
    # inverts pixels >= 256 - int(25.6 level): none at level 0
    "SolarizeIncreasing": lambda img, level, rng: ImageOps.solarize(img, 256 - int(level / MAX_LEVEL * 256)),
    "SolarizeAdd": lambda img, level, rng: _solarize_add(img, int(level / MAX_LEVEL * 110)),
    "ColorIncreasing": lambda img, level, rng: ImageEnhance.Color(img).enhance(_enhance_factor(level, rng)),
    "ContrastIncreasing": lambda img, level, rng: ImageEnhance.Contrast(img).enhance(_enhance_factor(level, rng)),
    "BrightnessIncreasing": lambda img, level, rng: ImageEnhance.Brightness(img).enhance(_enhance_factor(level, rng)),
    "SharpnessIncreasing": lambda img, level, rng: ImageEnhance.Sharpness(img).enhance(_enhance_factor(level, rng)),
    "ShearX": lambda img, level, rng: _affine(img, (1, _signed(level / MAX_LEVEL * 0.3, rng), 0, 0, 1, 0)),
    "ShearY": lambda img, level, rng: _affine(img, (1, 0, 0, _signed(level / MAX_LEVEL * 0.3, rng), 1, 0)),
    "TranslateXRel": lambda img, level, rng: _affine(
        img, (1, 0, _signed(level / MAX_LEVEL * TRANSLATE_FRACTION, rng) * img.size[0], 0, 1, 0)),
    "TranslateYRel": lambda img, level, rng: _affine(
        img, (1, 0, 0, 0, 1, _signed(level / MAX_LEVEL * TRANSLATE_FRACTION, rng) * img.size[1])),
}
# Ops that are the identity at level 0 (whatever the sign draw).
IDENTITY_AT_ZERO = ("Rotate", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                    "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
    """timm's rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1; DeiT: m 9, n 2, mstd 0.5."""

    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.5
    prob: float = 0.5  # each chosen op is applied with this probability (timm's AugmentOp default)


def rand_augment(img, rng, cfg=RandAugmentConfig()):
    """RandAugment on a PIL image: cfg.num_ops ops drawn uniformly with replacement, each applied with
    probability cfg.prob at level clip(N(magnitude, magnitude_std), 0, 10) drawn per op (timm order of
    draws: apply?, level, sign)."""
    names = list(RAND_AUGMENT_OPS)
    for k in rng.integers(0, len(names), size=cfg.num_ops):
        if cfg.prob < 1.0 and rng.random() > cfg.prob:
            continue
        level = cfg.magnitude
        if cfg.magnitude_std > 0:
            level = rng.normal(cfg.magnitude, cfg.magnitude_std)
        level = float(min(max(level, 0.0), MAX_LEVEL))
        img = RAND_AUGMENT_OPS[names[k]](img, level, rng)
    return img


# ---------------------------------------------------------------------------------------------------
# Per-image transforms (picklable; run in the loader's workers)
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """DeiT's per-image training transform: random-resized-crop -> flip -> RandAugment, uint8 out.

    Each part is a switch: crop=False resizes the whole image (no crop); flip_prob=0 turns the flip
    off; rand_augment=None turns RandAugment off. draft: JPEG reduced-size decode (decode_box).
    """

    size: int = 224
    crop: bool = True
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    rand_augment: RandAugmentConfig = RandAugmentConfig()
    draft: bool = True

    def __call__(self, file, rng):
        """file: a path or binary file object; rng: the image's Generator. -> uint8 (size, size, 3)."""
        with Image.open(file) as img:
            width, height = img.size
            if self.crop:
                box = random_resized_crop_box(height, width, rng, self.scale, self.ratio)
            else:
                box = (0, 0, height, width)
            out = decode_box(img, box, self.size, self.draft)
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            out = out[:, ::-1]
        if self.rand_augment is not None:
            out = np.asarray(rand_augment(Image.fromarray(out), rng, self.rand_augment), dtype=np.uint8)
        return np.ascontiguousarray(out)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Evaluation as torchvision's Resize(int(size / crop_ratio)) + CenterCrop(size), bicubic."""

    size: int = 224
    crop_ratio: float = EVAL_CROP_RATIO
    draft: bool = True

    def __call__(self, file, rng=None):
        with Image.open(file) as img:
            width, height = img.size
            out_w, out_h = eval_resize_size(height, width, self.size, self.crop_ratio)
            resized = decode_box(img, (0, 0, height, width), (out_w, out_h), self.draft)
        top, left = int(round((out_h - self.size) / 2.0)), int(round((out_w - self.size) / 2.0))
        return np.ascontiguousarray(resized[top:top + self.size, left:left + self.size])


# ---------------------------------------------------------------------------------------------------
# Per-batch half: normalise, random erasing, mixup / cutmix (run in the trainer)
# ---------------------------------------------------------------------------------------------------

def random_erasing_box(height, width, rng, area=(0.02, 1 / 3), log_aspect=(math.log(0.3), math.log(1 / 0.3))):
    """timm's RandomErasing box (top, left, h, w) or None after 10 failed tries: area fraction
    ~ U(area), aspect h/w ~ logU(0.3, 1/0.3), h = round(sqrt(A a)), w = round(sqrt(A / a)), accepted
    if h < height and w < width."""
    for _ in range(10):
        target_area = rng.uniform(*area) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return None


def erase_batch(x, prob, seed, epoch, step, first_index=0):
    """Random erasing of a normalised batch x float32 (B, C, H, W), in place (timm's RandomErasing,
    mode 'pixel', one box): with probability prob, image i gets a random_erasing_box filled with
    N(0, 1) noise, drawn from Generator([seed, ERASE_STREAM, epoch, step, first_index + i]); prob 0
    changes nothing. Returns x."""
    if prob > 0:
        for i in range(len(x)):
            rng = np.random.default_rng([seed, ERASE_STREAM, epoch, step, first_index + i])
            if rng.random() < prob:
                box = random_erasing_box(x.shape[2], x.shape[3], rng)
                if box is not None:
                    top, left, h, w = box
                    x[i, :, top:top + h, left:left + w] = rng.standard_normal((x.shape[1], h, w))
    return x


def cutmix_box(height, width, lam, rng):
    """timm's rand_bbox: a box of side sqrt(1 - lam) around a uniform centre, clipped to the image.
    Returns (y0, y1, x0, x1) and the exact lam = 1 - box area / image area."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return (int(y0), int(y1), int(x0), int(x1)), 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def smoothed_one_hot(labels, num_classes, smoothing):
    """(B, C) float64: 1 - smoothing + smoothing / C at the label, smoothing / C elsewhere."""
    off = smoothing / num_classes
    targets = np.full((len(labels), num_classes), off)
    targets[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return targets


def mix_batch(x, labels, num_classes, rng, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
              mix_prob=1.0, smoothing=0.1):
    """timm's Mixup in 'batch' mode (DeiT): image i is mixed with image B-1-i of the same batch.

    With probability mix_prob: cutmix with probability switch_prob (if both alphas > 0), lam ~
    Beta(alpha, alpha) of the chosen one; mixup x = lam x + (1 - lam) flip(x); cutmix pastes flip(x)
    into a box and sets lam to the exact kept area. Targets: lam y + (1 - lam) flip(y) of smoothed
    one-hot labels. x: float32 (B, C, H, W), modified in place. Returns (x, targets float32 (B, K),
    lam, kind) with kind in ('none', 'mixup', 'cutmix').
    """
    lam, kind = 1.0, "none"
    if rng.random() < mix_prob and (mixup_alpha > 0 or cutmix_alpha > 0):
        use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
        kind = "cutmix" if use_cutmix else "mixup"
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
        flipped = x[::-1].copy()
        if use_cutmix:
            (y0, y1, x0, x1), lam = cutmix_box(x.shape[2], x.shape[3], lam, rng)
            x[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        else:
            x *= np.float32(lam)
            x += np.float32(1.0 - lam) * flipped
    y = smoothed_one_hot(labels, num_classes, smoothing)
    targets = lam * y + (1.0 - lam) * y[::-1]
    return x, targets.astype(np.float32), lam, kind


@dataclasses.dataclass(frozen=True)
class BatchAugment:
    """The per-batch half of DeiT's training augmentation, with DeiT's defaults.

    erase_prob: random erasing per image (DeiT --reprob 0.25, --remode pixel, --recount 1), 0 = off.
    mixup_alpha / cutmix_alpha: DeiT 0.8 / 1.0; both 0 = off (then labels stay integers).
    switch_prob: DeiT 0.5; mix_prob: DeiT 1.0; smoothing: DeiT 0.1 (folded into the soft targets
    when mixing; otherwise the trainer's cross-entropy applies its own --label-smoothing).
    """

    num_classes: int = 1000
    erase_prob: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    mix_prob: float = 1.0
    smoothing: float = 0.1
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def mixing(self):
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, images, labels, seed, epoch, step, first_index=0):
        """images uint8 (B, H, W, 3), labels int64 (B,) -> (x float32 (B, 3, H, W), targets).

        targets: float32 (B, num_classes) soft targets when mixing, else the int64 labels. Image i's
        erasing draws from Generator([seed, ERASE_STREAM, epoch, step, first_index + i]), the mix from
        Generator([seed, MIX_STREAM, epoch, step]).
        """
        x = normalize(images, self.mean, self.std)
        erase_batch(x, self.erase_prob, seed, epoch, step, first_index)
        if not self.mixing:
            return x, labels
        rng = np.random.default_rng([seed, MIX_STREAM, epoch, step])
        x, targets, _, _ = mix_batch(x, labels, self.num_classes, rng, self.mixup_alpha, self.cutmix_alpha,
                                     self.switch_prob, self.mix_prob, self.smoothing)
        return x, targets


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) = (u8 / 255 - mean) / std (the model's layout)."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(1, -1, 1, 1)
    shift = (mean / std).astype(np.float32).reshape(1, -1, 1, 1)
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)  # C-contiguous NCHW
    x *= scale
    x -= shift
    return x
