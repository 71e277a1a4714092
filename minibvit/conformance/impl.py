"""minibvit under the names of the adapter contract (docs/conformance.md, "The adapter contract"): the
one place where the conformance kit and the reference tests reach into minibvit. The golden runner
(``runner.py``) computes minibvit's outputs through these names, the exporter takes the method tables
from ``schemes``, and ``reference_tests/impls/minibvit_impl.py`` (the tests' default implementation)
re-exports this module. After a module move, re-point the imports below and nothing else.

The contract's ``methods`` namespace holds the method-specific pieces (GSB quantizers, GRS, ASM,
diagnostics): minibvit keeps them in gsb.py, binaryvit.py and diagnostics.py, merged here into one
namespace. The contract's ``schemes`` namespace (per-method quantizer tables: resolve,
build_quantizers, SchemeOptions, tensor_roles, binarized_weight_roles) is minibvit's method registry,
minibvit/methods.py, whose options record is called QuantizerOptions.
"""
import types

import numpy as np

from minibvit import (binaryvit, checkpoint, cost, data, diagnostics, engine, gsb, infer, kernels, methods as _registry,
                      ops, quant, train)
# the fused quantizer kernels, which quant and gsb import on first use: loaded with the implementation,
# so that their first use inside a test is not an import of minibvit by the test (conftest's guard)
from minibvit.kernels import gsb as _gsb_kernels, quantize as _quantize_kernels, quantize_int as _int_kernels  # noqa: F401
from minibvit.model import ViT, ViTConfig
from minibvit.optim import SGD, AdamW, clip_grad_norm, cosine_lr

__all__ = ["ops", "quant", "methods", "schemes", "kernels", "engine", "infer", "checkpoint", "data", "train", "cost",
           "ViT", "ViTConfig", "build_vit", "AdamW", "SGD", "clip_grad_norm", "cosine_lr"]

methods = types.SimpleNamespace(**{name: value for module in (gsb, binaryvit, diagnostics)
                                   for name, value in vars(module).items() if not name.startswith("__")})
schemes = types.SimpleNamespace(resolve=_registry.resolve, build_quantizers=_registry.build_quantizers,
                                SchemeOptions=_registry.QuantizerOptions, tensor_roles=_registry.tensor_roles,
                                binarized_weight_roles=_registry.binarized_weight_roles)


def build_vit(cfg, state=None, dtype=np.float64, quantizers=None, seed=0):
    model = ViT(cfg, quantizers=quantizers, dtype=dtype, seed=seed)
    if state is not None:
        model.load_state_dict(state)
    return model
