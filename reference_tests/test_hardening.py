"""Issue 14, phase 1: first contact (the README's two commands as root without sudo and as a user
with sudo), checkpoint integrity (a digest verified on load, training and packed files), CIFAR-10
with both layouts, the image-size suggestion, docs/gsb.md's claims about the official code, and why
tiny binary students score exactly chance."""
import json
import os
import re
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest

from adapter import ViTConfig, build_vit, checkpoint, data, quant, schemes, train
from minibvit import methods as registry

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
TINY = ["--dataset", "synthetic", "--limit-per-class", "12", "--embed-dim", "16", "--depth", "1",
        "--num-heads", "2", "--patch-size", "8", "--batch-size", "16", "--eval-batch-size", "500",
        "--epochs", "1", "--max-steps", "1"]


def tiny_run(tmp_path, method, name="run"):
    """Best checkpoint of the final stage of a one-step run of `method` on synthetic data."""
    out = tmp_path / name
    assert train.main(TINY + ["--method", method, "--out", str(out)]) == 0
    return str(out / registry.METHODS[method].stages[-1].name / "best.safetensors")


# ---------------------------------------------------------------------------------------------
# first contact: the README's two commands


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Two commands on a fresh machine", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    return commands


def _system_part(command):
    """What a command runs before it creates the virtual environment."""
    head, separator, _ = command.partition("python3 -m venv")
    assert separator, command
    return head.rstrip().removesuffix("&&").rstrip()


def _stub(directory, name, body):
    path = directory / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("uid, has_sudo", [(0, False), (1000, True)], ids=["root-without-sudo", "user-with-sudo"])
def test_readme_commands_run_as_root_without_sudo_and_as_user_with_sudo(tmp_path, uid, has_sudo):
    # Stubs stand in for id, apt-get and sudo; PATH holds nothing else, so a bare `sudo` as root fails.
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    _stub(bin_dir, "id", f'[ "$1" = -u ] && echo {uid} || echo "uid={uid}"')
    _stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}')
    if has_sudo:
        _stub(bin_dir, "sudo", f'echo "sudo $*" >> {log}; exec "$@"')
    for command in _readme_commands():
        log.write_text("")
        result = subprocess.run(["/bin/bash", "-c", _system_part(command)], env={"PATH": str(bin_dir)},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)
        calls = log.read_text().splitlines()
        installs = [c for c in calls if c.startswith("apt-get install")]
        updates = [c for c in calls if c.startswith("apt-get update")]
        assert len(updates) == 1 and len(installs) == 1, calls
        assert calls.index(updates[0]) < calls.index(installs[0]), "apt-get update must come first"
        assert {"python3-venv", "dataset-fashion-mnist", "-y"} <= set(installs[0].split()), installs
        sudo_calls = [c for c in calls if c.startswith("sudo ")]
        assert sudo_calls == ([f"sudo {c}" for c in updates + installs] if has_sudo else []), calls


def test_readme_main_job_and_ci_agree():
    main_job, tests = _readme_commands()
    assert "minibvit.train --dataset fashion-mnist --method binaryvit" in main_job
    invocation = tests.rpartition(".venv/bin/python ")[2]  # the test run: the command's last part
    assert invocation.startswith("-m pytest reference_tests -q"), tests
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert f'"$VENV/bin/python" {invocation}\n' in ci, f"CI does not run the README's {invocation!r}"


# ---------------------------------------------------------------------------------------------
# integrity: a digest in every checkpoint, verified on load


def _tensors():
    rng = np.random.default_rng(0)
    return {"head.weight": rng.standard_normal((3, 4)).astype(np.float32),
            "codes": np.arange(6, dtype=np.int8).reshape(2, 3), "scale": np.array(0.5),
            "empty": np.zeros((0, 2), np.float16), "mask": np.array([True, False])}


def _header(raw):
    length = int.from_bytes(raw[:8], "little")
    return length, json.loads(raw[8:8 + length])


def _flip_bit(raw, offset, bit=0):
    out = bytearray(raw)
    out[offset] ^= 1 << bit
    return bytes(out)


def _assert_refused(path, content, match=r"is corrupt: .*digest"):
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=match) as caught:
        checkpoint.load_checkpoint(path)
    assert str(path) in str(caught.value) and "restore a good copy" in str(caught.value)


