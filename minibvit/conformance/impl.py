"""minibvit under the names of the adapter contract (docs/conformance.md): the one place where the
conformance kit reaches into minibvit.

The golden runner (``runner.py``) computes minibvit's outputs through these names, and the exporter
takes the method tables (which quantizer sits on which tensor) from ``schemes``. After a module move,
re-point the imports below; nothing else in minibvit/conformance/ imports minibvit.
"""
import numpy as np

from minibvit import methods  # noqa: F401  (GSB value / attention quantizers)
from minibvit import ops, quant, schemes  # noqa: F401
from minibvit.model import ViT, ViTConfig  # noqa: F401
from minibvit.optim import AdamW  # noqa: F401


def build_vit(cfg, state=None, dtype=np.float64, quantizers=None, seed=0):
    model = ViT(cfg, quantizers=quantizers, dtype=dtype, seed=seed)
    if state is not None:
        model.load_state_dict(state)
    return model
