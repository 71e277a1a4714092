"""minibvit: a from-scratch NumPy/Numba reference implementation of low-bit Vision Transformers."""
import os

# Numba's parallel kernels run on an OpenMP pool and NumPy's matmuls on OpenBLAS's pthreads. With
# OpenMP's default active wait, the two pools spin against each other on the same cores: a LayerNorm
# after a matmul took 6.8 ms instead of 0.2 ms (2 cores). Passive waiting removes that. setdefault
# keeps any value the user set; it must happen before Numba starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Likewise OpenBLAS's workers keep polling for a while after each matmul and slow down the Numba
# kernel that follows; a short timeout (2^4 cycles) took a training step of the benchmark model from
# 1.45 s to 1.07 s on 2 cores. Effective only when minibvit is imported before NumPy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .model import PRESETS, ViT, ViTConfig, preset  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ViT", "ViTConfig", "PRESETS", "preset", "__version__"]
