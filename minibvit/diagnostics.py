"""Diagnostics of a binarized network, logged by the trainer and plotted by the tutorials.

Per tensor (float arrays; alpha = per-output-channel mean|W|, axis 0; sign(0) = +1):
    sign_flip_rate(W_prev, W_now)   fraction of latent weights whose sign changed
    code_change_rate(c_prev, c_now) fraction of weight codes (sign bits, ternary codes) that changed
    zero_mass(codes)                fraction of ternary codes that are 0
    near_zero_mass(W, frac)         fraction with |W| < frac alpha (weights a small update can flip)
    bimodality(W)                   (skew^2 + 1) / kurtosis of W / alpha: 1 for a two-point tensor
    weight_histogram(W)             histogram of W / alpha
    sign_entropy(x - threshold)     mean per-channel binary entropy of the activation sign bits
    binarization_error(x, a, s)     ||x - a sign(x - s)|| / ||x||
Per model: record_quantizer_inputs (the one recorder of what quantizers see, shared by the trainer and
the tutorials), weight_code, FlipCounter, weight_diagnostics, ternary_diagnostics and
activation_diagnostics (what train.py logs).
"""

import numpy as np

from .binaryvit import ASM, asm_fold_threshold, binarized_latent
from .quant import Ternarizer, channel_mean_abs, check_float_array, sign, ternary_codes


def sign_flip_rate(w_prev, w_now):
    """Fraction of latent weights whose sign (sign(0) = +1) changed between two steps. Returns float."""
    if np.shape(w_prev) != np.shape(w_now):
        raise ValueError(f"sign_flip_rate needs equal shapes, got {np.shape(w_prev)} and {np.shape(w_now)}")
    return code_change_rate(np.asarray(w_prev) >= 0, np.asarray(w_now) >= 0)


def code_change_rate(codes_prev, codes_now):
    """Fraction of entries whose code (a sign bit, a ternary code in {-1, 0, +1}) changed. Returns float."""
    if np.shape(codes_prev) != np.shape(codes_now):
        raise ValueError(f"code_change_rate needs equal shapes, got {np.shape(codes_prev)} and {np.shape(codes_now)}")
    return float(np.mean(np.asarray(codes_prev) != np.asarray(codes_now)))


def zero_mass(codes):
    """Fraction of ternary codes that are 0 (weights the ternarizer prunes). Returns float."""
    return float(np.mean(np.asarray(codes) == 0))


def near_zero_mass(w, frac=0.1):
    """Fraction of latent weights with |w| < frac alpha, alpha = per-output-channel mean|W| (axis 0).

    A channel with alpha = 0 contributes no near-zero weights (the strict inequality never holds).
    """
    check_float_array(w, "w", nonempty=True)
    return float(np.mean(np.abs(w) < frac * channel_mean_abs(w)))


def bimodality(w):
    """Moment bimodality coefficient of W/alpha (alpha per output channel mean|W|, axis 0).

    BC = (skewness^2 + 1) / kurtosis with population moments (Pearson / Sarle's coefficient without the
    small-sample correction). BC <= 1, with equality exactly for a two-point distribution (a weight
    tensor sitting at its two modes +-alpha); Gaussian 1/3, uniform 5/9, Laplace 1/6. Channels with
    alpha = 0 contribute zeros. Returns NaN when all normalised weights are equal (undefined).
    """
    check_float_array(w, "w", nonempty=True)
    alpha = channel_mean_abs(w)
    z = np.divide(w, alpha, out=np.zeros_like(w), where=alpha > 0).astype(np.float64).ravel()
    d = z - z.mean()
    m2, m3, m4 = np.mean(d ** 2), np.mean(d ** 3), np.mean(d ** 4)
    if m2 == 0:
        return float("nan")
    return float((m3 ** 2 / m2 ** 3 + 1) / (m4 / m2 ** 2))


