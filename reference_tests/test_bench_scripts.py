"""Smoke test of the training-step benchmark (scripts/bench_train_step.py) at a tiny size: every
section of its report is printed and its JSON holds every figure. No timing is asserted."""
import json
import os
import subprocess
import sys

import pytest

from minibvit import cost
from minibvit.model import ViTConfig

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "bench_train_step.py")
TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--batch", "4", "--steps", "1", "--threads", "1"]


def _run(*extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, SCRIPT, *TINY, *extra], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out = _run("--methods", "fp", "binary", "--json", str(path))
    with open(path) as f:
        return out, json.load(f)


def test_report_has_every_section(report):
    out, _ = report
    for section in ("cpu: ", "blas: ", "versions: numpy", "OPENBLAS_CORETYPE: ", "OPENBLAS_L2_SIZE: ",
                    "load average before: ", "training step (fwd + bwd + AdamW)", "step/GEMM",
                    "the teacher's forward", "peak memory of one training step", "load average after: "):
        assert section in out, f"missing {section!r} in:\n{out}"
    rows = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert {"fp", "binary"} <= rows


def test_json_holds_every_figure(report):
    _, results = report
    assert results["methods"] == ["fp", "binary"]
    for name in ("fp", "binary"):
        med = results["median"][name]
        for key in ("minibvit", "gemm", "vs_fp", "step_over_gemm"):
            assert med[key] > 0, (name, key)
        if results["machine"]["torch"] is not None:
            assert med["torch"] > 0 and med["torch_vs_fp"] > 0
        assert len(results["times"][name]["minibvit"]) == 1
        memory = results["memory"][name]
        assert memory["peak_mib"] >= memory["before_mib"] > 0
    assert results["median"]["fp"]["vs_fp"] == 1.0
    assert results["teacher_forward"]["median"] > 0
    assert set(results["machine"]["blas_env"]) == {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"}
    assert len(results["machine"]["load_before"]) == len(results["machine"]["load_after"]) == 3


def test_gemm_floor_counts_every_matmul_of_the_step(report):
    """Forward MACs (minibvit.cost, independent of the benchmark) x 2 FLOPs x 3 (forward, d input,
    d weight: every forward product has two backward products of the same size)."""
    _, results = report
    cfg = ViTConfig(**results["config"])
    macs = cost.model_cost(cfg, "fp", batch=results["batch"]).totals.macs
    assert results["times"]["fp"]["gemm_gflop"] * 1e9 == pytest.approx(6 * macs, rel=1e-12)


def test_profile_lists_quantizers_and_adamw():
    out = _run("--methods", "binary", "--profile")
    assert "binary: step" in out and "fp: step" in out
    assert "AdamW.step" in out and "linear_forward" in out
    assert "WeightBinarizer.forward" in out or "WeightBinarizer.backward" in out, out