def test_every_checkpoint_stores_a_digest_that_a_clean_load_verifies(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save_checkpoint(path, _tensors(), {"epoch": 2, "note": "x"})
    _, header = _header(path.read_bytes())
    payload = json.loads(header["__metadata__"]["minibvit"])
    assert re.fullmatch(r"[0-9a-f]{64}", payload["sha256"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors, metadata = checkpoint.load_checkpoint(path)
    assert metadata == {"epoch": 2, "note": "x"}
    # the digest is of the values: byte order and memory layout of the saved arrays do not change it
    odd = {"w": np.arange(12, dtype=">f8").reshape(3, 4).T}
    assert checkpoint.content_digest(odd, {}) == checkpoint.content_digest(
        {"w": np.ascontiguousarray(odd["w"], dtype="<f8")}, {})
    assert checkpoint.content_digest(odd, {}) != checkpoint.content_digest(odd, {"a": 1})


def test_flipped_payload_bit_is_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    checkpoint.save_checkpoint(good, _tensors(), {"epoch": 2})
    raw = good.read_bytes()
    length, header = _header(raw)
    start = 8 + length
    for name, entry in header.items():
        if name == "__metadata__" or entry["data_offsets"][0] == entry["data_offsets"][1]:
            continue
        first, end = entry["data_offsets"]
        for offset in (start + first, start + end - 1):  # first and last byte of every tensor
            _assert_refused(tmp_path / "flipped.safetensors", _flip_bit(raw, offset, bit=3))
    assert good.read_bytes() == raw


def test_edited_dtype_shape_or_metadata_is_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    checkpoint.save_checkpoint(good, _tensors(), {"epoch": 2})
    raw = good.read_bytes()
    edits = [(b'"dtype":"F32"', b'"dtype":"I32"'),   # same size: safetensors itself accepts it
             (b'"shape":[3,4]', b'"shape":[4,3]'),
             (b'\\"epoch\\": 2', b'\\"epoch\\": 3')]
    for old, new in edits:
        assert raw.count(old) == 1, old
        _assert_refused(tmp_path / "edited.safetensors", raw.replace(old, new))


def test_file_without_digest_loads_with_a_warning(tmp_path):
    from safetensors.numpy import save

    legacy = tmp_path / "legacy.safetensors"
    payload = json.dumps({"format_version": 1, "metadata": {"epoch": 1}})
    legacy.write_bytes(save({"w": np.ones(3, np.float32)}, metadata={"minibvit": payload}))
    with pytest.warns(checkpoint.CheckpointWarning, match=r"legacy.safetensors has no content digest"):
        tensors, metadata = checkpoint.load_checkpoint(legacy)
    assert metadata == {"epoch": 1} and np.array_equal(tensors["w"], np.ones(3, np.float32))


def test_training_and_packed_files_refuse_a_flipped_bit(tmp_path):
    from minibvit import engine

    best = tiny_run(tmp_path, "binary")
    packed = tmp_path / "packed.safetensors"
    engine.export(best, packed)
    for path, load in ((best, train.load_model), (str(packed), engine.PackedViT.load)):
        raw = open(path, "rb").read()
        load(path)
        flipped = tmp_path / ("flipped-" + os.path.basename(path))
        flipped.write_bytes(_flip_bit(raw, len(raw) - 1, bit=6))
        with pytest.raises(checkpoint.CheckpointError, match="digest"):
            load(str(flipped))
    # the command-line tools report it as an error, not a traceback
    flipped = str(tmp_path / "flipped-best.safetensors")
    result = subprocess.run([sys.executable, "-m", "minibvit.evaluate", "--checkpoint", flipped], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "error:" in result.stderr and "digest" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# data: CIFAR-10 with both layouts; the image-size suggestion


def test_cifar_data_dir_with_both_layouts_is_refused(tmp_path):
    py, binary = tmp_path / "cifar-10-batches-py", tmp_path / "cifar-10-batches-bin"
    py.mkdir()
    binary.mkdir()
    (py / "data_batch_1").write_bytes(b"")
    (binary / "data_batch_1.bin").write_bytes(b"")
    with pytest.raises(data.DatasetError) as caught:
        data.load_dataset("cifar10", "test", data_dir=tmp_path)
    message = str(caught.value)
    assert str(py) in message and str(binary) in message and "data_dir" in message, message
    # both kinds of batch files side by side
    (py / "data_batch_1.bin").write_bytes(b"")
    with pytest.raises(data.DatasetError, match="more than one copy"):
        data.load_dataset("cifar10", "test", data_dir=py)
    # one copy named directly is read (and here found incomplete), not refused as ambiguous
    with pytest.raises(data.DatasetError, match="lacks test_batch.bin"):
        data.load_dataset("cifar10", "test", data_dir=binary)


@pytest.mark.skipif(not os.path.exists(FASHION_MNIST), reason="needs Debian's dataset-fashion-mnist")
def test_evaluate_suggests_only_options_it_has(tmp_path, capsys):
    from minibvit import evaluate

    best = tiny_run(tmp_path, "fp")  # a 32x32 RGB model; Fashion-MNIST is 28x28 grey
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", best, "--dataset", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert "28x28 with 1 channel(s), but the model expects 32x32 with 3" in err, err
    suggested = set(re.findall(r"(--[a-z][a-z-]*)", err))
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    options = set(re.findall(r"(--[a-z][a-z-]*)", capsys.readouterr().out))
    assert suggested <= options, f"suggests {suggested - options}, which evaluate does not have"


# ---------------------------------------------------------------------------------------------
# docs/gsb.md on the official code


def test_gsb_doc_states_what_the_official_code_does():
    text = " ".join(open(os.path.join(ROOT, "docs", "gsb.md")).read().split())
    assert "inf·0" not in text and "NaN there" not in text
    assert "raises `ZeroDivisionError`" in text and "`1/math.sqrt(0)`" in text
    # first call: alpha2' = alpha2 - alpha1, then alpha3 - (alpha2' + alpha1) = alpha3 - alpha2
    assert "`alpha3' = alpha3 − (alpha2' + alpha1)`" in text and "`alpha3 − alpha2`" in text
    assert "`alpha3 − (alpha1 + alpha2)`" not in text


# ---------------------------------------------------------------------------------------------
# why tiny binary students score exactly chance


def test_bit_init_binarizes_near_uniform_attention_to_zero(rng):
    # BiT's unsigned elastic binarizer starts at alpha0 = 4 mean|x| and outputs alpha where
    # x / alpha rounds to 1, i.e. x > alpha0 / 2 = 2 mean x. A softmax row of N tokens has mean 1/N,
    # so a row whose largest probability is below 2/N binarizes to all zeros.
    n_tokens = 17
    scores = rng.normal(0, 0.05, (4, 2, n_tokens, n_tokens))
    probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    assert probs.max() < 2 / n_tokens
    alpha = quant.elastic_alpha_init(probs, signed=False)
    np.testing.assert_allclose(alpha, 4 / n_tokens, rtol=1e-12)
    out, _ = quant.elastic_binarize_forward(probs, alpha, signed=False)
    assert not out.any()
    peaked = probs.copy()
    peaked[..., 0] += 0.5
    peaked /= peaked.sum(-1, keepdims=True)
    out, _ = quant.elastic_binarize_forward(peaked, quant.elastic_alpha_init(peaked, signed=False), signed=False)
    np.testing.assert_array_equal(out != 0, peaked / quant.elastic_alpha_init(peaked, signed=False) > 0.5)
    assert out.any()


@pytest.mark.parametrize("method", ["binary", "binaryvit"])
def test_zero_attention_makes_the_logits_independent_of_the_image(rng, method):
    # A fresh (or barely trained) ViT attends almost uniformly, so the first batch, which sets the
    # scales, binarizes its attention to all zeros. Two things follow: the attention output is zero,
    # and the binarizer after it (proj.input) is initialised from that all-zero batch, alpha = 0,
    # floored at SCALE_FLOOR. The class token then receives nothing from the patches: every image
    # gets the same logits, which is exactly chance accuracy on a balanced test set.
    cfg = ViTConfig(image_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=16, depth=1,
                    num_heads=2, mlp_ratio=2.0)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)

    def initialised(keep_attention_binarizer):
        quantizers = schemes.build_quantizers(cfg, method)
        if not keep_attention_binarizer:
            del quantizers["blocks.0.attn.attn"]  # full-precision attention probabilities
        model = build_vit(cfg, dtype=np.float32, quantizers=quantizers)
        model.forward(x, training=True, rng=np.random.default_rng(0))  # sets every scale from x
        return model

    dead = initialised(True)
    logits, _ = dead.forward(x, training=False)
    assert np.ptp(logits, axis=0).max() == 0, "the logits should not depend on the image"
    assert dead.quantizers["blocks.0.attn.proj.input"].params["alpha"] <= quant.SCALE_FLOOR
    # the same model and batch with full-precision attention probabilities sees the image
    alive = initialised(False)
    logits, _ = alive.forward(x, training=False)
    assert np.ptp(logits, axis=0).max() > 0
    assert alive.quantizers["blocks.0.attn.proj.input"].params["alpha"] > 100 * quant.SCALE_FLOOR
