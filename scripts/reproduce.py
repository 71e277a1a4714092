"""The reproduction table: every method, with and without distillation, at full and at limited data.

    python scripts/reproduce.py                  # the whole table on Fashion-MNIST (budget: docs/results.md)
    python scripts/reproduce.py --quick          # tiny models, one seed: checks that the table is produced
    python scripts/reproduce.py --rows binary binaryvit --settings limited --seeds 0 1 2 3 4

Every row is one `python -m minibvit.train` command per seed (run in-process, --jobs at a time, each
job on one thread: on 2 cores two one-thread jobs beat one two-thread job, and OpenBLAS's two-thread
GEMMs collapse whenever anything else runs). All rows of a data setting start from, and distil from,
ONE shared full-precision teacher: the FP row's seed-0 run (its last checkpoint, not the best-on-test
one). Budgets are equal: every student gets the same number of quantized epochs (the trainer's
--epochs is the total over a method's quantized stages, so TerViT's progressive recipe splits it
between its 8-bit and ternary stages). The accuracy of a run is the test accuracy after its last
epoch (not the best epoch: the test split picks nothing).

Finished runs are reused: a run directory with result.json is done; one without it is continued with
--resume, so an interrupted table continues where it stopped (Ctrl-C saves every running job).

It writes docs/results.md (mean +- std per row, every comparison as a paired difference over seeds
with a 95% Student-t interval, a verdict per paper claim, the wall time of every row) and
docs/results.png (accuracy per row and setting; flip rate and sign entropy over training).
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One row: a method and its switches (train.py flags), with or without distillation."""

    key: str
    label: str
    method: str
    kd: str = None  # --kd; None: the fp row (no distillation)
    flags: tuple = ()


def _pair(key, label, method, kd, flags=()):
    """A row with the method's distillation and the same row without it."""
    return (Row(key, label, method, kd, flags), Row(key + "_nokd", label + ", no KD", method, "none", flags))


ROWS = (
    Row("fp", "FP (the teacher: seed 0)", "fp"),
    *_pair("binary", "binary", "binary", "soft"),
    *_pair("binary_grs", "binary + GRS", "binary", "soft", ("--grs-lambda", "GRS_DEFAULT")),
    *_pair("binary_asm", "binary + ASM", "binary", "soft", ("--asm", "on")),
    *_pair("binaryvit", "BinaryViT (GRS + ASM)", "binaryvit", "soft"),
    *(row for gran in ("channel", "tensor") for kind in ("direct", "progressive") for row in reversed(_pair(
        f"tervit_{kind}_{gran}", f"TerViT {kind}, {gran}-wise", "tervit", "soft",
        (("--tervit-direct",) if kind == "direct" else ()) + ("--ternary-granularity", gran)))),
    *_pair("gsb", "GSB", "gsb", "hard"),
)
"""Every row; a key ending in _nokd is its partner without distillation. TerViT's recipe has no
distillation (the paper's), so its rows are listed no-KD first and "+ KD" is the soft-KD variant."""
ROW_BY_KEY = {r.key: r for r in ROWS}


@dataclass(frozen=True)
class Setting:
    """A data setting and its budget: epochs of the teacher (and of the FP row), quantized epochs of
    every student."""

    key: str
    label: str
    limit_per_class: int  # None: the full training split
    teacher_epochs: int
    epochs: int
    eval_every: int = 1  # test evaluations: the last epoch, and every eval_every-th (the 10k test pass is dear)


@dataclass(frozen=True)
class Plan:
    dataset: str
    settings: tuple
    seeds: tuple
    common: tuple  # flags every run gets (recipe, model size)


