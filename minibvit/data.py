"""Image-classification datasets, limited-data subsets, batching and augmentation.

``load_dataset(name, split, ...)`` returns a :class:`Dataset` of uint8 images (N, H, W, C) and int64
labels (N,) from one of five sources:

- ``cifar10``: a local ``cifar-10-batches-py`` directory (read with a restricted unpickler that only
  admits the numpy array globals the batches need) or ``cifar-10-batches-bin`` directory (no pickle),
  otherwise the Hugging Face hub (``uoft-cs/cifar10``, cached by ``datasets``).
- ``cifar100``: the same for CIFAR-100 (its 100 fine labels): a local ``cifar-100-python`` directory
  (``train``, ``test``, ``meta``; the same restricted unpickler), otherwise the hub
  (``uoft-cs/cifar100``, the hub's ``cifar100``).
- ``fashion-mnist``: IDX files, gzipped or not (default ``/usr/share/datasets/fashion-mnist/``, from
  Debian's ``dataset-fashion-mnist``), otherwise the hub (``zalando-datasets/fashion_mnist``).
- ``imagefolder``: ``data_dir/<class>/<image>`` read with Pillow, with an optional ``train``/``test``
  level; without it a fixed stratified split (80 % / 20 %).
- ``synthetic``: generated shapes (10 classes) at random positions, sizes and colours, with noise.

``iterate_batches`` yields normalised float32 (B, C, H, W) batches whose order and augmentation
depend only on (seed, epoch, step), so a run resumed at (epoch, step) sees the same batches as an
uninterrupted one. See docs/data.md.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

DATASET_NAMES = ("cifar10", "cifar100", "fashion-mnist", "imagefolder", "synthetic")
SPLITS = ("train", "test")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm")
"""CIFAR-100's fine labels in label order (the meta file's fine_label_names)."""
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
SYNTHETIC_CLASSES = ("horizontal bar", "vertical bar", "plus", "cross", "square", "square outline",
                     "disc", "ring", "triangle up", "triangle down")

# Per-channel mean and standard deviation of the training split, pixels scaled to [0, 1].
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
CIFAR100_MEAN = (0.50707516, 0.48654887, 0.44091784)
CIFAR100_STD = (0.26733429, 0.25643846, 0.27615047)
FASHION_MNIST_MEAN = (0.28604060,)
FASHION_MNIST_STD = (0.35302424,)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR10_HUB = ("uoft-cs/cifar10", "img", "label")  # repository, image column, label column
CIFAR100_HUB = ("uoft-cs/cifar100", "img", "fine_label")  # the hub's "cifar100"; its 100 fine labels
FASHION_MNIST_HUB = ("zalando-datasets/fashion_mnist", "image", "label")

SYNTHETIC_PER_CLASS = {"train": 500, "test": 100}
SYNTHETIC_SEED = {"train": 0, "test": 1}  # fixed: the synthetic data do not depend on `seed`
IMAGEFOLDER_TEST_FRACTION = 0.2
IMAGEFOLDER_SPLIT_SEED = 0  # fixed: every run and method sees the same test images
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".pbm")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")

AUGMENT_MODES = ("none", "flip", "crop", "crop-flip")
"""Training augmentations: nothing, a horizontal flip with probability 1/2, a random crop of the
zero-padded image, or both (crop, then flip)."""
# The mode of augment=True. Horizontal flips keep the label of natural images and of the (symmetric)
# synthetic shapes; Fashion-MNIST gets the crop only (the trainer's own default is in
# train.DATASET_DEFAULTS).
DEFAULT_AUGMENT = {"cifar10": "crop-flip", "cifar100": "crop-flip", "imagefolder": "crop-flip",
                   "synthetic": "crop-flip", "fashion-mnist": "crop"}

# Domain tags that keep the random streams of shuffling, augmentation and subsetting apart.
_ORDER_STREAM, _AUGMENT_STREAM, _SUBSET_STREAM = 0, 1, 2


class DatasetError(ValueError):
    """A dataset that is missing, unreachable, corrupt or does not fit the request."""


@dataclasses.dataclass
class Dataset:
    """An in-memory image-classification split.

    images: uint8 (N, H, W, C); labels: int64 (N,) in [0, num_classes); class_names: num_classes
    names; mean, std: float64 (C,) per-channel statistics of the training split on the [0, 1] pixel
    scale, used for normalisation; name: one of DATASET_NAMES (selects the augmentation).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple
    mean: np.ndarray
    std: np.ndarray
    name: str

    def __post_init__(self):
        images, labels = self.images, self.labels
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4):
            raise TypeError(f"Dataset.images must be a uint8 array (N, H, W, C), got "
                            f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                            f"{getattr(images, 'shape', '')}")
        if not (isinstance(labels, np.ndarray) and labels.dtype == np.int64 and labels.ndim == 1):
            raise TypeError(f"Dataset.labels must be an int64 array (N,), got {type(labels).__name__} "
                            f"{getattr(labels, 'dtype', '')} {getattr(labels, 'shape', '')}")
        if len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"Dataset needs as many labels as images and at least one image, got "
                             f"{len(images)} images and {len(labels)} labels")
        self.class_names = tuple(self.class_names)
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"Dataset has num_classes={self.num_classes} but "
                             f"{len(self.class_names)} class names")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"Dataset labels must lie in [0, {self.num_classes}), found "
                             f"[{labels.min()}, {labels.max()}]")
        channels = images.shape[3]
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.asarray(self.std, dtype=np.float64)
        if self.mean.shape != (channels,) or self.std.shape != (channels,) or not np.all(self.std > 0):
            raise ValueError(f"Dataset mean and std must have shape ({channels},) with std > 0, got "
                             f"{self.mean} and {self.std}")
        if self.name not in DATASET_NAMES:
            raise ValueError(f"Dataset name must be one of {DATASET_NAMES}, got {self.name!r}")

    def __len__(self):
        return len(self.labels)


