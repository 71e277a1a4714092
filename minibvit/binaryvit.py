"""BinaryViT (Xiao et al. 2023, "BinaryViT: Towards Efficient and Accurate Binary Vision Transformers",
arXiv 2305.14730; withdrawn, no code): our documented reconstruction of its two ideas, GRS and ASM,
in one place. docs/binaryvit.md says what the paper states and what we chose where it is silent.

GRS, gradient regularization scheme. A binarized latent weight W (the tensor whose sign the weight
binarizer takes: W - mean_channel(W) for BiT's centred w_binary, see binarized_latent) gets an extra
gradient pulling it to the two modes +-alpha of its channel, alpha = mean|W| per output channel (a
constant), sign(0) = +1:
    l2:  R = (lam/2) sum (|W| - alpha)^2     dR/dW = lam (W - alpha sign(W))
    l1:  R = lam sum ||W| - alpha|           dR/dW = lam sign(|W| - alpha) sign(W)
For a centred binarizer the regularizer acts on W_c = W - mean(W) and its gradient reaches the latent
W through the centring: dR/dW = g_c - mean_channel(g_c) (GRSHook). Strength: lam_t = lam min(1, t / T_w)
(linear warm-up over T_w optimizer steps, grs_lambda).

ASM, activation shift module, in front of an activation binarizer (x: (..., C), channels last):
    forward:  y = x - (c + r),  out = binarizer(y)
    r: learnable per-channel shift (init 0), dL/dr = -sum over leading axes of dL/dy
    c: data-driven centre: "mean" (default) / "median" per-channel running estimate (EMA, frozen in
       eval, a constant in backward), "token" (each token's mean over C; dL/dx = dL/dy - mean_C dL/dy)
       or "none" (c = 0).
At inference sign(x - (c + r)) needs one threshold per channel: asm_fold_threshold.

The BinaryViT table is the binary baseline with ASM in front of every activation binarizer except
the attention probabilities (asm_table); GRS is its stage's gradient hook (minibvit.methods).
"""

import numpy as np

from .quant import channel_mean_abs, check_choice, check_float_array, sign

ASM_CENTERS = ("mean", "median", "token", "none")
ASM_DEFAULT_CENTER = "mean"
ASM_DEFAULT_MOMENTUM = 0.1
GRS_VARIANTS = ("l2", "l1")
GRS_DEFAULT_LAMBDA = 1e-2
GRS_DEFAULT_VARIANT = "l2"
GRS_DEFAULT_WARMUP_EPOCHS = 1.0


# ------------------------------------------------------------------------------------------------
# GRS (gradient regularization scheme), our reconstruction
# ------------------------------------------------------------------------------------------------

def grs_gradient(w, lam, variant="l2"):
    """GRS extra gradient, added to dL/dW of a binarized latent weight (BinaryViT reconstruction).

    alpha = per-output-channel mean|W| (a constant, not differentiated), sign(0) = +1:
      l2: lam (W - alpha sign(W))           = d/dW (lam/2) sum (|W| - alpha)^2
      l1: lam sign(|W| - alpha) sign(W)     = d/dW lam sum ||W| - alpha|
    Both pull every latent weight to the two modes +-alpha of its channel, away from 0 where signs flip.

    Args: w (out_channels, ...) float array; lam float >= 0; variant "l2" | "l1".
    Returns: (w's shape, w's dtype) gradient.
    """
    check_float_array(w, "w", nonempty=True)
    check_choice(variant, GRS_VARIANTS, "variant")
    if lam < 0:
        raise ValueError(f"GRS lambda must be >= 0 (0 is the baseline), got {lam}")
    lam = w.dtype.type(lam)
    alpha = channel_mean_abs(w)
    s = sign(w)
    if variant == "l2":
        return lam * (w - alpha * s)
    return lam * sign(np.abs(w) - alpha) * s


