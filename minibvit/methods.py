"""The methods of the binarization papers on top of the quantizer layer, and their diagnostics.

- GSB (Gao et al., "GSB: Group Superposition Binarization for Vision Transformer with Limited Training
  Samples", Neural Networks 2024, arXiv 2305.07931): the value (V) and attention-probability (A)
  quantizers, as pure op pairs and as wrapper classes with their learnable shift / bias.
- BinaryViT (Xiao et al. 2023, arXiv 2305.14730; withdrawn, no code): our documented reconstruction of
  GRS (gradient regularization scheme) and ASM (activation shift module).
- Diagnostics logged during training: sign-flip rate, near-zero mass, bimodality, histograms, sign
  entropy, binarization error.

Conventions: sign(0) = +1 for every binary sign; the GSB masked terms use sign(v * T) with sign(0) = 0
(the official code's `torch.sign` of a masked tensor). docs/gsb.md and docs/binaryvit.md derive every
formula and say what is the papers' and what is ours.
"""

import numpy as np

from .quant import SCALE_FLOOR, sign

GSB_MODES = ("official", "principled")
GSB_MAX_OVER = ("tensor", "row")
GSB_T1_FRACTION = 0.7
GSB_T2_FRACTION = 0.9
ASM_CENTERS = ("mean", "median", "token", "none")
GRS_VARIANTS = ("l2", "l1")


def _check_float_array(x, name):
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point numpy array, got {type(x).__name__} "
                        f"{getattr(x, 'dtype', '')}; convert it with np.asarray(..., dtype=np.float32)")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); pass at least one element")


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _effective_alphas(alphas, dtype):
    """The three GSB scales as used by forward and backward: max(alpha_k, SCALE_FLOOR = 1e-5), the
    official code's clamp (and quant.py's floor); the gradient reaches the raw alpha unchanged."""
    alphas = np.asarray(alphas)
    if alphas.shape != (3,):
        raise ValueError(f"GSB alphas must have shape (3,) (alpha1, alpha2, alpha3), got {alphas.shape}")
    if np.isnan(alphas).any():
        raise ValueError("GSB alphas contain NaN: initialise them (gsb_*_init or one training forward)")
    return np.maximum(alphas.astype(dtype), dtype.type(SCALE_FLOOR))


def _group_scale(count, dtype):
    """LSQ gradient scale 1/sqrt(|G|) of a group; 0 for an empty group (no alpha gradient, no NaN)."""
    return dtype.type(1.0 / np.sqrt(count)) if count > 0 else dtype.type(0.0)


def _mean_abs_with_fallback(x, masks):
    """mean |x| over the first non-empty mask in `masks`; over all of x if every mask is empty."""
    for mask in masks:
        if mask.any():
            return np.abs(x[mask]).mean()
    return np.abs(x).mean()


# ------------------------------------------------------------------------------------------------
# GSB: value quantizer
# ------------------------------------------------------------------------------------------------

def gsb_value_masks(v):
    """GSB group masks of the values, over the whole tensor.

    T1 = 1[v > 0.7 max v] + 1[v < 0.7 min v],  T2 = 1[v > 0.9 max v] + 1[v < 0.9 min v]  (T2 within T1).

    Args: v (any shape) float array.  Returns: (t1, t2) boolean arrays of v's shape.
    """
    vmax, vmin = v.max(), v.min()
    t1 = (v > GSB_T1_FRACTION * vmax) | (v < GSB_T1_FRACTION * vmin)
    t2 = (v > GSB_T2_FRACTION * vmax) | (v < GSB_T2_FRACTION * vmin)
    return t1, t2


