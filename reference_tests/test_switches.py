"""The recipe switches of issue 17: --augment / --crop-padding, --kd, --ternary-granularity,
--tervit-direct and the budget rule (--epochs split over the quantized stages, --stage-epochs)."""
import json
import os

import numpy as np
import pytest

from minibvit import data, train

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

TINY = dict(dataset="synthetic", limit_per_class=12, embed_dim=16, depth=1, num_heads=2, patch_size=8,
            batch_size=16, eval_batch_size=500, epochs=1, log_every=2)


def tiny(tmp_path, tag="run", **kw):
    return train.TrainConfig(**{**TINY, "out": str(tmp_path / tag), **kw})


def _small(name="synthetic", n_per_class=7, size=12):
    images, labels = data.make_synthetic(n_per_class, image_size=size, channels=3, seed=9)
    mean, std = data.channel_stats(images)
    return data.Dataset(images, labels, 10, data.SYNTHETIC_CLASSES, mean, std, name)


def _normalised(dataset, images):
    return ((images / 255.0 - dataset.mean) / dataset.std).transpose(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------
# --augment, --crop-padding
# ------------------------------------------------------------------------------------------------

def _epoch(dataset, **kw):
    return list(data.iterate_batches(dataset, 10, seed=5, epoch=3, **kw))


@pytest.mark.parametrize("mode", data.AUGMENT_MODES)
def test_every_augment_mode_is_deterministic_and_resumes_bit_identically(mode):
    dataset = _small()
    full = _epoch(dataset, augment=mode)
    again = _epoch(dataset, augment=mode)
    for (x1, y1), (x2, y2) in zip(full, again):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    for start in (1, 3, len(full)):
        resumed = list(data.iterate_batches(dataset, 10, seed=5, epoch=3, start_step=start, augment=mode))
        assert len(resumed) == len(full) - start
        for (x1, y1), (x2, y2) in zip(full[start:], resumed):
            assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    other_epoch = list(data.iterate_batches(dataset, 10, seed=5, epoch=4, augment=mode))
    assert not np.array_equal(full[0][1], other_epoch[0][1])  # another permutation


def test_each_augment_mode_does_what_it_says():
    dataset = _small(n_per_class=20, size=8)
    order = np.random.default_rng([1, data._ORDER_STREAM, 4]).permutation(200)
    images = dataset.images[order]
    plain = _normalised(dataset, images)
    (none, y), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment="none")
    (off, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment=False)
    np.testing.assert_array_equal(y, dataset.labels[order])
    np.testing.assert_array_equal(none, off)  # exactly the unaugmented batch
    np.testing.assert_allclose(none, plain, rtol=1e-5, atol=1e-5)

    (flip, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment="flip")
    mirror = np.random.default_rng([1, data._AUGMENT_STREAM, 4, 0]).random(200) < 0.5
    assert 0 < mirror.sum() < 200
    np.testing.assert_allclose(flip, np.where(mirror[:, None, None, None], plain[..., ::-1], plain), rtol=1e-5,
                               atol=1e-5)

    for mode, flips in (("crop", False), ("crop-flip", True)):
        for padding in (None, 2):
            (x, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment=mode, padding=padding)
            rng = np.random.default_rng([1, data._AUGMENT_STREAM, 4, 0])
            pad = data.crop_padding(8) if padding is None else padding
            expected = data.random_crop_flip(images, pad, flips, rng)
            np.testing.assert_allclose(x, _normalised(dataset, expected), rtol=1e-5, atol=1e-5)
    (default, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4)  # augment=True: the dataset's default
    (crop_flip, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment="crop-flip")
    np.testing.assert_array_equal(default, crop_flip)
    (p1, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment="crop", padding=1)
    (p3, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment="crop", padding=3)
    assert not np.array_equal(p1, p3)
    with pytest.raises(ValueError, match="augment='rotate' is not an augmentation"):
        data.iterate_batches(dataset, 10, seed=1, epoch=0, augment="rotate")
    with pytest.raises(ValueError, match="padding must be a positive integer"):
        data.iterate_batches(dataset, 10, seed=1, epoch=0, augment="crop", padding=0)


def test_augment_defaults_and_refusals(tmp_path):
    assert train.resolve_config(train.TrainConfig(dataset="fashion-mnist")).augment == "flip"
    for name in ("synthetic", "cifar10"):
        assert train.resolve_config(train.TrainConfig(dataset=name)).augment == "crop-flip"
    cfg = train.resolve_config(tiny(tmp_path, augment="crop", crop_padding=2))
    assert (cfg.augment, cfg.crop_padding) == ("crop", 2)
    with pytest.raises(ValueError, match="--crop-padding applies to the random crop"):
        train.resolve_config(tiny(tmp_path, augment="flip", crop_padding=2))
    with pytest.raises(ValueError, match="--augment must be one of"):
        train.resolve_config(tiny(tmp_path, augment="rotate"))
    with pytest.raises(ValueError, match="do not apply to --dataset imagenet"):
        train.resolve_config(train.TrainConfig(dataset="imagenet", data_dir="hub", augment="none"))
    args = train._parser().parse_args(["--augment", "none", "--crop-padding", "3"])
    assert (args.augment, args.crop_padding) == ("none", 3)


def test_training_sees_the_chosen_augmentation(tmp_path):
    cfg = train.resolve_config(tiny(tmp_path, augment="none"))
    train_set, _ = train.load_data(cfg)
    got = list(train.train_batches(train_set, cfg, 2, 0, True))
    want = list(data.iterate_batches(train_set, cfg.batch_size, cfg.seed, 2, augment=False))
    assert len(got) == len(want)
    for (x1, y1), (x2, y2) in zip(got, want):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    cfg = train.resolve_config(tiny(tmp_path, augment="crop", crop_padding=1))
    (x, _), = list(train.train_batches(train_set, cfg, 2, 0, True))[:1]
    (x_want, _), = list(data.iterate_batches(train_set, cfg.batch_size, cfg.seed, 2, augment="crop", padding=1))[:1]
    np.testing.assert_array_equal(x, x_want)
    results = train.run(tiny(tmp_path, "flip", method="fp", augment="flip", max_steps=1))
    saved = json.load(open(os.path.join(os.path.dirname(results["fp"][0]), "config.json")))
    assert saved["train_config"]["augment"] == "flip"
