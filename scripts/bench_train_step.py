"""Time the training step (forward + backward + AdamW) of every method, side by side in one run,
against PyTorch's step of the same model and quantizers, the step's GEMMs alone, and the fp step.

    python scripts/bench_train_step.py [--methods fp binary binaryvit tervit gsb] [--batch 64]
        [--threads 2] [--steps 5] [--model cifar | deit-small ...] [--json FILE] [--profile]

What one step of a method is. The method's final stage (minibvit.methods: its quantizer table and
the registry's default options), run through minibvit.train.train_step as the trainer runs it: its
stage loss (label smoothing 0.1; binary and binaryvit: soft KD, tau 1, alpha 0.5; gsb: the
distillation token and DeiT's hard-distillation loss), the stage's gradient hooks (binaryvit: GRS),
gradient clipping at 5 and AdamW (weight decay 0.05). Fixed random logits stand in for the
teacher's (a fixed-logits teacher): the step is the student's step. The teacher's forward, the
full-precision inference the trainer also runs in every step of binary, binaryvit and gsb, is not
in it; it is timed on a line of its own (the fp model's forward at the same batch).

What is printed, in this order:
  - the machine: CPU model, the BLAS library and kernel threadpoolctl reports, NumPy / Numba /
    PyTorch versions, OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (a warning when set: they force an
    OpenBLAS kernel or cache size and slow NumPy's matmul; this script never changes them), the
    load average before (and after, at the end). The machine may be shared: read the load.
  - the step table: per method the median step time of minibvit (NumPy/Numba) and of PyTorch,
    each relative to the fp step of its own library, the GEMM floor and step / GEMM floor.
    Interleaved: each round times one step of every method, then one PyTorch step of every method,
    then the GEMM floors and the teacher's forward, so that a change of machine load hits all
    alike; 2 warm-up rounds, then
    the median of --steps rounds. Every timed step starts after a pause of PAUSE seconds (PyTorch's
    OpenMP threads spin for a while after its step; they must not share the cores the next timed
    step needs).
  - the GEMM floor: every matrix product of the method's step (linear layers as minibvit.ops does
    them, x @ w.T forward, dy @ w and dy.T @ x backward; attention's Q K^T and A V forward and
    their four backward products, split over threads as ops does, numerics.stacked_matmul), float32,
    on fresh operands of the same shapes and layouts, through NumPy. The quantized forwards compute
    the same shapes (as exact integer products in float32); the floor is what this machine's BLAS
    needs for the step's arithmetic alone.
  - peak memory per method: each method in a subprocess of its own (the same step, batch and
    model; resource high-water marks are per process), which runs one warm-up step at batch 2
    (Numba compilation, AdamW state), resets the high-water mark (/proc/self/clear_refs) and runs
    one step at --batch: peak RSS of that step, the RSS before it, and the peak relative to fp's.

PyTorch runs in worker processes (scripts/torch_baseline.py, one per method) with PyTorch's own
thread settings: minibvit's thread-pool defaults would otherwise apply to it too (one OpenMP runtime
per process). Its model is reference_tests/torch_reference.py with the quantizers of
reference_tests/torch_quant.py, the same weights, the same loss, clipping and AdamW; there is no
PyTorch GRS (binaryvit's PyTorch step has no GRS hook).

--profile prints, per method, where minibvit's step spends its time (exclusive wall time per op,
quantizer and AdamW) and exits. --memory-only prints the machine and the memory table only (for
large models: `--model deit-small --batch 64 --memory-only`). --json FILE writes every figure.
"""
import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time

METHOD_NAMES = ("fp", "binary", "binaryvit", "tervit", "gsb")  # minibvit.methods.METHODS, before import
PRESET_NAMES = ("cifar", "fashion-mnist", "deit-tiny", "deit-small", "deit-base")  # minibvit.model.PRESETS
PAUSE = 0.5  # seconds before each timed step (see the module docstring)
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES, metavar="METHOD",
                    help=f"methods to time, from {', '.join(METHOD_NAMES)} (default: all); fp is always "
                         "timed, as the reference")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (after 2 warm-up rounds)")
    ap.add_argument("--model", default="cifar", choices=PRESET_NAMES,
                    help="model preset (default cifar: 32x32, patch 4, dim 192, depth 6, 3 heads, 10 classes)")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--patch", type=int)
    ap.add_argument("--dim", type=int)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--classes", type=int)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch steps")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument("--memory-only", action="store_true", help="print the machine and the memory table only")
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE (JSON)")
    ap.add_argument("--profile", action="store_true",
                    help="print where each method's step spends its time (per op, over --steps steps) and exit")
    ap.add_argument("--memory-probe", metavar="METHOD", help=argparse.SUPPRESS)  # the memory subprocess
    args = ap.parse_args(argv)
    if "fp" not in args.methods:
        args.methods = ["fp"] + args.methods
    args.methods = list(dict.fromkeys(args.methods))
    if args.batch < 1 or args.steps < 1 or args.threads < 1:
        ap.error("--batch, --steps and --threads must be positive")
    return args