def load_dataset(name, split, data_dir=None, image_size=None, limit_per_class=None, fraction=None,
                 seed=0) -> Dataset:
    """Load one split of a dataset into memory.

    name: "cifar10", "cifar100", "fashion-mnist", "imagefolder" or "synthetic".
    split: "train" or "test".
    data_dir: directory of local files (cifar10: a cifar-10-batches-py or cifar-10-batches-bin
        directory or its parent; cifar100: a cifar-100-python directory or its parent; fashion-mnist:
        the IDX files; imagefolder: required). None uses the default location (fashion-mnist) or the
        Hugging Face hub (cifar10, cifar100, fashion-mnist).
    image_size: resize every image to image_size x image_size (bilinear, aspect ratio not kept);
        None keeps the native size (synthetic: 32).
    limit_per_class: keep N images per class (stratified, seeded) -- the small-data setting.
    fraction: keep this fraction (0, 1] of every class (at least one image each); not with
        limit_per_class.
    seed: seeds the limit_per_class / fraction subset; the data themselves do not depend on it.
    Returns a Dataset whose mean/std are those of the full training split.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path or None, got {type(data_dir).__name__}")
    if data_dir is not None and name == "synthetic":
        raise ValueError("the synthetic dataset is generated and takes no data_dir (--data-dir)")
    if name == "imagefolder" and data_dir is None:
        raise ValueError("the imagefolder dataset needs data_dir (--data-dir): a directory with one "
                         "sub-folder of images per class")
    min_size = 8 if name == "synthetic" else 1
    if image_size is not None and not (_is_int(image_size) and image_size >= min_size):
        raise ValueError(f"image_size must be an integer >= {min_size} or None, got {image_size!r}")
    if limit_per_class is not None and not (_is_int(limit_per_class) and limit_per_class >= 1):
        raise ValueError(f"limit_per_class must be a positive integer or None, got "
                         f"{limit_per_class!r}")
    if fraction is not None and not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
                                     and 0 < fraction <= 1):
        raise ValueError(f"fraction must be a number in (0, 1] or None, got {fraction!r}")
    if limit_per_class is not None and fraction is not None:
        raise ValueError("give limit_per_class or fraction, not both")
    if not (_is_int(seed) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

    if name in CIFAR_LAYOUTS:
        images, labels, class_names = _load_cifar(name, split, data_dir)
        mean, std = CIFAR_LAYOUTS[name].mean, CIFAR_LAYOUTS[name].std
    elif name == "fashion-mnist":
        images, labels, class_names = _load_fashion_mnist(split, data_dir)
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    elif name == "imagefolder":
        splits, class_names = _load_imagefolder(Path(data_dir), image_size)
        images, labels = splits[split]
        mean, std = channel_stats(splits["train"][0])
    else:
        size = 32 if image_size is None else image_size
        images, labels, mean, std = _synthetic_split(split, size)
        class_names = SYNTHETIC_CLASSES
    if image_size is not None:
        images = _resize_array(images, image_size)
    if limit_per_class is not None or fraction is not None:
        keep = subset_indices(labels, class_names, limit_per_class, fraction, seed, split)
        images, labels = images[keep], labels[keep]
    return Dataset(images=np.ascontiguousarray(images), labels=labels.astype(np.int64),
                   num_classes=len(class_names), class_names=tuple(class_names), mean=mean, std=std,
                   name=name)


def check_images(dataset, image_size, channels):
    """Raise ValueError unless the dataset's images are image_size x image_size with `channels`."""
    _, height, width, have_channels = dataset.images.shape
    if (height, width, have_channels) == (image_size, image_size, channels):
        return
    fixes = []
    if (height, width) != (image_size, image_size):
        fixes.append(f"load the data resized to the model's size (load_dataset(..., "
                     f"image_size={image_size}))")
    if have_channels != channels:
        fixes.append(f"use a model with in_chans={have_channels} (channel counts are not converted)")
    raise ValueError(
        f"the {dataset.name} images are {height}x{width} with {have_channels} channel(s), but the model "
        f"expects {image_size}x{image_size} with {channels} channel(s): {' and '.join(fixes)}, or use a "
        f"model built for this data")


