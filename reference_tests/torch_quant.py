"""Independent PyTorch quantizers, one ``nn.Module`` per quantizer spec of minibvit, for the
whole-model reference tests (``torch_reference.TorchViT(cfg, quant={role: module})``).

Written from the documented formulas (docs, issue texts and the docstrings' formulas), sharing no
code with minibvit. Every module computes

    out = straight_through(value, surrogate)

where ``value`` is the exact quantized forward value (built from detached discrete decisions:
signs, roundings, masks, data-derived scales) and ``surrogate`` is a differentiable expression
whose autograd gradient IS the documented pseudo-gradient, in the LSQ "round_pass" pattern
``scale * ((r(c) - c).detach() + c)`` with ``c = clamp(x / scale)``. Because
``surrogate - surrogate.detach()`` is exactly 0 in floating point, the forward value is bit-exact
``value``; only the gradient comes from the surrogate.

Parameters and buffers carry minibvit's names ("alpha", "shift", "bias", "step",
"running_center"), so ``TorchViT.load_numpy`` copies a minibvit state dict in unchanged.
Learnable scales start as NaN and are set from the first training batch, like minibvit's.
After each forward a module keeps ``last_out`` (detached), and ``codes(out)`` decodes a quantized
output of that forward (its own or minibvit's) into integer codes using the module's levels: the
tests compare codes exactly and values with a tight tolerance.
"""
import math

import torch

SCALE_FLOOR = 1e-5  # smallest value a learnable scale takes in forward; its gradient passes unchanged
GSB_T1, GSB_T2 = 0.7, 0.9  # GSB group thresholds as fractions of the max


# --------------------------------------------------------------------------------------------
# building blocks


