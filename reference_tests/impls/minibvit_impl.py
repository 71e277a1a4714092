"""minibvit's adapter: the one file that maps the contract names (docs/conformance.md, "The adapter
contract") to minibvit's objects. Every minibvit import of the reference tests is in this file; when
minibvit's modules move, re-point the imports here and nothing else.

``methods`` is the contract's namespace of method-specific pieces (GSB quantizers, GRS, ASM,
diagnostics). Today minibvit keeps them all in minibvit/methods.py; when they move to separate
modules, make it ``types.SimpleNamespace(**vars(gsb), **vars(binaryvit), ...)`` here (attribute
writes such as monkeypatch then need the real module, so point those tests' names at it).
"""
import numpy as np

from minibvit import checkpoint, cost, data, engine, infer, kernels, methods as _methods, ops, quant, schemes, train
from minibvit.model import ViT, ViTConfig
from minibvit.optim import SGD, AdamW, clip_grad_norm, cosine_lr

__all__ = ["ops", "quant", "methods", "schemes", "kernels", "engine", "infer", "checkpoint", "data", "train", "cost",
           "ViT", "ViTConfig", "build_vit", "AdamW", "SGD", "clip_grad_norm", "cosine_lr"]


methods = _methods


def build_vit(cfg, state=None, dtype=np.float64, quantizers=None, seed=0):
    model = ViT(cfg, quantizers=quantizers, dtype=dtype, seed=seed)
    if state is not None:
        model.load_state_dict(state)
    return model
