"""Low-bit quantizers: pure forward/backward pairs with explicit pseudo-gradients, and wrappers.

Every pure quantizer follows the CS231n / llm.c convention

    out, cache = <name>_forward(x, <learnable params>, <options>)
    dx, d<param>... = <name>_backward(dout, cache)

and computes in the dtype of ``x`` (float32 for training, float64 in the reference tests).
Learnable scalars are arrays of shape (1,), per-channel ones shape (C,); their gradients come
back with the same shape and dtype as the parameter. Weights arrive as (out_channels, ...)
with the channel on axis 0; activations as (..., C) with the channel on the last axis.

Conventions shared by every binarizer: ``sign(0) = +1``, rounding is half to even
(``np.round``, like ``torch.round``), and a learnable scale (elastic alpha, LSQ step) is floored
at ``SCALE_FLOOR`` before use, with its gradient passed straight to the raw parameter (BiT's
code does the same with eps = 1e-5), so a scale that training drives to zero or below can
recover instead of producing inf/NaN.

Data parallelism: every statistic an activation quantizer takes over its input tensor (a min-max
range, a first-batch scale, the tensor size that normalises a scale gradient) goes through an
optional ``reduce`` argument, a Collective of minibvit.distributed (``sum``, ``max``, ``min``,
``mean(x, weight)``, ``gather``), so that a rank holding a slice of the batch gets the statistic of the
whole batch. ``reduce=None`` (the default) means this process's tensor, and is the code path of one
process. The wrappers pass their ``collective`` attribute (None unless
``distributed.global_quantizer_state`` sets it) in training forwards only; a weight is the same on every
rank and never needs one. Backward needs no collective: what it needs of the batch (sizes, group
counts) is taken in the forward and kept in the cache.

The stateful wrappers at the end (``Identity``, ``WeightBinarizer``, ``SignBinarizer``,
``ElasticBinarizer``, ``Ternarizer``, ``LSQQuantizer``, ``MinMaxQuantizer``, ``Shifted``)
hold the learnable parameters, and ``make_quantizer(spec)`` builds one from a short spec name
(``QUANTIZER_SPECS`` lists them).
"""

import math

import numpy as np


USE_FUSED = True
"""False: every quantizer runs its NumPy body. True: the quantizers that have one run their fused
kernel (minibvit.kernels.quantize) for float32 / float64 input: the same bits in one pass per tensor,
and the packed bits of the levels for the forward's popcount products (packed_form)."""


def _kernels(module="quantize"):
    """minibvit.kernels.quantize (the binarizers), .quantize_int (min-max, ternary) or .ternary (byte
    quads), imported on first use: the quantizer tables (minibvit.cost, minibvit.methods) load without
    Numba."""
    from . import kernels
    from .kernels import quantize, quantize_int, ternary  # noqa: F401

    return getattr(kernels, module)


def _fused(x, *others):
    """True when x (and the arrays others, of x's dtype) go to the fused kernels."""
    return (USE_FUSED and x.size > 0 and x.dtype in (np.float32, np.float64)
            and all(o.dtype == x.dtype for o in others))

SCALE_FLOOR = 1e-5
"""Smallest value a learnable scale (elastic alpha, LSQ step) takes in the forward pass."""

STE_KINDS = ("identity", "clipped", "approxsign")
WEIGHT_STE_KINDS = ("identity", "clipped")
WEIGHT_SCALES = ("channel", "tensor", "none")
ELASTIC_ALPHA_GRADS = ("lsq", "gsb")
"""Scale gradients of the signed elastic binarizer: BiT's "lsq", or GSB's refined one (minibvit.gsb)."""


# --------------------------------------------------------------------------------------------
# helpers


def check_float_array(x, name, nonempty=False):
    """Refuse anything but a floating-point numpy array (and, with nonempty, an empty one)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}; "
                        f"convert it with np.asarray(..., dtype=np.float32)")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must have a floating dtype (float32 or float64), got {x.dtype}")
    if nonempty and x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); pass at least one element")


def check_choice(value, choices, name):
    """The one choice check of the package: value must be one of choices (a constant tuple)."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


def channel_mean_abs(w):
    """Per-output-channel mean|W| (axis 0 is the output channel), shaped to broadcast against w."""
    return np.abs(w).mean(axis=tuple(range(1, w.ndim)), keepdims=True)


def _check_weight(w):
    check_float_array(w, "w")
    if w.ndim < 2:
        raise ValueError(
            f"a weight quantizer needs a weight of shape (out_channels, ...) with ndim >= 2, "
            f"got shape {w.shape}"
        )


def _check_bits(bits, low=2, high=16):
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not low <= bits <= high:
        raise ValueError(f"bits must be an integer in [{low}, {high}], got {bits!r}")


def _other_axes(ndim, channel_axis):
    """Axes to reduce over: all but channel_axis, or all axes when channel_axis is None."""
    if channel_axis is None:
        return tuple(range(ndim))
    return tuple(a for a in range(ndim) if a != channel_axis % ndim)


def _normalize_axis(x, channel_axis):
    if channel_axis is None:
        return None
    if not isinstance(channel_axis, (int, np.integer)) or not -x.ndim <= channel_axis < x.ndim:
        raise ValueError(f"channel_axis={channel_axis!r} is out of range for an input of shape {x.shape}")
    return int(channel_axis) % x.ndim


def _broadcast_shape(ndim, channel_axis):
    """Shape that broadcasts a (C,) (or (1,)) vector along channel_axis of an ndim array."""
    shape = [1] * ndim
    if channel_axis is not None:
        shape[channel_axis] = -1
    return shape


def _scale_param(param, name, x, channel_axis):
    """Check a learnable per-tensor (1,) / per-channel (C,) scale; return it floored and
    broadcastable against x, in x's dtype."""
    check_float_array(param, name)
    expected = (1,) if channel_axis is None else (x.shape[channel_axis],)
    if param.shape != expected:
        where = "per tensor" if channel_axis is None else f"per channel on axis {channel_axis}"
        raise ValueError(f"{name} must have shape {expected} ({where}) for input of shape {x.shape}, got {param.shape}")
    floored = np.maximum(param.astype(x.dtype, copy=False), x.dtype.type(SCALE_FLOOR))
    return floored.reshape(_broadcast_shape(x.ndim, channel_axis))


def _code_dtype(low, high):
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise ValueError(f"no integer dtype holds codes in [{low}, {high}]")