def gsb_value_init(v):
    """First-batch initialisation of the three GSB value scales (official GSB code).

    alpha1 = 2 mean|v| outside T1, alpha2 = 2 mean|v| over T1 minus T2, alpha3 = 2 mean|v| over T2.
    An empty group falls back to its enclosing group (T1 minus T2 -> T1 -> all; outside T1 -> all;
    T2 -> all: T2 holds max v if it is > 0 and min v if it is < 0, so it is empty only for an all-zero
    v), so the result is never NaN. An all-zero v gives zeros (floored to 1e-5 in use).

    Args: v (any shape) float array (the shifted values).  Returns: alphas (3,) in v's dtype.
    """
    _check_float_array(v, "v")
    t1, t2 = gsb_value_masks(v)
    means = (_mean_abs_with_fallback(v, [~t1]),
             _mean_abs_with_fallback(v, [t1 & ~t2, t1]),
             _mean_abs_with_fallback(v, [t2]))
    return (2 * np.array(means)).astype(v.dtype)


def gsb_value_forward(v, alphas, mode="official"):
    """GSB value quantizer (Gao et al. 2024, `ElasticQuantQKV` in the official code).

    Forward (both modes):  V_q = a1 sign(v) + a2 T1 sign(v) + a3 T2 sign(v),  a_k = max(alpha_k, 1e-5),
    with the group masks T1, T2 of `gsb_value_masks` and sign(0) = +1.

    Pseudo-gradient (q_k = v_k / a_k, v_1 = v, v_2 = v T1, v_3 = v T2, g = dL/dV_q):
      official:   dL/dv = (1[|q_1| <= 1] + 1[|q_2| <= 1] + 1[|q_3| <= 1]) g
                  (outside T1, v T1 = 0 so the last two indicators are 1: the pass-through reaches 3g)
      principled: dL/dv = (1[|q_1| <= 1] + T1 1[|q_2| <= 1] + T2 1[|q_3| <= 1]) g
      both:       dL/dalpha_k = sum (sign(v_k) - 1[|q_k| <= 1] q_k) g / sqrt(|G_k|),
                  |G_1| = v.size, |G_2| = |T1|, |G_3| = |T2|; sign(v_k) is 0 where T_k = 0 and the
                  alpha gradient of an empty group is 0.

    Args:
      v: (any shape) float array, the (shifted) values.
      alphas: (3,) array (alpha1, alpha2, alpha3).
      mode: "official" or "principled".
    Returns: out (v's shape, v's dtype), cache for gsb_value_backward.
    """
    _check_float_array(v, "v")
    _check_choice(mode, GSB_MODES, "mode")
    a = _effective_alphas(alphas, v.dtype)
    t1, t2 = gsb_value_masks(v)
    s = sign(v)
    out = a[0] * s + a[1] * (t1 * s) + a[2] * (t2 * s)
    cache = (v, a, t1, t2, mode)
    return out, cache


def gsb_value_backward(dout, cache):
    """Backward of gsb_value_forward (formulas in its docstring).

    Args: dout (v's shape), cache.  Returns: dv (v's shape), dalphas (3,).
    """
    v, a, t1, t2, mode = cache
    dtype = v.dtype
    s = sign(v)
    v_groups = (v, v * t1, v * t2)
    signs = (s, t1 * s, t2 * s)  # sign(v * T) with sign(0) = 0 outside the group
    counts = (v.size, int(t1.sum()), int(t2.sum()))
    masks = (None, t1, t2)
    dv = np.zeros_like(v)
    dalphas = np.zeros(3, dtype=dtype)
    for k in range(3):
        q = v_groups[k] / a[k]
        inside = np.abs(q) <= 1
        if mode == "principled" and masks[k] is not None:
            inside = inside & masks[k]
        dv += inside * dout
        dalphas[k] = np.sum((signs[k] - inside * q) * dout) * _group_scale(counts[k], dtype)
    return dv, dalphas


# ------------------------------------------------------------------------------------------------
# GSB: attention-probability quantizer
# ------------------------------------------------------------------------------------------------

def _attn_max(a, max_over):
    return a.max() if max_over == "tensor" else a.max(axis=-1, keepdims=True)