args = parse()
# Thread counts must be fixed before numpy/numba/torch start their pools.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(args.threads)
LOAD_BEFORE = os.getloadavg()

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from minibvit.process import configure_process  # noqa: E402

PROCESS = configure_process()  # first: before NumPy and Numba start their thread pools

import numpy as np  # noqa: E402

from minibvit import methods, numerics, ops, train  # noqa: E402
from minibvit.model import PRESETS, ViT, ViTConfig  # noqa: E402
from minibvit.optim import AdamW  # noqa: E402

LR, WEIGHT_DECAY = 1e-4, train.TrainConfig.weight_decay
LABEL_SMOOTHING, CLIP_GRAD = train.TrainConfig.label_smoothing, train.TrainConfig.clip_grad
KD_TEMPERATURE = methods.OPTION_BY_NAME["kd_temperature"].default
KD_ALPHA = methods.OPTION_BY_NAME["kd_alpha"].default


def model_config(method):
    """The benchmark's ViTConfig for a method (a distilled model where its final stage has the token)."""
    fields = dict(PRESETS[args.model])
    for arg, name in (("image_size", "image_size"), ("patch", "patch_size"), ("dim", "embed_dim"),
                      ("depth", "depth"), ("heads", "num_heads"), ("classes", "num_classes")):
        if getattr(args, arg) is not None:
            fields[name] = getattr(args, arg)
    return ViTConfig(**fields, distilled=methods.get_method(method).final.distilled)


# ------------------------------------------------------------------------------------------------
# one method's training step
# ------------------------------------------------------------------------------------------------

class FixedTeacher:
    """A teacher whose forward returns logits computed once: train_step distils from them without
    running a teacher model."""

    def __init__(self, logits):
        self.logits = logits

    def forward(self, x, training=False):
        return self.logits, None


@dataclasses.dataclass
class LossSettings:
    """The fields of a TrainConfig that minibvit.train's stage loss reads."""

    label_smoothing: float = LABEL_SMOOTHING
    kd_temperature: float = KD_TEMPERATURE
    kd_alpha: float = KD_ALPHA


class MethodStep:
    """A method's final stage at the benchmark's config: model, AdamW, hooks, one batch; calling it
    runs one training step (minibvit.train.train_step)."""

    def __init__(self, method, batch, seed=0):
        self.method = methods.get_method(method)
        self.stage = self.method.final
        self.cfg = model_config(method)
        rng = np.random.default_rng(seed)
        c = self.cfg
        self.x = rng.standard_normal((batch, c.in_chans, c.image_size, c.image_size)).astype(np.float32)
        self.y = rng.integers(0, c.num_classes, batch)
        self.teacher_logits = (rng.standard_normal((batch, c.num_classes)).astype(np.float32)
                               if self.stage.kd != "none" else None)
        self.model = ViT(c, quantizers=methods.build_quantizers(c, self.stage.table), seed=seed)
        self.opt = AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.hooks = methods.gradient_hooks(self.stage, self.model.quantizers)
        self.teacher = FixedTeacher(self.teacher_logits) if self.teacher_logits is not None else None
        self.loss = LossSettings()
        self.steps = 0

    def loss_fn(self, logits, y, teacher_logits):
        return train._loss(self.stage, self.loss, logits, y, teacher_logits)

    def __call__(self, x=None, y=None):
        x = self.x if x is None else x
        y = self.y if y is None else y
        teacher = self.teacher
        if teacher is not None and len(x) != len(self.x):
            teacher = FixedTeacher(self.teacher_logits[: len(x)])
        loss, _, _ = train.train_step(self.model, self.opt, x, y, lr=LR, rng=np.random.default_rng(self.steps),
                                      loss_fn=self.loss_fn, teacher=teacher, hooks=self.hooks, step=self.steps,
                                      clip_grad=CLIP_GRAD)
        self.steps += 1
        return loss

    def torch_settings(self):
        """BaselineProcess("train-step") keyword arguments for PyTorch's step of this method, taken
        after the first minibvit step (the quantizers' scales are then initialised)."""
        arrays = {k: np.ascontiguousarray(v) for k, v in self.model.state_dict().items()}
        arrays.update(x=self.x, y=self.y.astype(np.int64))
        if self.teacher_logits is not None:
            arrays["teacher_logits"] = self.teacher_logits
        options = dataclasses.asdict(methods.QuantizerOptions())
        loss = {"kind": self.stage.kd if self.stage.kd != "none" else "ce", **dataclasses.asdict(self.loss)}
        return dict(config=dataclasses.asdict(self.cfg), arrays=arrays, lr=LR,
                    quantizers=methods.resolve(self.cfg, self.stage.table), options=options, loss=loss,
                    weight_decay=WEIGHT_DECAY, clip_grad=CLIP_GRAD)


