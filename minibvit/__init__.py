"""minibvit: a from-scratch NumPy/Numba reference implementation of low-bit Vision Transformers.

Importing minibvit changes nothing in the process (no environment variables, no malloc settings) and
loads no submodule: ``minibvit.ViT`` and friends load minibvit.model (and with it NumPy and Numba) on
first use. For the thread-pool and malloc settings the benchmarks were measured with, call
``minibvit.process.configure_process()`` first thing (the command-line mains do).
"""

__version__ = "0.1.0"
__all__ = ["ViT", "ViTConfig", "PRESETS", "preset", "__version__"]

_FROM_MODEL = ("ViT", "ViTConfig", "PRESETS", "preset")


def __getattr__(name):
    if name in _FROM_MODEL:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'minibvit' has no attribute {name!r}")