def gsb_attn_masks(a, max_over="tensor"):
    """GSB group masks of attention probabilities: T1 = 1[A > 0.7 max A], T2 = 1[A > 0.9 max A].

    max_over="tensor" takes max A over the whole tensor (official code, depends on the batch);
    max_over="row" takes it over each attention row (last axis), batch-independent at inference.

    Args: a (..., N) float array.  Returns: (t1, t2) boolean arrays of a's shape.
    """
    _check_choice(max_over, GSB_MAX_OVER, "max_over")
    amax = _attn_max(a, max_over)
    return a > GSB_T1_FRACTION * amax, a > GSB_T2_FRACTION * amax


def gsb_attn_init(a, max_over="tensor"):
    """First-batch initialisation of the three GSB attention scales (official GSB code).

    alpha1 = 4 mean|A|, alpha2 = 4 mean|A| over T1 minus T2, alpha3 = 4 mean|A| over T2 (|A| = A for
    softmax outputs with the bias at its initial 0). Empty groups fall back as in gsb_value_init
    (T1 minus T2 -> T1 -> all; T2 -> all: T2 holds the maximum whenever it is > 0, otherwise T1 is
    empty too), so the result is never NaN.

    Args: a (..., N) float array; max_over "tensor" | "row".  Returns: alphas (3,) in a's dtype.
    """
    _check_float_array(a, "a")
    t1, t2 = gsb_attn_masks(a, max_over)
    means = (np.abs(a).mean(),
             _mean_abs_with_fallback(a, [t1 & ~t2, t1]),
             _mean_abs_with_fallback(a, [t2]))
    return (4 * np.array(means)).astype(a.dtype)


def gsb_attn_forward(a, alphas, mode="official", max_over="tensor"):
    """GSB attention quantizer (Gao et al. 2024, `ElasticQuantAttention` in the official code).

    Forward (both modes):  A_q = a1 clamp(round(A/a1), 0, 1) + a2 T1 + a3 T2,  a_k = max(alpha_k, 1e-5),
    round half to even, masks of gsb_attn_masks (thresholds t_2 = 0.7 max A, t_3 = 0.9 max A).

    Pseudo-gradient (q = A/a1, W1 = 1[0 <= q <= 1], g = dL/dA_q):
      official:   dL/dA = (W1 + a2 T1 + a3 T2) g
                  dL/dalpha1 = sum (1[q > 1] + W1 (round(q) - q)) g / sqrt(A.size)
                  dL/dalpha_k = sum T_k g / sqrt(|T_k|)                          (k = 2, 3)
      principled: every basis gets the LSQ straight-through estimator of its own step: basis k is a
                  step of height a_k at t_k, replaced in backward by a unit-slope ramp of width a_k
                  centred on t_k (basis 1 is the step of height a1 at a1/2, whose ramp is W1), so
                  W_k = 1[|A - t_k| <= a_k/2] and
                  dL/dA = (W1 + W2 + W3) g
                  dL/dalpha1 = as official
                  dL/dalpha_k = sum (T_k - W_k (A - t_k)/a_k) g / sqrt(|T_k|)    (k = 2, 3)
      The thresholds (through max A) are constants in backward in both modes; an empty group gets a
      zero alpha gradient.

    Args:
      a: (..., N) float array, attention probabilities plus bias.
      alphas: (3,) array (alpha1, alpha2, alpha3).
      mode: "official" or "principled".  max_over: "tensor" or "row".
    Returns: out (a's shape, a's dtype), cache for gsb_attn_backward.
    """
    _check_float_array(a, "a")
    _check_choice(mode, GSB_MODES, "mode")
    _check_choice(max_over, GSB_MAX_OVER, "max_over")
    al = _effective_alphas(alphas, a.dtype)
    amax = _attn_max(a, max_over)
    t1, t2 = a > GSB_T1_FRACTION * amax, a > GSB_T2_FRACTION * amax
    level1 = np.clip(np.rint(a / al[0]), 0, 1)
    out = level1 * al[0] + t1 * al[1] + t2 * al[2]
    cache = (a, al, t1, t2, amax, mode)
    return out, cache


