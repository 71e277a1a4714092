"""Data-parallel training (minibvit.distributed): slices, the gradient reducer, the backward hook and the
quantizers' collective in one process; with mpi4py and mpiexec, 2 ranks against 1 process for every
method as the registry configures it (dp_loop.py), resume with another number of ranks, the collectives
and every quantizer function that takes one (dp_collectives.py), and a rank that dies, raises or hangs."""
import contextlib
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
sys.path.insert(0, HERE)
from dp_loop import RUNS  # noqa: E402

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

METHODS = list(RUNS)
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


class RecordingCollective(distributed.SingleProcess):
    """One process's collectives (identities) that record which were called."""

    def __init__(self):
        self.calls = []

    def sum(self, x):
        self.calls.append("sum")
        return super().sum(x)

    def max(self, x):
        self.calls.append("max")
        return super().max(x)

    def min(self, x):
        self.calls.append("min")
        return super().min(x)

    def mean(self, x, weight=1.0):
        self.calls.append("mean")
        return super().mean(x, weight)

    def gather(self, x):
        self.calls.append("gather")
        return super().gather(x)


REGISTRY_TABLES = [("fp", {}), ("binary", {}), ("binaryvit", {}), ("binaryvit", {"asm_center": "median"}),
                   ("tervit_w8a8", {}), ("tervit", {}), ("gsb_stage1", {}), ("gsb", {}), ("gsb", {"gsb_max_over": "row"}),
                   ("gsb", {"gsb_mode": "principled"})]


@pytest.mark.parametrize("table,options", REGISTRY_TABLES)
def test_one_process_forward_with_the_quantizers_collective_gives_the_same_bits(table, options):
    """Two training steps' forward and backward (first-batch initialisation, then running updates), float32:
    inside global_quantizer_state with SingleProcess the bits equal those without it; the quantizers call
    the collective in training forwards only, and are reset afterwards."""
    from minibvit import methods

    cfg = ViTConfig(image_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=5,
                    distilled=table.startswith("gsb"))
    models = [ViT(cfg, methods.build_quantizers(cfg, table, options=methods.QuantizerOptions(**options)), seed=3)
              for _ in range(2)]
    comm = RecordingCollective()
    rng = np.random.default_rng(4)
    for step in range(2):
        x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
        outputs = []
        for use_collective, model in zip((False, True), models):
            with distributed.global_quantizer_state(model, comm) if use_collective else contextlib.nullcontext():
                logits, cache = model.forward(x, training=True)
            dlogits = tuple(np.ones_like(z) for z in logits) if cfg.distilled else np.ones_like(logits)
            model.backward(dlogits, cache)
            outputs.append((logits, dict(model.grads), model.state_dict()))
        (l0, g0, s0), (l1, g1, s1) = outputs
        assert np.array_equal(np.stack(l0) if cfg.distilled else l0, np.stack(l1) if cfg.distilled else l1), table
        assert g0.keys() == g1.keys() and all(np.array_equal(g0[k], g1[k]) for k in g0), table
        assert all(np.array_equal(s0[k], s1[k], equal_nan=True) for k in s0), table
    quantizers = [q for q in models[1].quantizers.values()] + [q.inner for q in models[1].quantizers.values()
                                                                 if hasattr(q, "inner")]
    assert all(q.collective is None for q in quantizers)
    activations = [role for role in models[1].quantizers if not role.endswith(".weight")]
    if table == "tervit":  # one MAX per min-max activation quantizer per forward (unsigned: of (-min, max))
        assert comm.calls == ["max"] * 2 * len(activations)
    assert bool(comm.calls) == bool(activations), table
    calls = len(comm.calls)
    with distributed.global_quantizer_state(models[1], comm):
        models[1].forward(x, training=False)
    assert len(comm.calls) == calls, "an evaluation forward called a collective"


def test_global_quantizer_state_refuses_a_quantizer_without_a_collective():
    class Opaque:
        def forward(self, x, training):
            return x, None

    model = ViT(ViTConfig(image_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=5),
                {"blocks.0.mlp.fc1.input": Opaque()})
    with pytest.raises(TypeError, match="blocks.0.mlp.fc1.input.*no 'collective'"):
        with distributed.global_quantizer_state(model, distributed.SingleProcess()):
            pass


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
    """3 steps of every dp_loop method: one process (accum 2) and 2 ranks (accum 2, batch 11: uneven; the
    methods with decisions on a data statistic on dp_loop.BALANCED_BATCH, see dp_loop.RUNS)."""
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
@pytest.mark.parametrize("method", ["binaryvit", "gsb", "lsq"])
def test_without_the_quantizers_collective_the_replicas_diverge_and_the_job_stops(runs, method):
    result = _run(2, "dp_loop.py", "--out", runs / f"no-state-{method}", "--methods", method, "--accum", 2,
                  "--no-state-collectives", expect_ok=False)
    assert result.returncode != 0 and "the model state differs between ranks" in result.stderr


@needs_mpi
def test_without_the_quantizers_collective_min_max_scales_change_the_training(runs):
    """TerViT's min-max scales are no state: the replicas stay equal, but each rank quantized its rows
    with its own scale, so the step is not the one of one process."""
    _run(2, "dp_loop.py", "--out", runs / "no-state-tervit", "--methods", "tervit", "--accum", 2, "--no-state-collectives")
    got, _ = _weights(runs / "no-state-tervit" / "tervit" / "final.safetensors")
    want, _ = _weights(runs / "one" / "tervit" / "final.safetensors")
    assert max(np.abs(got[k] - want[k]).max() for k in want) > 1e-6


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
