"""ImageNet-1k (ILSVRC 2012) for training: sources, and ``ImageNetData`` that batches them.

Sources (picklable, handed to the loader's workers):

- ``folder_source(root, split)``: ``root/train/<wnid>/*.JPEG`` and ``root/val/``, where val is either
  class folders (``val/<wnid>/*.JPEG``, e.g. after the common valprep.sh) or flat
  (``val/ILSVRC2012_val_00000001.JPEG`` ...) with one of the label files users have:
    * ``LOC_val_solution.csv`` (the Kaggle ImageNet download; first wnid of PredictionString), looked
      up in root and its three parent directories (Kaggle's root is ILSVRC/Data/CLS-LOC);
    * the devkit's ``ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat`` (ILSVRC2012_IDs in the
      devkit's own class order, mapped to wnids through meta.mat; needs scipy), in
      ``ILSVRC2012_devkit_t12/data/`` under root or its parent, or inside
      ``ILSVRC2012_devkit_t12.tar.gz`` there (torchvision's layout);
    * or an explicit ``val_labels=`` path to either file.
- ``hub_source(split)``: the Hugging Face dataset ``ILSVRC/imagenet-1k`` through ``datasets`` (gated:
  accept its terms on the hub and log in with ``huggingface-cli login``), or any ``datasets.Dataset``
  with an image and a label column. Images are read undecoded so the workers decode them (draft).

Class index = position of the wnid in sorted order, as torchvision's ImageFolder (and the hub
dataset's labels, which follow the same sorted-wnid order), so checkpoints and logits are
interchangeable with torchvision/timm models. Samples within a split are in ImageFolder's order
(sorted class, then sorted file name).
"""
from __future__ import annotations

import csv
import io
import os
import re
import tarfile

import numpy as np

from . import loader
from .augment import BatchAugment, EvalTransform, TrainTransform, normalize

SPLITS = ("train", "val")
NUM_CLASSES = 1000
HUB_NAME = "ILSVRC/imagenet-1k"
HUB_SPLITS = {"train": "train", "val": "validation"}
# torchvision's IMG_EXTENSIONS, matched case-insensitively as ImageFolder does
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID = re.compile(r"^n\d{8}$")
LOC_CSV = "LOC_val_solution.csv"
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_DIR = os.path.join("ILSVRC2012_devkit_t12", "data")
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
_ORDER_STREAM = 0  # as minibvit.data: the epoch permutation is Generator([seed, 0, epoch])


class ImageNetLayoutError(ValueError):
    """The ImageNet tree or label file is missing, partial or inconsistent."""


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------

class FolderSource:
    """Image files under root: files (relative paths, bytes array), labels int64, classes (wnids)."""

    def __init__(self, root, files, labels, classes):
        self.root, self.classes = str(root), tuple(classes)
        self.files = np.asarray([f.encode() for f in files], dtype=bytes)
        self.labels = np.asarray(labels, np.int64)

    def __len__(self):
        return len(self.labels)

    def open(self, i):
        return os.path.join(self.root, self.files[i].decode())

    def describe(self, i):
        return self.open(i)


class HubSource:
    """A ``datasets.Dataset`` read with its image column undecoded ({'bytes', 'path'})."""

    def __init__(self, dataset, image_column="image", label_column="label"):
        import datasets

        for column in (image_column, label_column):
            if column not in dataset.column_names:
                raise ImageNetLayoutError(f"the dataset has no column {column!r} (columns: {dataset.column_names})")
        self.dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.labels = np.asarray(dataset[label_column], np.int64)
        if len(self.labels) and self.labels.min() < 0:
            raise ImageNetLayoutError("the dataset has unlabelled samples (label -1: imagenet-1k's test split); "
                                      "use the validation split for evaluation")
        feature = dataset.features[label_column]
        names = getattr(feature, "names", None)
        self.classes = tuple(names) if names else tuple(str(k) for k in range(int(self.labels.max()) + 1))

    def __len__(self):
        return len(self.labels)

    def open(self, i):
        item = self.dataset[int(i)][self.image_column]
        if item.get("bytes") is not None:
            return io.BytesIO(item["bytes"])
        return item["path"]

    def describe(self, i):
        item = self.dataset[int(i)][self.image_column]
        return f"hub sample {int(i)}" + (f" ({item['path']})" if item.get("path") else "")