def straight_through(value, surrogate):
    """Forward: exactly ``value``. Backward: the gradient of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


def grad_scale(x, factor):
    """Forward x, backward g * factor (LSQ's gradient scale)."""
    return straight_through(x, x * factor)


def floored(scale):
    """max(scale, SCALE_FLOOR) forward; the gradient reaches the raw scale unchanged (BiT's eps)."""
    return straight_through(scale.clamp(min=SCALE_FLOOR), scale)


def pm_sign(x):
    """sign with sign(0) = +1."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def round_pass(scale, c, rounded):
    """scale * rounded forward; LSQ gradients: d/dc = scale, d/dscale = rounded - c + scale dc/dscale."""
    return scale * ((rounded - c).detach() + c)


def median_rows(flat):
    """Per-column median of (rows, C): the middle value, or the mean of the two middle values."""
    s = flat.sort(dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def mean_abs_first(x, masks):
    """mean |x| over the first non-empty mask, else over all of x (the documented fallback)."""
    for m in masks:
        if m.any():
            return x[m].abs().mean()
    return x.abs().mean()


def nearest_level(x, levels):
    """Index of the nearest entry of ``levels`` (1-D) for every element of x."""
    return (x.unsqueeze(-1) - levels).abs().argmin(dim=-1)


class QuantModule(torch.nn.Module):
    """Base: records the last output; subclasses implement ``quantize`` and ``codes``."""

    def forward(self, x):
        out = self.quantize(x)
        self.last_out = out.detach()
        return out

    def init_from(self, name, value):
        """Fill a NaN param from the first training batch; refuse eval before that."""
        param = getattr(self, name)
        if torch.isnan(param).any():
            if not self.training:
                raise ValueError(f"{type(self).__name__}.{name} is not initialised")
            with torch.no_grad():
                param.copy_(value.detach().reshape(param.shape))


# --------------------------------------------------------------------------------------------
# binary


class SignBinarizer(QuantModule):
    """sign(x) (sign(0) = +1); clipped STE: dx = g 1[|x| <= 1] (BNN)."""

    def quantize(self, x):
        return straight_through(pm_sign(x), x.clamp(-1, 1))

    def codes(self, out):
        return (out > 0).to(torch.int64)


class WeightBinarizer(QuantModule):
    """alpha * sign(W_c), W_c = W - mean_row W (center) or W, alpha = mean|W_c| per output channel
    (constant); clipped STE on W_c, and autograd through the centring gives dW = dW_c - mean_row dW_c."""

    def __init__(self, center):
        super().__init__()
        self.center = center

    def quantize(self, w):
        rows = tuple(range(1, w.ndim))
        wc = w - w.mean(dim=rows, keepdim=True) if self.center else w
        alpha = wc.detach().abs().mean(dim=rows, keepdim=True)
        return straight_through(alpha * pm_sign(wc), wc.clamp(-1, 1))

    def codes(self, out):
        return (out > 0).to(torch.int64)


class ElasticBinarizer(QuantModule):
    """BiT's elastic binarizer with learnable scale alpha (1,), N = numel, s = 1/sqrt(N):
    signed   out = alpha sign(x),  dx = g 1[|x/alpha| <= 1],
             "lsq": dalpha = s sum sign(x) g;  "gsb": dalpha = s sum (sign(x) - 1[|q| <= 1] q) g
    unsigned out = alpha clamp(round(x/alpha), 0, 1), dx = g 1[0 <= q <= 1],
             dalpha = s sum (1[q > 1] + 1[0 <= q <= 1](round(q) - q)) g.
    First batch: alpha = 2 mean|x| (signed) or 4 mean|x| (unsigned)."""

    def __init__(self, signed, alpha_grad, dtype):
        super().__init__()
        self.signed, self.alpha_grad = signed, alpha_grad
        self.alpha = torch.nn.Parameter(torch.full((1,), math.nan, dtype=dtype))

    def quantize(self, x):
        self.init_from("alpha", (2 if self.signed else 4) * x.detach().abs().mean())
        a = grad_scale(floored(self.alpha), 1 / math.sqrt(x.numel()))
        self.level = a.detach()
        if not self.signed:
            c = (x / a).clamp(0, 1)
            rounded = torch.round(c.detach())
            return straight_through(a * rounded, round_pass(a, c, rounded))
        s = pm_sign(x.detach())
        if self.alpha_grad == "lsq":  # dalpha = sign(x): alpha only scales the detached sign
            surrogate = a * s + a.detach() * (x / a.detach()).clamp(-1, 1)
        else:
            surrogate = round_pass(a, (x / a).clamp(-1, 1), s)
        return straight_through(a * s, surrogate)

    def codes(self, out):
        return (out > 0).to(torch.int64) if self.signed else (out > self.level / 2).to(torch.int64)


# --------------------------------------------------------------------------------------------
# ternary and 8-bit


class Ternarizer(QuantModule):
    """TWN / TerViT: Delta = 0.7 mean|W|, T = sign(W) 1[|W| > Delta], alpha = mean of |W| over
    |W| > Delta (0 if none), per output channel or per tensor; out = alpha T; identity STE."""

    def __init__(self, per_channel):
        super().__init__()
        self.per_channel = per_channel

    def quantize(self, w):
        axes = tuple(range(1, w.ndim)) if self.per_channel else tuple(range(w.ndim))
        abs_w = w.detach().abs()
        above = abs_w > 0.7 * abs_w.mean(dim=axes, keepdim=True)
        count = above.sum(dim=axes, keepdim=True)
        alpha = torch.where(count > 0, (abs_w * above).sum(dim=axes, keepdim=True) / count.clamp(min=1),
                            torch.zeros_like(count, dtype=w.dtype))
        return straight_through(alpha * (pm_sign(w.detach()) * above), w)

    def codes(self, out):
        return torch.sign(out).to(torch.int64)


class MinMaxQuantizer(QuantModule):
    """Min-max k-bit on the current tensor's statistics, identity STE (scale detached).
    signed: scale = max|x| / (2^(b-1) - 1), codes = clamp(round(x/scale), -qmax, qmax), out = codes scale;
    unsigned: lo = min(min x, 0), hi = max(max x, 0), scale = (hi - lo)/(2^b - 1),
              zp = round(-lo/scale), codes = clamp(round(x/scale) + zp, 0, 2^b - 1), out = (codes - zp) scale.
    Per tensor, or per output channel (axis 0, weights). A zero range gets scale 1."""

    def __init__(self, bits, signed, per_channel):
        super().__init__()
        self.bits, self.signed, self.per_channel = bits, signed, per_channel

    def _stat(self, x, fn):
        if self.per_channel:
            return fn(x.reshape(x.shape[0], -1), dim=1).values.reshape((-1,) + (1,) * (x.ndim - 1))
        return fn(x.reshape(-1), dim=0).values

    def quantize(self, x):
        xd = x.detach()
        if self.signed:
            qmax = 2 ** (self.bits - 1) - 1
            scale = self._stat(xd.abs(), torch.max) / qmax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zp = torch.zeros_like(scale)
            codes = torch.round(xd / scale).clamp(-qmax, qmax)
        else:
            qmax = 2**self.bits - 1
            lo = self._stat(xd, torch.min).clamp(max=0)
            hi = self._stat(xd, torch.max).clamp(min=0)
            scale = (hi - lo) / qmax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zp = torch.round(-lo / scale)
            codes = (torch.round(xd / scale) + zp).clamp(0, qmax)
        self.scale, self.zero_point = scale, zp
        return straight_through((codes - zp) * scale, x)

    def codes(self, out):
        return (torch.round(out / self.scale) + self.zero_point).to(torch.int64)


class LSQQuantizer(QuantModule):
    """LSQ (Esser et al. 2020), one step per tensor: out = clamp(round(x/s), Qn, Qp) s,
    dx = g 1[Qn <= q <= Qp], ds = sum(v g)/sqrt(N Qp), v = Qn | Qp | round(q) - q.
    First batch: s = 2 mean|x| / sqrt(Qp)."""

    def __init__(self, bits, signed, dtype):
        super().__init__()
        self.qn, self.qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        self.step = torch.nn.Parameter(torch.full((1,), math.nan, dtype=dtype))

    def quantize(self, x):
        self.init_from("step", 2 * x.detach().abs().mean() / math.sqrt(self.qp))
        s = grad_scale(floored(self.step), 1 / math.sqrt(x.numel() * self.qp))
        self.level = s.detach()
        c = (x / s).clamp(self.qn, self.qp)
        rounded = torch.round(c.detach())
        return straight_through(s * rounded, round_pass(s, c, rounded))

    def codes(self, out):
        return torch.round(out / self.level).to(torch.int64)


# --------------------------------------------------------------------------------------------
# BinaryViT's activation shift module (our reconstruction)


class ActivationShift(QuantModule):
    """ASM: out = inner(x - (c + shift)), shift (C,) learnable (init 0); the centre c is
    "mean" / "median": buffer running_center (C,), the per-channel statistic of x over all leading axes,
        set by the first training batch, then c <- (1 - m) c + m stat, updated before quantizing in
        training, frozen in eval, constant in backward;
    "token": each token's own mean over its C channels (differentiated through);
    "shift": 0 (the learnable shift alone).
    The inner binarizer's params are registered under their own names ("alpha")."""

    def __init__(self, inner, channels, center, momentum, dtype):
        super().__init__()
        self.inner = [inner]  # a list, not a submodule: its params are re-registered flat below
        self.center, self.momentum, self.channels = center, momentum, channels
        for name, p in inner.named_parameters():
            self.register_parameter(name, p)
        self.shift = torch.nn.Parameter(torch.zeros(channels, dtype=dtype))
        if center in ("mean", "median"):
            self.register_buffer("running_center", torch.full((channels,), math.nan, dtype=dtype))

    def train(self, mode=True):
        self.inner[0].train(mode)
        return super().train(mode)

    def quantize(self, x):
        if self.center in ("mean", "median"):
            if self.training:
                with torch.no_grad():
                    flat = x.detach().reshape(-1, self.channels)
                    stat = flat.mean(dim=0) if self.center == "mean" else median_rows(flat)
                    if torch.isnan(self.running_center).any():
                        self.running_center.copy_(stat)
                    else:
                        self.running_center.mul_(1 - self.momentum).add_(self.momentum * stat)
            elif torch.isnan(self.running_center).any():
                raise ValueError("ActivationShift.running_center is not initialised")
            y = x - (self.running_center + self.shift)
        elif self.center == "token":
            y = x - (x.mean(dim=-1, keepdim=True) + self.shift)
        else:
            y = x - self.shift
        return self.inner[0](y)

    def codes(self, out):
        return self.inner[0].codes(out)


# --------------------------------------------------------------------------------------------
# GSB (Gao et al. 2024): values and attention probabilities


class GSBValue(QuantModule):
    """v (B, H, N, d) -> y = v - shift[h, :] (shift (H, d), init 0), group masks over the whole tensor
    T1 = 1[y > 0.7 max y] + 1[y < 0.7 min y], T2 likewise with 0.9;
    out = a1 sign(y) + a2 T1 sign(y) + a3 T2 sign(y)   (a = max(alpha, 1e-5), sign(0) = +1).
    Pseudo-gradient = autograd of sum_k a_k ((s_k - c_k).detach() + c_k), c_k = clamp(y_k / a_k, -1, 1),
    y_1 = y, y_k = y T_k with s_k = sign(y T_k) (sign(0) = 0), a_k's gradient scaled by 1/sqrt(|G_k|)
    (|G_1| = numel, |G_2| = |T1|, |G_3| = |T2|; 0 for an empty group). "official": y_k takes y's gradient
    unmasked (the indicators 1[|y_k/a_k| <= 1] are 1 outside T_k); "principled": dy_k/dy = T_k.
    First batch: alpha = 2 mean|y| over (outside T1 | T1 minus T2 | T2), empty groups falling back to
    (all | T1, all | all)."""

    def __init__(self, heads, head_dim, mode, dtype):
        super().__init__()
        self.mode = mode
        self.shift = torch.nn.Parameter(torch.zeros(heads, head_dim, dtype=dtype))
        self.alpha = torch.nn.Parameter(torch.full((3,), math.nan, dtype=dtype))

    def quantize(self, v):
        y = v - self.shift[:, None, :]
        yd = y.detach()
        t1 = (yd > GSB_T1 * yd.max()) | (yd < GSB_T1 * yd.min())
        t2 = (yd > GSB_T2 * yd.max()) | (yd < GSB_T2 * yd.min())
        self.init_from("alpha", 2 * torch.stack([mean_abs_first(yd, [~t1]), mean_abs_first(yd, [t1 & ~t2, t1]),
                                                 mean_abs_first(yd, [t2])]))
        a = floored(self.alpha)
        self.levels = torch.cumsum(a.detach(), 0)
        s = pm_sign(yd)
        value = a[0] * s + a[1] * (t1 * s) + a[2] * (t2 * s)
        surrogate = 0
        for k, mask in enumerate((None, t1, t2)):
            count = y.numel() if mask is None else int(mask.sum())
            ak = grad_scale(a[k], 1 / math.sqrt(count) if count else 0.0)
            if mask is None:
                yk, sk = y, s
            else:
                yk = y * mask if self.mode == "principled" else straight_through(y * mask, y)
                sk = torch.sign(yd * mask)
            surrogate = surrogate + round_pass(ak, (yk / ak).clamp(-1, 1), sk)
        return straight_through(value, surrogate)

    def codes(self, out):
        return torch.sign(out).to(torch.int64) * (nearest_level(out.abs(), self.levels) + 1)


class GSBAttn(QuantModule):
    """A (B, H, N, N) softmax probabilities -> y = A + bias (bias (H, N, N), init 0), masks
    T1 = 1[y > 0.7 M], T2 = 1[y > 0.9 M], M = max y over the tensor or per row (last axis);
    out = a1 clamp(round(y/a1), 0, 1) + a2 T1 + a3 T2.
    Basis 1: the unsigned elastic LSQ gradients (scale 1/sqrt(numel)).
    "official": dy += (a2 T1 + a3 T2) g, dalpha_k = sum T_k g / sqrt(|T_k|) (surrogate a_k T_k + a_k.detach() T_k y);
    "principled": basis k is a step of height a_k at t_k = frac_k M with the LSQ ramp
      a_k clamp((y - t_k)/a_k + 1/2, 0, 1) as its surrogate (M constant in backward).
    First batch: alpha = 4 mean|y| over (all | T1 minus T2 -> T1 -> all | T2 -> all)."""

    def __init__(self, heads, tokens, mode, max_over, dtype):
        super().__init__()
        self.mode, self.max_over = mode, max_over
        self.bias = torch.nn.Parameter(torch.zeros(heads, tokens, tokens, dtype=dtype))
        self.alpha = torch.nn.Parameter(torch.full((3,), math.nan, dtype=dtype))

    def quantize(self, attn):
        y = attn + self.bias
        yd = y.detach()
        top = yd.max() if self.max_over == "tensor" else yd.amax(dim=-1, keepdim=True)
        t1, t2 = yd > GSB_T1 * top, yd > GSB_T2 * top
        self.init_from("alpha", 4 * torch.stack([yd.abs().mean(), mean_abs_first(yd, [t1 & ~t2, t1]),
                                                 mean_abs_first(yd, [t2])]))
        a = floored(self.alpha)
        ad = a.detach()
        upper = (torch.zeros_like(ad[1]), ad[1], ad[1] + ad[2])  # T1 = T2 = 0 | T1 only | T1 and T2
        self.levels = torch.stack([b * ad[0] + t for b in (0, 1) for t in upper])
        a1 = grad_scale(a[0], 1 / math.sqrt(y.numel()))
        c = (y / a1).clamp(0, 1)
        rounded = torch.round(c.detach())
        value = rounded * ad[0] + t1 * ad[1] + t2 * ad[2]
        surrogate = round_pass(a1, c, rounded)
        for k, (mask, frac) in enumerate(((t1, GSB_T1), (t2, GSB_T2)), start=1):
            count = int(mask.sum())
            ak = grad_scale(a[k], 1 / math.sqrt(count) if count else 0.0)
            if self.mode == "official":
                surrogate = surrogate + ak * mask + ak.detach() * mask * y
            else:
                ramp = ((y - frac * top) / ak + 0.5).clamp(0, 1)
                surrogate = surrogate + round_pass(ak, ramp, mask.to(y.dtype))
        return straight_through(value, surrogate)

    def codes(self, out):
        return nearest_level(out, self.levels)


# --------------------------------------------------------------------------------------------
# spec -> module (mirrors minibvit.methods.build_quantizers)


def _activation_channels(cfg, role):
    """Size of the last axis of the tensor a role quantizes (ASM's per-channel shift)."""
    if role.endswith(("attn.q", "attn.k", "attn.v")):
        return cfg.embed_dim // cfg.num_heads
    if role.endswith("mlp.fc2.input"):
        return int(cfg.embed_dim * cfg.mlp_ratio)
    return cfg.embed_dim


def torch_quantizer(spec, role, cfg, options, dtype=torch.float64):
    """A fresh torch quantizer module for a minibvit spec name on tensor ``role``.

    options: any object with asm_center, asm_momentum, gsb_mode, gsb_max_over (e.g.
    minibvit.methods.QuantizerOptions)."""
    if spec.startswith("asm:"):
        inner = torch_quantizer(spec[4:], role, cfg, options, dtype)
        return ActivationShift(inner, _activation_channels(cfg, role), options.asm_center, options.asm_momentum, dtype)
    if spec == "gsb_value":
        return GSBValue(cfg.num_heads, cfg.embed_dim // cfg.num_heads, options.gsb_mode, dtype)
    if spec == "gsb_attn":
        tokens = (cfg.image_size // cfg.patch_size) ** 2 + (2 if cfg.distilled else 1)
        return GSBAttn(cfg.num_heads, tokens, options.gsb_mode, options.gsb_max_over, dtype)
    factories = {
        "sign": lambda: SignBinarizer(),
        "w_binary": lambda: WeightBinarizer(center=True),
        "w_xnor": lambda: WeightBinarizer(center=False),
        "a_elastic_signed": lambda: ElasticBinarizer(True, "lsq", dtype),
        "a_elastic_unsigned": lambda: ElasticBinarizer(False, "lsq", dtype),
        "a_elastic_signed_gsb": lambda: ElasticBinarizer(True, "gsb", dtype),
        "w_ternary_channel": lambda: Ternarizer(per_channel=True),
        "w_ternary_tensor": lambda: Ternarizer(per_channel=False),
        "w_lsq8": lambda: LSQQuantizer(8, True, dtype),
        "a_lsq8": lambda: LSQQuantizer(8, True, dtype),
        "w_minmax8": lambda: MinMaxQuantizer(8, True, per_channel=True),
        "a_minmax8_signed": lambda: MinMaxQuantizer(8, True, per_channel=False),
        "a_minmax8_unsigned": lambda: MinMaxQuantizer(8, False, per_channel=False),
    }
    if spec not in factories:
        raise ValueError(f"no torch reference for quantizer spec {spec!r}; known: {sorted(factories)}")
    return factories[spec]()


def torch_quantizers(specs, cfg, options, dtype=torch.float64):
    """{role: module} for a {role: spec} table (minibvit.methods.resolve)."""
    return {role: torch_quantizer(spec, role, cfg, options, dtype) for role, spec in specs.items()}