def gsb_attn_backward(dout, cache):
    """Backward of gsb_attn_forward (formulas in its docstring).

    Args: dout (a's shape), cache.  Returns: da (a's shape), dalphas (3,).
    """
    a, al, t1, t2, amax, mode = cache
    dtype = a.dtype
    q = a / al[0]
    below, above = q < 0, q > 1
    inside = ~below & ~above
    dalphas = np.empty(3, dtype=dtype)
    dalphas[0] = np.sum((above + inside * (np.rint(q) - q)) * dout) * _group_scale(a.size, dtype)
    scale2, scale3 = _group_scale(int(t1.sum()), dtype), _group_scale(int(t2.sum()), dtype)
    if mode == "official":
        da = inside * dout + t1 * dout * al[1] + t2 * dout * al[2]
        dalphas[1] = np.sum(t1 * dout) * scale2
        dalphas[2] = np.sum(t2 * dout) * scale3
        return da, dalphas
    da = inside * dout
    for k, (mask, fraction, scale) in enumerate(((t1, GSB_T1_FRACTION, scale2),
                                                  (t2, GSB_T2_FRACTION, scale3)), start=1):
        offset = a - fraction * amax
        ramp = np.abs(offset) <= al[k] / 2
        da += ramp * dout
        dalphas[k] = np.sum((mask - ramp * (offset / al[k])) * dout) * scale
    return da, dalphas


# ------------------------------------------------------------------------------------------------
# GSB wrappers (quantizer interface): learnable shift / bias in front of the quantizer
# ------------------------------------------------------------------------------------------------

def _init_or_check(alpha, init_fn, x, training, owner):
    """Initialise a NaN alpha in place from x in training; refuse to run an uninitialised one in eval."""
    if not np.isnan(alpha).any():
        return
    if not training:
        raise ValueError(f"{owner} alpha not initialised: run one training forward or load a checkpoint")
    alpha[...] = init_fn(x)


