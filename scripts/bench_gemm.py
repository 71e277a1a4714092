"""Binary GEMM (minibvit.kernels.binary_gemm) against NumPy float32 matmul, and torch.matmul when
torch is importable, on ViT linear-layer shapes. Prints a table and the median speedups; asserts
nothing about speed (it does check every binary result against the float matmul of the +-1 matrices).

    python scripts/bench_gemm.py [--threads 1 2] [--repeats 15] [--rounds 3] [--rows 520 1576]
                                 [--dims 192 384 768 1536] [--wide-vectors] [--ternary]

Shapes: M in --rows (8*65 and 8*197 tokens: a batch of 8 at 64 or 196 patches plus the class token),
every (K, N) pair from --dims. Modes:
    packed        binary_gemm on activations packed beforehand (weights are always packed offline)
    with packing  binary_gemm_packing(x): the float32 activations' sign packing fused into the GEMM's
                  tasks (one parallel region), i.e. what a binary linear layer pays per call
Each time is the minimum over --rounds passes x --repeats back-to-back runs (the machine may be
shared; the minimum is the least disturbed run); the summary is the median over shapes of
numpy_time / binary_time.

--ternary adds a second table: ternary weights (TerViT) with int8 activations (ternary_gemm_int8)
and with binary activations (ternary_gemm_binary), both against the same NumPy float32 matmul.

Thread settings are minibvit's training defaults (minibvit.process.configure_process, what it set is
printed: GOMP_SPINCOUNT=5000 lets the OpenMP worker spin ~50 us between parallel regions before it
sleeps); export a variable to override it (GOMP_SPINCOUNT=0: the plain passive wait). torch.matmul
runs in a worker process with PyTorch's own settings (torch_baseline.py).

--wide-vectors re-runs this script with NUMBA_CPU_FEATURES = host features + "-prefer-256-bit", which
lets LLVM use 512-bit vectors on AVX-512 CPUs (see docs/kernels.md). If OPENBLAS_CORETYPE or
OPENBLAS_L2_SIZE are set they are removed for this process (they pin a possibly slower OpenBLAS
kernel) and the script re-runs itself; the output says so.
"""
import argparse
import importlib.util
import os
import sys
import time

_REEXEC_MARK = "MINIBVIT_BENCH_GEMM_REEXEC"


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=15, help="back-to-back timed calls per candidate and pass")
    ap.add_argument("--rounds", type=int, default=3, help="passes over all shapes; each time is the minimum over all")
    ap.add_argument("--rows", type=int, nargs="+", default=[8 * 65, 8 * 197])
    ap.add_argument("--dims", type=int, nargs="+", default=[192, 384, 768, 1536])
    ap.add_argument("--ternary", action="store_true", help="also time the ternary-weight kernels")
    ap.add_argument("--wide-vectors", action="store_true",
                    help="compile the kernels with 512-bit vectors (NUMBA_CPU_FEATURES=...,-prefer-256-bit)")
    return ap.parse_args()


def reexec_if_needed(args):
    """Fix the environment that numpy/numba read at import time, then re-run this script once."""
    if os.environ.get(_REEXEC_MARK):
        return
    env = dict(os.environ)
    notes = []
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in env:
            print(f"WARNING: {var}={env[var]} is set in the environment. It pins an OpenBLAS kernel that can make "
                  f"NumPy float32 matmul slower than it should be (inflating every speedup below); this benchmark "
                  f"unsets it for its own process and re-runs itself.", file=sys.stderr)
            notes.append(f"unset {var}={env.pop(var)} (it pins an OpenBLAS kernel; unset for a fair NumPy number)")
    if args.wide_vectors and "NUMBA_CPU_FEATURES" not in env:
        import llvmlite.binding as llvm
        env["NUMBA_CPU_FEATURES"] = llvm.get_host_cpu_features().flatten() + ",-prefer-256-bit"
        notes.append("set NUMBA_CPU_FEATURES=<host features>,-prefer-256-bit (--wide-vectors)")
    if notes:
        env[_REEXEC_MARK] = "; ".join(notes)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


args = parse()
reexec_if_needed(args)

import numpy as np  # noqa: E402
import numba  # noqa: E402
import threadpoolctl  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minibvit.process import configure_process  # noqa: E402

PROCESS = configure_process()  # after NumPy on purpose (below)
from minibvit import kernels  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_baseline import BaselineProcess  # noqa: E402