def weight_histogram(w, bins=41, limit=3.0):
    """Histogram of W/alpha (alpha per output channel mean|W|, axis 0) on [-limit, limit].

    A bimodal binarized weight shows two peaks at +-1. Values outside the range are clipped into the
    edge bins, so the counts sum to w.size.
    Returns: counts (bins,) int64, edges (bins + 1,) float64.
    """
    check_float_array(w, "w", nonempty=True)
    alpha = channel_mean_abs(w)
    z = np.divide(w, alpha, out=np.zeros_like(w), where=alpha > 0).astype(np.float64).ravel()
    return np.histogram(np.clip(z, -limit, limit), bins=bins, range=(-limit, limit))


def sign_entropy(x_minus_threshold):
    """Mean over channels of the binary entropy (bits) of P(bit = +1) per channel.

    Args: x_minus_threshold (..., C), the binarizer input minus its threshold; bit = +1 where >= 0.
    Returns: float in [0, 1]; 1 when every channel's sign bit is +1 half of the time.
    """
    check_float_array(x_minus_threshold, "x_minus_threshold", nonempty=True)
    channels = x_minus_threshold.shape[-1]
    p = np.mean(x_minus_threshold.reshape(-1, channels) >= 0, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return float(np.mean(np.where((p > 0) & (p < 1), h, 0.0)))


def binarization_error(x, alpha, shift):
    """Relative binarization error ||x - alpha sign(x - s)|| / ||x|| (Frobenius, sign(0) = +1).

    Args: x (..., C); alpha and shift scalars or (C,) arrays (broadcast on the last axis).
    """
    check_float_array(x, "x", nonempty=True)
    norm = np.linalg.norm(x)
    if norm == 0:
        raise ValueError("binarization_error of an all-zero x is undefined (||x|| = 0)")
    return float(np.linalg.norm(x - alpha * sign(x - shift)) / norm)



# ------------------------------------------------------------------------------------------------
# model-level: the quantizer-input recorder and what the trainer logs
# ------------------------------------------------------------------------------------------------

def record_quantizer_inputs(model, roles, x):
    """{role: (input, output)} of the quantizers at `roles` during one evaluation forward of x.

    The quantizer objects stay in place (their forward is wrapped for the call and restored after,
    also on error), so the model runs exactly as it does without the recorder.
    """
    seen, wrapped = {}, []
    try:
        for role in roles:
            q = model.quantizers[role]

            def recording(t, training, _role=role, _forward=q.forward):
                out, cache = _forward(t, training)
                seen[_role] = (t, out)
                return out, cache

            q.forward = recording
            wrapped.append(q)
        model.forward(x, training=False)
    finally:
        for q in wrapped:
            del q.forward  # back to the class's method
    return seen


def weight_code(model, role):
    """The discrete code the quantizer of a weight role gives its latent weight: the ternary code
    {-1, 0, +1} (quant.ternary_codes, the quantizer's own granularity) for a ternarizer, else the sign
    bit (>= 0) of the binarized latent (binaryvit.binarized_latent)."""
    q = model.quantizers.get(role)
    if isinstance(q, Ternarizer):
        return ternary_codes(model.params[role], q.per_channel, q.delta_factor)[0]
    return binarized_latent(model, role) >= 0


class FlipCounter:
    """Code changes of quantized weights (weight_code: sign flips of binarized latent weights, any
    change of a ternary code), counted at EVERY step and averaged per step over the logging interval
    (take; so the rate does not depend on the logging interval) and over the epoch (take_epoch).
    A step counts once the previous step's codes are known (not the first step of a process)."""

    def __init__(self):
        self.prev, self.flips, self.steps = {}, 0.0, 0
        self.epoch_flips, self.epoch_steps = 0.0, 0

    def update(self, model, roles):
        rates = []
        for role in roles:
            code = weight_code(model, role)
            if role in self.prev:
                rates.append(code_change_rate(self.prev[role], code))
            self.prev[role] = code
        if rates:
            rate = float(np.mean(rates))
            self.flips += rate
            self.steps += 1
            self.epoch_flips += rate
            self.epoch_steps += 1

    def take(self):
        rate = self.flips / self.steps if self.steps else None
        self.flips, self.steps = 0.0, 0
        return rate

    def take_epoch(self):
        rate = self.epoch_flips / self.epoch_steps if self.epoch_steps else None
        self.epoch_flips, self.epoch_steps = 0.0, 0
        return rate


def weight_diagnostics(model, binarized, flip_counter):
    """near_zero_mass, bimodality (and flip_rate since the last call) averaged over the binarized layers."""
    if not binarized:
        return {}
    latents = [binarized_latent(model, role) for role in binarized]
    out = {"near_zero_mass": float(np.mean([near_zero_mass(w) for w in latents])),
           "bimodality": float(np.mean([bimodality(w) for w in latents]))}
    rate = flip_counter.take()
    if rate is not None:
        out["flip_rate"] = rate
    return out


def ternary_diagnostics(model, ternary, flip_counter, epoch=False):
    """ternary_zero_mass (fraction of 0 codes) and ternary_flip_rate (fraction of codes that changed
    per step, since the last call: flip_counter.take, or over the epoch: take_epoch with epoch=True),
    averaged over the ternarized layers."""
    if not ternary:
        return {}
    out = {"ternary_zero_mass": float(np.mean([zero_mass(weight_code(model, role)) for role in ternary]))}
    rate = flip_counter.take_epoch() if epoch else flip_counter.take()
    if rate is not None:
        out["ternary_flip_rate"] = rate
    return out


def sign_threshold(q, t):
    """The threshold the sign bit of quantizer q is taken against for input t: ASM's c + r (each
    token's own mean plus r for center="token"), 0 for a plain binarizer."""
    if not isinstance(q, ASM):
        return 0.0
    if q.center == "token":
        return t.mean(axis=-1, keepdims=True) + q.params["shift"]
    return asm_fold_threshold(q)


def activation_diagnostics(model, x):
    """Mean sign entropy and relative binarization error of the signed activation binarizers inside
    the blocks, on one batch x, in evaluation mode."""
    roles = []
    for role, q in model.quantizers.items():
        inner = getattr(q, "inner", q)
        if getattr(inner, "signed", False) and "alpha" in inner.params and not role.startswith(("head", "patch")):
            roles.append(role)
    if not roles:
        return {}
    seen = record_quantizer_inputs(model, roles, x)
    entropies, errors = [], []
    for role in roles:
        q, t = model.quantizers[role], seen[role][0]
        shift = sign_threshold(q, t)
        alpha = getattr(q, "inner", q).params["alpha"]
        entropies.append(sign_entropy(t - shift))
        if np.any(t):  # an all-zero input (e.g. after a collapsed attention) has no relative error
            errors.append(binarization_error(t, alpha, shift))
    out = {"sign_entropy": float(np.mean(entropies))}
    if errors:
        out["binarization_error"] = float(np.mean(errors))
    return out


def dead_activation_quantizers(model, x):
    """[(role, what)] of the activation quantizers that pass nothing on, on one batch x (evaluation mode).

    A quantizer whose input is all zero, or whose output is all zero (BiT's unsigned attention
    binarizer on near-uniform attention: every probability is below alpha/2, so every output is 0),
    cuts the class token off from the image: every image then gets the same logits. The trainer
    warns about these after the first training step (when the scales have been set from a batch).
    """
    roles = [role for role in model.quantizers if not role.endswith(".weight")]
    seen = record_quantizer_inputs(model, roles, x)
    dead = []
    for role in roles:
        if role not in seen:
            continue
        t, out = seen[role]
        if not np.any(t):
            dead.append((role, "its input is all zero"))
        elif not np.any(out):
            dead.append((role, "its output is all zero"))
    return dead