FULL_PLAN = Plan(
    dataset="fashion-mnist",
    settings=(Setting("full", "full data (60,000 images)", None, teacher_epochs=15, epochs=2),
              Setting("limited", "limited data (100 per class, GSB's setting)", 100, teacher_epochs=100, epochs=30,
                      eval_every=30)),
    seeds=(0, 1, 2),
    common=(),
)
QUICK_PLAN = Plan(
    dataset="synthetic",
    settings=(Setting("full", "full data (synthetic, 16 per class)", 16, teacher_epochs=1, epochs=2),
              Setting("limited", "limited data (synthetic, 4 per class)", 4, teacher_epochs=1, epochs=2)),
    seeds=(0,),
    common=("--image-size", "16", "--patch-size", "8", "--embed-dim", "16", "--depth", "1", "--num-heads", "2",
            "--batch-size", "16", "--eval-batch-size", "256"),
)


@dataclass(frozen=True)
class Comparison:
    """A - B, paired by seed, in every data setting; `claim` says what a positive difference would support."""

    paper: str
    claim: str
    a: str
    b: str


COMPARISONS = (
    Comparison("BinaryViT", "GRS + ASM beat the binary baseline (paper: +2.05 points, DeiT-S, ImageNet)",
               "binaryvit", "binary"),
    Comparison("BinaryViT", "GRS + ASM beat the baseline without distillation", "binaryvit_nokd", "binary_nokd"),
    Comparison("BinaryViT", "GRS alone helps the binary baseline", "binary_grs", "binary"),
    Comparison("BinaryViT", "ASM alone helps the binary baseline", "binary_asm", "binary"),
    Comparison("TerViT", "progressive 8-bit -> ternary training beats direct ternary training (channel-wise)",
               "tervit_progressive_channel_nokd", "tervit_direct_channel_nokd"),
    Comparison("TerViT", "channel-wise ternary beats per-tensor ternary (progressive)",
               "tervit_progressive_channel_nokd", "tervit_progressive_tensor_nokd"),
    Comparison("GSB", "GSB beats the binary baseline (paper: most with little data)", "gsb", "binary"),
    Comparison("GSB", "distillation helps GSB", "gsb", "gsb_nokd"),
    Comparison("all", "distillation helps a binary student", "binary", "binary_nokd"),
)

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
"""Student-t 0.975 quantiles by degrees of freedom (a constant table; df between entries take the
next smaller listed df, which widens the interval; above 30: 1.96)."""