# ------------------------------------------------------------------------------------------------
# the GEMM floor
# ------------------------------------------------------------------------------------------------

def gemm_shapes(cfg, batch):
    """The matrix products of one training step: [(label, a shape, b shape, stacked)], a @ b with
    a (..., M, K), b (..., K, N) as minibvit.ops computes them (forward and backward)."""
    B, N, D, Hd, H = batch, cfg.num_tokens, cfg.embed_dim, cfg.mlp_hidden, cfg.num_heads
    d, P, C = D // H, cfg.num_patches, cfg.num_classes
    linears = [("patch_embed", B * P, cfg.in_chans * cfg.patch_size ** 2, D)]
    for i in range(cfg.depth):
        linears += [(f"blocks.{i}.attn.qkv", B * N, D, 3 * D), (f"blocks.{i}.attn.proj", B * N, D, D),
                    (f"blocks.{i}.mlp.fc1", B * N, D, Hd), (f"blocks.{i}.mlp.fc2", B * N, Hd, D)]
    linears += [("head", B, D, C)] + ([("head_dist", B, D, C)] if cfg.distilled else [])
    out = []
    for name, m, k, n in linears:  # y = x @ w.T;  dx = dy @ w;  dw = dy.T @ x
        out += [(f"{name} fwd", (m, k), (k, n), False), (f"{name} dx", (m, n), (n, k), False),
                (f"{name} dw", (n, m), (m, k), False)]
    S = (B, H)
    for i in range(cfg.depth):  # S = Q K^T: dQ = dS K, dK = dS^T Q;  O = A V: dA = dO V^T, dV = A^T dO
        b = f"blocks.{i}.attn"
        out += [(f"{b} q@k.T", S + (N, d), S + (d, N), True), (f"{b} dS@k", S + (N, N), S + (N, d), True),
                (f"{b} dS.T@q", S + (N, N), S + (N, d), True), (f"{b} a@v", S + (N, N), S + (N, d), True),
                (f"{b} dO@v.T", S + (N, d), S + (d, N), True), (f"{b} a.T@dO", S + (N, N), S + (N, d), True)]
    return out


class GemmFloor:
    """The step's GEMMs alone, float32, on fresh operands; calling it runs all of them once.
    Operands have the layouts of the step: a transposed b (w.T, k.T, v.T) and a transposed a
    (dy.T, dS.T, A.T) are strided views as in minibvit.ops."""

    def __init__(self, cfg, batch, seed=1):
        rng = np.random.default_rng(seed)
        self.products = []
        self.flops = 0
        for label, a_shape, b_shape, stacked in gemm_shapes(cfg, batch):
            transpose_a = label.endswith((" dw", "dS.T@q", "a.T@dO"))
            transpose_b = label.endswith((" fwd", "q@k.T", "dO@v.T"))
            a = rng.standard_normal(_swapped(a_shape) if transpose_a else a_shape, dtype=np.float32)
            b = rng.standard_normal(_swapped(b_shape) if transpose_b else b_shape, dtype=np.float32)
            a = a.swapaxes(-1, -2) if transpose_a else a
            b = b.swapaxes(-1, -2) if transpose_b else b
            self.products.append((numerics.stacked_matmul if stacked else np.matmul, a, b))
            self.flops += 2 * int(np.prod(a_shape)) * b_shape[-1]

    def __call__(self):
        for matmul, a, b in self.products:
            matmul(a, b)


