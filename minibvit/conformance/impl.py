"""The one place where the conformance kit reaches into minibvit.

The runner (``runner.py``) computes minibvit's outputs through these names, and the exporter takes
the method tables (which quantizer sits on which tensor) from here. After a module move, re-point
the imports below; nothing else in minibvit/conformance/ imports minibvit.
"""
from minibvit import methods as gsb  # noqa: F401  (GSB value / attention quantizers)
from minibvit import ops, quant, schemes  # noqa: F401
from minibvit.model import ViT, ViTConfig  # noqa: F401
from minibvit.optim import AdamW  # noqa: F401


def method_roles(cfg, method):
    """{tensor role: quantizer spec} of a method on a model config (any object with depth, distilled)."""
    return schemes.resolve(cfg, method)


def build_quantizers(cfg, method, options, dtype):
    """Fresh minibvit quantizers {role: quantizer} for a method and its options (a dict)."""
    return schemes.build_quantizers(cfg, method, options=schemes.SchemeOptions(**options), dtype=dtype)
