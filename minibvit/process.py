"""Process-wide settings for fast training and inference, applied only when asked: configure_process().

Importing minibvit changes nothing in the process. The command-line mains (train, evaluate, infer),
the benchmark scripts and the tutorials call configure_process() first thing; a notebook or a library
user may call it too, or not at all (the results are the same bits either way: only speed changes).

Thread-pool environment (set only where the user has not set the variable). These are read when the
libraries start their pools, so they take effect only if set before NumPy's BLAS (OpenBLAS) and
Numba's OpenMP layer load; configure_process reports which pools were already loaded (`too_late`).
These settings are process-wide: they also apply to PyTorch in the same process (one OpenMP runtime).

- OMP_WAIT_POLICY=PASSIVE: Numba's parallel kernels run on an OpenMP pool and NumPy's matmuls on
  OpenBLAS's pthreads. With OpenMP's default active wait the two pools spin against each other on the
  same cores: a LayerNorm after a matmul took 6.8 ms instead of 0.2 ms (2 cores).
- OPENBLAS_THREAD_TIMEOUT=4: likewise OpenBLAS's workers keep polling for a while after each matmul and
  slow down the Numba kernel that follows; a short timeout (2^4 cycles) took a training step of the
  benchmark model from 1.45 s to 1.07 s on 2 cores.
- GOMP_SPINCOUNT: under PASSIVE alone each Numba parallel region first wakes the sleeping worker, ~55 us
  on the 2-core AMD KVM machine (a prange loop of two additions, median of 300 calls: 57 us PASSIVE, 1.3
  us with a spin), paid by every region of a training step's chains of Numba kernels. Training gets a
  short spin, GOMP_SPINCOUNT=5000 (libgomp counts ~100000 spins a millisecond: ~50 us), long enough to
  catch the next region of a chain of Numba kernels, short enough not to hold a core while OpenBLAS's
  matmul that follows wants it: three alternating process pairs of `scripts/bench_train_step.py
  --methods fp binary gsb` gave fp 268 / 280 / 275 ms without it and 267 / 255 / 275 ms with it, binary
  287 / 352 / 304 -> 263 / 269 / 273, gsb 363 / 397 / 414 -> 347 / 318 / 366 (docs/benchmarks.md). A
  longer spin (30000) slowed the step on the Intel machine (docs/kernels.md "Threads").
  workload="inference": the packed engine runs a batch as a chain of short parallel regions (TerViT:
  about 20 per block) with almost no BLAS between them, so it gets libgomp's own default spin,
  GOMP_SPINCOUNT=300000 (about 3 ms), and OMP_WAIT_POLICY is not set: `scripts/bench_inference.py
  --workload train` against `--workload inference` on the same code gave TerViT DeiT-Tiny batch 8 1.22x
  -> 1.78x PyTorch (docs/engine.md "Speed"). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is always
  kept (and GOMP_SPINCOUNT is not set when the user chose an OMP_WAIT_POLICY).

glibc malloc (takes effect whenever it is called, for the allocations that follow): by default glibc
serves each large block (the activations: 6-25 MB at the benchmark's batch 128) with a fresh mmap and
returns it on free, so every training step page-faults and zeroes its whole working set again: 100-290
ms of kernel time per 0.95 s step (scripts/bench_train_step.py, 2 cores). mallopt(M_MMAP_MAX, 0) serves
every block from the heap and M_TRIM_THRESHOLD = 1 GiB keeps freed heap memory mapped for reuse, so the
process keeps its peak working set (step: ~0.82 s). Skipped on non-glibc systems and when any MALLOC_*_
tunable is set in the environment (glibc then uses yours: MALLOC_TRIM_THRESHOLD_=131072 restores glibc's
default).
"""
import os
import sys
from dataclasses import dataclass, field

