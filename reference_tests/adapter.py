"""The single door through which the reference tests reach the implementation under test.

To check another implementation against these tests, re-point the names below at it; the tests
use nothing else from minibvit. Contract:
- ``ops``: a module with the op pairs ``*_forward(...) -> (out, cache)`` / ``*_backward(dout, cache)``
  (signatures as in minibvit/ops.py).
- ``ViTConfig``: a dataclass-like config with the fields used by ``reference_tests/torch_reference.py``.
- ``build_vit(cfg, state, dtype, quantizers=None)``: a model holding ``state`` (timm names, PyTorch
  shapes) with ``forward(x, training, rng) -> (logits, cache)``, ``backward(dlogits, cache)`` that fills
  ``.grads`` (same names), ``parameters()`` and ``state_dict()``.
- ``AdamW(params, lr, betas, eps, weight_decay)`` with ``step(grads)``; ``clip_grad_norm``; ``cosine_lr``.
- ``quant`` (quantizer pure functions and wrappers, see docs/quantizers.md), ``binaryvit`` (GRS, ASM),
  ``gsb``, ``diagnostics``, ``methods`` (the method registry and per-method quantizer tables), ``data``, ``checkpoint``, ``train``.
"""
import numpy as np

from minibvit import binaryvit, checkpoint, data, diagnostics, gsb, methods, ops, quant, train  # noqa: F401  (re-exported)
from minibvit.model import ViT, ViTConfig  # noqa: F401
from minibvit.optim import SGD, AdamW, clip_grad_norm, cosine_lr  # noqa: F401


def build_vit(cfg, state=None, dtype=np.float64, quantizers=None, seed=0):
    model = ViT(cfg, quantizers=quantizers, dtype=dtype, seed=seed)
    if state is not None:
        model.load_state_dict(state)
    return model