def channel_stats(images):
    """Per-channel mean and standard deviation of uint8 images (N, H, W, C) on the [0, 1] scale.

    Computed exactly from per-channel histograms (no float copy of the images). Returns (mean, std),
    float64 (C,); a constant channel gets std 1 so that normalisation is defined.
    """
    levels = np.arange(256) / 255.0
    mean, std = [], []
    for channel in range(images.shape[-1]):
        counts = np.bincount(images[..., channel].ravel(), minlength=256) / images[..., channel].size
        mean.append(counts @ levels)
        std.append(np.sqrt(counts @ (levels - mean[-1]) ** 2))
    std = np.array(std)
    return np.array(mean), np.where(std > 0, std, 1.0)


def subset_indices(labels, class_names, limit_per_class=None, fraction=None, seed=0, split="train"):
    """Indices (sorted, int64) of a stratified random subset of a labelled split.

    Each class keeps the first `limit_per_class` (or max(1, round(fraction * count))) images of a
    permutation drawn from a generator seeded by (seed, class), so with the same seed a smaller limit
    selects a subset of a larger one. A class with fewer than limit_per_class images is an error.
    """
    keep = []
    for label, class_name in enumerate(class_names):
        members = np.flatnonzero(labels == label)
        if limit_per_class is not None:
            if len(members) < limit_per_class:
                raise ValueError(f"class {class_name!r} has only {len(members)} images in the {split} "
                                 f"split, fewer than limit_per_class={limit_per_class}; lower it")
            count = limit_per_class
        else:
            count = max(1, round(fraction * len(members))) if len(members) else 0
        order = np.random.default_rng([seed, _SUBSET_STREAM, label]).permutation(len(members))
        keep.append(members[order[:count]])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def steps_per_epoch(n, batch_size, drop_last):
    """Number of batches in an epoch of n samples; an error when drop_last leaves none."""
    if not (_is_int(n) and n >= 1 and _is_int(batch_size) and batch_size >= 1):
        raise ValueError(f"need n >= 1 samples and batch_size >= 1, got n={n!r}, "
                         f"batch_size={batch_size!r}")
    if drop_last and n < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {n} samples and drop_last "
                         f"leaves no batch; use a batch size <= {n}")
    return n // batch_size if drop_last else -(-n // batch_size)


def crop_padding(image_size):
    """Zero padding of the random crop: 4 px for 32x32 (and 28x28), scaled as image_size / 8."""
    return max(1, round(image_size / 8))


def augment_mode(dataset_name, augment):
    """The augmentation mode (one of AUGMENT_MODES) of an `augment` argument: a mode, True (the
    dataset's DEFAULT_AUGMENT) or False ("none")."""
    if augment is True:
        return DEFAULT_AUGMENT[dataset_name]
    if augment is False:
        return "none"
    if augment not in AUGMENT_MODES:
        raise ValueError(f"augment={augment!r} is not an augmentation; choose one of {list(AUGMENT_MODES)} "
                         f"(or True for the dataset's default, False for none)")
    return augment