def _ste_derivative(x, ste):
    """d sign(x)/dx as the straight-through estimator `ste` defines it; None means 1."""
    if ste == "identity":
        return None
    if ste == "clipped":
        return (np.abs(x) <= 1).astype(x.dtype)
    # approxsign: 2 + 2x on [-1, 0], 2 - 2x on (0, 1], 0 elsewhere == max(2 - 2|x|, 0)
    return np.maximum(2 - 2 * np.abs(x), 0).astype(x.dtype, copy=False)


def _apply_ste(dout, derivative):
    return dout.copy() if derivative is None else dout * derivative


# --------------------------------------------------------------------------------------------
# binary


def sign(x):
    """Binary sign with sign(0) = +1.

    Forward: sign(x) = +1 if x >= 0 else -1, elementwise, in x's dtype.

    Args:
        x: float array, any shape.
    Returns:
        array of x's shape and dtype with values in {-1, +1}.
    """
    check_float_array(x, "x")
    return np.where(x >= 0, x.dtype.type(1), x.dtype.type(-1))


def binarize_forward(x, ste="clipped"):
    """Sign binarizer with a straight-through pseudo-gradient.

    Forward:  out = sign(x)   (sign(0) = +1)
    Pseudo-gradient dx = g * d(x) with the STE `ste`:
        "identity":   d(x) = 1
        "clipped":    d(x) = 1[|x| <= 1]                 (BNN, Courbariaux et al. 2016, arXiv:1602.02830)
        "approxsign": d(x) = 2 + 2x on [-1, 0], 2 - 2x on (0, 1], 0 elsewhere
                                                          (Bi-Real Net, Liu et al. 2018, arXiv:1808.00278)
    Args:
        x: float array, any shape.
        ste: one of STE_KINDS.
    Returns:
        out: array of x's shape and dtype, values in {-1, +1}.
        cache: for binarize_backward.
    """
    check_float_array(x, "x")
    check_choice(ste, STE_KINDS, "ste")
    return sign(x), _ste_derivative(x, ste)


def binarize_backward(dout, cache):
    """Pseudo-gradient of binarize_forward.

    Args:
        dout: upstream gradient g, shape of x.
        cache: from binarize_forward.
    Returns:
        dx: g * d(x), shape of x.
    """
    return _apply_ste(dout, cache)


def _binarize_weight(w, scale, center):
    """Shared by weight_binary_codes / weight_binarize_forward: (W_c, levels (+-1 in w's dtype),
    alpha (C,)|(1,), the packed sign bits of a 2-D weight's levels or None)."""
    _check_weight(w)
    check_choice(scale, WEIGHT_SCALES, "scale")
    rows = _other_axes(w.ndim, 0)
    if _fused(w) and w.ndim == 2:  # one pass per row: centring, levels, per-channel alpha, bits
        w_c, levels, alpha, bits = _kernels().weight_binarize(w, center, scale == "channel")
    else:
        w_c = w - w.mean(axis=rows, keepdims=True) if center else w
        levels, alpha, bits = np.where(w_c >= 0, 1, -1).astype(np.int8).astype(w.dtype), None, None
    if scale == "channel" and alpha is None:
        alpha = np.abs(w_c).mean(axis=rows)
    elif scale == "tensor":
        alpha = np.abs(w_c).mean().reshape(1)
    elif scale == "none":
        alpha = np.ones(1, dtype=w.dtype)
    return w_c, levels, alpha, bits


def weight_binary_codes(w, scale="channel", center=False):
    """Integer export form of weight_binarize_forward: out == alpha[:, None, ...] * codes.

    Args:
        w: latent weight, shape (C_out, ...), ndim >= 2.
        scale, center: as in weight_binarize_forward.
    Returns:
        codes: int8 array of w's shape, values in {-1, +1} (sign of the centred weight).
        alpha: scale in w's dtype, shape (C_out,) for scale="channel", (1,) otherwise
               (ones for scale="none").
    """
    _, levels, alpha, _ = _binarize_weight(w, scale, center)
    return levels.astype(np.int8), alpha


def weight_binarize_forward(w, scale="channel", center=False, ste="identity"):
    """Scaled weight binarizer (XNOR-Net / BiT).

    Forward:  W_c = W - mean_row(W) if center else W        (row = one output channel, i.e. all
                                                              axes but 0; BiT, Liu et al. 2022,
                                                              arXiv:2205.13016)
              alpha = mean|W_c| per output channel (scale="channel") or over the whole tensor
                      (scale="tensor"; XNOR-Net, Rastegari et al. 2016, arXiv:1603.05279),
                      or 1 (scale="none"); alpha is a constant (detached), as in BiT's code
              out = alpha * sign(W_c)
    Pseudo-gradient: dW_c = g * d(W_c) with d = 1 ("identity") or 1[|W_c| <= 1] ("clipped");
              dW = dW_c - mean_row(dW_c) if center else dW_c   (gradient of the centring)
    Args:
        w: latent weight, shape (C_out, ...), ndim >= 2.
        scale: "channel", "tensor" or "none".
        center: subtract each output channel's mean before the sign.
        ste: "identity" or "clipped".
    Returns:
        out: array of w's shape and dtype.
        cache: for weight_binarize_backward.
    """
    check_choice(ste, WEIGHT_STE_KINDS, "ste")
    if _fused(w) and w.ndim == 2 and scale == "channel":  # one pass per row: out, derivative, levels, bits
        _check_weight(w)
        out, derivative, levels, alpha, bits = _kernels().weight_binarize_channel(w, center, ste == "clipped")
        return out, (derivative, center, levels, alpha, bits)
    w_c, levels, alpha, bits = _binarize_weight(w, scale, center)
    out = alpha.reshape(_broadcast_shape(w.ndim, 0 if scale == "channel" else None)) * levels
    return out, (_ste_derivative(w_c, ste), center, levels, alpha, bits)


def weight_binarize_backward(dout, cache):
    """Pseudo-gradient of weight_binarize_forward.

    Args:
        dout: upstream gradient g, shape (C_out, ...).
        cache: from weight_binarize_forward.
    Returns:
        dw: shape (C_out, ...).
    """
    derivative, center = cache[:2]
    if _fused(dout) and dout.ndim == 2 and (derivative is None or derivative.dtype == dout.dtype):
        return _kernels().weight_grad(dout, derivative, center)  # one pass per row
    dw_c = _apply_ste(dout, derivative)
    if center:
        dw_c -= dw_c.mean(axis=_other_axes(dw_c.ndim, 0), keepdims=True)
    return dw_c


# --------------------------------------------------------------------------------------------
# elastic binarizer (BiT) and learnable shift