def _swapped(shape):
    return shape[:-2] + (shape[-1], shape[-2])


# ------------------------------------------------------------------------------------------------
# the machine
# ------------------------------------------------------------------------------------------------

def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_info():
    """threadpoolctl's view of the BLAS libraries loaded in this process (NumPy's)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    keep = ("internal_api", "version", "architecture", "threading_layer", "num_threads", "filepath")
    return [{k: i.get(k) for k in keep} for i in threadpool_info() if i.get("user_api") == "blas"]


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine():
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "blas": blas_info(),
            "numpy": np.__version__, "numba": version("numba"), "torch": version("torch"),
            "python": platform.python_version(),
            "blas_env": {name: os.environ.get(name) for name in BLAS_ENV},
            "set_by_minibvit": PROCESS.env, "load_before": list(LOAD_BEFORE)}


def print_machine(m):
    print(f"cpu: {m['cpu']} ({m['cores']} logical cores)")
    for b in m["blas"]:
        print("blas: " + ", ".join(f"{k} {v}" for k, v in b.items() if k != "filepath" and v is not None))
    print(f"versions: numpy {m['numpy']}, numba {m['numba']}, torch {m['torch'] or 'not installed'}, "
          f"python {m['python']}")
    for name, value in m["blas_env"].items():
        print(f"{name}: {'unset' if value is None else repr(value)}")
        if value is not None:
            print(f"WARNING: {name}={value} is set: it forces an OpenBLAS kernel or cache size and slows "
                  f"NumPy's matmul; for figures to compare, run with it unset (`env -u {name} ...`); "
                  f"this script does not change it", file=sys.stderr)
    print(f"load average before: {_load(m['load_before'])}  (the machine may be shared: read the load)")


def _load(avg):
    return " ".join(f"{a:.2f}" for a in avg) + " (1/5/15 min)"


# ------------------------------------------------------------------------------------------------
# peak memory: one subprocess per method
# ------------------------------------------------------------------------------------------------

def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_probe(method):
    """In the memory subprocess: warm up at batch 2, reset the high-water mark, run one step at
    --batch; returns the step's peak RSS and the RSS before it (MiB)."""
    step = MethodStep(method, args.batch)
    step(step.x[:2], step.y[:2])  # Numba compilation, quantizer initialisation, AdamW moments
    before = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        source = "VmHWM after clear_refs"
    except OSError:
        source = "ru_maxrss (whole process: includes the warm-up)"
    step()
    peak = _status_kb("VmHWM") if source.startswith("VmHWM") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": peak / 1024, "before_mib": before / 1024, "source": source}


