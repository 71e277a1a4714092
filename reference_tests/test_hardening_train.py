"""Issue 14 phase 2, train side: the pieces behind the trainer's fixes (tests of minibvit itself).

The command-line behaviour is tested in test_hardening_phase2.py; here: the dead-quantizer
diagnostic behind the dead-student warning, the log truncation behind a resumed log.jsonl, and that
the compile warm-up leaves the run bit-identical.
"""
import json

import numpy as np
import pytest

from minibvit import checkpoint, diagnostics, methods, train
from minibvit.model import ViT, ViTConfig

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

TINY = ["--dataset", "synthetic", "--limit-per-class", "12", "--embed-dim", "16", "--depth", "1",
        "--num-heads", "2", "--patch-size", "8", "--batch-size", "16", "--eval-batch-size", "500",
        "--epochs", "1"]


def _initialised(method, keep_attention_binarizer):
    cfg = ViTConfig(image_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=16, depth=1,
                    num_heads=2, mlp_ratio=2.0)
    quantizers = methods.build_quantizers(cfg, methods.METHODS[method].stages[-1].table)
    if not keep_attention_binarizer:
        del quantizers["blocks.0.attn.attn"]
    model = ViT(cfg, quantizers=quantizers, seed=0)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    model.forward(x, training=True, rng=np.random.default_rng(0))  # sets every scale from x
    return model, x


@pytest.mark.parametrize("method", ["binary", "binaryvit"])
def test_dead_activation_quantizers_names_the_zero_attention(method):
    model, x = _initialised(method, True)
    dead = dict(diagnostics.dead_activation_quantizers(model, x))
    assert dead.get("blocks.0.attn.attn") == "its output is all zero", dead
    assert dead.get("blocks.0.attn.proj.input") == "its input is all zero", dead
    model, x = _initialised(method, False)  # full-precision attention probabilities: nothing is dead
    assert diagnostics.dead_activation_quantizers(model, x) == []


def test_truncate_log_keeps_what_the_checkpoint_holds(tmp_path):
    steps = 5
    path = tmp_path / "log.jsonl"
    records = [{"stage": "s", "epoch": g // steps, "step": g % steps, "global_step": g, "loss": g} for g in range(5)]
    records.insert(1, {"stage": "s", "epoch": 0, "step": 0, "warning": "after the first step"})
    records.append({"stage": "s", "epoch": 0, "train_loss": 1.0, "train_acc": 0.5})
    records.append({"stage": "s", "epoch": 0, "step": 4, "warning": "one class"})
    records += [{"stage": "s", "epoch": 1, "step": s, "global_step": 5 + s, "loss": 5 + s} for s in range(4)]
    lines = [json.dumps(r) + "\n" for r in records]
    path.write_text("".join(lines) + '{"stage": "s", "epo')  # a line a SIGKILL cut short
    train.truncate_log(str(path), steps, 7)  # the checkpoint is at epoch 1, step 2
    kept = [json.loads(line) for line in open(path)]
    assert kept == records[:-2]
    train.truncate_log(str(path), steps, 0)  # a fresh start keeps nothing
    assert path.read_text() == ""


def test_the_warm_up_leaves_the_run_bit_identical(tmp_path, monkeypatch):
    args = TINY + ["--method", "binaryvit", "--max-steps", "3"]
    assert train.main(args + ["--out", str(tmp_path / "warm")]) == 0
    monkeypatch.setattr(train, "_warm_up", lambda *a, **k: 0.0)
    assert train.main(args + ["--out", str(tmp_path / "cold")]) == 0
    for stage in ("teacher", "binaryvit"):
        warm, _ = checkpoint.load_checkpoint(str(tmp_path / "warm" / stage / "last.safetensors"))
        cold, _ = checkpoint.load_checkpoint(str(tmp_path / "cold" / stage / "last.safetensors"))
        assert warm.keys() == cold.keys()
        for name in warm:
            np.testing.assert_array_equal(warm[name], cold[name], err_msg=name)


def test_evaluate_and_infer_load_the_data_at_the_models_image_size(tmp_path, capsys):
    # A checkpoint that does not say which size training resized to (here: its train_config dropped)
    # is evaluated at the model's size: synthetic images are 32x32, the model takes 16x16.
    from minibvit import engine, evaluate, infer

    out = tmp_path / "run"
    assert train.main(TINY + ["--method", "binary", "--max-steps", "1", "--image-size", "16", "--out", str(out)]) == 0
    tensors, meta = checkpoint.load_checkpoint(str(out / "binary" / "best.safetensors"))
    meta.pop("train_config")
    bare = str(tmp_path / "bare.safetensors")
    checkpoint.save_checkpoint(bare, tensors, meta)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", bare]) == 0, capsys.readouterr().err
    assert "synthetic test accuracy" in capsys.readouterr().out
    packed = str(tmp_path / "bare.packed.safetensors")
    engine.export(bare, packed)
    assert infer.main(["--packed", packed, "--compare", bare, "--limit", "8"]) == 0, capsys.readouterr().err
    assert "bit-identical on 8/8" in capsys.readouterr().out
