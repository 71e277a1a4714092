"""--dataset cifar100 offline: a tiny cifar-100-python directory (the real files' pickle keys) made at
test time, read through the restricted unpickler, and a 2-step training run on it; the hub path with a
stand-in for datasets.load_dataset."""
import json
import os
import pickle

import numpy as np
import pytest

from minibvit import data, train
from minibvit.data import DatasetError
from test_data import _py2_pickle as py2_pickle  # protocol 2 as Python 2's cPickle wrote the real files

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

SIZES = {"train": 40, "test": 12}


def write_cifar100(directory, sizes=SIZES, seed=0):
    """A cifar-100-python directory with the real files' keys (byte strings, as Python 2 wrote them):
    train / test {filenames, batch_label, fine_labels, coarse_labels, data} and meta {fine_label_names,
    coarse_label_names}. Returns {split: (rows (N, 3072) uint8, fine labels)}."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in sizes.items():
        rows = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, count).tolist()
        content = {b"filenames": [f"img{i}.png".encode() for i in range(count)],
                   b"batch_label": f"{split}ing batch 1 of 1".encode(), b"fine_labels": fine,
                   b"coarse_labels": [label // 5 for label in fine], b"data": rows}
        (directory / split).write_bytes(py2_pickle(content))
        written[split] = (rows, fine)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (directory / "meta").write_bytes(py2_pickle(meta))
    return written


@pytest.fixture
def no_hub(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise AssertionError(f"the hub must not be used here: load_dataset{args}")

    monkeypatch.setattr(datasets, "load_dataset", fail)


def test_cifar100_python_files(tmp_path, no_hub):
    written = write_cifar100(tmp_path / "cifar-100-python")
    for split in ("train", "test"):
        for where in (tmp_path, tmp_path / "cifar-100-python"):  # the parent or the directory itself
            dataset = data.load_dataset("cifar100", split, data_dir=where)
            rows, fine = written[split]
            assert dataset.images.shape == (len(rows), 32, 32, 3) and dataset.num_classes == 100
            np.testing.assert_array_equal(dataset.images.transpose(0, 3, 1, 2).reshape(len(rows), -1), rows)
            np.testing.assert_array_equal(dataset.labels, fine)  # the fine labels, not the coarse ones
            assert dataset.class_names[:2] == ("fine0", "fine1") and dataset.name == "cifar100"
            np.testing.assert_array_equal(dataset.mean, data.CIFAR100_MEAN)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    assert data.load_dataset("cifar100", "test", data_dir=tmp_path).class_names == data.CIFAR100_CLASSES
    assert data.CIFAR100_CLASSES[:3] == ("apple", "aquarium_fish", "baby") and len(set(data.CIFAR100_CLASSES)) == 100


def test_cifar100_bad_files_are_refused(tmp_path, no_hub):
    with pytest.raises(DatasetError, match=r"no CIFAR-100 batches in .*expected train and test \(python format, "
                                           r"cifar-100-python\)"):
        data.load_dataset("cifar100", "train", data_dir=tmp_path)
    directory = tmp_path / "cifar-100-python"
    write_cifar100(directory)
    (directory / "test").unlink()
    with pytest.raises(DatasetError, match="lacks test; the test split needs test"):
        data.load_dataset("cifar100", "test", data_dir=tmp_path)
    bad = {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}
    (directory / "test").write_bytes(py2_pickle(bad))
    with pytest.raises(DatasetError, match=r"CIFAR-100 labels .* must be in 0\.\.99, found 0\.\.100"):
        data.load_dataset("cifar100", "test", data_dir=tmp_path)
    (directory / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match="'fine_labels' must be a list of 2 class indices"):
        data.load_dataset("cifar100", "test", data_dir=tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (directory / "test").write_bytes(py2_pickle({b"data": Exploit(), b"fine_labels": [0]}))
    with pytest.raises(DatasetError, match=r"not a readable CIFAR-100 python batch.*refusing global"):
        data.load_dataset("cifar100", "test", data_dir=tmp_path)
    assert not marker.exists()
    write_cifar100(tmp_path / "other" / "cifar-100-python")
    (tmp_path / "other" / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a"]}))
    with pytest.raises(DatasetError, match="should list the 100 CIFAR-100 class names"):
        data.load_dataset("cifar100", "test", data_dir=tmp_path / "other")


def test_cifar100_from_the_hub_uses_the_fine_labels(monkeypatch):
    import datasets
    from PIL import Image

    asked = []
    rng = np.random.default_rng(3)
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=list(data.CIFAR100_CLASSES)),
                                  "coarse_label": datasets.ClassLabel(num_classes=20)})
    pixels = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    table = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "fine_label": [99, 0, 5, 42],
                                        "coarse_label": [1, 2, 3, 4]}, features=features)

    def load(repository, split):
        asked.append((repository, split))
        return table

    monkeypatch.setattr(datasets, "load_dataset", load)
    dataset = data.load_dataset("cifar100", "test")
    assert asked == [("uoft-cs/cifar100", "test")]
    np.testing.assert_array_equal(dataset.labels, [99, 0, 5, 42])
    np.testing.assert_array_equal(dataset.images, pixels)
    assert dataset.num_classes == 100 and dataset.class_names == data.CIFAR100_CLASSES


def test_two_training_steps_on_a_local_cifar100(tmp_path, no_hub):
    write_cifar100(tmp_path / "data" / "cifar-100-python")
    cfg = train.TrainConfig(dataset="cifar100", data_dir=str(tmp_path / "data"), method="fp", embed_dim=16, depth=1,
                            num_heads=2, patch_size=8, batch_size=16, eval_batch_size=64, epochs=1, max_steps=2,
                            out=str(tmp_path / "run"))
    resolved = train.resolve_config(cfg)
    assert (resolved.model, resolved.augment, resolved.lr) == ("cifar", "crop-flip", 1e-3)
    results = train.run(cfg)
    path, acc = results["fp"]
    stage_dir = os.path.dirname(path)
    records = [json.loads(line) for line in open(os.path.join(stage_dir, "log.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [0, 1] and 0 <= acc <= 1
    saved = json.load(open(os.path.join(stage_dir, "config.json")))
    assert saved["dataset"]["name"] == "cifar100" and saved["model_config"]["num_classes"] == 100
    model, _ = train.load_model(path)
    assert model.params["head.weight"].shape[0] == 100