def _global_size(size, reduce):
    """The number of elements of a tensor whose slices the ranks of `reduce` hold (size without one)."""
    return size if reduce is None else int(reduce.sum(np.array(size, dtype=np.int64)))


def elastic_alpha_init(x, signed, reduce=None):
    """Data-driven initial value of the elastic binarizer's scale (BiT).

    alpha0 = 2 * mean|x| (signed) or 4 * mean|x| (unsigned).

    Args:
        x: first batch of activations, any shape.
        signed: which binarizer the scale belongs to.
        reduce: None, or the Collective over whose ranks' slices the mean is taken (module docstring).
    Returns:
        alpha0: shape (1,), x's dtype.
    """
    check_float_array(x, "x")
    mean_abs = np.abs(x).mean()
    if reduce is not None:
        mean_abs = reduce.mean(mean_abs, weight=x.size)
    return ((2 if signed else 4) * mean_abs).reshape(1).astype(x.dtype, copy=False)


def elastic_binarize_forward(x, alpha, signed, alpha_grad="lsq", reduce=None, shift=None):
    """Elastic binarizer with a learnable scale (BiT, Liu et al. 2022, arXiv:2205.13016).

    Forward (alpha floored at SCALE_FLOOR, q = x / alpha):
        signed:   out = alpha * sign(x)                          in {-alpha, +alpha}
        unsigned: out = alpha * clamp(round(q), 0, 1)            in {0, alpha}  (round half to even)
    Pseudo-gradients, with g = dout, N = x.size (over the ranks of reduce), s = 1 / sqrt(N):
        signed:   dx = 1[|q| <= 1] * g
                  "lsq": dalpha = sum(sign(x) * g) * s                               (BiT)
                  "gsb": dalpha = sum((sign(x) - 1[|q| <= 1] * q) * g) * s
                         (GSB's refined scale gradient: minibvit.gsb.refined_alpha_terms)
        unsigned: dx = 1[0 <= q <= 1] * g
                  dalpha = sum((1[q > 1] + 1[0 <= q <= 1] * (round(q) - q)) * g) * s   (both modes)
    Args:
        x: activations, any shape.
        alpha: learnable scale, shape (1,).
        signed: binarize to {-alpha, +alpha} (True) or {0, alpha} (False).
        alpha_grad: "lsq" or "gsb" (only changes the signed case).
        reduce: None, or the Collective whose ranks hold the slices of the tensor (N sums them).
        shift: None, or a per-channel shift (C,) on the last axis: the binarizer's input is then
            x - shift (ASM's centring, fused into the same pass), and everything above reads x - shift.
    Returns:
        out: array of x's shape and dtype.
        cache: for elastic_binarize_backward.
    """
    check_float_array(x, "x")
    check_choice(alpha_grad, ELASTIC_ALPHA_GRADS, "alpha_grad")
    a = _scale_param(alpha, "alpha", x, None)
    size = _global_size(x.size, reduce)
    if _fused(x) and (shift is None or shift.dtype == x.dtype):  # one pass: out and the level bits
        if shift is None:
            x = np.ascontiguousarray(x)
            out, bits = _kernels().elastic_forward(x, a.reshape(()), signed)
        else:
            out, bits, x = _kernels().elastic_forward(x, a.reshape(()), signed, shift)
        return out, (x, a, signed, alpha_grad, alpha.dtype, size, bits)
    if shift is not None:
        x = x - shift
    q = x / a
    if signed:
        out = a * sign(x)
    else:
        out = a * np.clip(np.round(q), 0, 1)
    return out, (x, a, signed, alpha_grad, alpha.dtype, size, None)


def elastic_binarize_backward(dout, cache, out=None):
    """Pseudo-gradients of elastic_binarize_forward.

    Args:
        dout: upstream gradient g, shape of x.
        cache: from elastic_binarize_forward.
        out: None, or an array of x's shape and dtype (a view too) to write dx into.
    Returns:
        dx: shape of x (out, when given).
        dalpha: shape (1,), alpha's dtype.
    """
    x, a, signed, alpha_grad, alpha_dtype, size, _ = cache
    grad_scale = 1.0 / math.sqrt(size)
    if _fused(x, dout) and (out is None or out.dtype == x.dtype):  # one pass: dx and the terms' sum
        kernels = _kernels()
        kind = kernels.UNSIGNED if not signed else kernels.SIGNED_LSQ if alpha_grad == "lsq" else kernels.SIGNED_GSB
        dx, total = kernels.elastic_backward(kind, x, dout, a.reshape(()), out)
        out = None  # written
    else:
        q = x / a
        if signed:
            inside = np.abs(q) <= 1
            dx = dout * inside
            if alpha_grad == "lsq":
                dalpha_elem = sign(x)
            else:
                from .gsb import refined_alpha_terms  # GSB's idea lives in gsb.py (which imports this module)

                dalpha_elem = refined_alpha_terms(x, q, inside)
        else:
            inside = (q >= 0) & (q <= 1)
            dx = dout * inside
            dalpha_elem = (q > 1) + inside * (np.round(q) - q)
        total = np.sum(dalpha_elem * dout)
    if out is not None:
        out[...] = dx
        dx = out
    dalpha = (total * grad_scale).reshape(1).astype(alpha_dtype)
    return dx, dalpha


def shift_forward(x, shift):
    """Learnable per-channel shift applied before a binarizer (BiT's move, ReActNet's RSign
    threshold; Liu et al. 2020, arXiv:2003.03488).

    Forward:  out = x - shift            (shift broadcast along the last axis, initialised to 0)
    Gradient: dx = g,  dshift = -sum(g) over all axes but the last
    Args:
        x: activations, shape (..., C).
        shift: learnable, shape (C,).
    Returns:
        out: shape (..., C), x's dtype.
        cache: for shift_backward.
    """
    check_float_array(x, "x")
    check_float_array(shift, "shift")
    if x.ndim < 1 or shift.shape != (x.shape[-1],):
        raise ValueError(
            f"shift must have shape (C,) with C = x.shape[-1]; got shift {shift.shape} for x {x.shape}"
        )
    return x - shift.astype(x.dtype, copy=False), shift.dtype


def shift_backward(dout, cache):
    """Gradients of shift_forward.

    Args:
        dout: upstream gradient g, shape (..., C).
        cache: from shift_forward.
    Returns:
        dx: shape (..., C).
        dshift: shape (C,), shift's dtype.
    """
    dshift = -dout.reshape(-1, dout.shape[-1]).sum(axis=0)
    return dout.copy(), dshift.astype(cache)


