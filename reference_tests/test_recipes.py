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