def iterate_batches(dataset, batch_size, seed, epoch, start_step=0, train=True, augment=True,
                    drop_last=None, padding=None, erase_prob=0.0):
    """Batches of one epoch: an iterator of (x float32 (B, C, H, W), y int64 (B,)).

    x is normalised by the dataset's mean/std. train=True visits the samples in a permutation drawn
    from a generator seeded by (seed, epoch); train=False in order. Augmentation (train only):
    augment is one of AUGMENT_MODES, True (the dataset's DEFAULT_AUGMENT) or False ("none"); the crop
    pads `padding` pixels of zeros on every side (None: crop_padding(image size)). Batch i's draws
    come from a generator seeded by (seed, epoch, i) -- so starting at start_step yields exactly the
    batches start_step, start_step+1, ... of the full epoch, in every mode. erase_prob > 0 (train
    only) then applies random erasing to the normalised batch (minibvit.augment.erase_batch, seeded
    by (seed, epoch, step, image)).
    drop_last: skip the final incomplete batch; None means drop_last=train.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a minibvit.data.Dataset, got {type(dataset).__name__}")
    mode = augment_mode(dataset.name, augment)
    if not (isinstance(erase_prob, (int, float, np.floating)) and 0 <= erase_prob <= 1):
        raise ValueError(f"erase_prob must be a probability in [0, 1], got {erase_prob!r}")
    if padding is not None and not (_is_int(padding) and padding >= 1):
        raise ValueError(f"padding must be a positive integer or None, got {padding!r}")
    for label, value in (("seed", seed), ("epoch", epoch), ("start_step", start_step)):
        if not (_is_int(value) and value >= 0):
            raise ValueError(f"{label} must be a non-negative integer, got {value!r}")
    drop_last = train if drop_last is None else drop_last
    steps = steps_per_epoch(len(dataset), batch_size, drop_last)
    if start_step > steps:
        raise ValueError(f"start_step={start_step} is past the end of the epoch ({steps} steps)")
    if train:
        order = np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(len(dataset))
    else:
        order = np.arange(len(dataset))
    # x = (u8 / 255 - mean) / std, computed as u8 * scale - shift in float32
    scale = (1.0 / (255.0 * dataset.std)).astype(np.float32).reshape(1, -1, 1, 1)
    shift = (dataset.mean / dataset.std).astype(np.float32).reshape(1, -1, 1, 1)
    padding = crop_padding(dataset.images.shape[1]) if padding is None else padding

    def batches():
        for step in range(start_step, steps):
            index = order[step * batch_size:(step + 1) * batch_size]
            images = dataset.images[index]
            if train and mode != "none":
                rng = np.random.default_rng([seed, _AUGMENT_STREAM, epoch, step])
                images = augment_batch(images, mode, padding, rng)
            x = images.transpose(0, 3, 1, 2).astype(np.float32) * scale - shift
            if train and erase_prob > 0:
                from .augment import erase_batch  # Pillow is imported with it: only when erasing
                erase_batch(x, erase_prob, seed, epoch, step)
            yield x, dataset.labels[index]

    return batches()


def augment_batch(images, mode, padding, rng):
    """One batch's augmentation: uint8 (B, H, W, C) -> uint8 (B, H, W, C) for a mode of
    AUGMENT_MODES other than "none" (crop modes: random_crop_flip; "flip": draws only the flips)."""
    if mode == "flip":
        mirror = rng.random(len(images)) < 0.5
        return np.where(mirror[:, None, None, None], images[:, :, ::-1], images)
    return random_crop_flip(images, padding, mode == "crop-flip", rng)


def random_crop_flip(images, padding, flip, rng):
    """Random crop of the zero-padded images and optional horizontal flip, vectorised over the batch.

    images: uint8 (B, H, W, C); padding: pixels of zeros added on every side; flip: also mirror each
    image with probability 1/2; rng: numpy Generator (draws: row offsets, column offsets, flips).
    Returns uint8 (B, H, W, C).
    """
    count, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = rng.integers(0, 2 * padding + 1, count)[:, None] + np.arange(height)  # (B, H)
    cols = rng.integers(0, 2 * padding + 1, count)[:, None] + np.arange(width)  # (B, W)
    if flip:
        mirror = rng.random(count) < 0.5
        cols = np.where(mirror[:, None], cols[:, ::-1], cols)
    return padded[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]


# ---------------------------------------------------------------------------------------------
# Synthetic shapes


def make_synthetic(n_per_class, image_size=32, channels=3, seed=0):
    """Generate the synthetic shapes task: SYNTHETIC_CLASSES drawn at random positions and sizes.

    Each image is a uniformly coloured background with one shape (half-size 15-30 % of the image,
    stroke about 0.3 of the half-size) in a brighter random colour, plus Gaussian noise (sigma 0.08).
    All shapes are left-right symmetric, so horizontal flips keep the label.
    n_per_class: images per class; image_size: side >= 8; channels: 1 or 3; seed: generator seed.
    Returns images uint8 (10 * n_per_class, image_size, image_size, channels) and labels int64, the
    classes interleaved (0, 1, ..., 9, 0, 1, ...).
    """
    if not (_is_int(n_per_class) and n_per_class >= 1):
        raise ValueError(f"n_per_class must be a positive integer, got {n_per_class!r}")
    if not (_is_int(image_size) and image_size >= 8):
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    rng = np.random.default_rng(seed)
    num_classes = len(SYNTHETIC_CLASSES)
    labels = np.tile(np.arange(num_classes, dtype=np.int64), n_per_class)
    count = len(labels)
    half = (rng.uniform(0.15, 0.30, count) * image_size).astype(np.float32)  # half-size of the shape
    stroke = np.maximum(np.float32(1.0), np.float32(0.3) * half)
    centre_y = rng.uniform(half, image_size - 1 - half).astype(np.float32)
    centre_x = rng.uniform(half, image_size - 1 - half).astype(np.float32)
    background = rng.uniform(0.0, 0.45, (count, 1, 1, channels)).astype(np.float32)
    foreground = rng.uniform(0.55, 1.0, (count, 1, 1, channels)).astype(np.float32)
    grid = np.arange(image_size, dtype=np.float32)
    mask = np.empty((count, image_size, image_size, 1), dtype=bool)
    for label in range(num_classes):
        members = labels == label
        dy = grid[None, :, None] - centre_y[members, None, None]  # (n, H, 1)
        dx = grid[None, None, :] - centre_x[members, None, None]  # (n, 1, W)
        mask[members, :, :, 0] = _shape_mask(label, dy, dx, half[members, None, None],
                                             stroke[members, None, None])
    images = rng.standard_normal((count, image_size, image_size, channels), dtype=np.float32)
    images *= np.float32(0.08)
    images += np.where(mask, foreground, background)
    images = np.clip(images, 0.0, 1.0, out=images)
    images *= np.float32(255)
    return np.rint(images).astype(np.uint8), labels


@functools.lru_cache(maxsize=4)
def _synthetic_split(split, image_size):
    """The fixed synthetic split (read-only arrays, cached) and the train split's mean and std."""
    images, labels = make_synthetic(SYNTHETIC_PER_CLASS[split], image_size, 3, SYNTHETIC_SEED[split])
    images.flags.writeable = labels.flags.writeable = False
    mean, std = channel_stats(images if split == "train" else _synthetic_split("train", image_size)[0])
    return images, labels, mean, std


