"""minibvit.imagenet: the folder layouts (train, val as class folders / flat with LOC csv or devkit),
the hub dataset (a local datasets.Dataset, no network), errors for missing/partial trees, and
ImageNetData end to end with resume exactness."""
import os
import shutil
import tarfile

import numpy as np
import pytest

from jpeg_tree import WNIDS, make_tree, write_jpeg, write_loc_csv
from minibvit import augment as A
from minibvit import imagenet
from minibvit.imagenet import ImageNetData, ImageNetLayoutError
from minibvit.loader import decode_batch

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

SIZE = 24


def image_folder_order(split_dir):
    """torchvision ImageFolder's (path, class index), written out independently."""
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    samples = []
    for k, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(split_dir, c))):
            samples += [(os.path.join(dirpath, n), k) for n in sorted(names) if n.lower().endswith((".jpeg", ".jpg"))]
    return classes, samples


@pytest.fixture
def tree(tmp_path):
    make_tree(str(tmp_path), per_class=3)
    return str(tmp_path)


def test_train_and_val_folders_follow_image_folder_order(tree):
    # an unsorted extra file and a nested folder: ImageFolder's walk order must still hold
    write_jpeg(os.path.join(tree, "train", WNIDS[1], "a_first.jpg"), 30, 30, 99)
    write_jpeg(os.path.join(tree, "train", WNIDS[2], "sub", "z.JPEG"), 30, 30, 98)
    open(os.path.join(tree, "train", WNIDS[0], "notes.txt"), "w").close()
    for split in ("train", "val"):
        src = imagenet.folder_source(tree, split)
        classes, samples = image_folder_order(os.path.join(tree, split))
        assert src.classes == tuple(classes) == WNIDS
        assert [src.open(i) for i in range(len(src))] == [p for p, _ in samples]
        np.testing.assert_array_equal(src.labels, [k for _, k in samples])


def test_val_classes_follow_train_even_when_val_lacks_one(tree):
    shutil.rmtree(os.path.join(tree, "val", WNIDS[0]))
    val = imagenet.folder_source(tree, "val")
    assert val.classes == WNIDS and set(val.labels) == {1, 2}


def test_flat_val_with_loc_csv(tmp_path):
    truth = make_tree(str(tmp_path), val="flat")
    kaggle = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"  # Kaggle: csv three levels above the root
    kaggle.mkdir(parents=True)
    for split in ("train", "val"):
        shutil.move(str(tmp_path / split), str(kaggle / split))
    write_loc_csv(str(tmp_path / "LOC_val_solution.csv"), truth)
    src = imagenet.folder_source(str(kaggle), "val")
    names = [os.path.basename(src.open(i)) for i in range(len(src))]
    assert [WNIDS[k] for k in src.labels] == [truth[n.split(".")[0]] for n in names]
    assert list(src.labels) == sorted(src.labels)  # ImageFolder order: by class, then file name
    assert len(src) == len(truth)


def test_devkit_ground_truth_maps_ids_through_meta_order():
    # devkit class IDs are in meta.mat's (WordNet) order, not sorted-wnid order
    id_to_wnid = {1: WNIDS[2], 2: WNIDS[0], 3: WNIDS[1]}
    labels = imagenet.devkit_labels([3, 1, 1, 2], id_to_wnid)
    assert labels == {"ILSVRC2012_val_00000001": WNIDS[1], "ILSVRC2012_val_00000002": WNIDS[2],
                      "ILSVRC2012_val_00000003": WNIDS[2], "ILSVRC2012_val_00000004": WNIDS[0]}
    with pytest.raises(ImageNetLayoutError, match="ILSVRC2012_ID 7"):
        imagenet.devkit_labels([7], id_to_wnid)


