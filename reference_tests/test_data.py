"""Tests of minibvit.data: every dataset source from small generated files, the restricted CIFAR
unpickler, the hub path on an in-memory `datasets.Dataset` (never the network), limited-data
subsets, and deterministic, resumable, vectorised batching and augmentation."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from minibvit import data
from minibvit.data import DatasetError

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

datasets = pytest.importorskip("datasets", reason="the hub code path is tested with datasets.Dataset")

# ---------------------------------------------------------------------------------------------
# File writers


class _Py2StylePickler(pickle._Pickler):
    """Writes protocol-2 pickles the way Python 2's cPickle wrote the CIFAR-10 batches: strings as
    (SHORT_)BINSTRING and numpy's _reconstruct under its old module name numpy.core.multiarray."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str

    def save_global(self, obj, name=None):
        if obj is np.ndarray((0,)).__reduce__()[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _py2_pickle(obj):
    import io

    buffer = io.BytesIO()
    _Py2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _cifar_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def _write_cifar_py(directory, sizes=(3, 2, 4, 1, 2), test_size=3, style="py2"):
    """A cifar-10-batches-py directory; returns the (train, test) rows and labels written."""
    directory.mkdir(parents=True)
    dump = _py2_pickle if style == "py2" else (lambda obj: pickle.dumps(obj, protocol=4))
    key = (lambda k: k.encode()) if style == "py2" else (lambda k: k)
    written = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        rows, labels = [], []
        for i, name in enumerate(names):
            count = sizes[i] if split == "train" else test_size
            batch_rows, batch_labels = _cifar_arrays(count, seed=len(rows) + 10 * (split == "test"))
            content = {key("batch_label"): key(f"{name} of 5"), key("labels"): batch_labels,
                       key("data"): batch_rows, key("filenames"): [key(f"img{j}.png") for j in range(count)]}
            (directory / name).write_bytes(dump(content))
            rows.append(batch_rows)
            labels.extend(batch_labels)
        written[split] = (np.concatenate(rows), np.array(labels))
    names = [key(n) for n in ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    (directory / "batches.meta").write_bytes(dump({key("label_names"): names, key("num_vis"): 3072}))
    return written


def _write_cifar_bin(directory, written):
    directory.mkdir(parents=True)
    splits = (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"]))
    for split, names in splits:
        rows, labels = written[split]
        chunks = np.array_split(np.arange(len(rows)), len(names))
        for name, chunk in zip(names, chunks):
            records = np.concatenate([labels[chunk, None].astype(np.uint8), rows[chunk]], axis=1)
            (directory / name).write_bytes(records.tobytes())
    (directory / "batches.meta.txt").write_text("\n".join(data.CIFAR10_CLASSES) + "\n\n")


def _idx_bytes(array):
    type_code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_fashion(directory, n_train=30, n_test=20, compress=True, size=28):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            raw = _idx_bytes(array)
            if compress:
                (directory / (stem + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (directory / stem).write_bytes(raw)
        arrays[prefix] = (images, labels)
    return arrays


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def no_hub(monkeypatch):
    """Make any attempt to reach the hub fail the test."""
    def fail(*args, **kwargs):
        raise AssertionError(f"the hub must not be used here: load_dataset{args}")
    monkeypatch.setattr(datasets, "load_dataset", fail)


# ---------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar_python_batches(tmp_path, no_hub, style):
    written = _write_cifar_py(tmp_path / "cifar-10-batches-py", style=style)
    for split in ("train", "test"):
        dataset = data.load_dataset("cifar10", split, data_dir=tmp_path)  # the parent directory
        rows, labels = written[split]
        assert dataset.images.shape == (len(rows), 32, 32, 3)
        # pixel (r, c) of channel ch is byte ch * 1024 + r * 32 + c of the row
        np.testing.assert_array_equal(dataset.images[:, 5, 7, 2], rows[:, 2 * 1024 + 5 * 32 + 7])
        np.testing.assert_array_equal(dataset.images.transpose(0, 3, 1, 2).reshape(len(rows), -1), rows)
        np.testing.assert_array_equal(dataset.labels, labels)
        assert dataset.labels.dtype == np.int64 and dataset.images.flags.c_contiguous
        assert dataset.class_names[:2] == ("plane", "car")
        np.testing.assert_allclose(dataset.mean, data.CIFAR10_MEAN)
    direct = data.load_dataset("cifar10", "test", data_dir=tmp_path / "cifar-10-batches-py")
    np.testing.assert_array_equal(direct.images, dataset.images)


def test_cifar_py2_emulation_matches_the_real_format():
    # the real batches start with a dict whose first global is numpy.core.multiarray._reconstruct
    raw = _py2_pickle({b"data": np.zeros((1, 3072), np.uint8)})
    assert raw.startswith(b"\x80\x02}") and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    assert b"_codecs" not in raw and b"X" not in raw[:40]


def test_cifar_binary_batches_match_python_batches(tmp_path, no_hub):
    written = _write_cifar_py(tmp_path / "py" / "cifar-10-batches-py")
    _write_cifar_bin(tmp_path / "bin" / "cifar-10-batches-bin", written)
    for split in ("train", "test"):
        from_py = data.load_dataset("cifar10", split, data_dir=tmp_path / "py")
        from_bin = data.load_dataset("cifar10", split, data_dir=tmp_path / "bin")
        np.testing.assert_array_equal(from_bin.images, from_py.images)
        np.testing.assert_array_equal(from_bin.labels, from_py.labels)
        assert from_bin.class_names == data.CIFAR10_CLASSES


def test_cifar_binary_truncated(tmp_path):
    written = _write_cifar_py(tmp_path / "py")
    directory = tmp_path / "cifar-10-batches-bin"
    _write_cifar_bin(directory, written)
    path = directory / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="3073-byte"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_malicious_batch(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    _write_cifar_py(directory)
    marker = tmp_path / "pwned"
    payload = {b"data": _Exploit(marker), b"labels": [0]}
    (directory / "test_batch").write_bytes(pickle.dumps(payload, protocol=3))
    with pytest.raises(DatasetError, match=r"refusing global (posix|os|nt)\.system"):
        data.load_dataset("cifar10", "test", data_dir=directory)
    assert not marker.exists(), "the malicious pickle was executed"
    for protocol in (0, 2, 4, 5):
        (directory / "test_batch").write_bytes(pickle.dumps({"x": _Exploit(marker)}, protocol=protocol))
        with pytest.raises(DatasetError, match="refusing global"):
            data.read_cifar_batch(directory / "test_batch")
    (directory / "test_batch").write_bytes(pickle.dumps({"x": eval}, protocol=4))
    with pytest.raises(DatasetError, match="builtins.eval"):
        data.read_cifar_batch(directory / "test_batch")
    assert not marker.exists()
    for protocol in (4, 5):  # an object array would carry pickled objects inside the batch
        (directory / "test_batch").write_bytes(pickle.dumps({"x": np.array([1, "a"], dtype=object)},
                                                            protocol=protocol))
        with pytest.raises(DatasetError, match="refusing dtype object"):
            data.read_cifar_batch(directory / "test_batch")


def test_cifar_bad_directories(tmp_path, no_hub):
    with pytest.raises(DatasetError, match="not a directory"):
        data.load_dataset("cifar10", "train", data_dir=tmp_path / "absent")
    with pytest.raises(DatasetError, match="cifar-10-batches-py.*cifar-10-batches-bin"):
        data.load_dataset("cifar10", "train", data_dir=tmp_path)
    directory = tmp_path / "cifar-10-batches-py"
    _write_cifar_py(directory)
    (directory / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match="lacks data_batch_4"):
        data.load_dataset("cifar10", "train", data_dir=tmp_path)
    (directory / "test_batch").write_bytes(_py2_pickle({b"data": np.zeros((2, 100), np.uint8),
                                                        b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"uint8 array \(N, 3072\)"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path)
    (directory / "test_batch").write_bytes(_py2_pickle({b"data": np.zeros((2, 3072), np.uint8)})[:-30])
    with pytest.raises(DatasetError, match="not a readable CIFAR-10 python batch"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path)
    (directory / "test_batch").write_bytes(_py2_pickle({b"data": np.zeros((2, 3072), np.uint8),
                                                        b"labels": [0, 10]}))
    with pytest.raises(DatasetError, match="0..9"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# IDX files and Fashion-MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, no_hub, compress):
    arrays = _write_fashion(tmp_path, compress=compress)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        dataset = data.load_dataset("fashion-mnist", split, data_dir=tmp_path)
        images, labels = arrays[prefix]
        np.testing.assert_array_equal(dataset.images, images[..., None])
        np.testing.assert_array_equal(dataset.labels, labels)
        assert dataset.class_names == data.FASHION_MNIST_CLASSES and dataset.num_classes == 10
        assert dataset.mean.shape == (1,)


def test_read_idx_other_types_and_errors(tmp_path):
    values = np.arange(-6, 6, dtype=">i4").reshape(2, 3, 2)
    path = tmp_path / "values.idx"
    path.write_bytes(_idx_bytes(values))
    result = data.read_idx(path)
    np.testing.assert_array_equal(result, values)
    assert result.dtype == np.int32 and result.dtype.isnative

    raw = _idx_bytes(np.zeros((4, 5, 5), np.uint8))
    cases = {
        "truncated": raw[:-1],
        "longer than its header": raw + b"\0",
        "truncated IDX header": raw[:9],
        "not an IDX file": b"\x01\x02" + raw[2:],
    }
    for expected, content in cases.items():
        path.write_bytes(content)
        with pytest.raises(DatasetError, match=expected):
            data.read_idx(path)
    path.write_bytes(b"\x00\x00\x07\x01" + raw[4:])  # unknown type byte
    with pytest.raises(DatasetError, match="magic number 00000701"):
        data.read_idx(path)
    path.write_bytes(gzip.compress(raw[:-3]))
    with pytest.raises(DatasetError, match="truncated"):
        data.read_idx(path)
    path.write_bytes(gzip.compress(raw)[:-10])  # the gzip stream itself is cut
    with pytest.raises(DatasetError, match="corrupt or truncated gzip"):
        data.read_idx(path)


def test_fashion_mnist_errors(tmp_path, no_hub):
    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]"):
        data.load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(DatasetError, match="N labels"):
        data.load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    raw = (tmp_path / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        data.load_dataset("fashion-mnist", "train", data_dir=tmp_path)


@pytest.mark.skipif(not os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_package(no_hub):
    test = data.load_dataset("fashion-mnist", "test")
    assert test.images.shape == (10000, 28, 28, 1) and np.bincount(test.labels).tolist() == [1000] * 10
    train = data.load_dataset("fashion-mnist", "train", limit_per_class=3)
    assert train.images.shape == (30, 28, 28, 1)
    full = data.read_idx(os.path.join(data.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
    mean, std = data.channel_stats(full[..., None])
    np.testing.assert_allclose(mean, data.FASHION_MNIST_MEAN, atol=1e-7)
    np.testing.assert_allclose(std, data.FASHION_MNIST_STD, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The Hugging Face path, on in-memory datasets


def _hf_dataset(n, image_column, mode, names=None, size=8):
    rng = np.random.default_rng(n)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]
    labels = [i % len(names or "abc") for i in range(n)]
    features = datasets.Features({
        image_column: datasets.Image(),
        "label": datasets.ClassLabel(names=names) if names else datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({image_column: [Image.fromarray(a) for a in arrays], "label": labels},
                                    features=features)
    return ds, np.stack(arrays), np.array(labels)


def test_from_hf_dataset_rgb_and_grayscale():
    ds, arrays, labels = _hf_dataset(7, "img", "RGB", names=["a", "b", "c"])
    images, got_labels, class_names = data.from_hf_dataset(ds, "img", "label")
    np.testing.assert_array_equal(images, arrays)
    np.testing.assert_array_equal(got_labels, labels)
    assert images.dtype == np.uint8 and got_labels.dtype == np.int64 and class_names == ("a", "b", "c")

    ds, arrays, labels = _hf_dataset(5, "image", "L")
    images, got_labels, class_names = data.from_hf_dataset(ds, "image", "label")
    np.testing.assert_array_equal(images, arrays[..., None])
    assert class_names == ("0", "1", "2")
    with pytest.raises(DatasetError, match=r"no column 'img'.*\['image', 'label'\]"):
        data.from_hf_dataset(ds, "img", "label")


def test_hub_path_through_load_dataset(monkeypatch, tmp_path):
    calls = []
    cifar_like, arrays, labels = _hf_dataset(30, "img", "RGB", names=list(data.CIFAR10_CLASSES), size=32)
    fashion_like, fashion_arrays, _ = _hf_dataset(9, "image", "L", names=list(data.FASHION_MNIST_CLASSES),
                                                  size=28)

    def fake_load_dataset(repository, split):
        calls.append((repository, split))
        return cifar_like if repository == "uoft-cs/cifar10" else fashion_like

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = data.load_dataset("cifar10", "train", limit_per_class=2, seed=3)
    assert calls == [("uoft-cs/cifar10", "train")]
    assert dataset.images.shape == (20, 32, 32, 3) and dataset.class_names == data.CIFAR10_CLASSES
    keep = data.subset_indices(labels, data.CIFAR10_CLASSES, limit_per_class=2, seed=3)
    np.testing.assert_array_equal(dataset.images, arrays[keep])

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    dataset = data.load_dataset("fashion-mnist", "test")
    assert calls[-1] == ("zalando-datasets/fashion_mnist", "test")
    np.testing.assert_array_equal(dataset.images, fashion_arrays[..., None])


@pytest.mark.parametrize("offline_var", [None, "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_hub_error_names_alternatives(monkeypatch, tmp_path, offline_var):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    if offline_var:
        monkeypatch.setenv(offline_var, "1")

    def unreachable(repository, split):
        raise ConnectionError(f"Couldn't reach '{repository}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DatasetError) as caught:
        data.load_dataset("cifar10", "train")
    message = str(caught.value)
    for needed in ("uoft-cs/cifar10", "Couldn't reach", "--data-dir", "cifar-10-batches-py",
                   "cifar-10-batches-bin", "--dataset fashion-mnist", "dataset-fashion-mnist",
                   "--dataset synthetic"):
        assert needed in message, f"{needed!r} missing from: {message}"
    assert (f"{offline_var}=1" in message) == bool(offline_var), message

    def not_found(repository, split):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{repository}' doesn't exist")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match="apt install dataset-fashion-mnist.*--dataset synthetic"):
        data.load_dataset("fashion-mnist", "train")


# ---------------------------------------------------------------------------------------------
# Image folders


def _make_folder(root, counts, size=(12, 10), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        for i in range(count):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            _write_png(root / name / f"{i:03d}.png", rng.integers(0, 256, shape, dtype=np.uint8))


def test_imagefolder_fixed_split(tmp_path):
    _make_folder(tmp_path, {"cat": 10, "dog": 6, "emu": 1})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    train = data.load_dataset("imagefolder", "train", data_dir=tmp_path)
    test = data.load_dataset("imagefolder", "test", data_dir=tmp_path)
    assert train.class_names == ("cat", "dog", "emu") and train.images.shape[1:] == (10, 12, 3)
    assert np.bincount(test.labels, minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(train.labels, minlength=3).tolist() == [8, 5, 1]
    # the split does not depend on the seed, and train and test are disjoint
    again = data.load_dataset("imagefolder", "test", data_dir=tmp_path, seed=5)
    np.testing.assert_array_equal(again.images, test.images)
    train_set = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in train_set for img in test.images)
    mean, std = data.channel_stats(train.images)
    np.testing.assert_allclose(test.mean, mean)
    np.testing.assert_allclose(test.std, std)


def test_imagefolder_train_test_layout_grayscale_and_resize(tmp_path):
    _make_folder(tmp_path / "train", {"a": 3, "b": 2}, mode="L", size=(9, 9))
    _make_folder(tmp_path / "test", {"a": 1, "b": 1}, mode="L", size=(9, 9), seed=1)
    test = data.load_dataset("imagefolder", "test", data_dir=tmp_path)
    assert test.images.shape == (2, 9, 9, 1) and test.labels.tolist() == [0, 1]
    expected = np.asarray(Image.open(tmp_path / "test" / "b" / "000.png"))
    np.testing.assert_array_equal(test.images[1, :, :, 0], expected)
    resized = data.load_dataset("imagefolder", "train", data_dir=tmp_path, image_size=16)
    assert resized.images.shape == (5, 16, 16, 1)
    # one colour image makes the whole folder RGB
    _write_png(tmp_path / "test" / "b" / "001.png", np.zeros((9, 9, 3), np.uint8))
    assert data.load_dataset("imagefolder", "train", data_dir=tmp_path).images.shape[-1] == 3


def test_imagefolder_errors(tmp_path):
    def fails(root, match, **kwargs):
        with pytest.raises(DatasetError, match=match):
            data.load_dataset("imagefolder", "train", data_dir=root, **kwargs)

    fails(tmp_path / "absent", "not a directory")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "no class sub-folders")
    _make_folder(tmp_path / "one", {"a": 3})
    (tmp_path / "one" / "b").mkdir()
    fails(tmp_path / "one", r"class folder .*b has no images")
    _make_folder(tmp_path / "sizes", {"a": 3})
    _write_png(tmp_path / "sizes" / "a" / "big.png", np.zeros((20, 20, 3), np.uint8))
    fails(tmp_path / "sizes", "images differ in size.*--image-size")
    resized = data.load_dataset("imagefolder", "train", data_dir=tmp_path / "sizes", image_size=8)
    assert resized.images.shape[1:] == (8, 8, 3)
    _make_folder(tmp_path / "broken", {"a": 3, "b": 3})
    (tmp_path / "broken" / "b" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    fails(tmp_path / "broken", r"cannot read image .*001\.png")
    _make_folder(tmp_path / "half" / "train", {"a": 2})
    fails(tmp_path / "half", "train/ sub-directory but no test/")
    _make_folder(tmp_path / "mismatch" / "train", {"a": 2, "b": 2})
    _make_folder(tmp_path / "mismatch" / "test", {"a": 2, "c": 2})
    fails(tmp_path / "mismatch", "same class folders")
    _make_folder(tmp_path / "tiny", {"a": 1, "b": 1})
    fails(tmp_path / "tiny", "too few images")


# ---------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_is_deterministic_and_balanced():
    a_images, a_labels = data.make_synthetic(20, image_size=16, channels=1, seed=4)
    b_images, b_labels = data.make_synthetic(20, image_size=16, channels=1, seed=4)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert a_images.shape == (200, 16, 16, 1) and np.bincount(a_labels).tolist() == [20] * 10
    assert not np.array_equal(data.make_synthetic(20, 16, 1, seed=5)[0], a_images)
    train = data.load_dataset("synthetic", "train", limit_per_class=5)
    test = data.load_dataset("synthetic", "test")
    assert train.images.shape == (50, 32, 32, 3) and test.images.shape == (1000, 32, 32, 3)
    np.testing.assert_allclose(test.mean, train.mean)
    assert data.load_dataset("synthetic", "test", image_size=20).images.shape == (1000, 20, 20, 3)


@given(label=st.integers(0, 9), half=st.floats(1.0, 12.0), stroke=st.floats(1.0, 4.0))
@settings(max_examples=30, deadline=None)
def test_synthetic_shapes_are_mirror_symmetric(label, half, stroke):
    offsets = np.arange(-15, 16, dtype=np.float32)
    dy, dx = offsets[None, :, None], offsets[None, None, :]
    r, t = np.float32(half), np.float32(stroke)
    mask = data._shape_mask(label, dy, dx, r, t)
    np.testing.assert_array_equal(mask, data._shape_mask(label, dy, -dx, r, t))
    assert mask.any(), f"class {label} draws nothing at half-size {half}"


def test_synthetic_is_learnable_but_not_trivial():
    train_images, train_labels = data.make_synthetic(200, seed=0)
    test_images, test_labels = data.make_synthetic(50, seed=1)
    x_train = train_images.reshape(len(train_images), -1) / 255.0
    x_test = test_images.reshape(len(test_images), -1) / 255.0
    mean = x_train.mean(axis=0)
    x_train, x_test = x_train - mean, x_test - mean
    targets = np.eye(10)[train_labels]
    weights = np.linalg.solve(x_train.T @ x_train + 100.0 * np.eye(x_train.shape[1]), x_train.T @ targets)
    accuracy = np.mean((x_test @ weights).argmax(axis=1) == test_labels)
    # chance is 0.10; a linear model on raw pixels learns something but far from everything
    assert 0.16 < accuracy < 0.6, f"ridge classifier accuracy {accuracy}"


# ---------------------------------------------------------------------------------------------
# Limited data, validation, check_images


def test_limit_per_class_and_fraction():
    full = data.load_dataset("synthetic", "test")
    small = data.load_dataset("synthetic", "test", limit_per_class=7, seed=1)
    larger = data.load_dataset("synthetic", "test", limit_per_class=20, seed=1)
    assert np.bincount(small.labels).tolist() == [7] * 10
    as_rows = lambda d: {img.tobytes() for img in d.images}  # noqa: E731
    assert as_rows(small) <= as_rows(larger) <= as_rows(full)
    other = data.load_dataset("synthetic", "test", limit_per_class=7, seed=2)
    assert as_rows(other) != as_rows(small)
    part = data.load_dataset("synthetic", "test", fraction=0.25)
    assert np.bincount(part.labels).tolist() == [25] * 10
    labels = np.array([0] * 9 + [1] * 2 + [2])
    keep = data.subset_indices(labels, ("a", "b", "c"), fraction=0.1)
    assert np.bincount(labels[keep]).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="class 'b' has only 2 images in the train split"):
        data.subset_indices(labels, ("a", "b", "c"), limit_per_class=3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="mnist"), "unknown dataset 'mnist'"),
    (dict(split="val"), "unknown split 'val'"),
    (dict(image_size=0), "image_size"),
    (dict(image_size=7), "image_size must be an integer >= 8"),
    (dict(image_size=16.0), "image_size"),
    (dict(limit_per_class=0), "limit_per_class"),
    (dict(limit_per_class=True), "limit_per_class"),
    (dict(fraction=0.0), "fraction"),
    (dict(fraction=1.5), "fraction"),
    (dict(fraction=0.5, limit_per_class=3), "not both"),
    (dict(seed=-1), "seed"),
    (dict(data_dir="/tmp"), "takes no data_dir"),
    (dict(name="imagefolder"), "needs data_dir"),
    (dict(name="cifar10", data_dir=3), "data_dir must be a path"),
])
def test_load_dataset_rejects_bad_arguments(kwargs, match):
    arguments = dict(name="synthetic", split="train") | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        data.load_dataset(**arguments)


def test_check_images():
    dataset = data.load_dataset("synthetic", "test", limit_per_class=1)
    data.check_images(dataset, 32, 3)
    expected = (r"32x32 with 3 channel\(s\), but the model expects 28x28 with 1 .*"
                r"image_size=28\)\) and use a model with in_chans=3")
    with pytest.raises(ValueError, match=expected):
        data.check_images(dataset, 28, 1)
    with pytest.raises(ValueError, match=r"expects 32x32 with 1 channel\(s\): use a model with in_chans=3"):
        data.check_images(dataset, 32, 1)
    with pytest.raises(ValueError, match=r"expects 16x16 with 3 channel\(s\): load the data resized"):
        data.check_images(dataset, 16, 3)


def test_dataset_validation():
    images, labels = np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1])
    good = dict(images=images, labels=labels, num_classes=2, class_names=("a", "b"), mean=[0.5], std=[0.2],
                name="synthetic")
    assert len(data.Dataset(**good)) == 2
    for change, match in [(dict(images=images.astype(np.float32)), "uint8"),
                          (dict(labels=labels.astype(np.int32)), "int64"),
                          (dict(labels=np.array([0, 2])), r"\[0, 2\)"),
                          (dict(class_names=("a",)), "class names"),
                          (dict(std=[0.0]), "std > 0"),
                          (dict(mean=[0.5, 0.5]), r"shape \(1,\)"),
                          (dict(name="other"), "name must be one of")]:
        with pytest.raises((TypeError, ValueError), match=match):
            data.Dataset(**(good | change))


# ---------------------------------------------------------------------------------------------
# Batching and augmentation


def _small(name="synthetic", n_per_class=7, size=12):
    images, labels = data.make_synthetic(n_per_class, image_size=size, channels=3, seed=9)
    mean, std = data.channel_stats(images)
    return data.Dataset(images, labels, 10, data.SYNTHETIC_CLASSES, mean, std, name)


def test_steps_per_epoch():
    assert data.steps_per_epoch(10, 3, drop_last=True) == 3
    assert data.steps_per_epoch(10, 3, drop_last=False) == 4
    assert data.steps_per_epoch(9, 3, drop_last=False) == 3
    assert data.steps_per_epoch(2, 5, drop_last=False) == 1
    with pytest.raises(ValueError, match="batch_size=5 is larger than the 2 samples"):
        data.steps_per_epoch(2, 5, drop_last=True)
    with pytest.raises(ValueError, match="batch_size"):
        data.steps_per_epoch(10, 0, drop_last=False)
    assert [data.crop_padding(s) for s in (28, 32, 64, 8)] == [4, 4, 8, 1]


def test_evaluation_batches_are_in_order_and_normalised():
    dataset = _small()
    batches = list(data.iterate_batches(dataset, 16, seed=0, epoch=0, train=False))
    assert [len(y) for _, y in batches] == [16, 16, 16, 16, 6]
    x = np.concatenate([x for x, _ in batches])
    y = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(y, dataset.labels)
    expected = (dataset.images / 255.0 - dataset.mean) / dataset.std
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (70, 3, 12, 12)
    np.testing.assert_allclose(x, expected.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_training_order_is_a_seeded_permutation():
    dataset = _small()

    def epoch_labels(seed, epoch, **kwargs):
        return [y for _, y in data.iterate_batches(dataset, 8, seed, epoch, augment=False, **kwargs)]

    order = np.concatenate(epoch_labels(0, 0, drop_last=False))
    assert sorted(order.tolist()) == sorted(dataset.labels.tolist())
    assert len(epoch_labels(0, 0)) == 8  # drop_last defaults to True for training
    np.testing.assert_array_equal(np.concatenate(epoch_labels(0, 0)), np.concatenate(epoch_labels(0, 0)))
    assert not np.array_equal(np.concatenate(epoch_labels(0, 1)), np.concatenate(epoch_labels(0, 0)))
    assert not np.array_equal(np.concatenate(epoch_labels(1, 0)), np.concatenate(epoch_labels(0, 0)))


@pytest.mark.parametrize("name", ["synthetic", "fashion-mnist"])
def test_resumed_epoch_sees_identical_batches(name):
    dataset = _small(name)
    full = list(data.iterate_batches(dataset, 6, seed=3, epoch=2))
    for start in (0, 1, 5, len(full)):
        resumed = list(data.iterate_batches(dataset, 6, seed=3, epoch=2, start_step=start))
        assert len(resumed) == len(full) - start
        for (x_full, y_full), (x_resumed, y_resumed) in zip(full[start:], resumed):
            assert np.array_equal(x_full, x_resumed) and np.array_equal(y_full, y_resumed)
    with pytest.raises(ValueError, match="past the end of the epoch"):
        data.iterate_batches(dataset, 6, seed=3, epoch=2, start_step=len(full) + 1)
    with pytest.raises(ValueError, match="epoch"):
        data.iterate_batches(dataset, 6, seed=3, epoch=-1)


def _reference_crop_flip(images, padding, flip, rng):
    """Per-image loop with the same random draws as random_crop_flip."""
    count, height, width, _ = images.shape
    rows = rng.integers(0, 2 * padding + 1, count)
    cols = rng.integers(0, 2 * padding + 1, count)
    mirror = rng.random(count) < 0.5 if flip else np.zeros(count, bool)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
        crop = padded[rows[i]:rows[i] + height, cols[i]:cols[i] + width]
        out[i] = crop[:, ::-1] if mirror[i] else crop
    return out, mirror


@given(count=st.integers(1, 5), height=st.integers(1, 9), width=st.integers(1, 9),
       padding=st.integers(0, 4), flip=st.booleans(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_random_crop_flip_matches_per_image_loop(count, height, width, padding, flip, seed):
    images = np.random.default_rng(seed).integers(0, 256, (count, height, width, 2), dtype=np.uint8)
    got = data.random_crop_flip(images, padding, flip, np.random.default_rng(seed))
    expected, _ = _reference_crop_flip(images, padding, flip, np.random.default_rng(seed))
    np.testing.assert_array_equal(got, expected)


def test_augmentation_policy_per_dataset():
    for name, flips in (("synthetic", True), ("fashion-mnist", False)):
        dataset = _small(name, n_per_class=20, size=8)
        (x, y), = list(data.iterate_batches(dataset, 200, seed=1, epoch=4))
        order = np.random.default_rng([1, data._ORDER_STREAM, 4]).permutation(200)
        rng = np.random.default_rng([1, data._AUGMENT_STREAM, 4, 0])
        expected, mirror = _reference_crop_flip(dataset.images[order], data.crop_padding(8), flips, rng)
        expected = ((expected / 255.0 - dataset.mean) / dataset.std).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
        assert mirror.any() == flips
        unaugmented, = list(data.iterate_batches(dataset, 200, seed=1, epoch=4, augment=False))
        assert not np.allclose(unaugmented[0], x)


def test_random_erasing_of_small_datasets():
    """erase_prob=0 is the unerased batch bit for bit; erase_prob > 0 changes exactly
    augment.erase_batch's boxes of the augmented batch, seeded by (seed, epoch, step, image), so a
    resumed epoch erases the same boxes."""
    from minibvit import augment
    dataset = _small("fashion-mnist", n_per_class=40, size=12)
    plain = list(data.iterate_batches(dataset, 64, seed=5, epoch=1, augment="flip"))
    zero = list(data.iterate_batches(dataset, 64, seed=5, epoch=1, augment="flip", erase_prob=0.0))
    erased = list(data.iterate_batches(dataset, 64, seed=5, epoch=1, augment="flip", erase_prob=0.5))
    resumed = list(data.iterate_batches(dataset, 64, seed=5, epoch=1, augment="flip", erase_prob=0.5, start_step=3))
    changed_images = 0
    for step, ((x, y), (x0, y0), (xe, ye)) in enumerate(zip(plain, zero, erased)):
        assert np.array_equal(x, x0) and np.array_equal(y, ye)
        np.testing.assert_array_equal(xe, augment.erase_batch(x.copy(), 0.5, 5, 1, step))
        changed_images += int((xe != x).any(axis=(1, 2, 3)).sum())
    assert 0.3 * 64 * len(plain) < changed_images < 0.7 * 64 * len(plain)
    for (x_full, _), (x_res, _) in zip(erased[3:], resumed):
        assert np.array_equal(x_full, x_res)
    eval_batch, = list(data.iterate_batches(dataset, 400, seed=5, epoch=1, train=False, erase_prob=1.0))
    unerased, = list(data.iterate_batches(dataset, 400, seed=5, epoch=1, train=False))
    assert np.array_equal(eval_batch[0], unerased[0])  # evaluation is never erased
    for bad in (-0.1, 1.5, "0.5"):
        with pytest.raises(ValueError, match="erase_prob must be a probability"):
            data.iterate_batches(dataset, 8, seed=0, epoch=0, erase_prob=bad)