def hub_source(split, name=HUB_NAME, dataset=None, image_column="image", label_column="label", **load_kwargs):
    """The hub dataset's split ('train' or 'val' = its 'validation'), or an already loaded dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if dataset is None:
        import datasets

        try:
            dataset = datasets.load_dataset(name, split=HUB_SPLITS[split], **load_kwargs)
        except Exception as error:  # gated repository, no network, no login ...
            raise ImageNetLayoutError(
                f"could not load {name!r} split {HUB_SPLITS[split]!r} from the Hugging Face hub ({error}). "
                f"It is gated: accept its terms at https://huggingface.co/datasets/{name} and run "
                f"`huggingface-cli login`, or give a local tree with --data-dir") from error
    return HubSource(dataset, image_column, label_column)


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _scan_class_folders(split_dir, classes):
    """ImageFolder's walk: sorted classes, then sorted (os.walk, followlinks) file names."""
    files, labels, empty = [], [], []
    for label, wnid in enumerate(classes):
        class_dir = os.path.join(split_dir, wnid)
        n = len(files)
        if os.path.isdir(class_dir):
            for dirpath, _, names in sorted(os.walk(class_dir, followlinks=True)):
                for name in sorted(names):
                    if _is_image(name):
                        files.append(os.path.relpath(os.path.join(dirpath, name), split_dir))
                        labels.append(label)
        if len(files) == n:
            empty.append(wnid)
    return files, labels, empty