def t_quantile(df):
    if df > 30:
        return 1.96
    return T_975[max(k for k in T_975 if k <= df)]


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def paired_difference(a, b):
    """(mean, low, high, n) of a[s] - b[s] over the seeds both have; the 95% t-interval (nan for n < 2)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return None
    m = statistics.fmean(d)
    if len(d) < 2:
        return m, float("nan"), float("nan"), len(d)
    half = t_quantile(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - half, m + half, len(d)


def verdict(diff):
    if diff is None:
        return "not testable here: a row was not run"
    m, lo, hi, n = diff
    if n < 2:
        return "not testable: one seed gives no interval"
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "not reproduced: the opposite holds"
    return "not reproduced: no significant difference"


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------

def final_stage(method):
    from minibvit import methods
    return methods.get_method(method).final.name


def grs_default():
    from minibvit import binaryvit
    return f"{binaryvit.GRS_DEFAULT_LAMBDA:g}"


def run_dir(out, setting, row, seed):
    return os.path.join(out, setting.key, row.key, f"seed{seed}")


def teacher_path(out, setting):
    return os.path.join(run_dir(out, setting, ROW_BY_KEY["fp"], 0), "fp", "last.safetensors")


def train_args(plan, setting, row, seed, out):
    """The train.py argument list of one run (without --resume)."""
    args = ["--dataset", plan.dataset, "--method", row.method, "--seed", str(seed),
            "--out", run_dir(out, setting, row, seed), *plan.common]
    if setting.limit_per_class:
        args += ["--limit-per-class", str(setting.limit_per_class)]
    if row.method == "fp":
        args += ["--epochs", str(setting.teacher_epochs)]
    else:
        args += ["--epochs", str(setting.epochs), "--teacher", teacher_path(out, setting), "--kd", row.kd]
    args += ["--eval-every", str(setting.eval_every)]
    args += [grs_default() if f == "GRS_DEFAULT" else f for f in row.flags]
    return args


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_one(job):
    """Train one run in this process (its output goes to <run dir>/train.log); returns its result."""
    plan, setting, row, seed, out = job
    directory = run_dir(out, setting, row, seed)
    result_path = os.path.join(directory, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    from minibvit import train
    args = train_args(plan, setting, row, seed, out)
    resumed = os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    wall_path = os.path.join(directory, "wall.json")
    spent = json.load(open(wall_path))["wall_s"] if os.path.exists(wall_path) else 0.0
    t0 = time.perf_counter()
    with open(os.path.join(directory, "train.log"), "a") as log, contextlib.redirect_stderr(log), \
            contextlib.redirect_stdout(log):
        print(f"$ python -m minibvit.train {' '.join(args)}{' --resume' if resumed else ''}", flush=True)
        code = train.main(args + (["--resume"] if resumed else []))
    spent += time.perf_counter() - t0
    with open(wall_path, "w") as f:
        json.dump({"wall_s": spent}, f)
    if code != 0:
        return {"row": row.key, "setting": setting.key, "seed": seed, "error": code, "dir": directory}
    records = read_log(os.path.join(directory, final_stage(row.method), "log.jsonl"))
    epochs = [r for r in records if "test_acc" in r]
    result = {"row": row.key, "setting": setting.key, "seed": seed, "test_acc": epochs[-1]["test_acc"],
              "best_acc": max(r["test_acc"] for r in epochs), "wall_s": spent,
              "command": "python -m minibvit.train " + " ".join(args)}
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, result_path)
    return result


STOPPED = 130  # train.main's exit code after Ctrl-C (it saved the run first)


def is_teacher(job):
    plan, setting, row, seed, out = job
    return row.key == "fp" and seed == 0


def run_all(jobs, n_jobs, say):
    """Run the jobs, n_jobs at a time: every setting's teacher first, the other FP seeds beside it
    (or after the students, when the teacher was trained before), and a setting's students as soon as
    its teacher exists (a student without it is reported, not run). After Ctrl-C (every running job
    saves and returns STOPPED) nothing new starts. Returns (every result, stopped)."""
    import signal

    results = []
    stopped = False

    def note(result):
        nonlocal stopped
        results.append(result)
        stopped = stopped or result.get("error") == STOPPED
        say(result)

    teachers = [j for j in jobs if is_teacher(j)]
    waiting = [j for j in jobs if not is_teacher(j)]
    pending_settings = {j[1].key for j in teachers}

    def ready():
        """Jobs that can start now: students whose teacher is trained, then the other FP seeds (the
        verdicts compare students); students whose teacher failed or was never asked for (and is
        missing) are reported."""
        nonlocal waiting
        students, seeds, keep = [], [], []
        for j in waiting:
            if j[2].key == "fp":
                seeds.append(j)
            elif os.path.exists(teacher_path(j[4], j[1])):
                students.append(j)
            elif j[1].key in pending_settings:
                keep.append(j)
            else:
                note({"row": j[2].key, "setting": j[1].key, "seed": j[3], "error": "no teacher",
                      "dir": run_dir(j[4], j[1], j[2], j[3])})
        waiting = keep
        return students + seeds

    queue = teachers + ready()

    def finish(job, result):
        note(result)
        if is_teacher(job):  # its setting's students can start (or are reported, if it failed)
            pending_settings.discard(job[1].key)
            queue.extend(ready())

    if n_jobs == 1:
        while queue and not stopped:
            job = queue.pop(0)
            finish(job, run_one(job))
        return results, stopped
    # the workers get Ctrl-C from the terminal and save; this process waits for them
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ProcessPoolExecutor(max_workers=n_jobs) as pool:
            running = {}
            while (queue or running) and not stopped:
                while queue and len(running) < n_jobs:
                    job = queue.pop(0)
                    running[pool.submit(run_one, job)] = job
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = running.pop(fut)
                    finish(job, fut.result())
            for fut in running:  # after Ctrl-C: the running jobs save and return
                note(fut.result())
    finally:
        signal.signal(signal.SIGINT, previous)
    return results, stopped


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------

def collect(out, plan, rows):
    """{(setting, row): {seed: result}} of every finished run under out."""
    table = {}
    for setting in plan.settings:
        for row in rows:
            for seed in plan.seeds:
                path = os.path.join(run_dir(out, setting, row, seed), "result.json")
                if os.path.exists(path):
                    with open(path) as f:
                        table.setdefault((setting.key, row.key), {})[seed] = json.load(f)
    return table


def cost_claims():
    """The size and OPs claims, computed by minibvit.cost (docs/cost.md discusses the conventions)."""
    from minibvit import cost
    default = cost.model_cost("deit-small", "binaryvit")
    nearest_size = cost.model_cost("deit-small", "binaryvit", patch_embed="int8", head="fp32")
    fp = cost.model_cost("deit-small", "fp")
    mixed_ops = fp.totals.ops / cost.model_cost("deit-small", "binaryvit", flops_per_mac=2).totals.ops
    swin = cost.model_cost("swin-small", "tervit", patch_embed="block", head="block", count_scales=False)
    swin_mb = swin.totals.packed_bytes / 1e6
    return [
        ("BinaryViT", "16.2x smaller than DeiT-S",
         f"{default.size_ratio:.2f}x with our deployment (8-bit patch embedding and head); nearest reading "
         f"{nearest_size.size_ratio:.2f}x (8-bit patch embedding, FP32 head)",
         "not reproduced exactly: no single counting convention gives 16.2x (docs/cost.md)"),
        ("BinaryViT", "17.7x fewer OPs than DeiT-S",
         f"{default.ops_ratio:.1f}x counting both alike; {mixed_ops:.2f}x with FP32 at one op per MAC and the "
         "binary model at two", "reproduced only by mixing conventions (docs/cost.md)"),
        ("TerViT", "Swin-S in 13.1 MB",
         f"{swin_mb:.2f} MB (every weight at 2 bits, scales not counted)",
         "reproduced (size only) by the plainest reading" if abs(swin_mb - 13.1) < 0.05 else "not reproduced"),
        ("TerViT", "Swin-S > 79% top-1 on ImageNet", "-",
         "not testable here: Swin and ImageNet-scale training are beyond 2 CPU cores"),
        ("BinaryViT", "+2.05 points on ImageNet (DeiT-S)", "-",
         "not testable here at ImageNet scale; the Fashion-MNIST verdicts above test the direction"),
    ]


def _pct(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _fmt_diff(diff):
    if diff is None:
        return "-", "-"
    m, lo, hi, n = diff
    ci = "-" if math.isnan(lo) else f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
    return f"{100 * m:+.2f}", ci


def _machine():
    import platform
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return f"{cpu}, {os.cpu_count()} cores"


def write_report(out, plan, rows, doc, png, wall_this_run, quick):
    table = collect(out, plan, rows)
    acc = {k: {s: r["test_acc"] for s, r in v.items()} for k, v in table.items()}
    lines = ["# Reproduction table", "",
             f"Generated by `{' '.join(['python scripts/reproduce.py'] + sys.argv[1:])}` on {_machine()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Dataset: {plan.dataset}; seeds "
             f"{', '.join(map(str, plan.seeds))}; runs under `{out}`.", "",
             "Accuracy is the test accuracy after the last epoch (in %), mean +- standard deviation over seeds. "
             "Every student starts from and distils from the setting's one FP teacher (the FP row's seed 0); "
             "budgets are equal (the quantized epochs below, split across TerViT's stages in its progressive "
             "rows). Differences are paired by seed (the same seed gives the same batches), with a 95% "
             "Student-t interval; a claim is reproduced only when its interval lies above zero. A student "
             "continues from the teacher for its own epochs, so one above the FP row has trained longer, "
             "not necessarily better. Rows marked 'not run' have not been run yet: the same command "
             "continues the table.", ""]
    if quick:
        lines += ["**Quick mode: tiny models, one seed. These numbers check that the table is produced; they "
                  "say nothing about the methods.**", ""]
    total_wall = 0.0
    for setting in plan.settings:
        lines += [f"## {setting.label}", "",
                  f"Teacher / FP row: {setting.teacher_epochs} epochs; every student: {setting.epochs} quantized "
                  "epochs.", "",
                  "| row | KD | accuracy (%) | seeds | vs binary (same KD) | 95% interval | wall time (s, all seeds) |",
                  "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
        for row in rows:
            runs = table.get((setting.key, row.key), {})
            if not runs:
                lines.append(f"| {row.label} | {row.kd or '-'} | not run | 0 | | | |")
                continue
            m, s = mean_std([r["test_acc"] for r in runs.values()])
            wall = sum(r["wall_s"] for r in runs.values())
            total_wall += wall
            base = "binary" if row.kd != "none" else "binary_nokd"
            diff = None
            if row.method in ("binary", "binaryvit", "gsb") and row.key != base:
                diff = paired_difference(runs and acc[(setting.key, row.key)], acc.get((setting.key, base), {}))
            d, ci = _fmt_diff(diff)
            std = "" if math.isnan(s) else f" +- {100 * s:.2f}"
            lines.append(f"| {row.label} | {row.kd or '-'} | {100 * m:.2f}{std} | {len(runs)} | "
                         f"{d if diff else ''} | {ci if diff else ''} | {wall:.0f} |")
        lines.append("")
    lines += ["## Verdicts", "",
              "| paper | claim | setting | difference (points) | 95% interval | seeds | verdict |",
              "| --- | --- | --- | ---: | --- | ---: | --- |"]
    for c in COMPARISONS:
        for setting in plan.settings:
            a, b = acc.get((setting.key, c.a)), acc.get((setting.key, c.b))
            diff = paired_difference(a, b) if a and b else None
            d, ci = _fmt_diff(diff)
            lines.append(f"| {c.paper} | {c.claim} ({ROW_BY_KEY[c.a].label} - {ROW_BY_KEY[c.b].label}) | "
                         f"{setting.key} | {d} | {ci} | {diff[3] if diff else 0} | {verdict(diff)} |")
    lines += ["", "Claims about size, OPs and ImageNet accuracy (minibvit.cost; docs/cost.md):", "",
              "| paper | claim | ours | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {p} | {c} | {o} | {v} |" for p, c, o, v in cost_claims()]
    lines += ["", "## Time", "",
              f"Wall time of the finished runs: {total_wall / 60:.1f} min of job time (jobs ran side by side, "
              f"one thread each); this invocation: {wall_this_run / 60:.1f} min.", ""]
    if png:
        lines += [f"![accuracy per row and the mechanism curves]({os.path.basename(png)})", ""]
    os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
    tmp = doc + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, doc)
    if png:
        plot(out, plan, rows, table, png)


MECHANISM_ROWS = ("binary", "binary_grs", "binary_asm", "binaryvit")


def plot(out, plan, rows, table, png):
    """Accuracy per row (both settings) and flip rate / sign entropy over training (seed 0, full data)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(18, 6), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    width = 0.8 / len(plan.settings)
    for i, setting in enumerate(plan.settings):
        means, stds = [], []
        for row in rows:
            vals = [r["test_acc"] for r in table.get((setting.key, row.key), {}).values()]
            m, s = mean_std(vals) if vals else (float("nan"), float("nan"))
            means.append(100 * m)
            stds.append(0 if math.isnan(s) else 100 * s)
        ax.barh([j + i * width for j in range(len(rows))], means, width, xerr=stds, label=setting.label)
    ax.set_yticks([j + width * (len(plan.settings) - 1) / 2 for j in range(len(rows))])
    ax.set_yticklabels([r.label for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%), mean +- std over seeds")
    finite = [100 * r["test_acc"] for v in table.values() for r in v.values()]
    if finite:
        ax.set_xlim(max(0, min(finite) - 5), min(100, max(finite) + 2))
    ax.legend(fontsize=8)
    ran = [s for s in plan.settings if any((s.key, k) in table for k in MECHANISM_ROWS)]
    setting = ran[0] if ran else plan.settings[0]  # the first setting whose mechanism rows ran
    for ax, key, title in ((axes[1], "flip_rate", "sign-flip rate of the binarized weights"),
                           (axes[2], "sign_entropy", "sign entropy of the activation binarizers (bits)")):
        for key_row in MECHANISM_ROWS:
            if key_row not in {r.key for r in rows}:
                continue
            row = ROW_BY_KEY[key_row]
            path = os.path.join(run_dir(out, setting, row, plan.seeds[0]), final_stage(row.method), "log.jsonl")
            if not os.path.exists(path):
                continue
            pts = [(r["global_step"], r[key]) for r in read_log(path) if key in r]
            if pts:
                ax.plot(*zip(*pts), label=row.label, lw=1)
        ax.set_title(f"{title}\n({setting.label}, seed {plan.seeds[0]})", fontsize=9)
        ax.set_xlabel("training step")
        if key == "flip_rate":
            ax.set_yscale("symlog", linthresh=1e-5)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models on synthetic data, one seed (CI)")
    ap.add_argument("--out", default=None, help="run directory (default: runs/reproduce, quick: runs/reproduce-quick)")
    ap.add_argument("--doc", default=None, help="the Markdown report (default: docs/results.md; quick: <out>/results.md)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG (matplotlib not needed)")
    ap.add_argument("--rows", nargs="+", default=None, choices=[r.key for r in ROWS], metavar="ROW",
                    help=f"rows to run (default: all): {', '.join(r.key for r in ROWS)}")
    ap.add_argument("--settings", nargs="+", default=None, choices=("full", "limited"))
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2; quick: 0)")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each (default: 2)")
    ap.add_argument("--report-only", action="store_true", help="write the report from the finished runs")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    if args.seeds is not None:
        if 0 not in args.seeds:
            ap.error("--seeds must include 0: the FP row's seed 0 is every student's teacher")
        plan = Plan(plan.dataset, plan.settings, tuple(args.seeds), plan.common)
    if args.settings:
        plan = Plan(plan.dataset, tuple(s for s in plan.settings if s.key in args.settings), plan.seeds, plan.common)
    rows = ROWS if args.rows is None else tuple(r for r in ROWS if r.key in set(args.rows) | {"fp"})
    out = os.path.abspath(args.out or os.path.join(ROOT, "runs", "reproduce-quick" if args.quick else "reproduce"))
    doc = args.doc or (os.path.join(out, "results.md") if args.quick else os.path.join(ROOT, "docs", "results.md"))
    png = None if args.no_plot else os.path.splitext(doc)[0] + ".png"
    # one thread per job, set before any numerical library starts its pool (workers inherit it)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    sys.path.insert(0, ROOT)
    from minibvit import process
    process.configure_process()
    t0 = time.perf_counter()
    if not args.report_only:
        jobs = [(plan, s, r, seed, out) for s in plan.settings for r in rows for seed in plan.seeds]
        done = sum(os.path.exists(os.path.join(run_dir(out, s, r, seed), "result.json")) for _, s, r, seed, _ in jobs)
        print(f"{len(jobs)} runs, {done} finished before; results in {out}", file=sys.stderr)
        failed = []

        def say(result):
            if "error" in result:
                failed.append(result)
                print(f"FAILED {result['setting']}/{result['row']}/seed{result['seed']} (exit {result['error']}): "
                      f"see {result['dir']}/train.log", file=sys.stderr)
            else:
                print(f"{result['setting']}/{result['row']}/seed{result['seed']}: test acc {result['test_acc']:.4f} "
                      f"({result['wall_s']:.0f}s)", file=sys.stderr)

        _, stopped = run_all(jobs, args.jobs, say)
        if stopped:
            print("stopped: the running jobs saved; run the same command again to continue", file=sys.stderr)
        elif failed:
            print(f"{len(failed)} runs failed; the report lists them as missing", file=sys.stderr)
    write_report(out, plan, rows, doc, png, time.perf_counter() - t0, args.quick)
    print(f"wrote {doc}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
