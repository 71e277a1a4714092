"""minibvit: a from-scratch NumPy/Numba reference implementation of low-bit Vision Transformers."""
from .model import PRESETS, ViT, ViTConfig, preset

__version__ = "0.1.0"
__all__ = ["ViT", "ViTConfig", "PRESETS", "preset", "__version__"]