def _shape_mask(label, dy, dx, r, t):
    """Pixels of shape `label` (SYNTHETIC_CLASSES) at offsets dy, dx from its centre; half-size r,
    stroke t. All shapes are symmetric under dx -> -dx."""
    ady, adx = np.abs(dy), np.abs(dx)
    if label in (0, 1, 2):  # horizontal bar, vertical bar, plus
        hbar = (ady <= t / 2) & (adx <= r)
        vbar = (adx <= t / 2) & (ady <= r)
        return (hbar, vbar, hbar | vbar)[label]
    if label == 3:  # cross: both diagonals of the square of half-size r
        on_diagonal = (np.abs(dx - dy) <= t / np.sqrt(2)) | (np.abs(dx + dy) <= t / np.sqrt(2))
        return on_diagonal & (np.maximum(ady, adx) <= r)
    if label in (4, 5):  # square, square outline (side 1.7 r)
        box = np.maximum(ady, adx)
        return (box <= 0.85 * r) & ((box > 0.85 * r - t) if label == 5 else True)
    if label in (6, 7):  # disc, ring
        radius = np.sqrt(dy ** 2 + dx ** 2)
        return (radius <= r) & ((radius > r - t) if label == 7 else True)
    if label == 8:  # triangle, apex up
        return (dy <= r) & (adx <= (dy + r) / 2)
    return (dy >= -r) & (adx <= (r - dy) / 2)  # triangle, apex down


# ---------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100


@dataclasses.dataclass(frozen=True)
class CifarLayout:
    """Where and how one CIFAR dataset stores its python-format (pickled) and binary files.

    py_dir / bin_dir: the directory names of the two formats (bin_dir None: only the python one is
    read); files: {split: file names, without ".bin"}; label_key: the labels' key in a python batch;
    meta: (meta file name, key of its class-name list); hub: (repository, image column, label column);
    mean, std: the training split's per-channel statistics.
    """

    title: str
    classes: tuple
    py_dir: str
    bin_dir: str
    files: dict
    label_key: str
    meta: tuple
    hub: tuple
    mean: tuple
    std: tuple


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout("CIFAR-10", CIFAR10_CLASSES, "cifar-10-batches-py", "cifar-10-batches-bin",
                           {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                           "labels", ("batches.meta", "label_names"), CIFAR10_HUB, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": CifarLayout("CIFAR-100", CIFAR100_CLASSES, "cifar-100-python", None,
                            {"train": ["train"], "test": ["test"]}, "fine_labels", ("meta", "fine_label_names"),
                            CIFAR100_HUB, CIFAR100_MEAN, CIFAR100_STD),
}
"""CIFAR-10 (python and binary batches) and CIFAR-100 (python files, its 100 fine labels)."""


def _load_cifar(name, split, data_dir):
    layout = CIFAR_LAYOUTS[name]
    if data_dir is None:
        return _load_hub(*layout.hub, split, alternatives=_cifar_offline(layout))
    kind, directory = _find_cifar_dir(Path(data_dir), layout)
    if kind == "py":
        return _read_cifar_py(directory, split, layout)
    return _read_cifar_bin(directory, split, layout)


def _cifar_offline(layout):
    formats = (f"python ({layout.py_dir}) or binary ({layout.bin_dir})" if layout.bin_dir
               else f"python ({layout.py_dir})")
    return (f"--data-dir DIR with a local copy of {layout.title} in the {formats} format; --dataset "
            f"fashion-mnist, read from the IDX files that Debian's dataset-fashion-mnist package installs in "
            f"{FASHION_MNIST_DIR}/")


_FASHION_OFFLINE = (
    f"--data-dir DIR with the Fashion-MNIST IDX files, or install Debian's dataset-fashion-mnist "
    f"package (apt install dataset-fashion-mnist), which puts them in {FASHION_MNIST_DIR}/")