def grs_lambda(step, lam, warmup_steps):
    """GRS strength at optimizer step `step` (0-based): lam min(1, step / warmup_steps).

    Linear warm-up from 0; warmup_steps = 0 gives lam from the first step.
    """
    if step < 0 or warmup_steps < 0 or lam < 0:
        raise ValueError(f"grs_lambda needs step >= 0, warmup_steps >= 0 and lam >= 0, "
                         f"got step={step}, warmup_steps={warmup_steps}, lam={lam}")
    if warmup_steps == 0:
        return float(lam)
    return float(lam) * min(1.0, step / warmup_steps)


def binarized_latent(model, role):
    """The tensor whose sign a weight binarizer takes: the latent weight, centred per output channel
    when the binarizer centres it (BiT's w_binary), so that GRS and the diagnostics act on the real
    decision boundary. A role without a centring binarizer (e.g. a full-precision model) gives W."""
    w = model.params[role]
    centred = getattr(model.quantizers.get(role), "center", False)
    return w - w.mean(axis=tuple(range(1, w.ndim)), keepdims=True) if centred else w


class GRSHook:
    """GRS as a gradient hook: after backward and before clipping, hook(model, step) adds
    grs_gradient(W_c, lam_step) to dL/dW of every binarized weight role, pulled back through the
    centring for a centred binarizer (g - mean_channel(g)).

    Args: roles (binarized weight roles), lam, variant, warmup_steps (of the lambda schedule).
    """

    def __init__(self, roles, lam=GRS_DEFAULT_LAMBDA, variant=GRS_DEFAULT_VARIANT, warmup_steps=0):
        check_choice(variant, GRS_VARIANTS, "variant")
        self.roles, self.lam, self.variant, self.warmup_steps = list(roles), lam, variant, warmup_steps

    def __call__(self, model, step):
        lam = grs_lambda(step, self.lam, self.warmup_steps)
        for role in self.roles:
            g = grs_gradient(binarized_latent(model, role), lam, self.variant)
            if getattr(model.quantizers[role], "center", False):
                g -= g.mean(axis=tuple(range(1, g.ndim)), keepdims=True)
            model.grads[role] = model.grads[role] + g

    def __repr__(self):
        return f"GRSHook(lam={self.lam}, variant={self.variant!r}, warmup_steps={self.warmup_steps})"


# ------------------------------------------------------------------------------------------------
# ASM (activation shift module), our reconstruction
# ------------------------------------------------------------------------------------------------