def folder_source(root, split, val_labels=None, expect_classes=None):
    """The split of an ImageNet tree (module docstring). expect_classes: raise unless the tree has
    exactly that many classes (1000 for the full ImageNet-1k; None accepts subsets)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = os.path.abspath(os.path.expanduser(str(root)))
    train_dir, split_dir = os.path.join(root, "train"), os.path.join(root, split)
    if not os.path.isdir(root):
        raise ImageNetLayoutError(f"ImageNet root {root} does not exist")
    if not os.path.isdir(split_dir):
        raise ImageNetLayoutError(f"{split_dir} does not exist: the ImageNet root must hold train/<wnid>/*.JPEG "
                                  f"and val/ (class folders or flat with a label file); found "
                                  f"{sorted(os.listdir(root))[:10]}")
    classes = _class_dirs(train_dir) if os.path.isdir(train_dir) else None
    if classes is not None and not classes:
        raise ImageNetLayoutError(f"{train_dir} has no class folders (expected train/<wnid>/*.JPEG)")
    if classes is not None and (bad := [c for c in classes if not WNID.match(c)]):
        raise ImageNetLayoutError(f"{train_dir} has folders that are not wnids (n########): {bad[:5]}")
    val_dirs = _class_dirs(split_dir) if split == "val" else None
    if split == "train" or val_dirs:
        if split == "val":
            if classes is None:
                classes = val_dirs
            elif extra := sorted(set(val_dirs) - set(classes)):
                raise ImageNetLayoutError(f"{split_dir} has class folders missing from train/: {extra[:5]}")
        files, labels, empty = _scan_class_folders(split_dir, classes)
        if empty and split == "train":
            raise ImageNetLayoutError(f"{len(empty)} class folder(s) of {split_dir} have no images "
                                      f"({', '.join(empty[:5])}): the tree is partial, re-extract it")
    else:
        files, labels, classes = _flat_val(root, split_dir, classes, val_labels)
    if expect_classes is not None and len(classes) != expect_classes:
        raise ImageNetLayoutError(f"{root} has {len(classes)} classes, expected {expect_classes}")
    if not files:
        raise ImageNetLayoutError(f"{split_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return FolderSource(split_dir, files, labels, classes)


def _find_label_file(root, val_labels):
    if val_labels is not None:
        if not os.path.exists(val_labels):
            raise ImageNetLayoutError(f"val_labels file {val_labels} does not exist")
        return val_labels
    ancestors = [root]
    for _ in range(3):
        ancestors.append(os.path.dirname(ancestors[-1]))
    for directory in ancestors:
        if os.path.isfile(os.path.join(directory, LOC_CSV)):
            return os.path.join(directory, LOC_CSV)
    for directory in ancestors[:2]:
        for candidate in (os.path.join(directory, DEVKIT_DIR, DEVKIT_TRUTH), os.path.join(directory, DEVKIT_TAR)):
            if os.path.isfile(candidate):
                return candidate
    raise ImageNetLayoutError(
        f"{os.path.join(root, 'val')} is flat (no class folders) and no label file was found: put "
        f"{LOC_CSV} (Kaggle) in {root} or a parent, or the devkit ({DEVKIT_TAR} or {DEVKIT_DIR}/) in {root}, "
        f"or pass val_labels=, or sort val/ into class folders")


def read_loc_csv(path):
    """LOC_val_solution.csv -> {image id: wnid} (first box's wnid; all boxes share the class)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["ImageId", "PredictionString"]:
        raise ImageNetLayoutError(f"{path} is not a LOC_val_solution.csv (header ImageId,PredictionString)")
    labels = {}
    for line, row in enumerate(rows[1:], start=2):
        tokens = row[1].split() if len(row) > 1 else []
        if not tokens or not WNID.match(tokens[0]):
            raise ImageNetLayoutError(f"{path} line {line}: expected '<image id>,<wnid> x y x y ...', got {row}")
        labels[row[0]] = tokens[0]
    return labels


def devkit_labels(ground_truth_ids, id_to_wnid):
    """Devkit ground truth -> {image id: wnid}: line k (1-based) holds the ILSVRC2012_ID of
    ILSVRC2012_val_{k:08d}; id_to_wnid maps the devkit IDs (meta.mat order) to wnids."""
    labels = {}
    for k, class_id in enumerate(ground_truth_ids, start=1):
        if class_id not in id_to_wnid:
            raise ImageNetLayoutError(f"devkit ground truth line {k}: ILSVRC2012_ID {class_id} is not in meta.mat")
        labels[f"ILSVRC2012_val_{k:08d}"] = id_to_wnid[class_id]
    return labels


def _read_meta_mat(file):
    """meta.mat's leaf synsets (num_children == 0) -> {ILSVRC2012_ID: wnid}."""
    try:
        from scipy.io import loadmat
    except ImportError as error:
        raise ImageNetLayoutError("reading the devkit's meta.mat needs scipy (pip install scipy); or use "
                                  f"{LOC_CSV}, or sort val/ into class folders") from error
    synsets = loadmat(file, squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def _read_devkit(path):
    if path.endswith(".tar.gz"):
        with tarfile.open(path) as tar:
            def member(name):
                return tar.extractfile(f"ILSVRC2012_devkit_t12/data/{name}").read()
            truth, meta = member(DEVKIT_TRUTH).decode(), io.BytesIO(member("meta.mat"))
            id_to_wnid = _read_meta_mat(meta)
    else:
        with open(path) as f:
            truth = f.read()
        meta = os.path.join(os.path.dirname(path), "meta.mat")
        if not os.path.isfile(meta):
            raise ImageNetLayoutError(f"{meta} is missing: the devkit ground truth needs meta.mat beside it")
        id_to_wnid = _read_meta_mat(meta)
    return devkit_labels([int(t) for t in truth.split()], id_to_wnid)


def _flat_val(root, split_dir, classes, val_labels):
    path = _find_label_file(root, val_labels)
    by_id = read_loc_csv(path) if path.endswith(".csv") else _read_devkit(path)
    names = sorted(n for n in os.listdir(split_dir) if _is_image(n))
    on_disk = {os.path.splitext(n)[0]: n for n in names}
    if unlabelled := sorted(set(on_disk) - set(by_id)):
        raise ImageNetLayoutError(f"{len(unlabelled)} image(s) in {split_dir} have no label in {path} "
                                  f"(e.g. {unlabelled[:3]}): wrong label file?")
    if missing := sorted(set(by_id) - set(on_disk)):
        raise ImageNetLayoutError(f"{len(missing)} of the {len(by_id)} images labelled in {path} are missing from "
                                  f"{split_dir} (e.g. {missing[:3]}): the tree is partial, re-extract val/")
    if classes is None:
        classes = sorted(set(by_id.values()))
    index = {wnid: k for k, wnid in enumerate(classes)}
    if unknown := sorted(set(by_id.values()) - set(index)):
        raise ImageNetLayoutError(f"{path} names classes that train/ lacks: {unknown[:5]}")
    # ImageFolder order: by class, then by file name
    pairs = sorted((index[by_id[stem]], name) for stem, name in on_disk.items())
    return [name for _, name in pairs], [label for label, _ in pairs], classes


# ---------------------------------------------------------------------------------------------------
# ImageNetData: the trainer's entry point
# ---------------------------------------------------------------------------------------------------

class ImageNetData:
    """Batches of an ImageNet source for training or evaluation.

    train=True: DeiT's augmentation (transform: augment.TrainTransform, batch_augment:
    augment.BatchAugment; pass your own to switch parts off, or augment=False for neither), epoch
    order Generator([seed, 0, epoch]).permutation. train=False: augment.EvalTransform, in order.

    batches(batch_size, seed, epoch, start_step) -> iterator of (x float32 (B, 3, S, S) normalised,
    targets): int64 (B,) labels, or float32 (B, num_classes) soft targets while mixup/cutmix is on.
    The decode workers start at the first batches() and stay until close() (or ``with``).
    part=(lo, hi): a data-parallel rank's positions of every global batch; its images equal those
    positions of the single-process batch, while mixup/cutmix pairs images within the part (as DeiT
    on several GPUs, each mixing its own batch).
    """

    def __init__(self, source, train, image_size=224, augment=True, transform=None, batch_augment=None,
                 num_workers=2, draft=True, start_method="spawn"):
        self.source, self.train, self.image_size = source, train, image_size
        self.num_classes = len(source.classes)
        if transform is None:
            if not train:
                transform = EvalTransform(size=image_size, draft=draft)
            elif augment:
                transform = TrainTransform(size=image_size, draft=draft)
            else:  # the plain random-resized-crop + flip baseline
                transform = TrainTransform(size=image_size, rand_augment=None, draft=draft)
        if batch_augment is None:
            batch_augment = BatchAugment(
                num_classes=self.num_classes,
                **({} if train and augment else dict(erase_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)))
        self.transform, self.batch_augment = transform, batch_augment
        self.num_workers, self.start_method = num_workers, start_method
        self._loader = None

    @classmethod
    def from_split(cls, split, root=None, hub=False, image_size=224, **kwargs):
        """The split ('train' or 'val') of the tree at root, or of the hub dataset (hub=True);
        train=True for 'train'. kwargs go to ImageNetData (augment, num_workers, draft, ...)."""
        if (root is None) == (not hub):
            raise ValueError("give either root (a local ImageNet tree) or hub=True (ILSVRC/imagenet-1k)")
        source = hub_source(split) if hub else folder_source(root, split)
        return cls(source, train=split == "train", image_size=image_size, **kwargs)

    def __len__(self):
        return len(self.source)

    def steps_per_epoch(self, batch_size, drop_last=None):
        return loader.steps_in_epoch(len(self), batch_size, self.train if drop_last is None else drop_last)

    def order(self, seed, epoch):
        if self.train:
            return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(len(self))
        return np.arange(len(self))

    def raw_batches(self, batch_size, seed, epoch, start_step=0, drop_last=None, part=None):
        """(step, uint8 (n, S, S, 3) view into shared memory, int64 labels) per step."""
        for name, value in (("seed", seed), ("epoch", epoch)):
            if not (isinstance(value, (int, np.integer)) and value >= 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self._loader is None or self._loader.batch_size != batch_size:
            self.close()
            self._loader = loader.BatchLoader(self.source, self.transform, batch_size, self.image_size,
                                              self.num_workers, start_method=self.start_method)
        drop_last = self.train if drop_last is None else drop_last
        return self._loader.batches(self.order(seed, epoch), seed, epoch, start_step, drop_last, part)

    def batches(self, batch_size, seed, epoch, start_step=0, drop_last=None, part=None):
        first = 0 if part is None else part[0]
        for step, images, labels in self.raw_batches(batch_size, seed, epoch, start_step, drop_last, part):
            if self.train:
                yield self.batch_augment(images, labels, seed, epoch, step, first)
            else:
                yield normalize(images, self.batch_augment.mean, self.batch_augment.std), labels

    def close(self):
        if self._loader is not None:
            self._loader.close()
            self._loader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
