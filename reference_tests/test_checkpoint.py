"""Tests of minibvit.checkpoint: exact round trips, atomic writes (a failure or SIGKILL during a
save leaves the previous checkpoint intact), and clear errors for missing, truncated, corrupt,
foreign and future-version files, which are never modified by a failed load."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minibvit import checkpoint
from minibvit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

safetensors_numpy = pytest.importorskip("safetensors.numpy")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "blocks.0.attn.qkv.weight": rng.standard_normal((12, 4)),
        "head.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "scale": np.array(0.5),
        "empty": np.zeros((0, 3), np.float16),
        "mask": np.array([True, False, True]),
        "step": np.array([7], np.int64),
        "codes": np.arange(6, dtype=np.int8).reshape(2, 3),
    }


METADATA = {"config": {"embed_dim": 4, "method": "binaryvit", "lr": 1e-3, "drop": 0.0},
            "epoch": 2, "step": 123, "best": None, "history": [0.1, 0.25], "done": False,
            "huge": 2**100, "note": "ünïcode"}


def test_round_trip(tmp_path):
    path = tmp_path / "last.safetensors"
    tensors = _tensors()
    save_checkpoint(path, tensors, METADATA)
    loaded, metadata = load_checkpoint(path)
    assert metadata == METADATA
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape, name
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)
    assert sorted(os.listdir(tmp_path)) == ["last.safetensors"], "temporary file left behind"
    # a non-contiguous, big-endian array is stored by value
    odd = np.arange(12, dtype=">f8").reshape(3, 4).T
    save_checkpoint(path, {"odd": odd}, {})
    np.testing.assert_array_equal(load_checkpoint(path)[0]["odd"], odd)


@given(arrays=st.dictionaries(
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8),
    hnp.arrays(st.sampled_from([np.float64, np.float32, np.int32, np.uint8, np.bool_]),
               hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    max_size=4))
@settings(max_examples=30, deadline=None)
def test_round_trip_property(tmp_path_factory, arrays):
    path = tmp_path_factory.mktemp("ck") / "c.safetensors"
    save_checkpoint(path, arrays, {"n": len(arrays)})
    loaded, metadata = load_checkpoint(path)
    assert metadata == {"n": len(arrays)} and set(loaded) == set(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        # bit-exact, including NaN payloads and signed zeros
        assert loaded[name].tobytes() == np.ascontiguousarray(array).tobytes(), name


@pytest.mark.parametrize("bit_generator", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
def test_rng_state_round_trip_through_checkpoint(tmp_path, bit_generator):
    rng = np.random.Generator(getattr(np.random, bit_generator)(11))
    rng.random(3)
    rng.integers(0, 10, 1, dtype=np.uint32)  # leaves a buffered 32-bit half in PCG64-like states
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {}, {"rng": checkpoint.rng_state_to_json(rng)})
    restored = checkpoint.rng_from_json(load_checkpoint(path)[1]["rng"])
    np.testing.assert_array_equal(restored.random(5), rng.random(5))
    np.testing.assert_array_equal(restored.integers(0, 2**31, 5, dtype=np.uint32),
                                  rng.integers(0, 2**31, 5, dtype=np.uint32))


def test_rng_state_errors():
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        checkpoint.rng_state_to_json(np.random.RandomState(0))
    with pytest.raises(CheckpointError, match="'Mystery'.*PCG64"):
        checkpoint.rng_from_json({"bit_generator": "Mystery"})
    state = checkpoint.rng_state_to_json(np.random.default_rng(0))
    del state["state"]
    with pytest.raises(CheckpointError, match="invalid PCG64 RNG state"):
        checkpoint.rng_from_json(state)


def test_metadata_must_be_plain_json(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": np.ones(2)}, {"epoch": 1})
    before = path.read_bytes()
    bad = [({"lr": np.float32(0.1)}, TypeError, r"metadata\['lr'\] is a numpy.float32.*\.item\(\)"),
           ({"shape": (1, 2)}, TypeError, "tuple"),
           ({"loss": float("nan")}, ValueError, "nan"),
           ({"a": [1, float("inf")]}, ValueError, r"metadata\['a'\]\[1\] is inf"),
           ({1: "x"}, TypeError, "non-string key 1"),
           ([1], TypeError, "metadata must be a dict")]
    for metadata, error, match in bad:
        with pytest.raises(error, match=match):
            save_checkpoint(path, {"w": np.zeros(2)}, metadata)
    for tensors, error, match in [({"w": np.array(["a"])}, TypeError, "dtype"),
                                  ({"w": np.array([1j])}, TypeError, "dtype"),
                                  ({"w": [1.0]}, TypeError, "numpy array"),
                                  ({"__metadata__": np.ones(1)}, ValueError, "names"),
                                  ([np.ones(1)], TypeError, "dict")]:
        with pytest.raises(error, match=match):
            save_checkpoint(path, tensors, {})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_save_to_bad_locations(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; create it"):
        save_checkpoint(tmp_path / "missing" / "c.safetensors", {}, {})
    with pytest.raises(CheckpointError, match="is a directory"):
        save_checkpoint(tmp_path, {}, {})


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, failing):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"w": np.zeros(1000)}, {"epoch": 1})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "write":
        real_open = open

        class HalfWritingFile:
            def __init__(self, file):
                self.file = file

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

            def write(self, data):
                self.file.write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")

        def half_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return HalfWritingFile(handle) if "x" in mode else handle

        monkeypatch.setattr("builtins.open", half_open)
    else:
        monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"w": np.ones(1000)}, {"epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.safetensors"], "temporary file left behind"
    assert load_checkpoint(path)[1] == {"epoch": 1}


# Run in a fresh interpreter: fork a process that saves checkpoints in a loop, SIGKILL it at a
# random moment during one of its saves, check that the file at `path` is one complete checkpoint
# (the previous or the new one), and repeat.
_KILLER = """
import glob, os, signal, sys, time
import numpy as np
from minibvit.checkpoint import load_checkpoint, save_checkpoint
path, trials = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
for _ in range(2):  # warm-up: the first saves create the file and fault in the pages
    save_checkpoint(path, {"w": np.zeros(2_000_000), "i": np.array(0)}, {"i": 0})
