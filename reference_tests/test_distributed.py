"""Data-parallel training (minibvit.distributed): slices, the gradient reducer and the backward hook in
one process; with mpi4py and mpiexec, 2 ranks against 1 process (dp_loop.py), resume with another
number of ranks, the collectives (dp_collectives.py) and a rank that dies, raises or hangs."""
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from minibvit import checkpoint, distributed, ops
from minibvit.model import ViT, ViTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
if not os.path.exists(MPIEXEC):
    MPIEXEC = shutil.which("mpiexec")
HAVE_MPI = importlib.util.find_spec("mpi4py") is not None and MPIEXEC is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec (pip install 'minibvit[mpi]')")
METHODS = ["fp", "fp_accum1", "binaryvit", "binaryvit_median", "gsb_stage1", "tervit_weights", "lsq"]
LAUNCH_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
              "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **extra)
    return env


def _run(ranks, script, *args, expect_ok=True, **env):
    cmd = [sys.executable, os.path.join(HERE, script), *map(str, args)]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    t0 = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(**env), cwd=ROOT)
    result.elapsed = time.monotonic() - t0
    if expect_ok:
        assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def _weights(path):
    tensors, meta = checkpoint.load_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}, meta


def _assert_same_weights(path, reference, rtol=1e-12):
    got, _ = _weights(path)
    want, _ = _weights(reference)
    assert got.keys() == want.keys()
    total = np.sqrt(sum(float(np.sum((got[k] - want[k]) ** 2)) for k in want))
    assert total <= rtol * np.sqrt(sum(float(np.sum(w ** 2)) for w in want.values())), f"{path} vs {reference}"
    for k in want:  # and every tensor to 10x that (a bias that starts at zero is small after 3 steps)
        error, size = np.linalg.norm(got[k] - want[k]), np.linalg.norm(want[k])
        assert error <= 10 * rtol * size, f"{k}: relative error {error / size:.2e}"


# ---------------------------------------------------------------------------------------------
# one process


@pytest.mark.parametrize("batch,world,accum", [(11, 2, 1), (11, 2, 2), (12, 3, 2), (5, 5, 1), (64, 4, 4)])
def test_batch_slices_cover_the_batch_with_loss_weights_summing_to_one(batch, world, accum):
    parts = [distributed.batch_slices(batch, r, world, accum) for r in range(world)]
    rows = sorted(i for per_rank in parts for p in per_rank for i in range(batch)[p.slice])
    assert rows == list(range(batch))
    assert sum(p.weight for per_rank in parts for p in per_rank) == pytest.approx(1.0, abs=1e-15)
    for a in range(accum):
        assert sum(per_rank[a].batch_fraction for per_rank in parts) == pytest.approx(1.0, abs=1e-15)
        sizes = [per_rank[a].slice.stop - per_rank[a].slice.start for per_rank in parts]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert all([p.last for p in per_rank] == [False] * (accum - 1) + [True] for per_rank in parts)


def test_batch_slices_refuse_a_rank_without_rows():
    with pytest.raises(ValueError, match="at least 8 rows"):
        distributed.batch_slices(7, 0, 4, 2)


def _rank_world(environ):
    launch = distributed.detect_launch(environ)
    return launch.rank, launch.world


