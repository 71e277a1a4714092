"""The training command end to end at tiny size: every recipe, exact resume after SIGKILL, SIGINT,
the stage hand-over, and clear errors (with nothing overwritten) for bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minibvit import checkpoint, methods, train

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--limit-per-class", "12", "--embed-dim", "16", "--depth", "1", "--num-heads", "2",
        "--patch-size", "8", "--batch-size", "16", "--eval-batch-size", "500", "--epochs", "1", "--log-every", "2"]


def tiny_config(tmp_path, **kw):
    fields = dict(dataset="synthetic", limit_per_class=12, embed_dim=16, depth=1, num_heads=2, patch_size=8,
                  batch_size=16, eval_batch_size=500, epochs=1, log_every=2, out=str(tmp_path / "run"))
    fields.update(kw)
    return train.TrainConfig(**fields)


def weights(path):
    tensors, meta = checkpoint.load_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}, meta


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_recipe_runs_end_to_end(tmp_path, method):
    results = train.run(tiny_config(tmp_path, method=method))
    assert list(results) == [s.name for s in methods.METHODS[method].stages]
    for stage, (path, acc) in results.items():
        assert os.path.isfile(path) and 0.0 <= acc <= 1.0
        stage_dir = os.path.dirname(path)
        records = [json.loads(line) for line in open(os.path.join(stage_dir, "log.jsonl"))]
        assert any("test_acc" in r for r in records) and any("loss" in r for r in records)
        assert json.load(open(os.path.join(stage_dir, "config.json")))["scheme"] == methods.METHODS[method].stages[
            [s.name for s in methods.METHODS[method].stages].index(stage)].table
    if method in ("binary", "binaryvit", "gsb"):
        diag = [r for r in records if "flip_rate" in r]
        assert diag and all(0 <= r["flip_rate"] <= 1 and 0 <= r["near_zero_mass"] <= 1 for r in diag)
        assert any("sign_entropy" in r for r in records)
    # a second run reuses every finished stage and changes nothing
    before = {s: weights(p)[0] for s, (p, _) in results.items()}
    again = train.run(tiny_config(tmp_path, method=method))
    for s, (p, _) in again.items():
        for k, v in weights(p)[0].items():
            np.testing.assert_array_equal(v, before[s][k])


def test_handover_starts_from_previous_stage_weights(tmp_path, monkeypatch):
    """TerViT stage 2 (ternary) starts from exactly stage 1's (8-bit) latent weights."""
    seen = {}
    real = train.train_stage

    def spy(cfg, stage, out_dir, train_set, test_set, init_state=None, teacher=None):
        seen[stage.name] = None if init_state is None else {k: v.copy() for k, v in init_state.items()}
        return real(cfg, stage, out_dir, train_set, test_set, init_state, teacher)

    monkeypatch.setattr(train, "train_stage", spy)
    results = train.run(tiny_config(tmp_path, method="tervit"))
    stage1, _ = weights(results["tervit_w8a8"][0])
    assert seen["fp"] is None
    for k, v in stage1.items():
        np.testing.assert_array_equal(seen["tervit"][k[6:]], v, err_msg=f"{k} not handed over")
    cfg = train.resolve_config(tiny_config(tmp_path))
    model = train.build_model(train.model_config(cfg, False, 10, 3, 32), "tervit", train.quantizer_options(cfg))
    train.transfer_state(seen["tervit"], model)
    for k, v in stage1.items():
        np.testing.assert_array_equal(model.state_dict()[k[6:]], v)


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", "minibvit.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_mid_epoch_checkpoint(path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            try:
                _, meta = checkpoint.load_checkpoint(path)
                if meta["step"] > 0:
                    return meta
            except checkpoint.CheckpointError:
                pass
        assert proc.poll() is None, f"training ended before a mid-epoch checkpoint: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError("no mid-epoch checkpoint appeared")


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    args = TINY + ["--method", "fp", "--epochs", "2", "--save-every", "2", "--limit-per-class", "40"]
    ref = _cli(args + ["--out", str(tmp_path / "ref")])
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    proc = _cli(args + ["--out", str(tmp_path / "killed")])
    last = tmp_path / "killed" / "fp" / "last.safetensors"
    meta = _wait_for_mid_epoch_checkpoint(str(last), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    _, meta = checkpoint.load_checkpoint(str(last))
    assert not meta.get("complete"), "the run finished before it was killed; the test proves nothing"
    again = _cli(args + ["--out", str(tmp_path / "killed"), "--resume"])
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "resuming at epoch" in err
    a, _ = weights(str(tmp_path / "ref" / "fp" / "last.safetensors"))
    b, _ = weights(str(last))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} differs after resume")


def test_sigint_saves_then_resume_finishes(tmp_path):
    args = TINY + ["--method", "fp", "--save-every", "1", "--limit-per-class", "40", "--out", str(tmp_path / "r")]
    proc = _cli(args)
    _wait_for_mid_epoch_checkpoint(str(tmp_path / "r" / "fp" / "last.safetensors"), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("training finished before SIGINT arrived")
    assert proc.returncode == 130, err
    assert "interrupted: saved" in err
    rerun = _cli(args)  # without --resume: refuses, overwrites nothing
    _, err2 = rerun.communicate(timeout=120)
    assert rerun.returncode == 2 and "unfinished run" in err2
    resumed = _cli(args + ["--resume"])
    _, err3 = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err3


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, method="fp", save_every=1, limit_per_class=40)
    real = train._loss
    calls = {"n": 0}

    def poisoned(*a):
        calls["n"] += 1
        loss, d = real(*a)
        return (np.float32(np.nan) if calls["n"] == 4 else loss), d

    monkeypatch.setattr(train, "_loss", poisoned)
    with pytest.raises(train.TrainingDiverged, match="last good checkpoint is kept"):
        train.run(cfg)
    _, meta = checkpoint.load_checkpoint(str(tmp_path / "run" / "fp" / "last.safetensors"))
    assert meta["step"] == 3


def test_bad_inputs_give_clear_errors(tmp_path):
    cases = [
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--method", "xnor"], "--method must be one of"),
        (["--fraction", "1.5"], "--fraction must be in"),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path / "nope")], "not a directory"),
        (["--init-from", str(tmp_path / "missing.safetensors")], "is not a file"),
        (["--embed-dim", "15"], "not divisible"),
    ]
    for extra, message in cases:
        proc = _cli(TINY + ["--out", str(tmp_path / "x")] + extra)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and message in err, (extra, err)
    # corrupt, truncated and foreign checkpoints
    good = train.run(tiny_config(tmp_path, method="fp"))["fp"][0]
    blob = open(good, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(blob[: len(blob) // 2])
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, foreign, garbage):
        proc = _cli(TINY + ["--out", str(tmp_path / "y"), "--method", "binary", "--teacher", str(path)])
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "error:" in err, err
        assert not (tmp_path / "y" / "binary" / "last.safetensors").exists()
    # a checkpoint of another model size
    proc = _cli(TINY + ["--out", str(tmp_path / "z"), "--method", "binary", "--embed-dim", "32", "--teacher", good])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "does not fit the model" in err, err
    # a different model in an existing run directory is refused, nothing overwritten
    before = open(good, "rb").read()
    proc = _cli(TINY + ["--out", str(tmp_path / "run"), "--method", "fp", "--embed-dim", "32"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "different model" in err
    assert open(good, "rb").read() == before


def test_evaluate_cli(tmp_path):
    best = train.run(tiny_config(tmp_path, method="fp"))["fp"][0]
    proc = subprocess.run([sys.executable, "-m", "minibvit.evaluate", "--checkpoint", best], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "synthetic test accuracy" in proc.stdout