def test_devkit_files_with_meta_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    truth = make_tree(str(tmp_path), val="flat")
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    meta_order = [WNIDS[2], WNIDS[0], WNIDS[1]]
    synsets = np.array([(k + 1, w, 0) for k, w in enumerate(meta_order)] + [(1001, "n00000001", 2)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    scipy_io.savemat(str(data / "meta.mat"), {"synsets": synsets})
    (data / imagenet.DEVKIT_TRUTH).write_text("".join(f"{meta_order.index(truth[i]) + 1}\n" for i in sorted(truth)))
    src = imagenet.folder_source(str(tmp_path), "val")
    assert [WNIDS[k] for k in src.labels] == [truth[os.path.basename(src.open(i))[:-5]] for i in range(len(src))]
    # torchvision's layout: the devkit tarball beside train/ and val/
    with tarfile.open(tmp_path / imagenet.DEVKIT_TAR, "w:gz") as tar:
        tar.add(str(tmp_path / "ILSVRC2012_devkit_t12"), arcname="ILSVRC2012_devkit_t12")
    shutil.rmtree(tmp_path / "ILSVRC2012_devkit_t12")
    from_tar = imagenet.folder_source(str(tmp_path), "val")
    np.testing.assert_array_equal(from_tar.labels, src.labels)
    assert list(from_tar.files) == list(src.files)


def test_layout_errors(tmp_path):
    with pytest.raises(ImageNetLayoutError, match="does not exist"):
        imagenet.folder_source(str(tmp_path / "nowhere"), "train")
    with pytest.raises(ImageNetLayoutError, match="train/<wnid>"):
        imagenet.folder_source(str(tmp_path), "train")
    with pytest.raises(ValueError, match="split"):
        imagenet.folder_source(str(tmp_path), "test")
    truth = make_tree(str(tmp_path), val="flat")
    with pytest.raises(ImageNetLayoutError, match="no label file"):
        imagenet.folder_source(str(tmp_path), "val")
    csv = str(tmp_path / "LOC_val_solution.csv")
    write_loc_csv(csv, {k: v for k, v in truth.items() if k != "ILSVRC2012_val_00000002"})
    with pytest.raises(ImageNetLayoutError, match="have no label"):
        imagenet.folder_source(str(tmp_path), "val")
    write_loc_csv(csv, dict(truth, ILSVRC2012_val_00000099=WNIDS[0]))
    with pytest.raises(ImageNetLayoutError, match="partial"):
        imagenet.folder_source(str(tmp_path), "val")
    write_loc_csv(csv, dict(truth, ILSVRC2012_val_00000001="n09999999"))
    with pytest.raises(ImageNetLayoutError, match="train/ lacks"):
        imagenet.folder_source(str(tmp_path), "val")
    with open(csv, "w") as f:
        f.write("id,label\n")
    with pytest.raises(ImageNetLayoutError, match="not a LOC_val_solution"):
        imagenet.folder_source(str(tmp_path), "val")
    with pytest.raises(ImageNetLayoutError, match="expected 1000"):
        imagenet.folder_source(str(tmp_path), "train", expect_classes=1000)
    for name in os.listdir(tmp_path / "train" / WNIDS[1]):
        os.remove(tmp_path / "train" / WNIDS[1] / name)
    with pytest.raises(ImageNetLayoutError, match=f"partial.*|{WNIDS[1]}"):
        imagenet.folder_source(str(tmp_path), "train")
    os.makedirs(tmp_path / "train" / "cats")
    with pytest.raises(ImageNetLayoutError, match="not wnids"):
        imagenet.folder_source(str(tmp_path), "train")


def test_val_class_folder_unknown_to_train(tree):
    os.rename(os.path.join(tree, "val", WNIDS[0]), os.path.join(tree, "val", "n09999999"))
    with pytest.raises(ImageNetLayoutError, match="missing from train"):
        imagenet.folder_source(tree, "val")


def hub_dataset(tree, split):
    datasets = pytest.importorskip("datasets")
    folder = imagenet.folder_source(tree, split)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(folder.classes))})
    ds = datasets.Dataset.from_dict({"image": [folder.open(i) for i in range(len(folder))],
                                     "label": folder.labels.tolist()}, features=features)
    return folder, ds