class ASM:
    """Activation shift module in front of an activation binarizer (BinaryViT reconstruction).

    forward: out = inner(x - (c + r)), x (..., C) with channels on the last axis, where
      r: learnable residual per-channel shift, param "shift" (C,), init 0;
      c: the data-driven centre, by `center`:
        "mean" / "median": per-channel running estimate, buffer "running_center" (C,) = EMA of the
            batch's per-channel mean / median over all leading axes, NaN until the first training
            batch (which sets it directly), then c <- (1 - momentum) c + momentum batch_stat, updated
            in training forward BEFORE quantizing; frozen in eval; foldable into the binarizer
            threshold (asm_fold_threshold). Constant in backward.
        "token": input-adaptive, c = each token's own mean over its C channels; backward flows through
            the mean: dL/dx = dL/dy - mean_C(dL/dy), y = x - c - r.
        "none": c = 0 (only the learnable shift).
      backward: dL/dr = -sum over leading axes of dL/dy.
    params / buffers merge the inner binarizer's (same arrays), grads merge the inner's param grads.
    collective: as quant._Quantizer's; the batch statistic of the running centre is then that of every
    rank's rows (the row-weighted mean of the ranks' means; the median of the gathered rows).
    distributed.global_quantizer_state sets it on the ASM and on its inner binarizer.
    """

    collective = None

    def __init__(self, inner, channels, center=ASM_DEFAULT_CENTER, momentum=ASM_DEFAULT_MOMENTUM,
                 dtype=np.float32):
        check_choice(center, ASM_CENTERS, "center")
        if not 0 < momentum <= 1:
            raise ValueError(f"ASM momentum must be in (0, 1], got {momentum}")
        for name in ("shift", "running_center"):
            if name in inner.params or name in inner.buffers:
                raise ValueError(f"ASM inner quantizer already has a {name!r} entry; ASM's own names "
                                 f"would collide (use an inner binarizer without {name!r})")
        self.inner, self.channels, self.center, self.momentum = inner, channels, center, momentum
        self.dtype = np.dtype(dtype)
        self.params = {**inner.params, "shift": np.zeros(channels, self.dtype)}
        self.buffers = dict(inner.buffers)
        if center in ("mean", "median"):
            self.buffers["running_center"] = np.full(channels, np.nan, self.dtype)

    def _update_running_center(self, x, reduce=None):
        flat = x.reshape(-1, self.channels)
        if self.center == "mean":
            batch = flat.mean(axis=0)
            if reduce is not None:
                batch = reduce.mean(batch, weight=len(flat))
        else:
            batch = np.median(flat if reduce is None else reduce.gather(flat), axis=0)
        running = self.buffers["running_center"]
        if np.isnan(running).any():
            running[...] = batch
        else:
            running *= 1 - self.momentum
            running += self.momentum * batch

    def forward(self, x, training):
        """x: (..., C) -> out (inner's output, same shape), cache."""
        if not isinstance(x, np.ndarray) or x.ndim < 1 or x.shape[-1] != self.channels:
            raise ValueError(f"ASM expects an array with {self.channels} channels on the last axis, "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != self.dtype:
            raise TypeError(f"ASM holds {self.dtype} parameters but got {x.dtype} input; "
                            f"build it with dtype={x.dtype} or cast the input")
        shift = self.params["shift"]
        if self.center in ("mean", "median"):
            if training:
                self._update_running_center(x, self.collective)
            elif np.isnan(self.buffers["running_center"]).any():
                raise ValueError("ASM running_center not initialised: run one training forward or "
                                 "load a checkpoint")
            y = x - (self.buffers["running_center"] + shift)
        elif self.center == "token":
            y = x - (x.mean(axis=-1, keepdims=True) + shift)
        else:
            y = x - shift
        out, inner_cache = self.inner.forward(y, training)
        return out, inner_cache

    def backward(self, dout, cache):
        """Returns dx (x's shape) and grads {**inner grads, "shift": (C,)}."""
        dy, grads = self.inner.backward(dout, cache)
        dx = dy - dy.mean(axis=-1, keepdims=True) if self.center == "token" else dy
        return dx, {**grads, "shift": -dy.reshape(-1, self.channels).sum(axis=0)}

    def integer_form(self, cache):
        """The inner binarizer's (levels, scale) form, if it has one (see quant._Quantizer)."""
        inner = getattr(self.inner, "integer_form", None)
        return None if inner is None else inner(cache)

    def __repr__(self):
        return f"ASM(center={self.center!r}, momentum={self.momentum}, inner={self.inner!r})"


def asm_fold_threshold(asm):
    """Per-channel binarizer threshold c + r of an ASM for export (sign(x - (c + r)) at inference).

    Args: asm, an ASM with center "mean", "median" (running centre initialised) or "none".
    Returns: (C,) array in the ASM's dtype.
    """
    if asm.center == "token":
        raise ValueError("ASM center='token' is input-adaptive (each token's own mean): it cannot be "
                         "folded into a constant threshold; compute x - mean_C(x) - shift at inference")
    shift = asm.params["shift"]
    if asm.center == "none":
        return shift.copy()
    center = asm.buffers["running_center"]
    if np.isnan(center).any():
        raise ValueError("ASM running_center not initialised: run one training forward or load a checkpoint")
    return center + shift



def asm_table(binary_table):
    """The BinaryViT table from the binary baseline: "asm:<spec>" in front of every elastic activation
    binarizer except the attention probabilities (a non-negative, row-normalised tensor whose threshold
    is already learnt through alpha)."""
    return {**binary_table, **{role: f"asm:{spec}" for role, spec in binary_table.items()
                               if spec.startswith("a_elastic") and not role.endswith("attn.attn")}}
