"""Worked example 2: a deliberately broken implementation. It is minibvit's adapter with four bugs
planted, and without ``ops.kd_soft_*`` (so the KD test must be skipped, never reported green):

1. ``ops.layernorm_backward`` drops the ``xhat * mean(g * gamma * xhat)`` term of dx;
2. ``ops.gelu_backward`` differentiates the tanh GELU when the exact (erf) one was asked, and
   the other way round;
3. ``quant.sign`` / ``quant.binarize_forward`` give sign(0) = 0;
4. the clipped STE passes the gradient on ``|x| < 1`` instead of ``|x| <= 1``.

``reference_tests/test_conformance_kit.py`` runs the suite against it and checks that each bug fails,
naming the case and its inputs.
"""
import types

import numpy as np

from impls import minibvit_impl as _good
from impls.minibvit_impl import *  # noqa: F401,F403  (everything else is minibvit's, unchanged)


def layernorm_backward(dout, cache):
    xhat, rstd, gamma, x_shape = cache
    _, dgamma, dbeta = _good.ops.layernorm_backward(dout, cache)
    g = dout.reshape(xhat.shape) * gamma
    dx = rstd[:, None] * (g - g.mean(axis=1, keepdims=True))  # BUG 1: "- xhat * mean(g * xhat)" missing
    return dx.reshape(x_shape), dgamma, dbeta


def gelu_backward(dout, cache):
    x2, bias, approximate, shape = cache
    mixed = "tanh" if approximate == "none" else "none"  # BUG 2: the other GELU's derivative
    return _good.ops.gelu_backward(dout, (x2, bias, mixed, shape))


def sign(x):
    return np.sign(x).astype(x.dtype)  # BUG 3: sign(0) = 0


def binarize_forward(x, ste="clipped"):
    out, cache = _good.quant.binarize_forward(x, ste)
    if ste == "clipped":
        cache = (np.abs(x) < 1).astype(x.dtype)  # BUG 4: < instead of <=
    return sign(x), cache


_ops = {k: v for k, v in vars(_good.ops).items() if not k.startswith("kd_soft_")}
ops = types.SimpleNamespace(**{**_ops, "layernorm_backward": layernorm_backward, "gelu_backward": gelu_backward})
quant = types.SimpleNamespace(**{**vars(_good.quant), "sign": sign, "binarize_forward": binarize_forward})