def test_hub_source_reads_the_same_images(tree):
    folder, ds = hub_dataset(tree, "train")
    hub = imagenet.hub_source("train", dataset=ds)
    assert hub.classes == folder.classes and len(hub) == len(folder)
    np.testing.assert_array_equal(hub.labels, folder.labels)
    transform = A.TrainTransform(size=SIZE)
    for i in range(len(hub)):
        a = transform(hub.open(i), np.random.default_rng(i))
        b = transform(folder.open(i), np.random.default_rng(i))
        np.testing.assert_array_equal(a, b)
    # in-memory bytes too (a dataset whose images are embedded, as the hub's parquet files)
    embedded = ds.cast_column("image", __import__("datasets").Image(decode=False)).map(
        lambda row: {"image": {"bytes": open(row["image"]["path"], "rb").read(), "path": None}})
    hub_bytes = imagenet.hub_source("train", dataset=embedded)
    # through a worker process (the source is pickled to it) the batches equal the folder's
    with ImageNetData(hub_bytes, train=True, image_size=SIZE, num_workers=1) as from_hub:
        order = from_hub.order(4, 1)
        for step, images, labels in from_hub.raw_batches(3, seed=4, epoch=1):
            indices = order[3 * step:3 * step + 3]
            np.testing.assert_array_equal(images, decode_batch(folder, from_hub.transform, indices, 4, 1, step))
            np.testing.assert_array_equal(labels, folder.labels[indices])


def test_hub_errors(tree, monkeypatch):
    datasets = pytest.importorskip("datasets")
    _, ds = hub_dataset(tree, "train")
    with pytest.raises(ImageNetLayoutError, match="no column"):
        imagenet.hub_source("train", dataset=ds.rename_column("label", "y"))
    unlabelled = ds.cast_column("label", datasets.Value("int64")).map(lambda row: {"label": -1})
    with pytest.raises(ImageNetLayoutError, match="validation split"):
        imagenet.hub_source("train", dataset=unlabelled)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ImageNetLayoutError, match="huggingface-cli login"):
        imagenet.hub_source("val")


def test_imagenet_data_train_resume_exact_and_eval(tree):
    src = imagenet.folder_source(tree, "train")
    with ImageNetData(src, train=True, image_size=SIZE, num_workers=2) as two, \
            ImageNetData(src, train=True, image_size=SIZE, num_workers=1) as one:
        assert two.steps_per_epoch(2) == 4 and len(two) == 9
        full = [(x.copy(), t.copy()) for x, t in two.batches(2, seed=1, epoch=3)]
        resumed = [(x.copy(), t.copy()) for x, t in one.batches(2, seed=1, epoch=3, start_step=2)]
        for (x1, t1), (x2, t2) in zip(full[2:], resumed):
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(t1, t2)
        x, t = full[0]
        assert x.dtype == np.float32 and x.shape == (2, 3, SIZE, SIZE)
        assert t.dtype == np.float32 and t.shape == (2, 3)
        np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
        # the epoch permutation is Generator([seed, 0, epoch]), as minibvit.data
        order = np.random.default_rng([1, 0, 3]).permutation(9)
        _, raw, labels = next(iter(two.raw_batches(2, seed=1, epoch=3)))
        np.testing.assert_array_equal(labels, src.labels[order[:2]])
    val = imagenet.folder_source(tree, "val")
    with ImageNetData(val, train=False, image_size=SIZE, num_workers=1) as data:
        batches = list(data.batches(4, seed=0, epoch=0))
        assert [len(y) for _, y in batches] == [4, 2]  # evaluation keeps the short batch, in order
        np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), val.labels)
        first = A.normalize(np.stack([A.EvalTransform(SIZE)(val.open(i)) for i in range(4)]))
        np.testing.assert_array_equal(batches[0][0], first)


def test_imagenet_data_switches_and_bad_arguments(tree):
    with ImageNetData.from_split("train", root=tree, image_size=SIZE, augment=False, num_workers=1) as data:
        assert data.train and data.num_classes == 3
        x, y = next(iter(data.batches(3, seed=0, epoch=0)))
        assert y.dtype == np.int64 and y.shape == (3,)  # no mixing: integer labels
        assert data.transform.rand_augment is None and data.batch_augment.erase_prob == 0
        with pytest.raises(ValueError, match="seed"):
            next(iter(data.batches(3, seed=-1, epoch=0)))
        with pytest.raises(ValueError, match="start_step"):
            next(iter(data.batches(3, seed=0, epoch=0, start_step=99)))
        with pytest.raises(ValueError, match="batch_size"):
            next(iter(data.batches(0, seed=0, epoch=0)))
    assert not ImageNetData.from_split("val", root=tree).train
    with pytest.raises(ValueError, match="either root"):
        ImageNetData.from_split("val")