# workload -> {variable: value}, each set only where the user has not set it (GOMP_SPINCOUNT also not
# where the user chose an OMP_WAIT_POLICY)
THREAD_ENV_DEFAULTS = {"train": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "5000",
                                 "OPENBLAS_THREAD_TIMEOUT": "4"},
                       "inference": {"GOMP_SPINCOUNT": "300000", "OPENBLAS_THREAD_TIMEOUT": "4"}}
MALLOC_SETTINGS = {"M_MMAP_MAX": (-4, 0), "M_TRIM_THRESHOLD": (-1, 1 << 30)}  # name: (mallopt param, value)

_ENV_SET = {}  # every variable configure_process set in this process (env_set_by_configure)

# Modules whose import starts (or fixes the settings of) a thread pool that reads THREAD_ENV_DEFAULTS.
_POOL_MODULES = ("numpy", "numba", "torch")


@dataclass
class ProcessReport:
    """What configure_process did.

    env: the environment variables it set (name -> value); variables already set are left alone.
    malloc: the mallopt settings it applied (name -> value); {} when skipped (see malloc_skipped).
    malloc_skipped: why malloc was left alone ("" when it was configured).
    too_late: modules that were already imported, so their pools may have started without `env`
        (the variables then only reach threads created later, or nothing: call configure_process
        before importing numpy, numba or torch).
    """

    env: dict = field(default_factory=dict)
    malloc: dict = field(default_factory=dict)
    malloc_skipped: str = ""
    too_late: tuple = ()

    def __str__(self):
        parts = [f"env set: {self.env or 'nothing'}",
                 f"malloc: {self.malloc or 'left alone (' + self.malloc_skipped + ')'}"]
        if self.too_late:
            parts.append(f"too late for the thread env of: {', '.join(self.too_late)} (already imported)")
        return "; ".join(parts)


def _configure_malloc():
    """(settings applied, reason skipped)."""
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return {}, "a MALLOC_*_ tunable is set in the environment"
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return {}, "not glibc"
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return {}, "not glibc"
    applied = {name: value for name, (param, value) in MALLOC_SETTINGS.items() if mallopt(param, value) == 1}
    return applied, "" if applied else "mallopt refused the settings"


def configure_process(threads=True, malloc=True, workload="train"):
    """Apply minibvit's thread-pool environment defaults and glibc malloc settings (module docstring).

    Call it first thing, before numpy / numba / torch are imported: the thread variables are read when
    those libraries start their pools. Calling it later still sets the variables and malloc, and the
    report's `too_late` names the libraries that were already loaded. Idempotent: a second call sets
    nothing new (the variables are then set) and re-applies malloc.

    Args: threads: set THREAD_ENV_DEFAULTS[workload] where unset; malloc: apply MALLOC_SETTINGS;
        workload: "train" (training, evaluation, anything on NumPy's BLAS: OpenMP spins ~50 us, then
        sleeps) or "inference" (the packed engine: OpenMP spins ~3 ms between its parallel regions).
    Returns: ProcessReport.
    """
    if workload not in THREAD_ENV_DEFAULTS:
        raise ValueError(f"workload must be one of {', '.join(THREAD_ENV_DEFAULTS)}, got {workload!r}")
    report = ProcessReport()
    if threads:
        report.env = {name: value for name, value in THREAD_ENV_DEFAULTS[workload].items() if name not in os.environ
                      and not (name == "GOMP_SPINCOUNT" and "OMP_WAIT_POLICY" in os.environ)}
        os.environ.update(report.env)
        _ENV_SET.update(report.env)
        report.too_late = tuple(m for m in _POOL_MODULES if m in sys.modules)
    if malloc:
        report.malloc, report.malloc_skipped = _configure_malloc()
    else:
        report.malloc_skipped = "not requested"
    return report


def env_set_by_configure():
    """{name: value} of every environment variable configure_process set in this process so far (a
    benchmark starts its PyTorch baseline process without them)."""
    return dict(_ENV_SET)
