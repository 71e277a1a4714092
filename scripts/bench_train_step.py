"""Time one training step (forward + backward + AdamW) of the NumPy ViT against the same model in
PyTorch CPU, same threads, same batch, same weights, in one run. Prints images/s for both and the ratio.

PyTorch runs in a worker process of its own (scripts/torch_baseline.py) with its own OpenMP settings:
minibvit's thread-pool defaults would otherwise apply to it too (one OpenMP runtime per process) and
made its step ~10 % slower. The steps alternate between the two processes (one NumPy step, one PyTorch
step), so a change in machine load during the run affects both; each timed step starts after a pause
of PAUSE seconds, so that the threads the other process leaves spinning after its step (PyTorch's OpenMP
workers spin before they sleep) do not run on the cores the timed step needs.

    python scripts/bench_train_step.py [--batch 128] [--threads 2] [--steps 5]

Default config (issue 2): 32x32 input, patch 4, dim 192, depth 6, 3 heads, MLP ratio 4.
"""
import argparse
import dataclasses
import importlib.util
import os
import sys
import time


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--profile", action="store_true",
                    help="print where the NumPy step spends its time (per op, over --steps steps) and exit")
    return ap.parse_args()


args = parse()
# Thread counts must be fixed before numpy/numba/torch start their pools.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(args.threads)
if os.environ.get("OPENBLAS_CORETYPE"):
    print(f"WARNING: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} forces an OpenBLAS kernel; NumPy may be slower than it can be",
          file=sys.stderr)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from minibvit.process import configure_process  # noqa: E402

PROCESS = configure_process()  # first: before NumPy and Numba start their thread pools
from minibvit import ViT, ViTConfig, ops  # noqa: E402

import numpy as np  # noqa: E402
from minibvit.optim import AdamW  # noqa: E402

cfg = ViTConfig(image_size=32, patch_size=4, in_chans=3, embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
                mlp_ratio=4.0, num_classes=10)
rng = np.random.default_rng(0)
x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
y = rng.integers(0, 10, args.batch)


def numpy_step(model, opt):
    logits, cache = model.forward(x, training=True)
    loss, c = ops.cross_entropy_forward(logits, y)
    model.backward(ops.cross_entropy_backward(1.0, c), cache)
    opt.step(model.grads)
    return loss


PAUSE = 0.5  # seconds before each timed step (see the module docstring)


def timed(step):
    time.sleep(PAUSE)
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


model = ViT(cfg, dtype=np.float32)
opt = AdamW(model.parameters(), lr=1e-4)

if args.profile:
    # Exclusive wall time per op (an op's time minus the ops it calls), summed over a step: every
    # *_forward / *_backward function of minibvit.ops, the minibvit.numerics functions and Numba
    # kernels they call from Python (numerics.<name>), and AdamW.step.
    from collections import defaultdict

    from minibvit import numerics, optim

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
    for _ in range(2):
        numpy_step(model, opt)
    op_time.clear()
    t_steps = [timed(lambda: numpy_step(model, opt)) for _ in range(args.steps)]
    print(f"NumPy step: {np.mean(t_steps) * 1e3:.0f} ms (mean of {args.steps}); exclusive time per op and step:")
    for name, t in sorted(op_time.items(), key=lambda kv: -kv[1]):
        if t / args.steps >= 0.5e-3:
            print(f"  {name:38s} {t / args.steps * 1e3:7.1f} ms")
    print(f"  {'(rest: model code, Python)':38s} {(np.mean(t_steps) - sum(op_time.values()) / args.steps) * 1e3:7.1f} ms")
    sys.exit(0)

print(f"config: 32x32, patch 4, dim {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, batch {args.batch}, "
      f"threads {args.threads}; set by minibvit: {PROCESS.env or 'nothing'}")
if importlib.util.find_spec("torch") is None:
    times = [timed(lambda: numpy_step(model, opt)) for _ in range(args.steps + 2)][2:]
    print(f"numpy/numba : {args.batch / np.median(times):8.1f} img/s  ({np.median(times) * 1e3:.0f} ms/step)")
    print("torch not installed: no PyTorch comparison")
    sys.exit(0)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_baseline import BaselineProcess  # noqa: E402

torch_side = BaselineProcess("train-step", args.threads, config=dataclasses.asdict(cfg),
                             arrays=dict(model.state_dict(), x=x, y=y), lr=1e-4)
# Interleaved: each round times one NumPy step and one PyTorch step; 2 warm-up rounds, then the
# median of --steps rounds.
t_np, t_torch = [], []
for i in range(args.steps + 2):
    a = timed(lambda: numpy_step(model, opt))
    time.sleep(PAUSE)
    b = torch_side.time(1)[0]
    if i >= 2:
        t_np.append(a)
        t_torch.append(b)
t_np, t_torch = float(np.median(t_np)), float(np.median(t_torch))
print(f"numpy/numba : {args.batch / t_np:8.1f} img/s  ({t_np * 1e3:.0f} ms/step)")
print(f"pytorch cpu : {args.batch / t_torch:8.1f} img/s  ({t_torch * 1e3:.0f} ms/step)")
print(f"ratio numpy/pytorch (throughput): {t_torch / t_np:.2f}")
torch_side.close()
