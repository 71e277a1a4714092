"""Worked example 1: the tests' own PyTorch references plugged in as an outside implementation.

    python -m pytest reference_tests --impl impls.torch_impl

It imports nothing from minibvit. It provides part of the contract, in the usual NumPy-in /
NumPy-out form: the float ViT (``ViTConfig``, ``build_vit``, from torch_reference.TorchViT), a few
op pairs (``ops``) and the sign binarizer (``quant``), each forward by torch and each backward by
torch autograd. Every test that needs a name it lacks is skipped with that name in the reason.
"""
import dataclasses
import types

import numpy as np
import torch
import torch.nn.functional as F

from torch_reference import TorchViT


@dataclasses.dataclass
class ViTConfig:
    """The contract's model configuration (fields and defaults as docs/conformance.md lists them)."""
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    qkv_bias: bool = True
    distilled: bool = False
    global_pool: str = "token"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    gelu_approximate: str = "none"
    layernorm_eps: float = 1e-6


def _t(a, grad=False):
    return torch.tensor(np.asarray(a), requires_grad=grad)


def _pair(fn, n_grad):
    """(forward, backward) from a torch function of arrays whose first n_grad arguments get gradients."""

    def forward(*args, **kwargs):
        inputs = [_t(a, grad=i < n_grad and a is not None) if isinstance(a, np.ndarray) else a
                  for i, a in enumerate(args)]
        out = fn(*inputs, **kwargs)
        return out.detach().numpy(), (inputs[:n_grad], out)

    def backward(dout, cache):
        inputs, out = cache
        wanted = [t for t in inputs if isinstance(t, torch.Tensor)]
        grads = torch.autograd.grad(out, wanted, torch.from_numpy(np.asarray(dout)), allow_unused=True)
        grads = [g.numpy() if g is not None else np.zeros(t.shape, t.dtype) for g, t in zip(grads, wanted)]
        return grads[0] if len(grads) == 1 else tuple(grads)

    return forward, backward


def _layernorm(x, gamma, beta, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), gamma, beta, eps=eps)


def _linear(x, w, b=None):
    return F.linear(x, w, b)


layernorm_forward, layernorm_backward = _pair(_layernorm, 3)
softmax_forward, softmax_backward = _pair(lambda x: x.softmax(dim=-1), 1)
linear_forward, linear_backward = _pair(_linear, 3)


def gelu_forward(x, approximate="none", bias=None):
    xt = _t(x, grad=True)
    bt = None if bias is None else _t(bias, grad=True)
    out = F.gelu(xt if bt is None else xt + bt, approximate=approximate)
    return out.detach().numpy(), (xt, bt, out)


def gelu_backward(dout, cache):
    """(dx, dbias), dbias None without a bias (the contract's GELU-with-fused-bias pair)."""
    xt, bt, out = cache
    wanted = [xt] if bt is None else [xt, bt]
    grads = torch.autograd.grad(out, wanted, torch.from_numpy(np.asarray(dout)))
    return grads[0].numpy(), None if bt is None else grads[1].numpy()


def cross_entropy_forward(logits, labels, label_smoothing=0.0):
    z = _t(logits, grad=True)
    loss = F.cross_entropy(z, torch.from_numpy(np.asarray(labels)), label_smoothing=label_smoothing)
    return float(loss.detach()), (z, loss)


def cross_entropy_backward(dloss, cache):
    z, loss = cache
    return torch.autograd.grad(loss, z, torch.tensor(float(dloss), dtype=loss.dtype))[0].numpy()


ops = types.SimpleNamespace(
    layernorm_forward=layernorm_forward, layernorm_backward=layernorm_backward,
    gelu_forward=gelu_forward, gelu_backward=gelu_backward,
    softmax_forward=softmax_forward, softmax_backward=softmax_backward,
    cross_entropy_forward=cross_entropy_forward, cross_entropy_backward=cross_entropy_backward,
)


def _sign_ste(x, ste):
    sign = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x)).detach()
    if ste == "identity":
        surrogate = x
    elif ste == "clipped":
        surrogate = x.clamp(-1, 1)
    elif ste == "approxsign":  # integral of max(2 - 2|x|, 0): 2x - x|x| on [-1, 1]
        c = x.clamp(-1, 1)
        surrogate = 2 * c - c * c.abs()
    else:
        raise ValueError(f"unknown ste {ste!r}")
    return sign + (surrogate - surrogate.detach())


binarize_forward, binarize_backward = _pair(_sign_ste, 1)


def sign(x):
    return np.where(np.asarray(x) >= 0, 1.0, -1.0).astype(np.asarray(x).dtype)


quant = types.SimpleNamespace(sign=sign, binarize_forward=binarize_forward, binarize_backward=binarize_backward)


class TorchModel:
    """TorchViT behind the contract's model interface: forward(x, training, rng) -> (logits, cache),
    backward(dlogits, cache) fills .grads, state_dict() / load_state_dict(state, strict)."""

    def __init__(self, cfg, dtype):
        self.cfg, self.dtype = cfg, dtype
        self.net = TorchViT(cfg, dtype=torch.float64 if dtype == np.float64 else torch.float32)
        self.grads = {}

    def state_dict(self):
        return {k: t.detach().numpy().copy() for k, t in self.net.named_params().items()}

    def parameters(self):
        return self.state_dict()

    def load_state_dict(self, state, strict=True):
        params = self.net.named_params()
        if strict and set(state) != set(params):
            raise ValueError(f"state names differ: {sorted(set(state) ^ set(params))}")
        with torch.no_grad():
            for k, v in state.items():
                if k in params:
                    params[k].copy_(torch.from_numpy(np.asarray(v)).to(params[k].dtype))

    def forward(self, x, training=False, rng=None):
        if training and (self.cfg.drop_rate or self.cfg.attn_drop_rate or self.cfg.drop_path_rate):
            raise NotImplementedError("torch_impl has no dropout / drop path")
        out = self.net(torch.from_numpy(np.asarray(x)), training=training)
        as_np = tuple(o.detach().numpy() for o in out) if isinstance(out, tuple) else out.detach().numpy()
        return as_np, out

    def backward(self, dlogits, cache):
        outs = cache if isinstance(cache, tuple) else (cache,)
        douts = dlogits if isinstance(dlogits, tuple) else (dlogits,)
        params = self.net.named_params()
        grads = torch.autograd.grad(outs, list(params.values()), [torch.from_numpy(np.asarray(d)) for d in douts],
                                    allow_unused=True)
        self.grads = {k: (g.numpy() if g is not None else np.zeros(t.shape)) for (k, t), g in zip(params.items(), grads)}
        return None


def build_vit(cfg, state=None, dtype=np.float64, quantizers=None, seed=0):
    if quantizers:
        raise NotImplementedError("torch_impl builds float models only (no quantizer objects)")
    model = TorchModel(cfg, dtype)
    if state is not None:
        model.load_state_dict(state)
    return model