def _find_cifar_dir(root, layout):
    """The one layout of a CIFAR dataset under root: ("py" or "bin", directory). root may be a batches
    directory or its parent; more than one copy (both formats) is refused rather than guessed."""
    if not root.is_dir():
        raise DatasetError(f"{layout.title} data_dir {root} is not a directory")
    first = layout.files["train"][0]
    found = []
    for directory in (root, root / layout.py_dir) + ((root / layout.bin_dir,) if layout.bin_dir else ()):
        if (directory / first).is_file():
            found.append(("py", directory))
        if layout.bin_dir and (directory / f"{first}.bin").is_file():
            found.append(("bin", directory))
    if len(found) == 1:
        return found[0]
    if found:
        copies = " and ".join(f"{'python' if kind == 'py' else 'binary'} batches in {directory}"
                              for kind, directory in found)
        raise DatasetError(
            f"{layout.title} data_dir {root} holds more than one copy: {copies}; minibvit does not guess "
            f"which to use: pass the directory of one of them as data_dir (--data-dir)")
    python = f"{' ... '.join(dict.fromkeys([first, layout.files['train'][-1]]))} and {layout.files['test'][0]}"
    expected = f"{python} (python format, {layout.py_dir})"
    subdirs = f"its {layout.py_dir}/"
    if layout.bin_dir:
        binary = f"{first}.bin ... {layout.files['train'][-1]}.bin and {layout.files['test'][0]}.bin"
        expected += f" or {binary} (binary format, {layout.bin_dir})"
        subdirs += f" or {layout.bin_dir}/"
    raise DatasetError(f"no {layout.title} batches in {root}: expected {expected}, in {root} or in {subdirs} "
                       f"sub-directory")


def _cifar_files(directory, split, suffix, layout):
    names = [name + suffix for name in layout.files[split]]
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise DatasetError(f"{layout.title} directory {directory} lacks {', '.join(missing)}; the "
                           f"{split} split needs {', '.join(names)}")
    return [directory / name for name in names]


def _plain_dtype(*args, **kwargs):
    """np.dtype for the unpickler, refusing dtypes that hold Python objects (an object array would
    carry arbitrary pickled objects inside a batch)."""
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing dtype {dtype}: a CIFAR batch holds only plain numbers")
    return dtype


# The only globals a CIFAR python batch (a dict of a uint8 array, a list of labels and byte
# strings) needs: numpy's array reconstruction, under its numpy 1.x and 2.x module names.
_NDARRAY_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
}


