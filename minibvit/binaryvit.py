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
W through the centring: dR/dW = g_c - mean_channel(g_c) (GRSHook). Switches (all ours):
    strength at step t (grs_lambda): lam_t = lam w(t) a(t), 0 before the onset t0,
        w = min(1, (t - t0) / T_w)               linear warm-up from the onset,
        a = 1 | (1 + cos(pi u)) / 2 | (1 - cos(pi u)) / 2,  u = (t - t0) / (T - t0)
            ("constant", "cosine_decay", "cosine_increase"; T = the stage's steps);
    per-layer strength (grs_layer_factors): lam_l = lam f_l / mean_l(f_l), f_l = 1 ("none"),
        1 / mean|W_l| ("scale") or sqrt(fan_in_l) ("fan_in");
    flip mask (GRSHook flip_window K > 0): the penalty sums only over the weights whose sign changed
        within the last K steps, dR/dW = P(m * g_c), m in {0, 1}, P the centring pull-back.

ASM, activation shift module, in front of an activation binarizer (x: (..., C), channels last):
    forward:  y = x - (c + r),  z = s y (learned scale, optional; else z = y),  out = binarizer(z)
    r: learnable per-channel shift (init 0), dL/dr = -sum over leading axes of dL/dy
    s: learnable per-channel scale (init 1, floored at quant.SCALE_FLOOR), dL/ds = sum dL/dz * y;
       dL/dy = s dL/dz; only in front of a signed binarizer (sign(s y) = sign(y): the forward is
       unchanged, the scale moves the binarizer's STE window per channel)
    c: data-driven centre: "mean" (default) / "median" per-channel running estimate (EMA, frozen in
       eval, a constant in backward), "token" (each token's mean over C; dL/dx = dL/dy - mean_C dL/dy)
       or "shift" (c = 0: the learnable shift alone; no ASM at all is ASM off, not a centre).
At inference sign(x - (c + r)) needs one threshold per channel: asm_fold_threshold.

Where ASM sits (asm_placement): "all" activation binarizers but the attention probabilities (the
BinaryViT table, asm_table), only the block linears' inputs ("linear"), only Q, K, V ("attention"),
or only the signed ones ("signed"). GRS is a gradient hook (minibvit.methods).
"""

import math

import numpy as np

from .quant import (SCALE_FLOOR, ElasticBinarizer, _fused, _kernels, channel_mean_abs, check_choice,
                    check_float_array, sign)

ASM_CENTERS = ("mean", "median", "token", "shift")
ASM_DEFAULT_CENTER = "mean"
ASM_DEFAULT_MOMENTUM = 0.1
ASM_PLACEMENTS = ("all", "linear", "attention", "signed")
ASM_DEFAULT_PLACEMENT = "all"
ASM_DEFAULT_SCALE = False
GRS_VARIANTS = ("l2", "l1")
GRS_SCHEDULES = ("constant", "cosine_decay", "cosine_increase")
GRS_LAYER_NORMS = ("none", "scale", "fan_in")
GRS_DEFAULT_LAMBDA = 1e-2
GRS_DEFAULT_VARIANT = "l2"
GRS_DEFAULT_WARMUP_EPOCHS = 1.0
GRS_DEFAULT_START_EPOCH = 0.0
GRS_DEFAULT_SCHEDULE = "constant"
GRS_DEFAULT_LAYER_NORM = "none"
GRS_DEFAULT_FLIP_WINDOW = 0.0  # epochs; 0: every weight

_LINEAR_INPUTS = ("attn.qkv.input", "attn.proj.input", "mlp.fc1.input", "mlp.fc2.input")
_ATTENTION_OPERANDS = ("attn.q", "attn.k", "attn.v")


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


def grs_lambda(step, lam, warmup_steps, start_step=0, total_steps=None, schedule=GRS_DEFAULT_SCHEDULE):
    """GRS strength at optimizer step `step` (0-based) of a stage: lam w(t) a(t), 0 before start_step.

    With t = step - start_step (the steps since the onset) and u = t / (total_steps - start_step):
      w = min(1, t / warmup_steps)  (linear warm-up; warmup_steps = 0: w = 1)
      a = 1 ("constant"), (1 + cos(pi u)) / 2 ("cosine_decay": lam at the onset, 0 at the end),
          (1 - cos(pi u)) / 2 ("cosine_increase": 0 at the onset, lam at the end)
    total_steps (the stage's steps) is needed by the annealed schedules only.
    """
    check_choice(schedule, GRS_SCHEDULES, "GRS schedule")
    if step < 0 or warmup_steps < 0 or lam < 0 or start_step < 0:
        raise ValueError(f"grs_lambda needs step, warmup_steps, start_step and lam >= 0, got step={step}, "
                         f"warmup_steps={warmup_steps}, start_step={start_step}, lam={lam}")
    t = step - start_step
    if t < 0:
        return 0.0
    value = float(lam) if warmup_steps == 0 else float(lam) * min(1.0, t / warmup_steps)
    if schedule == "constant":
        return value
    if total_steps is None or total_steps <= start_step:
        raise ValueError(f"GRS schedule {schedule!r} needs the stage's total steps after the onset "
                         f"(total_steps={total_steps}, start_step={start_step}): start GRS before the last step")
    u = min(1.0, t / (total_steps - start_step))
    return value * (1 + math.cos(math.pi * u)) / 2 if schedule == "cosine_decay" else \
        value * (1 - math.cos(math.pi * u)) / 2


def grs_layer_factors(weights, norm=GRS_DEFAULT_LAYER_NORM):
    """Per-layer GRS strength factors f_l / mean_l(f_l) (their mean is 1, so lam keeps its overall size).

    weights: the binarized latent weights, one (out_channels, fan_in...) array per layer; norm:
      "none":   f_l = 1 (every layer lam);
      "scale":  f_l = 1 / mean|W_l| (the l2 pull in units of the layer's own scale: a layer with small
                weights is pulled as hard, relative to its modes, as one with large weights);
      "fan_in": f_l = sqrt(fan_in_l) (~ 1 / the init scale, fixed through training).
    Returns a list of floats, one per layer.
    """
    check_choice(norm, GRS_LAYER_NORMS, "GRS layer norm")
    if norm == "none":
        return [1.0] * len(weights)
    if norm == "scale":
        raw = [1.0 / max(float(np.abs(w).mean()), SCALE_FLOOR) for w in weights]
    else:
        raw = [math.sqrt(w[0].size) for w in weights]
    mean = sum(raw) / len(raw)
    return [f / mean for f in raw]


def binarized_latent(model, role):
    """The tensor whose sign a weight binarizer takes: the latent weight, centred per output channel
    when the binarizer centres it (BiT's w_binary), so that GRS and the diagnostics act on the real
    decision boundary. A role without a centring binarizer (e.g. a full-precision model) gives W."""
    w = model.params[role]
    centred = getattr(model.quantizers.get(role), "center", False)
    return w - w.mean(axis=tuple(range(1, w.ndim)), keepdims=True) if centred else w


class GRSHook:
    """GRS as a gradient hook: after backward and before clipping, hook(model, step) adds
    m * grs_gradient(W_c, lam_l(step)) to dL/dW of every binarized weight role, pulled back through
    the centring for a centred binarizer (g - mean_channel(g)).

    Args: roles (binarized weight roles), lam, variant, warmup_steps, start_step, total_steps and
    schedule (of grs_lambda), layer_norm (grs_layer_factors), flip_window (steps; 0: m = 1, every
    weight; K > 0: m = 1 only where sign(W_c) changed within the last K steps, as seen by the hook's
    calls: a weight that has not flipped since the hook's first call is left alone). The flip history
    is the hook's state, not saved in checkpoints: a resumed run starts it afresh.
    Without a flip window, a 2-D float32 / float64 weight takes the fused kernel
    (kernels.quantize.grs_gradient_added, quant.USE_FUSED): the same bits in one pass per row.
    """

    def __init__(self, roles, lam=GRS_DEFAULT_LAMBDA, variant=GRS_DEFAULT_VARIANT, warmup_steps=0, *,
                 start_step=0, total_steps=None, schedule=GRS_DEFAULT_SCHEDULE, layer_norm=GRS_DEFAULT_LAYER_NORM,
                 flip_window=0):
        check_choice(variant, GRS_VARIANTS, "variant")
        check_choice(layer_norm, GRS_LAYER_NORMS, "GRS layer norm")
        grs_lambda(0, lam, warmup_steps, start_step, total_steps if total_steps is not None else start_step + 1,
                   schedule)  # refuses bad arguments now, not at the first step
        if schedule != "constant" and total_steps is None:
            raise ValueError(f"GRS schedule {schedule!r} needs total_steps")
        if flip_window < 0:
            raise ValueError(f"GRS flip_window must be >= 0 steps (0: every weight), got {flip_window}")
        self.roles, self.lam, self.variant, self.warmup_steps = list(roles), lam, variant, warmup_steps
        self.start_step, self.total_steps, self.schedule = start_step, total_steps, schedule
        self.layer_norm, self.flip_window = layer_norm, flip_window
        self._signs, self._last_flip = {}, {}

    def flip_mask(self, role, latent, step):
        """1 where the sign of `latent` changed within the last flip_window steps (updates the history)."""
        signs = latent >= 0
        if role not in self._signs:
            self._last_flip[role] = np.full(latent.shape, np.iinfo(np.int64).min // 2, np.int64)
        else:
            self._last_flip[role][signs != self._signs[role]] = step
        self._signs[role] = signs
        return (step - self._last_flip[role] < self.flip_window).astype(latent.dtype)

    def __call__(self, model, step):
        lam = grs_lambda(step, self.lam, self.warmup_steps, self.start_step, self.total_steps, self.schedule)
        # the flip history and the "scale" factors read W_c; "none" and "fan_in" only W's shape
        need_latents = bool(self.flip_window) or self.layer_norm == "scale"
        latents = [binarized_latent(model, role) if need_latents else model.params[role] for role in self.roles]
        factors = grs_layer_factors(latents, self.layer_norm)
        for role, latent, factor in zip(self.roles, latents, factors):
            mask = self.flip_mask(role, latent, step) if self.flip_window else None
            if lam == 0:
                continue
            centred = getattr(model.quantizers[role], "center", False)
            w, grad = model.params[role], model.grads[role]
            if mask is None and w.ndim == 2 and _fused(w, grad):  # the same bits in one pass per row
                model.grads[role] = _kernels().grs_gradient_added(w, grad, lam * factor, self.variant, centred)
                continue
            latent = latent if need_latents else binarized_latent(model, role)
            g = grs_gradient(latent, lam * factor, self.variant)
            if mask is not None:
                g *= mask
            if centred:
                g -= g.mean(axis=tuple(range(1, g.ndim)), keepdims=True)
            model.grads[role] = grad + g

    def __repr__(self):
        return (f"GRSHook(lam={self.lam}, variant={self.variant!r}, warmup_steps={self.warmup_steps}, "
                f"start_step={self.start_step}, total_steps={self.total_steps}, schedule={self.schedule!r}, "
                f"layer_norm={self.layer_norm!r}, flip_window={self.flip_window})")


# ------------------------------------------------------------------------------------------------
# ASM (activation shift module), our reconstruction
# ------------------------------------------------------------------------------------------------

def _column_sums(x):
    """The sum of x (..., C) over every axis but the last: numerics.column_sums (in parallel, over
    fixed chunks of rows, as the bias gradients; a view read where it lies) for float32 / float64,
    NumPy's otherwise. Numba loads on first use."""
    from . import numerics, ops

    return numerics.column_sums(x) if ops._numerics(x) else x.reshape(-1, x.shape[-1]).sum(axis=0)


def check_asm_center(center):
    """Refuse an unknown ASM centre; the old name "none" (which still inserted a learnable shift)
    gets its own message."""
    if center == "none":
        raise ValueError("ASM centre 'none' was renamed 'shift' (c = 0, the learnable shift alone); "
                         "for no ASM at all use --asm off (QuantizerOptions(asm='off'))")
    check_choice(center, ASM_CENTERS, "asm_center")


class ASM:
    """Activation shift module in front of an activation binarizer (BinaryViT reconstruction).

    forward: out = inner(s * (x - (c + r))), x (..., C) with channels on the last axis, where
      r: learnable residual per-channel shift, param "shift" (C,), init 0;
      s: with scale=True, a learnable per-channel scale, param "scale" (C,), init 1, used as
         max(s, quant.SCALE_FLOOR); else s = 1 (no param). Only in front of a signed binarizer:
         sign(s y) = sign(y) for s > 0, so the forward and the folded threshold are unchanged and the
         scale acts through the pseudo-gradient, as a per-channel STE window |y| <= alpha / s.
      c: the data-driven centre, by `center`:
        "mean" / "median": per-channel running estimate, buffer "running_center" (C,) = EMA of the
            batch's per-channel mean / median over all leading axes, NaN until the first training
            batch (which sets it directly), then c <- (1 - momentum) c + momentum batch_stat, updated
            in training forward BEFORE quantizing; frozen in eval; foldable into the binarizer
            threshold (asm_fold_threshold). Constant in backward.
        "token": input-adaptive, c = each token's own mean over its C channels; backward flows through
            the mean: dL/dx = dL/dy - mean_C(dL/dy), y = x - c - r.
        "shift": c = 0 (only the learnable shift).
      backward, with y = x - (c + r), z = s y, dL/dz from the inner binarizer's pseudo-gradient:
        dL/dy = s dL/dz;  dL/dr = -sum over leading axes of dL/dy;
        dL/ds = sum over leading axes of dL/dz * y  (0 where s is floored);
        dL/dx = dL/dy ("mean", "median", "shift") or dL/dy - mean_C(dL/dy) ("token").
    params / buffers merge the inner binarizer's (same arrays), grads merge the inner's param grads.
    collective: as quant._Quantizer's; the batch statistic of the running centre is then that of every
    rank's rows (the row-weighted mean of the ranks' means; the median of the gathered rows).
    distributed.global_quantizer_state sets it on the ASM and on its inner binarizer.
    """

    collective = None

    def __init__(self, inner, channels, center=ASM_DEFAULT_CENTER, momentum=ASM_DEFAULT_MOMENTUM,
                 dtype=np.float32, scale=ASM_DEFAULT_SCALE):
        check_asm_center(center)
        if not 0 < momentum <= 1:
            raise ValueError(f"ASM momentum must be in (0, 1], got {momentum}")
        for name in ("shift", "scale", "running_center"):
            if name in inner.params or name in inner.buffers:
                raise ValueError(f"ASM inner quantizer already has a {name!r} entry; ASM's own names "
                                 f"would collide (use an inner binarizer without {name!r})")
        if scale and getattr(inner, "signed", None) is not True:
            raise ValueError(f"an ASM scale needs a signed inner binarizer (sign(s y) = sign(y)); in front of "
                             f"{inner!r} it would move the threshold and not fold into it: use scale=False")
        self.inner, self.channels, self.center, self.momentum = inner, channels, center, momentum
        self.scale = bool(scale)
        self.dtype = np.dtype(dtype)
        self.params = {**inner.params, "shift": np.zeros(channels, self.dtype)}
        if self.scale:
            self.params["scale"] = np.ones(channels, self.dtype)
        self.buffers = dict(inner.buffers)
        if center in ("mean", "median"):
            self.buffers["running_center"] = np.full(channels, np.nan, self.dtype)

    def _update_running_center(self, x, reduce=None):
        rows = x.size // self.channels
        if self.center == "mean":
            batch = _column_sums(x) / rows
            if reduce is not None:
                batch = reduce.mean(batch, weight=rows)
        else:
            flat = x.reshape(-1, self.channels)
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
        fused = not self.scale and self.center != "token" and isinstance(self.inner, ElasticBinarizer)
        if self.center in ("mean", "median"):
            if training:
                self._update_running_center(x, self.collective)
            elif np.isnan(self.buffers["running_center"]).any():
                raise ValueError("ASM running_center not initialised: run one training forward or "
                                 "load a checkpoint")
            center = self.buffers["running_center"] + shift
        elif self.center == "token":
            center = x.mean(axis=-1, keepdims=True) + shift
        else:
            center = shift
        if fused:
            out, inner_cache = self.inner.forward(x, training, shift=center)
            return out, (inner_cache, inner_cache[0], None)
        y = x - center
        s = np.maximum(self.params["scale"], self.dtype.type(SCALE_FLOOR)) if self.scale else None
        out, inner_cache = self.inner.forward(y if s is None else y * s, training)
        return out, (inner_cache, y, s)

    backward_takes_out = True  # backward(dout, cache, out=view) returns dx in the view

    def backward(self, dout, cache, out=None):
        """Returns dx (x's shape; written into out when given, a view too) and grads {**inner grads,
        "shift": (C,)[, "scale": (C,)]}."""
        inner_cache, y, s = cache
        direct = out is not None and s is None and self.center != "token" and \
            getattr(self.inner, "backward_takes_out", False)  # dx = dz: the binarizer writes it there
        dz, grads = self.inner.backward(dout, inner_cache, out=out) if direct else self.inner.backward(dout, inner_cache)
        grads = dict(grads)
        if s is None:
            dy = dz
        else:
            dy = dz * s
            floored = self.params["scale"] < self.dtype.type(SCALE_FLOOR)
            grads["scale"] = np.where(floored, 0, (dz * y).reshape(-1, self.channels).sum(axis=0)).astype(self.dtype)
        dx = dy - dy.mean(axis=-1, keepdims=True) if self.center == "token" else dy
        grads["shift"] = -_column_sums(dy)
        if out is not None and dx is not out:
            out[...] = dx
            dx = out
        return dx, grads

    def integer_form(self, cache):
        """The inner binarizer's (levels, scale) form, if it has one (see quant._Quantizer)."""
        inner = getattr(self.inner, "integer_form", None)
        return None if inner is None else inner(cache[0])

    def can_recompute(self, cache):
        """Whether the inner binarizer can give its output again (recompute)."""
        return getattr(self.inner, "can_recompute", lambda cache: False)(cache[0])

    def recompute(self, cache):
        """The forward's output again: the inner binarizer's, from its cache."""
        return self.inner.recompute(cache[0])

    def packed_form(self, cache, axis=-1):
        """The inner binarizer's packed levels, if it has them (see quant._Quantizer.packed_form)."""
        inner = getattr(self.inner, "packed_form", None)
        return None if inner is None else inner(cache[0], axis)

    def __repr__(self):
        scale = ", scale=True" if self.scale else ""
        return f"ASM(center={self.center!r}, momentum={self.momentum}{scale}, inner={self.inner!r})"


def asm_fold_threshold(asm):
    """Per-channel binarizer threshold c + r of an ASM for export (sign(x - (c + r)) at inference;
    an ASM scale does not enter: sign(s y) = sign(y)).

    Args: asm, an ASM with center "mean", "median" (running centre initialised) or "shift".
    Returns: (C,) array in the ASM's dtype.
    """
    if asm.center == "token":
        raise ValueError("ASM center='token' is input-adaptive (each token's own mean): it cannot be "
                         "folded into a constant threshold; compute x - mean_C(x) - shift at inference")
    shift = asm.params["shift"]
    if asm.center == "shift":
        return shift.copy()
    center = asm.buffers["running_center"]
    if np.isnan(center).any():
        raise ValueError("ASM running_center not initialised: run one training forward or load a checkpoint")
    return center + shift


def asm_placement(role, spec, where=ASM_DEFAULT_PLACEMENT):
    """Whether ASM sits in front of the quantizer `spec` of tensor role `role` under placement `where`.

    Only elastic activation binarizers (specs a_elastic*) take an ASM; of those:
      "all":       every one but the attention probabilities (a non-negative, row-normalised tensor
                   whose threshold is already learnt through alpha), and any role a table marks asm:;
      "linear":    the inputs of the block linears (qkv, proj, fc1, fc2);
      "attention": the attention operands Q, K, V;
      "signed":    the signed ones (all but the post-GELU fc2 input and the probabilities).
    """
    check_choice(where, ASM_PLACEMENTS, "ASM placement")
    marked = spec.startswith("asm:")
    base = spec[4:] if marked else spec
    if not base.startswith("a_elastic"):
        return False
    if where == "all":
        return marked or not role.endswith("attn.attn")
    if where == "linear":
        return role.endswith(_LINEAR_INPUTS)
    if where == "attention":
        return role.endswith(_ATTENTION_OPERANDS)
    return base.startswith("a_elastic_signed")


def asm_table(binary_table):
    """The BinaryViT table from the binary baseline: "asm:<spec>" in front of every activation
    binarizer of the "all" placement (asm_placement)."""
    return {**binary_table, **{role: f"asm:{spec}" for role, spec in binary_table.items()
                               if asm_placement(role, spec, "all")}}
