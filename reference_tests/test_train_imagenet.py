"""python -m minibvit.train --dataset imagenet on a tiny generated JPEG tree: end to end through the
loader's worker processes with DeiT's augmentation on (RandAugment, mixup/cutmix soft targets, random
erasing), the wnids and ImageNet's mean/std in the checkpoint, and a stop in mid-epoch + --resume that
ends bit-identical to the uninterrupted run."""
import json
import os
import signal

import numpy as np
import pytest

from minibvit import checkpoint, ops, train
from minibvit.augment import IMAGENET_MEAN, IMAGENET_STD

import jpeg_tree

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

TINY = ["--dataset", "imagenet", "--model", "deit-tiny", "--image-size", "32", "--patch-size", "8", "--embed-dim", "16",
        "--depth", "1", "--num-heads", "2", "--epochs", "2", "--batch-size", "4", "--eval-batch-size", "4",
        "--drop-path", "0.1"]  # augmentation: imagenet's defaults (DeiT's), all on


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    jpeg_tree.make_tree(str(root), per_class=6)  # 18 train images (4 steps of 4), 6 val
    return str(root)


def _tensors(path):
    return checkpoint.load_checkpoint(path)


def test_stop_in_mid_epoch_and_resume_equals_the_uninterrupted_run(tree, tmp_path, monkeypatch):
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    assert train.main(TINY + ["--data-dir", tree, "--workers", "2", "--out", whole]) == 0

    real_step, calls = train.train_step, []

    def step_then_ctrl_c(*args, **kwargs):  # call 1 is the compile warm-up; Ctrl-C during step 1
        calls.append(kwargs["step"])
        out = real_step(*args, **kwargs)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(train, "train_step", step_then_ctrl_c)
    assert train.main(TINY + ["--data-dir", tree, "--workers", "1", "--out", stopped]) == 130
    _, meta = _tensors(os.path.join(stopped, "fp", "last.safetensors"))
    assert (meta["epoch"], meta["step"]) == (0, 2)
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.main(TINY + ["--data-dir", tree, "--workers", "1", "--resume", "--out", stopped]) == 0

    want, want_meta = _tensors(os.path.join(whole, "fp", "last.safetensors"))
    got, got_meta = _tensors(os.path.join(stopped, "fp", "last.safetensors"))
    assert want.keys() == got.keys()
    for k in want:  # model and optimizer state, bit for bit
        assert np.array_equal(want[k], got[k]), k
    assert got_meta["best_acc"] == want_meta["best_acc"] and got_meta["complete"]
    dataset = want_meta["dataset"]
    assert dataset["name"] == "imagenet" and dataset["wnids"] == list(jpeg_tree.WNIDS)
    assert dataset["mean"] == list(IMAGENET_MEAN) and dataset["std"] == list(IMAGENET_STD)
    config = want_meta["train_config"]
    assert (config["rand_augment"], config["mixup"], config["cutmix"], config["random_erasing"]) == (2, 0.8, 1.0, 0.25)
    with open(os.path.join(whole, "fp", "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len([r for r in records if "loss" in r]) == 8 and all(np.isfinite(r["loss"]) for r in records if "loss" in r)


def test_soft_targets_use_the_soft_target_cross_entropy_and_argmax_accuracy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4))
    soft = rng.dirichlet(np.ones(4), size=5)
    loss, back = train._cross_entropy(logits, soft, label_smoothing=0.1)  # smoothing is already in soft targets
    want, cache = ops.soft_target_cross_entropy_forward(logits, soft)
    assert loss == want
    np.testing.assert_array_equal(back(0.5), ops.soft_target_cross_entropy_backward(0.5, cache))
    labels = rng.integers(0, 4, 5)
    loss, back = train._cross_entropy(logits, labels, label_smoothing=0.1)
    want, cache = ops.cross_entropy_forward(logits, labels, 0.1)
    assert loss == want
    np.testing.assert_array_equal(back(1.0), ops.cross_entropy_backward(1.0, cache))
    np.testing.assert_array_equal(train.hard_labels(soft), soft.argmax(axis=1))
    np.testing.assert_array_equal(train.hard_labels(labels), labels)


@pytest.mark.parametrize("options,message", [
    (dict(dataset="synthetic", mixup=0.5), "--mixup apply to --dataset imagenet only"),
    (dict(dataset="imagenet"), "--dataset imagenet needs --data-dir"),
    (dict(dataset="imagenet", data_dir="x", fraction=0.5), "do not apply to imagenet"),
    (dict(dataset="imagenet", data_dir="x", random_erasing=1.5), "--random-erasing must be in"),
    (dict(dataset="imagenet", data_dir="x", rand_augment=-1), "--rand-augment must be an integer"),
    (dict(accum_steps=0), "--accum-steps must be a positive integer"),
    (dict(dtype="float16"), "--dtype must be one of"),
])
def test_bad_imagenet_and_scale_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        train.resolve_config(train.TrainConfig(**options))


def test_a_missing_imagenet_tree_is_a_clear_error(tmp_path, capsys):
    assert train.main(["--dataset", "imagenet", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