def test_detect_launch_reads_each_launcher():
    assert distributed.detect_launch({}) == distributed.Launch(0, 1, "python")
    assert _rank_world({"PMI_RANK": "1", "PMI_SIZE": "4"}) == (1, 4)
    assert _rank_world({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"}) == (2, 3)
    assert _rank_world({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8"}) == (3, 8)
    # a batch script that runs python without srun is one process
    assert distributed.detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).world == 1
    assert distributed.detect_launch({"PMIX_RANK": "0"}).world is None
    with pytest.raises(ValueError, match="not integers"):
        distributed.detect_launch({"PMI_RANK": "x", "PMI_SIZE": "2"})
    assert distributed.local_ranks({"MPI_LOCALNRANKS": "2"}) == 2
    assert distributed.local_ranks({"SLURM_NTASKS_PER_NODE": "4(x2)"}) == 4


def test_import_and_single_process_init_never_load_mpi4py():
    code = ("import sys, minibvit.distributed as d; c = d.init(); "
            "assert type(c).__name__ == 'SingleProcess' and d.is_main() and c.world == 1; d.barrier(); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(), cwd=ROOT, timeout=120)


def _tiny_model(distilled=False):
    cfg = ViTConfig(image_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=3, num_heads=2, num_classes=5,
                    distilled=distilled)
    return ViT(cfg, dtype=np.float64, seed=1)


@pytest.mark.parametrize("distilled", [False, True])
def test_backward_hook_reports_every_gradient_once_head_first_blocks_reversed(distilled):
    model = _tiny_model(distilled)
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8))
    logits, cache = model.forward(x, training=True)
    dlogits = tuple(np.ones_like(z) for z in logits) if distilled else np.ones_like(logits)
    calls = []
    model.backward(dlogits, cache, on_grads_ready=lambda names: calls.append(list(names)))
    flat = [n for c in calls for n in c]
    assert sorted(flat) == sorted(model.grads) == sorted(model.parameters())
    assert len(calls) == model.cfg.depth + 2
    assert {n.split(".")[0] for n in calls[0]} == ({"norm", "head", "head_dist"} if distilled else {"norm", "head"})
    for call, block in zip(calls[1:-1], reversed(range(model.cfg.depth))):
        assert {n.split(".")[1] for n in call} == {str(block)} and all(n.startswith("blocks.") for n in call)
    assert all(not n.startswith(("blocks.", "head", "norm.")) for n in calls[-1])


@pytest.mark.parametrize("accum", [1, 3])
def test_reducer_in_one_process_gives_the_global_batch_gradient(accum):
    model = _tiny_model()
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((10, 3, 8, 8)), rng.integers(0, 5, 10)
    logits, cache = model.forward(x, training=True)
    loss, c = ops.cross_entropy_forward(logits, y)
    model.backward(ops.cross_entropy_backward(1.0, c), cache)
    want = {k: v.copy() for k, v in model.grads.items()}
    comm = distributed.SingleProcess()
    reducer = distributed.GradientReducer(model.parameters(), comm, bucket_bytes=2048)
    assert len(reducer.buckets) > 3
    for step in range(2):  # the second step must start from cleared sums
        for part in distributed.batch_slices(len(y), 0, 1, accum):
            logits, cache = model.forward(x[part.slice], training=True)
            loss, c = ops.cross_entropy_forward(logits, y[part.slice])
            reducer.begin(part)
            model.backward(ops.cross_entropy_backward(1.0, c), cache, on_grads_ready=reducer.hook(model))
            grads = reducer.finish()
            assert (grads is None) == (not part.last)
        assert grads.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(grads[k], want[k], rtol=1e-12, atol=1e-15, err_msg=k)
    assert reducer.bytes_per_step == 0


def test_roles_needing_quantizer_collectives_name_min_max_activations_and_gsb():
    from minibvit import methods

    cfg = ViTConfig(image_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=5, distilled=True)

    def roles(method, **overrides):
        return distributed.roles_needing_quantizer_collectives(
            ViT(cfg, methods.build_quantizers(cfg, method, overrides or None)))

    assert roles("fp") == [] and roles("gsb_stage1") == []
    assert roles("binaryvit") == ["patch_embed.proj.input", "head.input", "head_dist.input"]
    assert sorted(roles("gsb")) == sorted(["patch_embed.proj.input", "head.input", "head_dist.input"]
                                         + [f"blocks.{i}.attn.{t}" for i in range(2) for t in ("attn", "v")])
    assert len(roles("tervit")) == 3 + 2 * 8  # patch, head, head_dist inputs; 8 activations per block
    assert roles("binaryvit", **{"patch_embed.proj.input": "fp", "head*.input": "fp"}) == []


def test_reducer_returns_only_the_gradients_the_backward_reported():
    reducer = distributed.GradientReducer({"a": np.zeros(2), "b": np.zeros(3)}, distributed.SingleProcess())
    for part in distributed.batch_slices(2, 0, 1, 2):
        reducer.begin(part)
        reducer.ready(["a"], {"a": np.ones(2)})
        grads = reducer.finish()
    assert list(grads) == ["a"] and np.array_equal(grads["a"], [1.0, 1.0])


def test_reducer_refuses_mixed_dtypes_and_unknown_names():
    with pytest.raises(ValueError, match="one floating dtype"):
        distributed.GradientReducer({"a": np.zeros(2), "b": np.zeros(2, np.float32)}, distributed.SingleProcess())
    reducer = distributed.GradientReducer({"a": np.zeros(2)}, distributed.SingleProcess())
    reducer.begin(distributed.batch_slices(1, 0, 1)[0])
    with pytest.raises(ValueError, match="'b'"):
        reducer.ready(["b"], {"b": np.zeros(2)})


# ---------------------------------------------------------------------------------------------
# several ranks (mpiexec)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """3 steps of every dp_loop method: one process (accum 2) and 2 ranks (accum 2, batch 11: uneven)."""
    root = tmp_path_factory.mktemp("dp")
    methods = ",".join(METHODS)
    _run(0, "dp_loop.py", "--out", root / "one", "--methods", methods, "--accum", 2)
    _run(2, "dp_loop.py", "--out", root / "two", "--methods", methods, "--accum", 2)
    return root


@needs_mpi
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_end_with_the_weights_of_one_process(runs, method):
    _assert_same_weights(runs / "two" / method / "final.safetensors", runs / "one" / method / "final.safetensors")


@needs_mpi
def test_two_ranks_with_accumulation_match_one_process_without(runs):
    _assert_same_weights(runs / "two" / "fp" / "final.safetensors", runs / "one" / "fp_accum1" / "final.safetensors")


@needs_mpi
@pytest.mark.parametrize("method", ["binaryvit", "lsq"])
def test_without_the_state_collectives_the_replicas_diverge_and_the_job_stops(runs, method):
    result = _run(2, "dp_loop.py", "--out", runs / f"no-state-{method}", "--methods", method, "--accum", 2,
                  "--no-state-collectives", expect_ok=False)
    assert result.returncode != 0 and "the model state differs between ranks" in result.stderr


@needs_mpi
def test_without_the_size_normalised_correction_the_scales_learn_differently(runs):
    _run(2, "dp_loop.py", "--out", runs / "no-size", "--methods", "binaryvit,lsq", "--accum", 2, "--no-size-normalised")
    for method, scale in (("binaryvit", "alpha"), ("lsq", "step")):
        got, _ = _weights(runs / "no-size" / method / "final.safetensors")
        want, _ = _weights(runs / "one" / method / "final.safetensors")
        assert max(np.abs(got[k] - want[k]).max() for k in want if k.endswith(scale)) > 1e-6, method


@needs_mpi
def test_resume_with_one_rank_continues_a_two_rank_run(runs):
    resumed = runs / "resumed"
    shutil.copytree(runs / "two", resumed)
    methods = ",".join(METHODS)
    _run(0, "dp_loop.py", "--out", resumed, "--methods", methods, "--accum", 2, "--resume-step", 2)
    for method in METHODS:
        _assert_same_weights(resumed / method / "final.safetensors", runs / "one" / method / "final.safetensors")


@needs_mpi
def test_collectives_give_the_global_statistics():
    for ranks in (2, 3):
        assert "collectives ok" in _run(ranks, "dp_collectives.py").stdout


@needs_mpi
@pytest.mark.parametrize("fault", ["die", "raise", "hang"])
def test_a_failing_rank_ends_the_job_and_the_last_checkpoint_resumes(runs, fault):
    out = runs / f"fault-{fault}"
    result = _run(2, "dp_loop.py", "--out", out, "--steps", 3, f"--{fault}-at", 2, expect_ok=False,
                  MINIBVIT_MPI_TIMEOUT="3")
    print(f"{fault}: exit code {result.returncode} after {result.elapsed:.1f} s")
    assert result.returncode != 0
    expected = {"die": "signal 9", "raise": "RuntimeError: injected failure", "hang": "a peer is dead or stuck"}[fault]
    assert expected in result.stdout + result.stderr
    assert sorted(os.listdir(out / "fp")) == ["step1.safetensors", "step2.safetensors"]
    _, meta = _weights(out / "fp" / "step2.safetensors")  # intact: it loads
    assert meta["step"] == 2
    _run(0, "dp_loop.py", "--out", out, "--steps", 3, "--resume-step", 2)
    _assert_same_weights(out / "fp" / "final.safetensors", runs / "one" / "fp" / "final.safetensors")