# torch.matmul runs in a worker process of its own, with PyTorch's own OpenMP settings (see
# torch_baseline.py); NumPy is imported above, before configure_process sets OPENBLAS_THREAD_TIMEOUT, so the
# NumPy baseline runs with OpenBLAS's defaults.
torch_side = BaselineProcess("matmul", threads=1) if importlib.util.find_spec("torch") else None


def header():
    import llvmlite.binding as llvm
    ones = np.ones((4, 64), np.float32)
    kernels.binary_gemm(kernels.pack_signs(ones), kernels.pack_weight(ones), 64)  # compile; start the thread pool
    if os.environ.get(_REEXEC_MARK):
        print(f"re-executed with: {os.environ[_REEXEC_MARK]}")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"WARNING: {var}={os.environ[var]} is set: it forces an OpenBLAS kernel and can make NumPy "
                  f"float32 matmul slower than it should be; the speedups below are then inflated.", file=sys.stderr)
    features = llvm.get_host_cpu_features()
    wide = [f for f in ("avx2", "avx512f", "avx512vpopcntdq") if features.get(f)]
    print(f"host CPU: {llvm.get_host_cpu_name()} ({', '.join(wide)}); "
          f"NUMBA_CPU_NAME={os.environ.get('NUMBA_CPU_NAME', '<host>')}; "
          f"NUMBA_CPU_FEATURES={'<host>' if 'NUMBA_CPU_FEATURES' not in os.environ else '<host>,-prefer-256-bit' if os.environ['NUMBA_CPU_FEATURES'].endswith('-prefer-256-bit') else os.environ['NUMBA_CPU_FEATURES']}; "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '<default>')}; "
          f"set by minibvit: {PROCESS.env or 'nothing'}")
    for info in threadpoolctl.threadpool_info():
        if info["user_api"] == "blas":
            print(f"NumPy BLAS: {info['internal_api']} {info.get('version')} kernel={info.get('architecture')} "
                  f"threading={info.get('threading_layer')}")
    print(f"numpy {np.__version__}, numba {numba.__version__} (threading layer {numba.threading_layer()}), "
          f"torch {'in a worker process (torch_baseline.py)' if torch_side else 'not importable'}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes make every number noisier)")


def best_times(candidates, repeats, warmup_seconds=0.2):
    """min over `repeats` back-to-back calls of each candidate's wall time (seconds).

    Candidates are timed one after the other, not interleaved, each after warmup_seconds of
    untimed calls: OpenBLAS worker threads keep spinning for ~0.1 s after a NumPy matmul (taking
    the second core from the next candidate), and an idle vCPU runs slowly for tens of
    milliseconds after it wakes up. Without the warm-up, a fast kernel's whole timed block fits in
    that window and its two-thread time came out no better than its one-thread time."""
    best = {}
    for name, fn in candidates.items():
        warm_until = time.perf_counter() + warmup_seconds
        fn()
        while time.perf_counter() < warm_until:
            fn()
        best[name] = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def shapes():
    return [(m, k, n) for m in args.rows for k in args.dims for n in args.dims]


def time_shapes(make_candidates, threads, with_torch=False):
    """{shape: {candidate: seconds}}: the minimum over --rounds passes over all shapes, each pass
    timing every candidate with best_times (slow periods of a shared machine last seconds, so one
    pass can be unlucky throughout); with_torch adds "torch", timed the same way in the worker."""
    best = {}
    for _ in range(args.rounds):
        for index, shape in enumerate(shapes()):
            times = best_times(make_candidates(shape, np.random.default_rng(index)), args.repeats)
            if with_torch and torch_side is not None:
                times["torch"] = min(torch_side.time(args.repeats, warmup_seconds=0.2, shape=shape, threads=threads))
            previous = best.setdefault(shape, times)
            for name, value in times.items():
                previous[name] = min(previous[name], value)
    return best


def binary_candidates(shape, rng):
    m, k, n = shape
    x = rng.standard_normal((m, k), dtype=np.float32)
    x[:, 0] = 0.0
    w = rng.standard_normal((n, k), dtype=np.float32)
    w_packed_t = kernels.pack_weight(w)
    x_packed = kernels.pack_signs(x)
    expected = np.where(x >= 0, 1.0, -1.0).astype(np.float32) @ np.where(w >= 0, 1.0, -1.0).astype(np.float32).T
    if not (np.array_equal(kernels.binary_gemm(x_packed, w_packed_t, k), expected.astype(np.int32))
            and np.array_equal(kernels.binary_gemm_packing(x, w_packed_t, k), expected.astype(np.int32))):
        raise SystemExit(f"binary_gemm disagrees with the float matmul of signs at M={m} K={k} N={n}")
    candidates = {
        "numpy": lambda: x @ w.T,
        "binary": lambda: kernels.binary_gemm(x_packed, w_packed_t, k),
        "binary+pack": lambda: kernels.binary_gemm_packing(x, w_packed_t, k),
    }
    return candidates


