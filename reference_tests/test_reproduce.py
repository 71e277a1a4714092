"""scripts/reproduce.py: the statistics, the verdicts, and --quick producing the whole table."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.impl_specific

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "scripts", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reproduce = _load()


def test_paired_difference_matches_the_t_interval_by_hand():
    a = {0: 0.80, 1: 0.83, 2: 0.79}
    b = {0: 0.78, 1: 0.80, 2: 0.78, 3: 0.99}  # seed 3 has no partner: left out
    m, lo, hi, n = reproduce.paired_difference(a, b)
    d = [0.02, 0.03, 0.01]
    sd = math.sqrt(sum((x - 0.02) ** 2 for x in d) / 2)
    assert n == 3
    assert m == pytest.approx(0.02, abs=1e-15)
    assert hi - m == pytest.approx(4.303 * sd / math.sqrt(3), rel=1e-12)
    assert m - lo == pytest.approx(hi - m, rel=1e-12)


def test_verdicts_follow_the_interval():
    assert reproduce.verdict((0.02, 0.001, 0.04, 3)) == "reproduced"
    assert reproduce.verdict((-0.02, -0.04, -0.001, 3)).startswith("not reproduced: the opposite")
    assert reproduce.verdict((0.01, -0.01, 0.03, 3)).startswith("not reproduced: no significant")
    assert reproduce.verdict((0.01, float("nan"), float("nan"), 1)).startswith("not testable")
    assert reproduce.verdict(None).startswith("not testable")


def test_t_quantiles_never_narrow_the_interval():
    for df in range(1, 40):
        assert reproduce.t_quantile(df) >= reproduce.t_quantile(df + 1) >= 1.96


def test_every_comparison_names_real_rows():
    for c in reproduce.COMPARISONS:
        assert c.a in reproduce.ROW_BY_KEY and c.b in reproduce.ROW_BY_KEY and c.a != c.b
    keys = [r.key for r in reproduce.ROWS]
    assert len(keys) == len(set(keys))
    for r in reproduce.ROWS:  # every distilled row has its partner without distillation
        if r.kd not in (None, "none"):
            assert r.key + "_nokd" in reproduce.ROW_BY_KEY


def test_students_share_the_setting_teacher_and_budget(tmp_path):
    plan = reproduce.FULL_PLAN
    full = plan.settings[0]
    args = reproduce.train_args(plan, full, reproduce.ROW_BY_KEY["tervit_progressive_tensor"], 2, str(tmp_path))
    assert args[args.index("--teacher") + 1] == reproduce.teacher_path(str(tmp_path), full)
    assert args[args.index("--epochs") + 1] == str(full.epochs)
    assert args[args.index("--ternary-granularity") + 1] == "tensor" and "--tervit-direct" not in args
    fp = reproduce.train_args(plan, full, reproduce.ROW_BY_KEY["fp"], 0, str(tmp_path))
    assert "--teacher" not in fp and fp[fp.index("--epochs") + 1] == str(full.teacher_epochs)
    grs = reproduce.train_args(plan, full, reproduce.ROW_BY_KEY["binary_grs"], 0, str(tmp_path))
    assert float(grs[grs.index("--grs-lambda") + 1]) > 0


def test_quick_table_is_produced_and_reused(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--quick", "--out", str(out), "--no-plot"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out / "results.md").read_text()
    assert "| not run |" not in report and "FAILED" not in done.stderr
    for row in reproduce.ROWS:
        assert f"| {row.label} |" in report
    for c in reproduce.COMPARISONS:
        assert c.claim in report
    results = sorted(out.glob("*/*/seed0/result.json"))
    assert len(results) == len(reproduce.ROWS) * len(reproduce.QUICK_PLAN.settings)
    first = json.loads(results[0].read_text())
    assert 0.0 <= first["test_acc"] <= 1.0 and first["wall_s"] > 0
    # a second invocation reuses every finished run and trains nothing
    mtimes = {p: p.stat().st_mtime_ns for p in results}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(results)} finished before" in again.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_eval_every_evaluates_every_nth_and_the_last_epoch(tmp_path):
    from minibvit import train

    args = ["--dataset", "synthetic", "--method", "fp", "--image-size", "16", "--patch-size", "8", "--embed-dim", "16",
            "--depth", "1", "--num-heads", "2", "--limit-per-class", "4", "--batch-size", "8", "--epochs", "3",
            "--eval-every", "2", "--out", str(tmp_path / "run")]
    assert train.main(args) == 0
    lines = (tmp_path / "run" / "fp" / "log.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines if '"train_acc"' in line]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert ["test_acc" in r for r in epochs] == [False, True, True]
    assert train.main(args[:-4] + ["--eval-every", "0", "--out", str(tmp_path / "bad")]) == 2


def test_run_all_starts_students_once_their_teacher_exists(tmp_path, monkeypatch):
    """Teachers first, the other FP seeds beside them, a setting's students once its teacher's
    checkpoint exists; the students of a setting whose teacher failed are reported, not run."""
    plan = reproduce.QUICK_PLAN
    good, bad = plan.settings
    rows = [reproduce.ROW_BY_KEY[k] for k in ("fp", "binary", "gsb")]
    jobs = [(plan, s, r, seed, str(tmp_path)) for s in plan.settings for r in rows for seed in (0, 1)]
    order = []

    def fake_run(job):
        _, setting, row, seed, out = job
        order.append((setting.key, row.key, seed))
        if reproduce.is_teacher(job):
            if setting is bad:
                return {"row": row.key, "setting": setting.key, "seed": seed, "error": 1, "dir": "x"}
            path = reproduce.teacher_path(out, setting)
            os.makedirs(os.path.dirname(path))
            open(path, "w").close()
        return {"row": row.key, "setting": setting.key, "seed": seed, "test_acc": 0.5, "wall_s": 1.0}

    monkeypatch.setattr(reproduce, "run_one", fake_run)
    said = []
    results, stopped = reproduce.run_all(jobs, 1, said.append)
    assert not stopped and len(results) == len(jobs)
    assert order[:2] == [(good.key, "fp", 0), (bad.key, "fp", 0)]
    assert set(order[2:4]) == {(good.key, "fp", 1), (bad.key, "fp", 1)}  # FP seeds need no teacher
    assert {(s, r, k) for s, r, k in order[4:]} == {(good.key, r, k) for r in ("binary", "gsb") for k in (0, 1)}
    missing = [r for r in results if r.get("error") == "no teacher"]
    assert {(r["setting"], r["row"], r["seed"]) for r in missing} == {(bad.key, r, k) for r in ("binary", "gsb")
                                                                     for k in (0, 1)}


def test_ablation_summary_gives_the_paired_interval(capsys, monkeypatch):
    """scripts/ablate_binaryvit.py's summary uses reproduce.py's paired interval and verdict."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    spec = importlib.util.spec_from_file_location("ablate_binaryvit", os.path.join(ROOT, "scripts", "ablate_binaryvit.py"))
    ablate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablate)
    results = {"lpc1000/binary": {"acc": {"0": 0.70, "1": 0.71, "2": 0.72}},
               "lpc1000/grs_late": {"acc": {"0": 0.72, "1": 0.74, "2": 0.75}}}
    ablate.summarise(results)
    line = [ln for ln in capsys.readouterr().out.splitlines() if "grs_late" in ln][0]
    m, lo, hi, n = reproduce.paired_difference({0: 0.72, 1: 0.74, 2: 0.75}, {0: 0.70, 1: 0.71, 2: 0.72})
    assert n == 3 and f"{100 * m:+.2f} pt" in line and f"[{100 * lo:+.2f}, {100 * hi:+.2f}]" in line
    assert "reproduced" in line
