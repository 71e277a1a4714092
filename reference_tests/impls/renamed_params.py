"""minibvit's adapter with a model whose parameters carry other names ("vit/" + the contract name), and
the ``PARAM_NAMES`` map that tells the tests how they correspond: the mechanism an implementation
with its own parameter names (the official GSB DeiT, a JAX pytree...) uses. test_conformance_kit.py
runs the whole-model tests through it."""
from impls import minibvit_impl as _good
from impls.minibvit_impl import *  # noqa: F401,F403


class _Renamed:
    """minibvit's ViT whose state_dict / load_state_dict / grads use "vit/<name>"."""

    def __init__(self, model):
        self._model = model

    def state_dict(self):
        return {"vit/" + k: v for k, v in self._model.state_dict().items()}

    def load_state_dict(self, state, strict=True):
        return self._model.load_state_dict({k[len("vit/"):]: v for k, v in state.items()}, strict=strict)

    @property
    def grads(self):
        return {"vit/" + k: v for k, v in self._model.grads.items()}

    def __getattr__(self, attr):
        return getattr(self._model, attr)


def build_vit(*args, **kwargs):
    return _Renamed(_good.build_vit(*args, **kwargs))


def PARAM_NAMES(model):
    return {k[len("vit/"):]: k for k in model.state_dict()}