def run(threads):
    numba.set_num_threads(threads)
    cols = ["numpy", "torch", "binary", "binary+pack"]
    print(f"\n== {threads} thread(s): times in ms (min of {args.rounds} x {args.repeats}); speedup = numpy / binary ==")
    print(f"{'M':>5} {'K':>5} {'N':>5} | " + " ".join(f"{c:>11}" for c in cols)
          + f" | {'x packed':>8} {'x w/ pack':>9}" + (f" {'x torch':>8}" if torch_side else ""))
    speedups = {"packed": [], "with packing": [], "packed vs torch": []}
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        times = time_shapes(binary_candidates, threads, with_torch=True)
    for (m, k, n), t in times.items():
        speedups["packed"].append(t["numpy"] / t["binary"])
        speedups["with packing"].append(t["numpy"] / t["binary+pack"])
        row = " ".join(f"{t[c] * 1e3:11.3f}" if c in t else f"{'-':>11}" for c in cols)
        line = f"{m:5d} {k:5d} {n:5d} | {row} | {speedups['packed'][-1]:8.2f} {speedups['with packing'][-1]:9.2f}"
        if torch_side is not None:
            speedups["packed vs torch"].append(t["torch"] / t["binary"])
            line += f" {speedups['packed vs torch'][-1]:8.2f}"
        print(line)
    print(f"median speedup over NumPy float32 at {threads} thread(s): "
          f"packed {np.median(speedups['packed']):.2f}x, with activation packing {np.median(speedups['with packing']):.2f}x"
          + (f"; packed over torch.matmul {np.median(speedups['packed vs torch']):.2f}x" if torch_side is not None else ""),
          flush=True)
    return speedups


def ternary_candidates(shape, rng):
    m, k, n = shape
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    a_int8 = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    ternary = rng.integers(-1, 2, size=(n, k))
    nonzero, sign = kernels.pack_ternary_weight(ternary)
    x_packed = kernels.pack_signs(x)
    if not np.array_equal(kernels.ternary_gemm_int8(a_int8, nonzero, sign, k), a_int8.astype(np.int64) @ ternary.T):
        raise SystemExit(f"ternary_gemm_int8 disagrees with the integer matmul at M={m} K={k} N={n}")
    return {
        "numpy": lambda: x @ w.T,
        "int8": lambda: kernels.ternary_gemm_int8(a_int8, nonzero, sign, k),
        "binary": lambda: kernels.ternary_gemm_binary(x_packed, nonzero, sign, k),
    }


def run_ternary(threads):
    numba.set_num_threads(threads)
    print(f"\n== ternary weights, {threads} thread(s): times in ms (min of {args.rounds} x {args.repeats}); "
          f"speedup = numpy / kernel ==")
    print(f"{'M':>5} {'K':>5} {'N':>5} | {'numpy':>9} {'int8 x tern':>11} {'bin x tern':>10} | {'x int8':>7} {'x bin':>7}")
    speedups = {"int8": [], "binary": []}
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        times = time_shapes(ternary_candidates, threads)
    for (m, k, n), t in times.items():
        for name in speedups:
            speedups[name].append(t["numpy"] / t[name])
        print(f"{m:5d} {k:5d} {n:5d} | {t['numpy'] * 1e3:9.3f} {t['int8'] * 1e3:11.3f} {t['binary'] * 1e3:10.3f} | "
              f"{speedups['int8'][-1]:7.2f} {speedups['binary'][-1]:7.2f}")
    print(f"median speedup over NumPy float32 at {threads} thread(s): int8 x ternary {np.median(speedups['int8']):.2f}x, "
          f"binary x ternary {np.median(speedups['binary']):.2f}x", flush=True)
    return speedups


header()
summary = {t: run(t) for t in args.threads}
ternary = {t: run_ternary(t) for t in args.threads} if args.ternary else {}
print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
print("summary (median over shapes):")
for t, s in summary.items():
    print(f"  {t} thread(s): packed {np.median(s['packed']):.2f}x, with packing {np.median(s['with packing']):.2f}x"
          + (f", packed vs torch {np.median(s['packed vs torch']):.2f}x" if s["packed vs torch"] else "")
          + (f"; int8 x ternary {np.median(ternary[t]['int8']):.2f}x, binary x ternary {np.median(ternary[t]['binary']):.2f}x"
             if t in ternary else ""))
if torch_side is not None:
    torch_side.close()