def _check_input(x, expected, dtype, owner):
    """x must be a 4-D array whose axes 1..3 match `expected` (None: any size) and whose dtype is `dtype`."""
    if (not isinstance(x, np.ndarray) or x.ndim != 4
            or any(e is not None and e != n for e, n in zip(expected, x.shape[1:]))):
        dims = ", ".join("N" if e is None else str(e) for e in expected)
        raise ValueError(f"{owner} expects an array of shape (B, {dims}), "
                         f"got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype != dtype:
        raise TypeError(f"{owner} holds {dtype} parameters but got {x.dtype} input; "
                        f"build it with dtype={x.dtype} or cast the input")


class GSBValueQuantizer:
    """GSB value quantizer with its learnable per-head, per-dim shift (official `move_v`).

    forward: y = v - shift[h, d] (broadcast over batch and tokens), then gsb_value_forward(y, alpha).
    (The official code adds its shift; we subtract like quant.shift_forward: the same model with the
    parameter negated.)
    params: "shift" (heads, head_dim) init 0; "alpha" (3,) NaN until the first training batch
    (gsb_value_init of y). Input v: (B, heads, N, head_dim).
    """

    def __init__(self, heads, head_dim, mode="official", dtype=np.float32):
        _check_choice(mode, GSB_MODES, "mode")
        self.heads, self.head_dim, self.mode = heads, head_dim, mode
        self.dtype = np.dtype(dtype)
        self.params = {"shift": np.zeros((heads, head_dim), self.dtype),
                       "alpha": np.full(3, np.nan, self.dtype)}
        self.buffers = {}

    def forward(self, v, training):
        """v: (B, heads, N, head_dim) -> out (same shape), cache."""
        _check_input(v, (self.heads, None, self.head_dim), self.dtype, "GSBValueQuantizer")
        y = v - self.params["shift"][:, None, :]
        _init_or_check(self.params["alpha"], gsb_value_init, y, training, "GSBValueQuantizer")
        return gsb_value_forward(y, self.params["alpha"], mode=self.mode)

    def backward(self, dout, cache):
        """Returns dv (B, heads, N, head_dim) and grads {"shift": (heads, head_dim), "alpha": (3,)}."""
        dy, dalpha = gsb_value_backward(dout, cache)
        return dy, {"shift": -dy.sum(axis=(0, 2)), "alpha": dalpha}

    def basis_form(self, cache):
        """([S, T1 S, T2 S], (a1, a2, a3)): V_q = sum_k a_k * basis_k with integer bases (S = sign)."""
        v, a, t1, t2, _ = cache
        s = sign(v)
        return [s, t1 * s, t2 * s], a

    def __repr__(self):
        return f"GSBValueQuantizer(heads={self.heads}, head_dim={self.head_dim}, mode={self.mode!r})"


class GSBAttnQuantizer:
    """GSB attention quantizer with its learnable additive bias after softmax (official `move_att`).

    forward: y = a + bias[h, i, j] (broadcast over batch), then gsb_attn_forward(y, alpha).
    params: "bias" (heads, N, N) init 0; "alpha" (3,) NaN until the first training batch
    (gsb_attn_init of y). Input a: (B, heads, N, N) softmax probabilities.
    """

    def __init__(self, heads, tokens, mode="official", max_over="tensor", dtype=np.float32):
        _check_choice(mode, GSB_MODES, "mode")
        _check_choice(max_over, GSB_MAX_OVER, "max_over")
        self.heads, self.tokens, self.mode, self.max_over = heads, tokens, mode, max_over
        self.dtype = np.dtype(dtype)
        self.params = {"bias": np.zeros((heads, tokens, tokens), self.dtype),
                       "alpha": np.full(3, np.nan, self.dtype)}
        self.buffers = {}

    def forward(self, a, training):
        """a: (B, heads, N, N) -> out (same shape), cache."""
        _check_input(a, (self.heads, self.tokens, self.tokens), self.dtype, "GSBAttnQuantizer")
        y = a + self.params["bias"]
        _init_or_check(self.params["alpha"], lambda x: gsb_attn_init(x, self.max_over), y, training,
                       "GSBAttnQuantizer")
        return gsb_attn_forward(y, self.params["alpha"], mode=self.mode, max_over=self.max_over)

    def backward(self, dout, cache):
        """Returns da (B, heads, N, N) and grads {"bias": (heads, N, N), "alpha": (3,)}."""
        dy, dalpha = gsb_attn_backward(dout, cache)
        return dy, {"bias": dy.sum(axis=0), "alpha": dalpha}

    def basis_form(self, cache):
        """([clamp(round(A/a1), 0, 1), T1, T2], (a1, a2, a3)): A_q = sum_k a_k * basis_k, {0, 1} bases."""
        a, al, t1, t2, _, _ = cache
        return [np.clip(np.rint(a / al[0]), 0, 1), t1.astype(a.dtype), t2.astype(a.dtype)], al

    def __repr__(self):
        return (f"GSBAttnQuantizer(heads={self.heads}, tokens={self.tokens}, mode={self.mode!r}, "
                f"max_over={self.max_over!r})")


# ------------------------------------------------------------------------------------------------
# BinaryViT: GRS (gradient regularization scheme), our reconstruction
# ------------------------------------------------------------------------------------------------

def _channel_alpha(w):
    """Per-output-channel mean|W| (axis 0 is the output channel), shaped to broadcast against w."""
    return np.abs(w).mean(axis=tuple(range(1, w.ndim)), keepdims=True)


def grs_gradient(w, lam, variant="l2"):
    """GRS extra gradient, added to dL/dW of a binarized latent weight (BinaryViT reconstruction).

    alpha = per-output-channel mean|W| (a constant, not differentiated), sign(0) = +1:
      l2: lam (W - alpha sign(W))           = d/dW (lam/2) sum (|W| - alpha)^2
      l1: lam sign(|W| - alpha) sign(W)     = d/dW lam sum ||W| - alpha|
    Both pull every latent weight to the two modes +-alpha of its channel, away from 0 where signs flip.

    Args: w (out_channels, ...) float array; lam float >= 0; variant "l2" | "l1".
    Returns: (w's shape, w's dtype) gradient.
    """
    _check_float_array(w, "w")
    _check_choice(variant, GRS_VARIANTS, "variant")
    if lam < 0:
        raise ValueError(f"GRS lambda must be >= 0 (0 is the baseline), got {lam}")
    lam = w.dtype.type(lam)
    alpha = _channel_alpha(w)
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


# ------------------------------------------------------------------------------------------------
# BinaryViT: ASM (activation shift module), our reconstruction
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
    """

    def __init__(self, inner, channels, center="median", momentum=0.1, dtype=np.float32):
        _check_choice(center, ASM_CENTERS, "center")
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

    def _update_running_center(self, x):
        flat = x.reshape(-1, self.channels)
        batch = flat.mean(axis=0) if self.center == "mean" else np.median(flat, axis=0)
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
                self._update_running_center(x)
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


# ------------------------------------------------------------------------------------------------
# Diagnostics
# ------------------------------------------------------------------------------------------------

def sign_flip_rate(w_prev, w_now):
    """Fraction of latent weights whose sign (sign(0) = +1) changed between two steps. Returns float."""
    if np.shape(w_prev) != np.shape(w_now):
        raise ValueError(f"sign_flip_rate needs equal shapes, got {np.shape(w_prev)} and {np.shape(w_now)}")
    return float(np.mean((np.asarray(w_prev) >= 0) != (np.asarray(w_now) >= 0)))


def near_zero_mass(w, frac=0.1):
    """Fraction of latent weights with |w| < frac alpha, alpha = per-output-channel mean|W| (axis 0).

    A channel with alpha = 0 contributes no near-zero weights (the strict inequality never holds).
    """
    _check_float_array(w, "w")
    return float(np.mean(np.abs(w) < frac * _channel_alpha(w)))


def bimodality(w):
    """Moment bimodality coefficient of W/alpha (alpha per output channel mean|W|, axis 0).

    BC = (skewness^2 + 1) / kurtosis with population moments (Pearson / Sarle's coefficient without the
    small-sample correction). BC <= 1, with equality exactly for a two-point distribution (a weight
    tensor sitting at its two modes +-alpha); Gaussian 1/3, uniform 5/9, Laplace 1/6. Channels with
    alpha = 0 contribute zeros. Returns NaN when all normalised weights are equal (undefined).
    """
    _check_float_array(w, "w")
    alpha = _channel_alpha(w)
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
    _check_float_array(w, "w")
    alpha = _channel_alpha(w)
    z = np.divide(w, alpha, out=np.zeros_like(w), where=alpha > 0).astype(np.float64).ravel()
    return np.histogram(np.clip(z, -limit, limit), bins=bins, range=(-limit, limit))


def sign_entropy(x_minus_threshold):
    """Mean over channels of the binary entropy (bits) of P(bit = +1) per channel.

    Args: x_minus_threshold (..., C), the binarizer input minus its threshold; bit = +1 where >= 0.
    Returns: float in [0, 1]; 1 when every channel's sign bit is +1 half of the time.
    """
    _check_float_array(x_minus_threshold, "x_minus_threshold")
    channels = x_minus_threshold.shape[-1]
    p = np.mean(x_minus_threshold.reshape(-1, channels) >= 0, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return float(np.mean(np.where((p > 0) & (p < 1), h, 0.0)))


def binarization_error(x, alpha, shift):
    """Relative binarization error ||x - alpha sign(x - s)|| / ||x|| (Frobenius, sign(0) = +1).

    Args: x (..., C); alpha and shift scalars or (C,) arrays (broadcast on the last axis).
    """
    _check_float_array(x, "x")
    norm = np.linalg.norm(x)
    if norm == 0:
        raise ValueError("binarization_error of an all-zero x is undefined (||x|| = 0)")
    return float(np.linalg.norm(x - alpha * sign(x - shift)) / norm)