times = []
for _ in range(5):
    started = time.perf_counter()
    save_checkpoint(path, {"w": np.zeros(2_000_000), "i": np.array(0)}, {"i": 0})
    times.append(time.perf_counter() - started)
save_seconds = sorted(times)[2]  # the median save, not one slowed by a cold start or a busy disk
killed_mid_save = 0
for trial in range(trials):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        for i in range(1, 10**9):
            os.write(write_end, b"s")  # a save starts now
            save_checkpoint(path, {"w": np.full(2_000_000, float(i)), "i": np.array(i)}, {"i": i})
    for _ in range(1 + trial % 3):
        os.read(read_end, 1)
    time.sleep(rng.uniform(0.3, 1.1) * save_seconds)  # the second half of a save writes the file
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read_end)
    os.close(write_end)
    leftovers = glob.glob(os.path.join(os.path.dirname(path), ".*.tmp"))
    killed_mid_save += bool(leftovers)
    for leftover in leftovers:
        os.unlink(leftover)
    tensors, metadata = load_checkpoint(path)
    i = metadata["i"]
    assert int(tensors["i"]) == i and np.all(tensors["w"] == float(i)), (trial, i)
print("ok", trials, killed_mid_save)
"""


def test_sigkill_during_saves_leaves_a_complete_checkpoint(tmp_path):
    environment = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    trials = 16
    result = subprocess.run([sys.executable, "-c", _KILLER, str(tmp_path / "last.safetensors"), str(trials)],
                            env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    word, done, killed_mid_save = result.stdout.split()
    assert word == "ok" and int(done) == trials
    # the kills must actually have hit saves in progress for the test to mean something
    assert int(killed_mid_save) >= 1, f"only {killed_mid_save} of {trials} kills landed during a save"


def _foreign(path):
    safetensors_numpy.save_file({"w": np.ones(2, np.float32)}, str(path), metadata={"format": "pt"})


def test_load_errors_leave_the_file_untouched(tmp_path):
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, _tensors(), METADATA)
    raw = good.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")

    def check(name, content, match):
        path = tmp_path / name
        path.write_bytes(content)
        os.utime(path, (1_000_000, 1_000_000))
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path)
        assert path.read_bytes() == content and path.stat().st_mtime == 1_000_000, "load modified the file"

    check("empty", b"", r"truncated or not a safetensors file \(0 bytes\)")
    check("cut_in_length", raw[:5], "truncated")
    check("cut_in_header", raw[: 8 + header_length // 2], "truncated or not a safetensors file")
    check("cut_in_data", raw[: 8 + header_length + 10], "truncated: its tensors need")
    check("last_byte_missing", raw[:-1], "truncated")
    check("garbage_header", raw[:8] + b"\xff" * header_length + raw[8 + header_length:], "header is not JSON")
    check("pickle", b"\x80\x04\x95" + bytes(range(200)), "truncated or not a safetensors file")
    check("array_header", (2).to_bytes(8, "little") + b"[]", "header is not an object")
    _foreign(tmp_path / "foreign")
    check("foreign", (tmp_path / "foreign").read_bytes(), "not a minibvit checkpoint")
    future = json.dumps({"format_version": 99, "metadata": {}})
    check("future", safetensors_numpy.save({"w": np.ones(1)}, metadata={"minibvit": future}),
          "format version 99.*reads version 1")
    check("bad_payload", safetensors_numpy.save({}, metadata={"minibvit": "{not json"}),
          "corrupt minibvit metadata")
    # a header that parses but points outside the data: caught by safetensors, reported as corrupt
    bad_offsets = raw.replace(b'"data_offsets":[0,', b'"data_offsets":[1,', 1)
    assert bad_offsets != raw
    check("bad_offsets", bad_offsets, "corrupt checkpoint")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)
