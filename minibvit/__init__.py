"""minibvit: a from-scratch NumPy/Numba reference implementation of low-bit Vision Transformers."""
import os

# Thread-pool settings, applied only where the user has not set the variable (ENV_DEFAULTS_SET records
# which ones minibvit set; benchmarks start their PyTorch baselines without them). They are read when
# the libraries load, so import minibvit before NumPy and Numba. Both settings are process-wide: they
# also apply to PyTorch in the same process (one OpenMP runtime per process).
#
# OMP_WAIT_POLICY=PASSIVE: Numba's parallel kernels run on an OpenMP pool and NumPy's matmuls on
# OpenBLAS's pthreads. With OpenMP's default active wait the two pools spin against each other on the
# same cores: a LayerNorm after a matmul took 6.8 ms instead of 0.2 ms (2 cores).
# OPENBLAS_THREAD_TIMEOUT=4: likewise OpenBLAS's workers keep polling for a while after each matmul
# and slow down the Numba kernel that follows; a short timeout (2^4 cycles) took a training step of
# the benchmark model from 1.45 s to 1.07 s on 2 cores.
# GOMP_SPINCOUNT is left alone (PASSIVE means no spinning): a short spin (30000) made small binary GEMMs
# at 2 threads faster (median 6.9x -> 10.0x over NumPy, scripts/bench_gemm.py) but, with the attention
# matmuls split across Numba threads, slowed the training step (scripts/bench_train_step.py ratio
# 0.60-0.68 with it, 0.74-0.83 with GOMP_SPINCOUNT=0 exported). Export
# GOMP_SPINCOUNT=30000 yourself for inference-heavy work; docs/kernels.md "Threads".
_THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
ENV_DEFAULTS_SET = {name: value for name, value in _THREAD_ENV.items() if name not in os.environ}
os.environ.update(ENV_DEFAULTS_SET)


def _keep_freed_memory():
    """glibc malloc settings for a process that allocates and frees the same large arrays every step.

    By default glibc serves each large block (the activations: 6-25 MB at the benchmark's batch 128)
    with a fresh mmap and returns it on free, so every training step page-faults and zeroes its whole
    working set again: 100-290 ms of kernel time per 0.95 s step (scripts/bench_train_step.py,
    2 cores). mallopt(M_MMAP_MAX, 0) serves every block from the heap and M_TRIM_THRESHOLD = 1 GiB
    keeps freed heap memory mapped for reuse, so the process keeps its peak working set (step: ~0.82 s).
    Skipped on non-glibc systems and when any MALLOC_*_ tunable is set in the environment (glibc then
    uses yours: MALLOC_TRIM_THRESHOLD_=131072 restores glibc's default). Returns what it set.
    """
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return {}
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return {}
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return {}
    wanted = {"M_MMAP_MAX": (-4, 0), "M_TRIM_THRESHOLD": (-1, 1 << 30)}
    return {name: value for name, (param, value) in wanted.items() if mallopt(param, value) == 1}


MALLOC_DEFAULTS_SET = _keep_freed_memory()

from .model import PRESETS, ViT, ViTConfig, preset  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ViT", "ViTConfig", "PRESETS", "preset", "ENV_DEFAULTS_SET", "MALLOC_DEFAULTS_SET", "__version__"]