# --------------------------------------------------------------------------------------------
# ternary


def _check_delta_factor(delta_factor):
    if not 0 < delta_factor < 1:
        raise ValueError(f"delta_factor must be in (0, 1) (TWN uses 0.7), got {delta_factor!r}")


def _check_ternary(w, delta_factor):
    _check_weight(w)
    _check_delta_factor(delta_factor)


def ternary_codes(w, per_channel=True, delta_factor=0.7):
    """Integer export form of ternarize_forward: out == alpha[:, None, ...] * codes.

    Delta = delta_factor * mean|W| (per output channel or per tensor),
    T = sign(W) * 1[|W| > Delta] in {-1, 0, +1},
    alpha = mean of |W| over the entries with |W| > Delta (0 if there are none, which with
    delta_factor < 1 happens only for an all-zero channel).

    Args:
        w: latent weight, shape (C_out, ...), ndim >= 2.
        per_channel: statistics per output channel (TerViT) or per tensor (TWN).
        delta_factor: in (0, 1); 0.7 is TWN's approximation of the optimal threshold.
    Returns:
        codes: int8 array of w's shape, values in {-1, 0, +1}.
        alpha: w's dtype, shape (C_out,) per channel, (1,) per tensor.
        delta: w's dtype, same shape as alpha.
    """
    _check_ternary(w, delta_factor)
    axes = _other_axes(w.ndim, 0 if per_channel else None)
    abs_w = np.abs(w)
    delta = delta_factor * abs_w.mean(axis=axes, keepdims=True)
    above = abs_w > delta
    codes = np.where(above, np.where(w >= 0, 1, -1), 0).astype(np.int8)
    count = above.sum(axis=axes, keepdims=True)
    total = np.where(above, abs_w, 0).sum(axis=axes, keepdims=True)
    alpha = np.where(count > 0, total / np.maximum(count, 1), 0).astype(w.dtype, copy=False)
    return codes, alpha.reshape(-1), delta.reshape(-1)


def ternarize_forward(w, per_channel=True, delta_factor=0.7, ste="identity"):
    """Ternary weights: TWN (Li et al. 2016, arXiv:1605.04711), channel-wise as in TerViT
    (Xu et al. 2022, arXiv:2201.08050).

    Forward:  Delta = delta_factor * mean|W|      (per output channel or per tensor)
              T = sign(W) * 1[|W| > Delta]        in {-1, 0, +1}
              alpha = mean(|W| where |W| > Delta) (0 when no entry exceeds Delta)
              out = alpha * T                     (alpha, Delta detached)
    Pseudo-gradient: dW = g * d(W) with d = 1 ("identity") or 1[|W| <= 1] ("clipped").
    Args:
        w: latent weight, shape (C_out, ...), ndim >= 2.
        per_channel: per output channel (True) or per tensor statistics.
        delta_factor: threshold factor in (0, 1).
        ste: "identity" or "clipped".
    Returns:
        out: array of w's shape and dtype.
        cache: for ternarize_backward.
    """
    check_choice(ste, WEIGHT_STE_KINDS, "ste")
    _check_ternary(w, delta_factor)
    if _fused(w) and w.flags.c_contiguous:
        out, levels, alpha, _ = _kernels("quantize_int").ternarize(w, per_channel, delta_factor)  # one pass per channel
    else:
        codes, alpha, _ = ternary_codes(w, per_channel, delta_factor)
        levels = codes.astype(w.dtype)
        out = alpha.reshape(_broadcast_shape(w.ndim, 0 if per_channel else None)) * levels
    return out, (_ste_derivative(w, ste), levels, alpha)


def ternarize_backward(dout, cache):
    """Pseudo-gradient of ternarize_forward.

    Args:
        dout: upstream gradient g, shape (C_out, ...).
        cache: from ternarize_forward.
    Returns:
        dw: shape (C_out, ...).
    """
    return _apply_ste(dout, cache[0])


# --------------------------------------------------------------------------------------------
# k-bit uniform: LSQ and min-max


def lsq_range(bits, signed):
    """Integer code range (Qn, Qp) of a b-bit LSQ quantizer.

    signed: Qn = -2^(b-1), Qp = 2^(b-1) - 1;  unsigned: Qn = 0, Qp = 2^b - 1.
    """
    _check_bits(bits)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_step_init(x, bits, signed, channel_axis=None, reduce=None):
    """LSQ's initial step size: 2 * mean|x| / sqrt(Qp) (Esser et al. 2020, arXiv:1902.08153).

    Args:
        x: first batch (activations) or the latent weight, any shape.
        bits, signed: as in lsq_forward.
        channel_axis: None for one step per tensor, else the channel axis.
        reduce: None, or the Collective over whose ranks' slices the mean is taken (activations only).
    Returns:
        step0: x's dtype, shape (1,) per tensor or (C,) per channel (mean over the other axes).
    """
    check_float_array(x, "x")
    _, qp = lsq_range(bits, signed)
    axis = _normalize_axis(x, channel_axis)
    mean_abs = np.abs(x).mean(axis=_other_axes(x.ndim, axis))
    if reduce is not None:
        mean_abs = reduce.mean(mean_abs, weight=x.size)  # every channel has x.size / C elements per rank
    return (2 * mean_abs / math.sqrt(qp)).reshape(-1).astype(x.dtype, copy=False)


def lsq_codes(x, step, bits, signed, channel_axis=None):
    """Integer export form of lsq_forward: out == codes * step (broadcast on channel_axis).

    Returns:
        codes: clamp(round(x / step), Qn, Qp) in the smallest integer dtype that holds [Qn, Qp].
    """
    check_float_array(x, "x")
    qn, qp = lsq_range(bits, signed)
    axis = _normalize_axis(x, channel_axis)
    s = _scale_param(step, "step", x, axis)
    return np.clip(np.round(x / s), qn, qp).astype(_code_dtype(qn, qp))


