"""python -m minibvit.train on several MPI ranks (docs/scaling.md, "Trainer integration"): 2 ranks end
with the weights of 1 process with the same global batch (float64, uneven slices, --accum-steps),
only rank 0 writes, a rank that dies or raises ends the job with the last checkpoint intact, and a
1-rank --resume from it continues the run. A binary student, whose quantizers take statistics of
their input in every forward (made global by the quantizers' collectives), does the same."""
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from minibvit import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
if not os.path.exists(MPIEXEC):
    MPIEXEC = shutil.which("mpiexec")
HAVE_MPI = importlib.util.find_spec("mpi4py") is not None and MPIEXEC is not None
pytestmark = [pytest.mark.impl_specific, pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec (pip install 'minibvit[mpi]')")]
LAUNCH_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
              "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
# a tiny float64 ViT on synthetic data; global batch 11: uneven slices on 2 ranks and 2 micro-steps
TINY = ["--dataset", "synthetic", "--image-size", "16", "--patch-size", "8", "--embed-dim", "16", "--depth", "2",
        "--num-heads", "2", "--batch-size", "11", "--epochs", "1", "--dtype", "float64", "--eval-batch-size", "250",
        "--lr", "1e-2"]


def _run(ranks, args, script=None, timeout=120):
    """python -m minibvit.train (or a script) in 1 process (ranks=0) or under mpiexec -n ranks."""
    cmd = [sys.executable, *([script] if script else ["-m", "minibvit.train"]), *args]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def _weights(path):
    tensors, meta = checkpoint.load_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}, meta


def _assert_same_weights(path, reference, rtol=1e-12):
    """Whole model to rtol, every tensor to 10 rtol: the ranks sum in another order than one process."""
    got, _ = _weights(path)
    want, _ = _weights(reference)
    assert got.keys() == want.keys()
    assert all(v.dtype == np.float64 for v in got.values())
    total = np.sqrt(sum(float(np.sum((got[k] - want[k]) ** 2)) for k in want))
    assert total <= rtol * np.sqrt(sum(float(np.sum(w ** 2)) for w in want.values())), f"{path} vs {reference}"
    for k in want:
        error, size = np.linalg.norm(got[k] - want[k]), np.linalg.norm(want[k])
        assert error <= 10 * rtol * size, f"{k}: relative error {error / size:.2e}"


def _step_records(out):
    with open(os.path.join(out, "fp", "log.jsonl")) as f:
        return [line for line in f if '"loss"' in line]


def test_two_ranks_with_accumulation_end_with_the_weights_of_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _ok(_run(0, TINY + ["--method", "fp", "--max-steps", "3", "--out", one]))
    _ok(_run(2, TINY + ["--method", "fp", "--max-steps", "3", "--accum-steps", "2", "--out", two]))
    _assert_same_weights(os.path.join(two, "fp", "last.safetensors"), os.path.join(one, "fp", "last.safetensors"))
    assert len(_step_records(two)) == 3  # rank 0 alone logs
    _, meta = _weights(os.path.join(two, "fp", "last.safetensors"))
    _, meta_one = _weights(os.path.join(one, "fp", "last.safetensors"))
    assert meta["best_acc"] == meta_one["best_acc"]  # the sharded evaluation counts every test image once


def test_a_killed_rank_ends_the_job_and_one_rank_resumes_from_the_last_checkpoint(tmp_path):
    reference, run = str(tmp_path / "reference"), str(tmp_path / "run")
    _ok(_run(0, TINY + ["--method", "fp", "--max-steps", "5", "--out", reference]))
    killed = _run(2, ["kill", "3"] + TINY + ["--method", "fp", "--max-steps", "5", "--save-every", "2", "--out", run],
                  script=os.path.join(HERE, "train_fault.py"), timeout=60)
    assert killed.returncode != 0, killed.stderr
    last = os.path.join(run, "fp", "last.safetensors")
    _, meta = _weights(last)  # intact: it loads, and it is the checkpoint of step 2
    assert (meta["epoch"], meta["step"], meta.get("complete", False)) == (0, 2, False)
    _ok(_run(0, TINY + ["--method", "fp", "--max-steps", "3", "--resume", "--out", run]))
    _assert_same_weights(last, os.path.join(reference, "fp", "last.safetensors"))


def test_a_raising_rank_ends_the_job_with_its_traceback(tmp_path):
    failed = _run(2, ["raise", "1"] + TINY + ["--method", "fp", "--max-steps", "3", "--out", str(tmp_path / "r")],
                  script=os.path.join(HERE, "train_fault.py"), timeout=60)
    assert failed.returncode != 0
    assert "injected failure at step 1" in failed.stderr and "[rank 1/2]" in failed.stderr


# TINY at an odd width (15 = 3 heads of 5): the qkv layer's +-1 dot products have 15 terms and those of
# the binary Q K^T 5, so none sums to 0 and no key is 0 * alpha. At an even width some keys are 0 * alpha plus
# the key bias, and the key bias's gradient is 0 up to rounding (softmax ignores what a key bias adds to
# a whole row of scores), so its rounding noise, which 1 process and 2 ranks sum in different orders,
# decides the sign of those keys: 1e-5 apart after 3 steps on an AMD EPYC Zen 4, a discrete flip, not
# a rounding error of the collectives.
def _with(args, flag, value):
    """args with the value after flag replaced."""
    i = args.index(flag)
    return args[:i + 1] + [value] + args[i + 2:]


ODD_TINY = _with(_with(TINY, "--embed-dim", "15"), "--num-heads", "3")


def test_a_binary_student_on_two_ranks_ends_with_the_weights_of_one_process(tmp_path):
    """8-bit min-max patch/head inputs, elastic first-batch scales: the quantizers' collectives make them
    global, so 2 ranks (uneven slices of the global batch of 11) equal 1 process (ODD_TINY: why odd)."""
    teacher = str(tmp_path / "teacher")
    _ok(_run(0, ODD_TINY + ["--method", "fp", "--max-steps", "1", "--out", teacher]))
    student = ODD_TINY + ["--method", "binary", "--teacher", os.path.join(teacher, "fp", "best.safetensors"),
                      "--max-steps", "3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _ok(_run(0, student + ["--out", one]))
    _ok(_run(2, student + ["--out", two], timeout=180))
    _assert_same_weights(os.path.join(two, "binary", "last.safetensors"), os.path.join(one, "binary", "last.safetensors"))
