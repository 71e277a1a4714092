"""Optimizers, learning-rate schedule and gradient clipping, on dicts of NumPy arrays.

Parameters are updated in place (the model and its quantizers hold references to them).
"""
import math

import numpy as np
from numba import njit

_NO_DECAY_NAMES = ("cls_token", "dist_token", "pos_embed")


def decays(name, param):
    """Whether weight decay applies: only to matrices and conv kernels of linear layers, never to
    norms, biases, tokens, position embeddings or quantizer parameters (scales, shifts, steps)."""
    return param.ndim >= 2 and name not in _NO_DECAY_NAMES and "_quant." not in name


@njit(cache=True, error_model="numpy")  # no ZeroDivisionError check: the loop vectorizes
def _adamw_update(p, g, m, v, b1, b2, lr, decay, eps, bc1, bc2):
    """AdamW's update of one flat parameter in one pass, in the dtype of the scalars (the
    parameter's); decay = 1 - lr * wd, or 1 without decay."""
    one = p.dtype.type(1.0)
    for i in range(p.size):
        m[i] = b1 * m[i] + (one - b1) * g[i]
        v[i] = b2 * v[i] + (one - b2) * g[i] * g[i]
        p[i] = p[i] * decay - (lr / bc1) * m[i] / (math.sqrt(v[i] / bc2) + eps)


class AdamW:
    """AdamW (Loshchilov & Hutter 2019) with decoupled weight decay, as torch.optim.AdamW:

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr * wd * p   (decaying parameters only)
        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05):
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid AdamW settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        not_contiguous = [k for k, p in params.items() if not p.flags.c_contiguous]
        if not_contiguous:
            raise ValueError(f"AdamW updates parameters through flat views; not C-contiguous: {not_contiguous}")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.m = {k: np.zeros(p.shape, p.dtype) for k, p in params.items()}
        self.v = {k: np.zeros(p.shape, p.dtype) for k, p in params.items()}

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.step_count += 1
        bc1 = 1.0 - b1 ** self.step_count
        bc2 = 1.0 - b2 ** self.step_count
        for k, p in self.params.items():
            g = grads.get(k)
            if g is None:
                continue
            decay = 1.0 - lr * self.weight_decay if self.weight_decay and decays(k, p) else 1.0
            scalars = (p.dtype.type(s) for s in (b1, b2, lr, decay, self.eps, bc1, bc2))
            # flat views of the (contiguous) parameter and moments: the kernel updates them in place
            _adamw_update(p.reshape(-1), np.ascontiguousarray(g, dtype=p.dtype).reshape(-1), self.m[k].reshape(-1),
                          self.v[k].reshape(-1), *scalars)

    def state_dict(self):
        state = {f"m.{k}": v for k, v in self.m.items()}
        state.update({f"v.{k}": v for k, v in self.v.items()})
        return state, {"step_count": self.step_count}

    def load_state_dict(self, arrays, meta):
        for k in self.params:
            self.m[k][...] = arrays[f"m.{k}"]
            self.v[k][...] = arrays[f"v.{k}"]
        self.step_count = int(meta["step_count"])


class SGD:
    """SGD with momentum and coupled weight decay, as torch.optim.SGD (dampening 0):
        g += wd * p (decaying parameters only);  buf = mu buf + g;  p -= lr * buf
    """

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"invalid SGD settings lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        self.params = params
        self.lr, self.momentum, self.weight_decay, self.nesterov = lr, momentum, weight_decay, nesterov
        self.step_count = 0
        self.buf = {k: np.zeros_like(p) for k, p in params.items()}

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        self.step_count += 1
        for k, p in self.params.items():
            g = grads.get(k)
            if g is None:
                continue
            if self.weight_decay and decays(k, p):
                g = g + self.weight_decay * p
            buf = self.buf[k]
            if self.step_count == 1:
                buf[...] = g
            else:
                buf *= self.momentum
                buf += g
            p -= lr * (g + self.momentum * buf if self.nesterov else buf)

    def state_dict(self):
        return {f"buf.{k}": v for k, v in self.buf.items()}, {"step_count": self.step_count}

    def load_state_dict(self, arrays, meta):
        for k in self.params:
            self.buf[k][...] = arrays[f"buf.{k}"]
        self.step_count = int(meta["step_count"])


def cosine_lr(step, total_steps, base_lr, warmup_steps=0, min_lr=0.0):
    """Linear warm-up from 0 to base_lr over warmup_steps, then cosine decay to min_lr at
    total_steps. step counts from 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so that their global L2 norm is at most max_norm (as
    torch.nn.utils.clip_grad_norm_). Returns the norm before clipping."""
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    if max_norm is not None and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= scale
    return total