def lsq_forward(x, step, bits, signed, channel_axis=None, reduce=None):
    """Learned Step Size Quantization (LSQ, Esser et al. 2020, arXiv:1902.08153).

    Forward (step floored at SCALE_FLOOR, q = x / step):
        out = clamp(round(q), Qn, Qp) * step       (round half to even; Qn, Qp from lsq_range)
    Pseudo-gradients, with g = dout, N = number of elements per step (per channel when
    channel_axis is given; over the ranks of reduce), gs = 1 / sqrt(N * Qp):
        dx    = 1[Qn <= q <= Qp] * g
        dstep = sum(v * g) * gs  over the elements of each step, with
                v = Qn if q < Qn, Qp if q > Qp, round(q) - q otherwise
    Args:
        x: any shape (weights (C_out, ...) with channel_axis=0, activations (..., C) with -1).
        step: learnable, shape (1,) (channel_axis None) or (C,) = (x.shape[channel_axis],).
        bits: integer in [2, 16].
        signed: signed (two's complement range) or unsigned codes.
        channel_axis: None for one step per tensor, else the axis holding the channels.
        reduce: None, or the Collective whose ranks hold the slices of the tensor (N sums them).
    Returns:
        out: array of x's shape and dtype.
        cache: for lsq_backward.
    """
    check_float_array(x, "x")
    qn, qp = lsq_range(bits, signed)
    axis = _normalize_axis(x, channel_axis)
    s = _scale_param(step, "step", x, axis)
    q = x / s
    out = np.clip(np.round(q), qn, qp) * s
    per_step = _global_size(x.size if axis is None else x.size // x.shape[axis], reduce)
    return out, (q, qn, qp, axis, step.dtype, per_step)


def lsq_backward(dout, cache):
    """Pseudo-gradients of lsq_forward.

    Args:
        dout: upstream gradient g, shape of x.
        cache: from lsq_forward.
    Returns:
        dx: shape of x.
        dstep: shape of step, step's dtype.
    """
    q, qn, qp, axis, step_dtype, per_step = cache
    inside = (q >= qn) & (q <= qp)
    dx = dout * inside
    v = np.where(q < qn, qn, np.where(q > qp, qp, np.round(q) - q))
    reduce_axes = _other_axes(q.ndim, axis)
    grad_scale = 1.0 / math.sqrt(per_step * qp)
    dstep = (np.sum(v * dout, axis=reduce_axes) * grad_scale).reshape(-1).astype(step_dtype)
    return dx, dstep


def _minmax_statistics(x, axis, signed, reduce):
    """max|x| (signed) or (min x, max x) (unsigned) over all axes but `axis` (all for None), then over the
    ranks of reduce: a scalar per tensor, (C,) per channel, in x's dtype."""
    if _fused(x):  # one parallel pass (a maximum is exact in any order)
        stats = _kernels("quantize_int").tensor_extrema(x, axis, signed)
        if axis is None:
            stats = stats[0] if signed else (stats[0][0], stats[1][0])
    else:
        axes = _other_axes(x.ndim, axis)
        stats = np.abs(x).max(axis=axes) if signed else (x.min(axis=axes), x.max(axis=axes))
    if reduce is None:
        return stats
    if signed:
        return reduce.max(stats)
    negated_min, x_max = reduce.max(np.stack([-stats[0], stats[1]]))  # -min is exact: one allreduce
    return -negated_min, x_max


def _minmax_scale(stats, qmax, signed, dtype):
    """(scale, zero_point int32) of minmax_codes from _minmax_statistics."""
    if signed:
        scale = stats / qmax
        scale = np.where(scale > 0, scale, 1).astype(dtype, copy=False)
        return scale, np.zeros(scale.shape, dtype=np.int32)
    lo = np.minimum(stats[0], 0)
    hi = np.maximum(stats[1], 0)
    scale = (hi - lo) / qmax
    scale = np.where(scale > 0, scale, 1).astype(dtype, copy=False)
    return scale, np.round(-lo / scale).astype(np.int32)


def _minmax_qmax(bits, signed):
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def minmax_codes(x, bits, signed, channel_axis=None, reduce=None):
    """Integer export form of minmax_quant_forward: out == (codes - zero_point) * scale.

    signed (symmetric): scale = max|x| / (2^(b-1) - 1), zero_point = 0,
                        codes = clamp(round(x / scale), -(2^(b-1) - 1), 2^(b-1) - 1)
    unsigned (asymmetric): lo = min(min x, 0), hi = max(max x, 0) (the range always holds 0, so
                        zero is exact and the zero point is a valid code),
                        scale = (hi - lo) / (2^b - 1), zero_point = round(-lo / scale),
                        codes = clamp(round(x / scale) + zero_point, 0, 2^b - 1)
    A slice with scale 0 (all zeros) gets scale 1, so its codes are 0 and nothing is NaN.

    Args:
        x: any shape.
        bits: integer in [2, 16].
        signed: symmetric signed or asymmetric unsigned codes.
        channel_axis: None for per tensor statistics, else the channel axis.
        reduce: None, or the Collective whose ranks hold the slices of the tensor: max|x| (signed) or
            min x and max x (unsigned, in one MAX of (-min, max)) are taken over all of them.
    Returns:
        codes: integer array of x's shape (int8 / uint8 for 8 bits).
        scale: x's dtype, shape (1,) or (C,).
        zero_point: int32, same shape as scale.
    """
    check_float_array(x, "x")
    _check_bits(bits)
    axis = _normalize_axis(x, channel_axis)
    shape = _broadcast_shape(x.ndim, axis)
    qmax = _minmax_qmax(bits, signed)
    scale, zero_point = _minmax_scale(_minmax_statistics(x, axis, signed, reduce), qmax, signed, x.dtype)
    if signed:
        codes = np.clip(np.round(x / scale.reshape(shape)), -qmax, qmax).astype(_code_dtype(-qmax, qmax))
    else:
        codes = np.clip(np.round(x / scale.reshape(shape)) + zero_point.reshape(shape), 0, qmax)
        codes = codes.astype(_code_dtype(0, qmax))
    return codes, scale.reshape(-1), zero_point.reshape(-1)


def minmax_quant_forward(x, bits, signed, channel_axis=None, reduce=None, byte_codes=False):
    """Min-max uniform quantizer with statistics of the current tensor (Jacob et al. 2018,
    arXiv:1712.05877); TerViT's 8-bit activations and 8-bit patch embedding / head.

    Forward: out = (codes - zero_point) * scale, with codes, scale, zero_point from minmax_codes
             (signed symmetric over max|x|; unsigned asymmetric over [min(x_min, 0), max(x_max, 0)]).
    Pseudo-gradient: dx = g (identity STE; the scale statistics are detached).
    Args:
        x: any shape.
        bits: integer in [2, 16].
        signed: symmetric signed or asymmetric unsigned.
        channel_axis: None for per tensor statistics, else the channel axis.
        reduce: None, or the Collective whose ranks hold the slices of the tensor (minmax_codes).
        byte_codes: the fast path writes the codes as bytes instead of the float levels (per tensor,
            bits <= 8 only), for the byte dot products of ops.byte_matmul.
    Returns:
        out: array of x's shape and dtype.
        cache: (levels = codes - zero_point in x's dtype, scale (1,) | (C,), max_level = the largest
            |level| the codes allow, bytes); the backward needs nothing, integer_form the rest. bytes:
            None, or (uint8 codes of x's shape, offset) with levels = codes - offset (offset 128 for
            signed codes, biased by 128, else the zero point), written by the fused pass when asked,
            instead of the levels (levels None: minmax_levels_of gives them).
    """
    check_float_array(x, "x")
    _check_bits(bits)
    axis = _normalize_axis(x, channel_axis)
    qmax = _minmax_qmax(bits, signed)
    codes = None
    if _fused(x):  # two passes: the statistics, then the levels and out
        if axis is None and not x.flags.c_contiguous:
            # per tensor, every element is quantized alike: a copy (TerViT's q, k, v are strided
            # views of the qkv output) lets both passes walk flat segments, ~2x faster than by rows
            x = np.ascontiguousarray(x)
        scale, zero_point = _minmax_scale(_minmax_statistics(x, axis, signed, reduce), qmax, signed, x.dtype)
        scale, zero_point = scale.reshape(-1), zero_point.reshape(-1)
        byte_codes = bool(byte_codes) and axis is None and bits <= 8
        levels, out, codes = _kernels("quantize_int").minmax_levels(x, scale, zero_point, qmax, signed, axis,
                                                                    byte_codes)
    else:
        int_codes, scale, zero_point = minmax_codes(x, bits, signed, channel_axis, reduce)
        shape = _broadcast_shape(x.ndim, axis)
        levels = int_codes.astype(x.dtype) - zero_point.reshape(shape).astype(x.dtype)
        out = levels * scale.reshape(shape)
    # |codes - zero_point| <= max(zero_point, qmax - zero_point) (codes in [0, qmax], or [-qmax, qmax])
    max_level = qmax if signed else int(np.maximum(zero_point, qmax - zero_point).max())
    byte_form = None if codes is None else (codes, 128 if signed else int(zero_point[0]))
    return out, (levels, scale, max_level, byte_form)


def minmax_levels_of(cache):
    """The levels of a minmax_quant_forward cache, from its byte codes if it holds them instead."""
    if cache[0] is not None:
        return cache[0]
    codes, offset = cache[3]
    return _kernels("quantize_int").byte_levels(codes, offset, cache[1].dtype)


def minmax_quant_backward(dout, cache):
    """Pseudo-gradient of minmax_quant_forward: dx = g, dout itself (no copy: the identity STE; the
    caller owns dout and passes it on, as the model does where a tensor has no quantizer)."""
    return dout


# --------------------------------------------------------------------------------------------
# stateful wrappers (interface: see the module docstring and docs/quantizers.md)


def _nan_param(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)


class _Quantizer:
    """Base: no learnable state. Subclasses set params/buffers in __init__.

    collective: None, or the Collective (minibvit.distributed) over whose ranks a training forward
    takes its input statistics; set for the duration of a forward by distributed.global_quantizer_state.
    """

    collective = None
    # True when backward returns dout itself (an identity pseudo-gradient): the model may then let the
    # product before the quantizer write dout straight where the input's gradient goes
    backward_returns_dout = False

    def __init__(self):
        self.params = {}
        self.buffers = {}

    def integer_form(self, cache):
        """(levels, scale) with forward's out == levels * scale exactly: levels small integers in the
        input dtype, scale a scalar () or, for a weight (channel axis 0), one per output channel (C,);
        None when the output has no such form. Lets a product of two quantized tensors be computed on
        the integers and scaled once, as the packed inference engine does, so both give the same bits."""
        return None

    def level_bound(self, cache):
        """An upper bound of |levels| of integer_form(cache), known from the quantizer's level range
        without a pass over the levels (ops.levels_matmul chooses its exact product with it); None: not
        known, levels_matmul takes max|levels| itself."""
        return None

    def packed_form(self, cache, axis=-1):
        """(bits, kind, scale, K): forward's levels packed along `axis` into uint64 words
        (minibvit.kernels.pack's layout: [..., ceil(K/64)] with `axis` removed, bit 1 = level -1 for
        kind "sign" (levels +-1), level 1 for kind "unit" (levels {0, 1})), the scale of integer_form
        and K = the length of `axis`; None when there is no such form (or the forward kept no bits:
        the NumPy path). The forward's popcount products (ops.packed_matmul) read it."""
        return None

    def _options(self):
        return {}

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({options})"

    def _ensure_initialised(self, x, training, initial_values):
        """Fill NaN params from the first training batch; refuse to run eval before that."""
        for name, param in self.params.items():
            if np.isnan(param).any():
                if not training:
                    raise ValueError(
                        f"{self!r}: param {name!r} is not initialised: run one training forward or load a checkpoint"
                    )
                value = initial_values[name](x)
                if value.shape != param.shape:
                    raise ValueError(
                        f"{self!r}: the first batch (shape {x.shape}) gives {name!r} the shape {value.shape}, "
                        f"but the param has shape {param.shape}; check channels / channel_axis"
                    )
                param[...] = value


class Identity(_Quantizer):
    """Full precision: out = x, dx = g."""

    def forward(self, x, training):
        return x, None

    def backward(self, dout, cache):
        return dout.copy(), {}


class SignBinarizer(_Quantizer):
    """sign(x) with a straight-through pseudo-gradient (binarize_forward)."""

    def __init__(self, ste="clipped"):
        super().__init__()
        check_choice(ste, STE_KINDS, "ste")
        self.ste = ste

    def _options(self):
        return {"ste": self.ste}

    def forward(self, x, training):
        return binarize_forward(x, self.ste)

    def backward(self, dout, cache):
        return binarize_backward(dout, cache), {}


class WeightBinarizer(_Quantizer):
    """alpha * sign(W_c) weight binarizer (weight_binarize_forward); no learnable params."""

    def __init__(self, scale="channel", center=False, ste="identity"):
        super().__init__()
        check_choice(scale, WEIGHT_SCALES, "scale")
        check_choice(ste, WEIGHT_STE_KINDS, "ste")
        self.scale, self.center, self.ste = scale, bool(center), ste

    def _options(self):
        return {"scale": self.scale, "center": self.center, "ste": self.ste}

    def forward(self, x, training):
        return weight_binarize_forward(x, self.scale, self.center, self.ste)

    def backward(self, dout, cache):
        return weight_binarize_backward(dout, cache), {}

    def integer_form(self, cache):
        levels, alpha = cache[2:4]
        return levels, (alpha.reshape(-1) if self.scale == "channel" else alpha.reshape(()))

    def packed_form(self, cache, axis=-1):
        """Sign bits of a 2-D weight's levels along its input axis (see _Quantizer.packed_form)."""
        bits = cache[4]
        if bits is None or axis not in (-1, 1):
            return None
        return bits, "sign", self.integer_form(cache)[1], cache[2].shape[1]


class ElasticBinarizer(_Quantizer):
    """BiT's elastic binarizer (elastic_binarize_forward). Param "alpha" (1,), NaN until the
    first training forward sets it to elastic_alpha_init(x, signed)."""

    def __init__(self, signed=True, alpha_grad="lsq", dtype=np.float32):
        super().__init__()
        check_choice(alpha_grad, ELASTIC_ALPHA_GRADS, "alpha_grad")
        self.signed, self.alpha_grad = bool(signed), alpha_grad
        self.params = {"alpha": _nan_param((1,), dtype)}

    def _options(self):
        return {"signed": self.signed, "alpha_grad": self.alpha_grad}

    def forward(self, x, training, shift=None):
        """shift: None, or (C,): binarize x - shift (elastic_binarize_forward's shift; ASM)."""
        reduce = self.collective if training else None
        if shift is not None and np.isnan(self.params["alpha"]).any():  # the first batch initialises on x - shift
            x, shift = x - shift, None
        self._ensure_initialised(x, training, {"alpha": lambda x: elastic_alpha_init(x, self.signed, reduce)})
        return elastic_binarize_forward(x, self.params["alpha"], self.signed, self.alpha_grad, reduce, shift)

    backward_takes_out = True  # backward(dout, cache, out=view) writes dx into the view

    def backward(self, dout, cache, out=None):
        """out: None, or an array to write dx into (elastic_binarize_backward)."""
        dx, dalpha = elastic_binarize_backward(dout, cache, out)
        return dx, {"alpha": dalpha}

    def integer_form(self, cache):
        x, a, signed = cache[:3]
        levels = sign(x) if signed else np.clip(np.round(x / a), 0, 1)
        return levels, a.reshape(())

    def can_recompute(self, cache):
        """The fused path's cache (the NumPy path's caller keeps the output)."""
        return cache[-1] is not None

    def recompute(self, cache):
        """The forward's output again: alpha * sign from the level bits (signed: reads 1 bit an
        element, not x), or the fused kernel on the cached input (unsigned: a level of -0. or NaN
        has no bit of its own)."""
        x, a, signed = cache[:3]
        if signed:
            return _kernels().signed_output(cache[-1], a.reshape(()), x.shape, x.dtype)
        return _kernels().elastic_forward(x, a.reshape(()), signed)[0]

    def packed_form(self, cache, axis=-1):
        """The levels as packed bits for a popcount product (see _Quantizer.packed_form)."""
        x, a, signed = cache[:3]
        bits = cache[-1]
        if bits is None or (axis != -1 and not signed):
            return None
        if axis != -1:
            bits = _kernels().pack_sign_columns(x if axis == -2 else np.moveaxis(x, axis, -2))
        return bits, ("sign" if signed else "unit"), a.reshape(()), x.shape[axis]


class Ternarizer(_Quantizer):
    """TWN / TerViT ternary weights (ternarize_forward); no learnable params."""

    def __init__(self, per_channel=True, ste="identity", delta_factor=0.7):
        super().__init__()
        check_choice(ste, WEIGHT_STE_KINDS, "ste")
        _check_delta_factor(delta_factor)
        self.per_channel, self.ste, self.delta_factor = bool(per_channel), ste, delta_factor

    def _options(self):
        return {"per_channel": self.per_channel, "ste": self.ste, "delta_factor": self.delta_factor}

    def forward(self, x, training):
        return ternarize_forward(x, self.per_channel, self.delta_factor, self.ste)

    def backward(self, dout, cache):
        return ternarize_backward(dout, cache), {}

    def integer_form(self, cache):
        _, levels, alpha = cache
        return levels, (alpha.reshape(-1) if self.per_channel else alpha.reshape(()))

    def level_bound(self, cache):
        """Ternary levels: |T| <= 1 (see _Quantizer.level_bound)."""
        return 1

    def weight_quad_form(self, cache):
        """A 2-D weight's levels T as byte quads (kernels.ternary.weight_level_quads) with its scale,
        for ops.byte_matmul; None for another shape."""
        _, levels, _ = cache
        if levels.ndim != 2:
            return None
        return (*_kernels("ternary").weight_level_quads(levels), self.integer_form(cache)[1])


class LSQQuantizer(_Quantizer):
    """LSQ k-bit quantizer (lsq_forward). Param "step": (1,) per tensor, or (channels,) per
    channel along channel_axis (0 for weights, -1 for activations); NaN until the first training
    forward sets it to lsq_step_init."""

    def __init__(self, bits=8, signed=True, per_channel=False, channel_axis=-1, channels=None, dtype=np.float32):
        super().__init__()
        _check_bits(bits)
        if per_channel and (not isinstance(channels, (int, np.integer)) or channels < 1):
            raise ValueError(
                f"a per-channel LSQQuantizer needs channels=<number of channels on axis {channel_axis}> "
                f"to create its step parameter, got channels={channels!r}"
            )
        self.bits, self.signed, self.per_channel = bits, bool(signed), bool(per_channel)
        self.channel_axis = channel_axis if per_channel else None
        self.params = {"step": _nan_param((channels if per_channel else 1,), dtype)}

    def _options(self):
        options = {"bits": self.bits, "signed": self.signed, "per_channel": self.per_channel}
        if self.per_channel:
            options["channel_axis"] = self.channel_axis
        return options

    def forward(self, x, training):
        reduce = self.collective if training else None
        init = {"step": lambda x: lsq_step_init(x, self.bits, self.signed, self.channel_axis, reduce)}
        self._ensure_initialised(x, training, init)
        return lsq_forward(x, self.params["step"], self.bits, self.signed, self.channel_axis, reduce)

    def backward(self, dout, cache):
        dx, dstep = lsq_backward(dout, cache)
        return dx, {"step": dstep}


class MinMaxQuantizer(_Quantizer):
    """Min-max k-bit quantizer on the current tensor's statistics (minmax_quant_forward);
    per tensor, or per channel along channel_axis (0 for weights, -1 for activations)."""

    backward_returns_dout = True  # the identity STE (minmax_quant_backward)

    def __init__(self, bits=8, signed=True, per_channel=False, channel_axis=-1):
        super().__init__()
        _check_bits(bits)
        self.bits, self.signed, self.per_channel = bits, bool(signed), bool(per_channel)
        self.channel_axis = channel_axis if per_channel else None

    def _options(self):
        options = {"bits": self.bits, "signed": self.signed, "per_channel": self.per_channel}
        if self.per_channel:
            options["channel_axis"] = self.channel_axis
        return options

    def forward(self, x, training):
        return minmax_quant_forward(x, self.bits, self.signed, self.channel_axis,
                                    self.collective if training else None, byte_codes=not self.per_channel)

    def backward(self, dout, cache):
        return minmax_quant_backward(dout, cache), {}

    def can_recompute(self, cache):
        """Per tensor (per channel the scale's axis is not in the cache)."""
        return not self.per_channel

    def recompute(self, cache):
        """The forward's output again, levels * scale (the one product per element both paths compute),
        from the byte codes when the cache holds them."""
        levels, scale = cache[:2]
        if levels is None:
            codes, offset = cache[3]
            return _kernels("quantize_int").byte_values(codes, offset, scale)
        return levels * scale

    def integer_form(self, cache):
        levels, scale = minmax_levels_of(cache), cache[1]
        if not self.per_channel:
            return levels, scale.reshape(())
        return (levels, scale.reshape(-1)) if self.channel_axis == 0 else None

    def level_bound(self, cache):
        """The largest |level| of integer_form that the codes allow (see _Quantizer.level_bound)."""
        return cache[2]

    def byte_form(self, cache):
        """(uint8 codes, offset, scalar scale) of a per-tensor activation whose fused forward wrote its
        byte codes (levels = codes - offset), for ops.byte_matmul; else None."""
        if cache[3] is None:
            return None
        codes, offset = cache[3]
        return codes, offset, cache[1].reshape(())

    def weight_quad_form(self, cache):
        """A signed per-output-channel 2-D weight's levels as byte quads (kernels.ternary.weight_level_quads)
        with its scale (N,), for ops.byte_matmul; else None."""
        levels, scale = cache[:2]
        if not (self.per_channel and self.channel_axis == 0 and self.signed and self.bits <= 8 and levels.ndim == 2):
            return None
        return (*_kernels("ternary").weight_level_quads(levels), scale.reshape(-1))


class Shifted(_Quantizer):
    """Learnable per-channel shift (param "shift", shape (channels,), zeros) on the last axis,
    followed by `inner` (shift_forward then inner.forward). params holds "shift" plus inner's
    params (the same arrays); grads come back under the same names."""

    def __init__(self, inner, channels, dtype=np.float32):
        super().__init__()
        if not isinstance(channels, (int, np.integer)) or channels < 1:
            raise ValueError(f"Shifted needs channels=<size of the last axis>, got {channels!r}")
        if "shift" in inner.params:
            raise ValueError(f"{inner!r} already has a param named 'shift'; cannot wrap it in Shifted")
        self.inner = inner
        self.params = {"shift": np.zeros(channels, dtype=dtype), **inner.params}
        self.buffers = inner.buffers

    def __repr__(self):
        return f"Shifted({self.inner!r}, channels={self.params['shift'].shape[0]})"

    def forward(self, x, training):
        shifted, shift_cache = shift_forward(x, self.params["shift"])
        out, inner_cache = self.inner.forward(shifted, training)
        return out, (shift_cache, inner_cache)

    def backward(self, dout, cache):
        shift_cache, inner_cache = cache
        d_shifted, grads = self.inner.backward(dout, inner_cache)
        dx, dshift = shift_backward(d_shifted, shift_cache)
        return dx, {"shift": dshift, **grads}


# --------------------------------------------------------------------------------------------
# factory

QUANTIZER_SPECS = {
    "fp": (Identity, {}),
    "sign": (SignBinarizer, {"ste": "clipped"}),
    "w_binary": (WeightBinarizer, {"scale": "channel", "center": True, "ste": "clipped"}),
    "w_xnor": (WeightBinarizer, {"scale": "channel", "center": False, "ste": "clipped"}),
    "a_elastic_signed": (ElasticBinarizer, {"signed": True, "alpha_grad": "lsq"}),
    "a_elastic_unsigned": (ElasticBinarizer, {"signed": False, "alpha_grad": "lsq"}),
    "a_elastic_signed_gsb": (ElasticBinarizer, {"signed": True, "alpha_grad": "gsb"}),
    "w_ternary_channel": (Ternarizer, {"per_channel": True, "ste": "identity"}),
    "w_ternary_tensor": (Ternarizer, {"per_channel": False, "ste": "identity"}),
    "w_lsq8": (LSQQuantizer, {"bits": 8, "signed": True, "per_channel": False, "channel_axis": 0}),
    "a_lsq8": (LSQQuantizer, {"bits": 8, "signed": True, "per_channel": False, "channel_axis": -1}),
    "w_minmax8": (MinMaxQuantizer, {"bits": 8, "signed": True, "per_channel": True, "channel_axis": 0}),
    "a_minmax8_signed": (MinMaxQuantizer, {"bits": 8, "signed": True, "per_channel": False, "channel_axis": -1}),
    "a_minmax8_unsigned": (MinMaxQuantizer, {"bits": 8, "signed": False, "per_channel": False, "channel_axis": -1}),
}
"""Spec name -> (wrapper class, constructor keywords). Names starting with "w_" take a weight
(channel axis 0), "a_" an activation (channel axis -1); "fp" and "sign" take either."""


def make_quantizer(spec, dtype=None, **overrides):
    """A fresh quantizer wrapper for a spec name of QUANTIZER_SPECS.

    dtype sets the dtype of the learnable params (float32 by default); wrappers without
    learnable params ignore it, so one call works for every spec. Other keyword overrides
    replace the spec's constructor keywords, e.g. make_quantizer("w_lsq8", per_channel=True,
    channels=384). Raises ValueError for an unknown spec (listing the valid ones) and TypeError
    for a keyword the wrapper does not take.
    """
    if spec not in QUANTIZER_SPECS:
        raise ValueError(f"unknown quantizer spec {spec!r}; valid specs: {', '.join(QUANTIZER_SPECS)}")
    cls, defaults = QUANTIZER_SPECS[spec]
    if dtype is not None and cls in (ElasticBinarizer, LSQQuantizer):
        overrides["dtype"] = dtype
    return cls(**{**defaults, **overrides})
