"""Recipes and their switches (issue 17): which checkpoint each stage starts from."""
import numpy as np
import pytest

from minibvit import checkpoint, train

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

TINY = dict(dataset="synthetic", limit_per_class=12, embed_dim=16, depth=1, num_heads=2, patch_size=8,
            batch_size=16, eval_batch_size=500, epochs=1, max_steps=1)


def test_tervit_teacher_checkpoint_is_the_fp_stage(tmp_path, monkeypatch):
    """`--method tervit --teacher CKPT`: the checkpoint replaces TerViT's fp stage, and the 8-bit stage
    starts from its weights (it used to start from random weights: test accuracy 0.135 after a step)."""
    fp = train.run(train.TrainConfig(method="fp", out=str(tmp_path / "fp"), **TINY))["fp"][0]
    teacher, _ = checkpoint.load_checkpoint(fp)
    seen = {}
    real = train.train_stage

    def spy(cfg, stage, out_dir, train_set, test_set, init_state=None, teacher=None):
        seen[stage.name] = init_state
        return real(cfg, stage, out_dir, train_set, test_set, init_state, teacher)

    monkeypatch.setattr(train, "train_stage", spy)
    train.run(train.TrainConfig(method="tervit", teacher=fp, out=str(tmp_path / "tervit"), **TINY))
    assert "fp" not in seen, "the fp stage is replaced by the --teacher checkpoint, not trained again"
    assert seen["tervit_w8a8"] is not None, "the 8-bit stage must start from the --teacher checkpoint"
    for name, value in teacher.items():
        if name.startswith("model."):
            np.testing.assert_array_equal(seen["tervit_w8a8"][name[6:]], value, err_msg=name)


def test_random_erasing_switch_on_small_datasets(tmp_path):
    """`--random-erasing P` works on every dataset: 0 trains bit-identically to leaving it unset,
    P > 0 changes the step; out-of-range values are refused with the flag's name."""
    def weights(name, **kw):
        path = train.run(train.TrainConfig(method="fp", out=str(tmp_path / name), **TINY, **kw))["fp"][0]
        return {k: v for k, v in checkpoint.load_checkpoint(path)[0].items() if k.startswith("model.")}

    unset, zero, erased = weights("unset"), weights("zero", random_erasing=0.0), weights("erased", random_erasing=1.0)
    assert all(np.array_equal(unset[k], zero[k]) for k in unset)
    assert any(not np.array_equal(unset[k], erased[k]) for k in unset)
    with pytest.raises(ValueError, match="--random-erasing must be in"):
        train.resolve_config(train.TrainConfig(dataset="synthetic", random_erasing=1.5))