class _CifarBatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only _CIFAR_PICKLE_GLOBALS and refuses every other global."""

    def find_class(self, module, name):
        try:
            return _CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in _CIFAR_PICKLE_GLOBALS)
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: a CIFAR batch only needs {allowed}") from None


def read_cifar_batch(path, title="CIFAR-10"):
    """Read one python-format CIFAR-10 or CIFAR-100 file (title names it in errors) with the
    restricted unpickler.

    Returns the unpickled dict with str keys (the files store byte-string keys). Raises DatasetError
    for anything that is not plain containers and numpy arrays.
    """
    try:
        with open(path, "rb") as file:
            content = _CifarBatchUnpickler(file, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError) as error:
        raise DatasetError(f"{path} is not a readable {title} python batch ({error}); only plain "
                           f"containers and numpy arrays are accepted, so a corrupt or foreign "
                           f"pickle is refused: re-download {title.lower()}-python.tar.gz") from error
    if not isinstance(content, dict):
        raise DatasetError(f"{path} holds a {type(content).__name__}, not the dict of a {title} batch")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value
            for key, value in content.items()}


def _read_cifar_py(directory, split, layout):
    images, labels = [], []
    for path in _cifar_files(directory, split, "", layout):
        batch = read_cifar_batch(path, layout.title)
        data, batch_labels = batch.get("data"), batch.get(layout.label_key)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32):
            raise DatasetError(f"{path}: 'data' must be a uint8 array (N, 3072), got "
                               f"{type(data).__name__} {getattr(data, 'dtype', '')} "
                               f"{getattr(data, 'shape', '')}")
        if not (isinstance(batch_labels, (list, np.ndarray)) and len(batch_labels) == len(data)):
            raise DatasetError(f"{path}: '{layout.label_key}' must be a list of {len(data)} class indices")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    class_names = layout.classes
    meta_file, meta_key = layout.meta
    if (directory / meta_file).is_file():
        names = read_cifar_batch(directory / meta_file, layout.title).get(meta_key)
        class_names = _cifar_class_names(directory / meta_file,
                                         [n.decode("utf-8") if isinstance(n, bytes) else n
                                          for n in (names or [])], layout)
    return (*_check_cifar(np.concatenate(images), np.concatenate(labels), directory, layout), class_names)


def _read_cifar_bin(directory, split, layout):
    records = []
    for path in _cifar_files(directory, split, ".bin", layout):
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % 3073:
            raise DatasetError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte {layout.title} "
                               f"records (1 label byte + 3072 pixel bytes); the file is truncated or "
                               f"not in the binary format")
        records.append(raw.reshape(-1, 3073))
    records = np.concatenate(records)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    class_names = layout.classes
    if (directory / "batches.meta.txt").is_file():
        names = (directory / "batches.meta.txt").read_text().split("\n")
        class_names = _cifar_class_names(directory / "batches.meta.txt",
                                         [n.strip() for n in names if n.strip()], layout)
    return (*_check_cifar(images, records[:, 0].astype(np.int64), directory, layout), class_names)


def _cifar_class_names(path, names, layout):
    count = len(layout.classes)
    if len(names) != count or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{path} should list the {count} {layout.title} class names, found {names!r}")
    return tuple(names)


def _check_cifar(images, labels, directory, layout):
    top = len(layout.classes) - 1
    if labels.min() < 0 or labels.max() > top:
        raise DatasetError(f"{layout.title} labels in {directory} must be in 0..{top}, found "
                           f"{labels.min()}..{labels.max()}")
    return np.ascontiguousarray(images), labels


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST and IDX files


_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path):
    """Read an IDX file (the MNIST format), gzipped or not (detected from the content).

    Format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, each dimension as a big-endian uint32, then the data.
    Returns an array of that shape (native byte order). Raises DatasetError for a wrong magic number,
    a truncated file or trailing bytes.
    """
    with open(path, "rb") as file:
        raw = file.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise DatasetError(f"{path}: corrupt or truncated gzip file ({error}); re-download it "
                               f"or reinstall dataset-fashion-mnist") from error
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DatasetError(f"{path} is not an IDX file: magic number {raw[:4].hex() or 'missing'}, "
                           f"expected 0000 followed by a type byte (08 for uint8) and the number of "
                           f"dimensions")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        problem = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise DatasetError(f"{path}: IDX file {problem}: dimensions {shape} need {expected} data "
                           f"bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory, stem):
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _load_fashion_mnist(split, data_dir):
    directory = Path(FASHION_MNIST_DIR if data_dir is None else data_dir)
    if data_dir is not None and not directory.is_dir():
        raise DatasetError(f"Fashion-MNIST data_dir {directory} is not a directory")
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find_idx(directory, stem) for stem in stems]
    if None in paths:
        if data_dir is None:
            return _load_hub(*FASHION_MNIST_HUB, split, alternatives=_FASHION_OFFLINE)
        raise DatasetError(f"Fashion-MNIST directory {directory} lacks "
                           f"{' and '.join(s + '[.gz]' for s, p in zip(stems, paths) if p is None)}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{paths[0]} and {paths[1]} must hold uint8 images (N, H, W) and N labels, "
                           f"found {images.dtype} {images.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() > 9:
        raise DatasetError(f"{paths[1]}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    return images[..., None], labels.astype(np.int64), FASHION_MNIST_CLASSES


# ---------------------------------------------------------------------------------------------
# Hugging Face hub


def _offline_mode():
    flags = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
             if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    return " and ".join(f"{v}=1" for v in flags)


def _load_hub(repository, image_column, label_column, split, alternatives):
    try:
        import datasets
    except ImportError as error:
        raise DatasetError(f"loading {repository} from the Hugging Face hub needs the `datasets` "
                           f"package (pip install datasets); offline alternatives: {alternatives}; "
                           f"or --dataset synthetic") from error
    try:
        hub_dataset = datasets.load_dataset(repository, split=split)
    except (OSError, datasets.exceptions.DatasetsError) as error:  # includes ConnectionError
        offline = _offline_mode()
        offline = f" (offline mode is on: {offline}, so only the local datasets cache is used)" \
            if offline else ""
        raise DatasetError(
            f"could not load {repository} ({split} split) from the Hugging Face hub{offline}: "
            f"{error}. Offline alternatives: {alternatives}; --dataset synthetic (generated, needs no "
            f"files).") from error
    return from_hf_dataset(hub_dataset, image_column, label_column)


def from_hf_dataset(hf_dataset, image_column, label_column):
    """Convert a `datasets.Dataset` with PIL images and integer labels to arrays.

    Images are converted to 8-bit grayscale ("L") when all of them are grayscale, else to RGB.
    Returns images uint8 (N, H, W, C), labels int64 (N,) and the class names (from a ClassLabel
    feature, else "0", "1", ...).
    """
    columns = list(hf_dataset.column_names)
    for column in (image_column, label_column):
        if column not in columns:
            raise DatasetError(f"the dataset has no column {column!r}; its columns are {columns}")
    if len(hf_dataset) == 0:
        raise DatasetError("the dataset is empty")
    pil_images, labels = [], []
    for batch in hf_dataset.select_columns([image_column, label_column]).iter(batch_size=1024):
        pil_images.extend(batch[image_column])
        labels.extend(batch[label_column])
    if not all(isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in labels):
        raise DatasetError(f"column {label_column!r} must hold integer class indices")
    labels = np.asarray(labels, dtype=np.int64)
    images = _stack_pil(pil_images, None, [f"{image_column}[{i}]" for i in range(len(pil_images))])
    feature = hf_dataset.features[label_column]
    names = getattr(feature, "names", None)
    class_names = tuple(names) if names else tuple(str(i) for i in range(int(labels.max()) + 1))
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise DatasetError(f"column {label_column!r} holds labels {labels.min()}..{labels.max()} "
                           f"outside the {len(class_names)} classes")
    return images, labels, class_names


# ---------------------------------------------------------------------------------------------
# Image folders


def _load_imagefolder(root, image_size):
    """Both splits of an image folder: ({"train": (images, labels), "test": ...}, class_names)."""
    if not root.is_dir():
        raise DatasetError(f"imagefolder data_dir {root} is not a directory")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        raise DatasetError(f"{root} has a {'train' if has_train else 'test'}/ sub-directory but no "
                           f"{'test' if has_train else 'train'}/; give both (train/<class>/..., "
                           f"test/<class>/...) or neither (<class>/..., split automatically)")
    if has_train:
        class_names, train_files = _scan_class_folders(root / "train")
        test_names, test_files = _scan_class_folders(root / "test")
        if test_names != class_names:
            raise DatasetError(f"{root}/train and {root}/test must have the same class folders, found "
                               f"{list(class_names)} and {list(test_names)}")
        files = {"train": train_files, "test": test_files}
    else:
        class_names, all_files = _scan_class_folders(root)
        files = _split_files(all_files, len(class_names), root)
    paths = files["train"] + files["test"]
    pil_images = [_open_image(path) for path, _ in paths]
    images = _stack_pil(pil_images, image_size, [str(path) for path, _ in paths])
    labels = np.array([label for _, label in paths], dtype=np.int64)
    n_train = len(files["train"])
    return ({"train": (images[:n_train], labels[:n_train]),
             "test": (images[n_train:], labels[n_train:])}, class_names)


def _scan_class_folders(root):
    class_names = tuple(sorted(entry.name for entry in root.iterdir()
                               if entry.is_dir() and not entry.name.startswith(".")))
    if not class_names:
        raise DatasetError(f"{root} has no class sub-folders; an imagefolder is "
                           f"<data_dir>/<class name>/<image>, e.g. {root}/cat/001.png")
    files = []
    for label, name in enumerate(class_names):
        images = sorted(path for path in (root / name).rglob("*")
                        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
                        and not path.name.startswith("."))
        if not images:
            raise DatasetError(f"class folder {root / name} has no images (looked for "
                               f"{', '.join(IMAGE_EXTENSIONS)})")
        files.extend((path, label) for path in images)
    return class_names, files


def _split_files(files, num_classes, root):
    """A fixed stratified split: round(IMAGEFOLDER_TEST_FRACTION * n) images of each class to test."""
    split = {"train": [], "test": []}
    for label in range(num_classes):
        members = [item for item in files if item[1] == label]
        order = np.random.default_rng([IMAGEFOLDER_SPLIT_SEED, label]).permutation(len(members))
        n_test = round(IMAGEFOLDER_TEST_FRACTION * len(members))
        split["test"].extend(members[i] for i in sorted(order[:n_test]))
        split["train"].extend(members[i] for i in sorted(order[n_test:]))
    if not split["test"]:
        raise DatasetError(f"{root} has too few images to set {IMAGEFOLDER_TEST_FRACTION:.0%} aside "
                           f"for a test split; add images or give train/ and test/ sub-directories")
    return split


def _open_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy() if image.mode != "P" else image.convert("RGBA")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DatasetError(f"cannot read image {path}: {error}; remove or replace the file") from error


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _stack_pil(pil_images, image_size, names):
    """Stack PIL images as uint8 (N, H, W, C): "L" if all are grayscale, else RGB; resized if asked."""
    from PIL import Image

    for image, name in zip(pil_images, names):
        if not isinstance(image, Image.Image):
            raise DatasetError(f"{name} is a {type(image).__name__}, expected a PIL image")
    mode = "L" if all(image.mode in GRAYSCALE_MODES for image in pil_images) else "RGB"
    arrays = []
    for image, name in zip(pil_images, names):
        image = image.convert(mode)
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[..., None] if array.ndim == 2 else array)
        if arrays[-1].shape != arrays[0].shape:
            raise DatasetError(f"images differ in size: {names[0]} is {arrays[0].shape[1]}x"
                               f"{arrays[0].shape[0]} but {name} is {array.shape[1]}x{array.shape[0]}; "
                               f"pass image_size (--image-size) to resize them all")
    return np.stack(arrays)


def _resize_array(images, image_size):
    """Bilinear resize of uint8 images (N, H, W, C) to (N, image_size, image_size, C) with Pillow."""
    if images.shape[1:3] == (image_size, image_size):
        return images
    from PIL import Image

    resized = np.empty((len(images), image_size, image_size, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if images.shape[3] == 1 else image)
        array = np.asarray(pil.resize((image_size, image_size), Image.Resampling.BILINEAR))
        resized[i] = array.reshape(image_size, image_size, images.shape[3])
    return resized


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