def measure_memory(names):
    """{method: memory_probe result}, each in a fresh process."""
    out = {}
    passthrough = [a for a in sys.argv[1:] if a not in ("--profile",)]
    for name in names:
        print(f"memory: {name} in a subprocess", file=sys.stderr, flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--memory-probe", name]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            sys.stderr.write(run.stderr)
            raise RuntimeError(f"the memory subprocess of {name} failed (its error is above)")
        out[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"memory: {name}: peak {out[name]['peak_mib']:.0f} MiB, {out[name]['before_mib']:.0f} MiB before the step",
              file=sys.stderr, flush=True)
    return out


def print_memory(memory):
    fp = memory["fp"]
    print(f"\npeak memory of one training step, batch {args.batch}, each method in its own process "
          f"({fp['source']}):")
    print(f"  {'method':10s} {'peak RSS':>10s} {'RSS before':>11s} {'peak / fp':>10s} {'(peak - before) / fp':>21s}")
    for name, m in memory.items():
        rel_extra = (m["peak_mib"] - m["before_mib"]) / max(fp["peak_mib"] - fp["before_mib"], 1e-9)
        print(f"  {name:10s} {m['peak_mib']:8.0f} MiB {m['before_mib']:7.0f} MiB {m['peak_mib'] / fp['peak_mib']:9.2f}x "
              f"{rel_extra:20.2f}x")


# ------------------------------------------------------------------------------------------------
# --profile
# ------------------------------------------------------------------------------------------------

def profile(names):
    """Exclusive wall time per op (an op's time minus the ops it calls), summed over a step: every
    *_forward / *_backward / *_matmul function of minibvit.ops, the minibvit.numerics functions and
    Numba kernels they call from Python (numerics.<name>), every quantizer's forward and backward
    (<class>.forward), the gradient hooks and AdamW.step."""
    from collections import defaultdict

    from minibvit import optim

    op_time, child_time = defaultdict(float), []

    def timed_op(fn, label):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            child_time.append(0.0)
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                op_time[label] += dt - child_time.pop()
                if child_time:
                    child_time[-1] += dt

        return wrapper

    for name in dir(ops):
        if name.endswith(("_forward", "_backward", "_matmul")):
            setattr(ops, name, timed_op(getattr(ops, name), name))
    # only functions that numerics calls from Python: a kernel called from other Numba code must
    # stay a Numba function
    for name in dir(numerics):
        if name.endswith(("_backward", "_matmul", "_rows", "_rows_f32")) or name.startswith("_gelu_") or \
                name in ("layernorm", "softmax", "column_sums", "add", "interleave_heads"):
            setattr(numerics, name, timed_op(getattr(numerics, name), f"numerics.{name}"))
    optim.AdamW.step = timed_op(optim.AdamW.step, "AdamW.step")
    for name in names:
        step = MethodStep(name, args.batch)
        for q in step.model.quantizers.values():
            kind = type(q).__name__
            q.forward, q.backward = timed_op(q.forward, f"{kind}.forward"), timed_op(q.backward, f"{kind}.backward")
        step.hooks = [timed_op(h, type(h).__name__) for h in step.hooks]
        for _ in range(2):
            step()
        op_time.clear()
        t_steps = [timed(step) for _ in range(args.steps)]
        print(f"\n{name}: step {np.mean(t_steps) * 1e3:.0f} ms (mean of {args.steps}); exclusive time per op and step:")
        for op, t in sorted(op_time.items(), key=lambda kv: -kv[1]):
            if t / args.steps >= 0.002 * np.mean(t_steps):  # every op above 0.2 % of the step
                print(f"  {op:38s} {t / args.steps * 1e3:8.2f} ms")
        print(f"  {'(rest: model code, Python)':38s} "
              f"{(np.mean(t_steps) - sum(op_time.values()) / args.steps) * 1e3:8.2f} ms")


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def timed(fn):
    time.sleep(PAUSE)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_steps(names, with_torch):
    """Round-robin: per round one minibvit step of every method, one PyTorch step of every method,
    each distinct GEMM floor (a distilled model has one more token and head), and the fp model's
    forward when a method distils. Returns ({method: {"minibvit": [s], "torch": [s] or None,
    "gemm": [s], "gemm_gflop": float}}, [teacher forward s]) over the timed rounds."""
    steps = {name: MethodStep(name, args.batch) for name in names}
    for step in steps.values():
        step()  # compiles, initialises the quantizers' scales from the batch
    floors, floor_of = {}, {}
    for name, step in steps.items():
        floor_of[name] = step.cfg.distilled
        if step.cfg.distilled not in floors:
            floors[step.cfg.distilled] = GemmFloor(step.cfg, args.batch)
    workers = {}
    if with_torch:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from torch_baseline import BaselineProcess

        for name, step in steps.items():
            workers[name] = BaselineProcess("train-step", args.threads, **step.torch_settings())
    times = {name: {"minibvit": [], "torch": [] if with_torch else None, "gemm": []} for name in names}
    floor_times = {k: [] for k in floors}
    teacher = steps["fp"] if any(s.stage.kd != "none" for s in steps.values()) else None
    teacher_times = []
    try:
        for round_ in range(args.steps + 2):
            print(f"round {round_ + 1}/{args.steps + 2}" + (" (warm-up)" if round_ < 2 else ""), file=sys.stderr,
                  flush=True)
            this = {name: timed(step) for name, step in steps.items()}
            this_torch = {}
            for name, worker in workers.items():
                time.sleep(PAUSE)
                this_torch[name] = worker.time(1)[0]
            this_floor = {k: timed(f) for k, f in floors.items()}
            if teacher is not None:
                this_teacher = timed(lambda: teacher.model.forward(teacher.x, training=False))
            if round_ < 2:
                continue
            if teacher is not None:
                teacher_times.append(this_teacher)
            for name in names:
                times[name]["minibvit"].append(this[name])
                if with_torch:
                    times[name]["torch"].append(this_torch[name])
            for k, t in this_floor.items():
                floor_times[k].append(t)
    finally:
        for worker in workers.values():
            worker.close()
    for name in names:
        times[name]["gemm"] = floor_times[floor_of[name]]
        times[name]["gemm_gflop"] = floors[floor_of[name]].flops / 1e9
    return times, teacher_times


def summarize(times):
    med = {name: {k: (float(np.median(v)) if isinstance(v, list) else v) for k, v in t.items()}
           for name, t in times.items()}
    fp = med["fp"]
    for m in med.values():
        m["vs_fp"] = m["minibvit"] / fp["minibvit"]
        m["step_over_gemm"] = m["minibvit"] / m["gemm"]
        if m["torch"] is not None:
            m["torch_vs_fp"] = m["torch"] / fp["torch"]
            m["vs_torch"] = m["minibvit"] / m["torch"]
    return med


TARGETS = {"fp": "<= 1.15x GEMM", "binary": "<= 1.0x fp", "binaryvit": "<= 1.0x fp", "tervit": "<= 1.0x fp",
           "gsb": "<= 1.2x fp"}  # issue 16


def print_steps(med, cfg):
    print(f"\ntraining step (fwd + bwd + AdamW), median of {args.steps} interleaved rounds, batch {args.batch}, "
          f"{args.threads} threads; {cfg.image_size}x{cfg.image_size}, patch {cfg.patch_size}, dim {cfg.embed_dim}, "
          f"depth {cfg.depth}, heads {cfg.num_heads}, {cfg.num_classes} classes:")
    print(f"  {'method':10s} {'minibvit':>9s} {'vs fp':>6s} {'torch':>9s} {'vs fp':>6s} {'mb/torch':>8s} "
          f"{'GEMMs':>8s} {'step/GEMM':>9s}  target (issue 16)")
    for name, m in med.items():
        torch_cols = (f"{m['torch'] * 1e3:6.0f} ms {m['torch_vs_fp']:5.2f}x {m['vs_torch']:7.2f}x"
                      if m["torch"] is not None else f"{'-':>9s} {'-':>6s} {'-':>8s}")
        print(f"  {name:10s} {m['minibvit'] * 1e3:6.0f} ms {m['vs_fp']:5.2f}x {torch_cols} "
              f"{m['gemm'] * 1e3:5.0f} ms {m['step_over_gemm']:8.2f}x  {TARGETS.get(name, '')}")
    print("  vs fp: the method's step / the fp step of the same library; mb/torch: minibvit / PyTorch; "
          f"GEMMs: the step's matrix products alone (NumPy float32, {med['fp']['gemm_gflop']:.2f} GFLOP for fp)")


def main():
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return
    info = machine()
    print_machine(info)
    if args.profile:
        profile(args.methods)
        return
    cfg = model_config("fp")
    print(f"methods: {' '.join(args.methods)}; model {args.model} ({cfg.image_size}x{cfg.image_size}, "
          f"patch {cfg.patch_size}, dim {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}), "
          f"batch {args.batch}, threads {args.threads}; set by minibvit: {PROCESS.env or 'nothing'}")
    print("step: the final stage's quantizers and default options, the trainer's loss (soft KD / hard "
          "distillation from fixed teacher logits), hooks (GRS), clipping and AdamW; no teacher forward")
    results = {"machine": info, "config": dataclasses.asdict(cfg), "batch": args.batch, "threads": args.threads,
               "steps": args.steps, "methods": args.methods}
    if not args.memory_only:
        with_torch = not args.no_torch and version("torch") is not None
        if not with_torch:
            print("no PyTorch steps (" + ("--no-torch" if args.no_torch else "torch not installed") + ")")
        times, teacher_times = time_steps(args.methods, with_torch)
        med = summarize(times)
        print_steps(med, cfg)
        results["times"] = times
        results["median"] = med
        if teacher_times:
            t = float(np.median(teacher_times))
            print(f"  the teacher's forward (fp inference, batch {args.batch}), which the trainer adds to every "
                  f"distilled step: {t * 1e3:.0f} ms = {t / med['fp']['minibvit']:.2f}x the fp step")
            results["teacher_forward"] = {"times": teacher_times, "median": t}
    if not args.no_memory:
        memory = measure_memory(args.methods)
        print_memory(memory)
        results["memory"] = memory
    load_after = os.getloadavg()
    print(f"\nload average after: {_load(load_after)}")
    results["machine"]["load_after"] = list(load_after)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
