"""GSB: group superposition binarization of a ViT's attention (Gao et al., "GSB: Group Superposition
Binarization for Vision Transformer with Limited Training Samples", Neural Networks 2024, arXiv
2305.07931; official code IMRL/GSB-Vision-Transformer). Everything of GSB lives here: the value and
attention quantizers (pure op pairs and the wrapper classes with their learnable shift / bias), the
refined scale gradient of the elastic binarizer, and the quantizer tables of its two stages.

Forward (a_k = max(alpha_k, 1e-5), sign(0) = +1; group masks T1 within T2 chosen by thresholds
0.7 / 0.9 of the tensor's maximum, for V also of its minimum):
    values:     V_q = a1 sign(v) + a2 T1 sign(v) + a3 T2 sign(v)
    attention:  A_q = a1 clamp(round(A/a1), 0, 1) + a2 T1 + a3 T2
so A_q V_q is a sum of 3 x 3 binary products, each scaled once (the engine's nine-product combine).

Pseudo-gradients: gsb_value_forward / gsb_attn_forward state them in full, in two modes:
"official" reproduces the published code bit for bit (including its pass-through of 3 g outside T1 for
V and the a_k-scaled pass-through of A); "principled" is ours: every basis gets the straight-through
estimator of its own step (docs/gsb.md derives both and says why).

Refined scale gradient of the signed elastic binarizer (GSB's Eq. for alpha, used in every signed
activation binarizer of the gsb table, spec "a_elastic_signed_gsb"), q = x / alpha, s = 1/sqrt(N):
    BiT:  dL/dalpha = s sum sign(x) g
    GSB:  dL/dalpha = s sum (sign(x) - 1[|q| <= 1] q) g     (refined_alpha_terms)
The second is the exact derivative of alpha sign(x) under the clipped STE x = alpha q: it keeps the
term that BiT drops.

Stages (minibvit.methods registry): a full-precision teacher, then STAGE1_TABLE (binary MLP weights
only) and then gsb_table(binary) (the whole binary baseline with GSB's A and V), both trained with
DeiT hard distillation through a distillation token. Conventions: the masked terms use sign(v T) with
sign(0) = 0 (the official code's torch.sign of a masked tensor). docs/gsb.md.

Data parallelism (minibvit.quant's module docstring): the masks, group sizes and first-batch scales are
statistics of the whole tensor; with `reduce` (a Collective of minibvit.distributed) they are taken
over every rank's slice of it: max / min v and max A by MAX, the group counts and the init's sums of
|x| by SUM. The counts are taken in the forward and kept in the cache for the backward.
"""

import numpy as np

from . import quant
from .quant import SCALE_FLOOR, check_choice, check_float_array, sign

GSB_MODES = ("official", "principled")
GSB_MAX_OVER = ("tensor", "row")
GSB_T1_FRACTION = 0.7
GSB_T2_FRACTION = 0.9


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


def _mean_abs_with_fallback(x, chains, reduce=None):
    """For each chain of masks in `chains`: mean |x| over the first mask of the chain that is non-empty
    (over the ranks of reduce), over all of x if every mask of the chain is empty. The sums and counts
    of every mask travel in one SUM, so the fallback is decided on the global counts. Returns a list of
    x.dtype scalars (the division is np.mean's: the float sum over the integer count)."""
    abs_x = np.abs(x)
    masks = [mask for chain in chains for mask in chain]
    totals = np.array([abs_x[mask].sum() for mask in masks] + [abs_x.sum()], dtype=np.float64)
    counts = np.array([mask.sum() for mask in masks] + [x.size], dtype=np.int64)
    if reduce is not None:
        totals, counts = reduce.sum(totals), reduce.sum(counts)
    means, start = [], 0
    for chain in chains:
        chosen = next((i for i in range(start, start + len(chain)) if counts[i] > 0), len(masks))
        means.append(x.dtype.type(totals[chosen] / counts[chosen]))
        start += len(chain)
    return means


def _fused_kernels(x, *others):
    """minibvit.kernels.gsb (Numba, imported on first use) when the fused passes apply to x (and the
    arrays others): quant.USE_FUSED, float32/float64, every array C-contiguous, of x's dtype; else None.
    The fused passes walk the arrays in C order, as NumPy's own passes over C-contiguous arrays do,
    so that the np.sum of their terms has the bits of the NumPy formula's."""
    if not (quant.USE_FUSED and x.dtype in (np.float32, np.float64) and x.size > 0 and x.flags.c_contiguous
            and all(o.dtype == x.dtype and o.flags.c_contiguous for o in others)):
        return None
    from .kernels import gsb as kernels

    return kernels


# ------------------------------------------------------------------------------------------------
# GSB: value quantizer
# ------------------------------------------------------------------------------------------------

def gsb_value_masks(v, reduce=None):
    """GSB group masks of the values, over the whole tensor.

    T1 = 1[v > 0.7 max v] + 1[v < 0.7 min v],  T2 = 1[v > 0.9 max v] + 1[v < 0.9 min v]  (T2 within T1).

    Args: v (any shape) float array; reduce: None or the Collective whose ranks hold v's slices.
    Returns: (t1, t2) boolean arrays of v's shape.
    """
    vmax, vmin = v.max(), v.min()
    if reduce is not None:
        vmax, negated_min = reduce.max(np.array([vmax, -vmin]))  # -min is exact: one allreduce
        vmin = -negated_min
    t1 = (v > GSB_T1_FRACTION * vmax) | (v < GSB_T1_FRACTION * vmin)
    t2 = (v > GSB_T2_FRACTION * vmax) | (v < GSB_T2_FRACTION * vmin)
    return t1, t2


def gsb_value_init(v, reduce=None):
    """First-batch initialisation of the three GSB value scales (official GSB code).

    alpha1 = 2 mean|v| outside T1, alpha2 = 2 mean|v| over T1 minus T2, alpha3 = 2 mean|v| over T2.
    An empty group falls back to its enclosing group (T1 minus T2 -> T1 -> all; outside T1 -> all;
    T2 -> all: T2 holds max v if it is > 0 and min v if it is < 0, so it is empty only for an all-zero
    v), so the result is never NaN. An all-zero v gives zeros (floored to 1e-5 in use).

    Args: v (any shape) float array (the shifted values); reduce: None or the Collective whose ranks
    hold v's slices (the groups and fallbacks are those of the whole tensor).
    Returns: alphas (3,) in v's dtype.
    """
    check_float_array(v, "v", nonempty=True)
    t1, t2 = gsb_value_masks(v, reduce)
    means = _mean_abs_with_fallback(v, [[~t1], [t1 & ~t2, t1], [t2]], reduce)
    return (2 * np.array(means)).astype(v.dtype)


def _group_counts(x, t1, t2, reduce):
    """(|x|, |T1|, |T2|) as an int64 array, summed over the ranks of reduce: the group sizes G_k."""
    counts = np.array([x.size, t1.sum(), t2.sum()], dtype=np.int64)
    return counts if reduce is None else reduce.sum(counts)


def gsb_value_forward(v, alphas, mode="official", reduce=None):
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
      reduce: None, or the Collective whose ranks hold v's slices (masks and |G_k| of the whole tensor).
    Returns: out (v's shape, v's dtype), cache for gsb_value_backward.
    """
    check_float_array(v, "v", nonempty=True)
    check_choice(mode, GSB_MODES, "mode")
    a = _effective_alphas(alphas, v.dtype)
    kernels = _fused_kernels(v) if reduce is None else None
    if kernels is not None:  # one pass for min / max, one for the masks, their counts and out
        vmin, vmax = kernels.tensor_extrema(v)
        out, t1, t2, c1, c2 = kernels.value_forward(v, a, GSB_T1_FRACTION * vmax, GSB_T1_FRACTION * vmin,
                                                    GSB_T2_FRACTION * vmax, GSB_T2_FRACTION * vmin)
        return out, (v, a, t1, t2, np.array([v.size, c1, c2], dtype=np.int64), mode)
    t1, t2 = gsb_value_masks(v, reduce)
    out = _value_output(v, a, t1, t2)
    cache = (v, a, t1, t2, _group_counts(v, t1, t2, reduce), mode)
    return out, cache


def _value_output(v, a, t1, t2):
    """a1 S + a2 (T1 S) + a3 (T2 S), S = sign(v): gsb_value_forward's output (the fused pass's bits)."""
    s = sign(v)
    return a[0] * s + a[1] * (t1 * s) + a[2] * (t2 * s)


def gsb_value_backward(dout, cache):
    """Backward of gsb_value_forward (formulas in its docstring).

    Args: dout (v's shape), cache.  Returns: dv (v's shape), dalphas (3,).
    """
    v, a, t1, t2, counts, mode = cache
    dtype = v.dtype
    kernels = _fused_kernels(v, dout)
    if kernels is not None:  # dv and the three terms in one pass; the sums stay np.sum's
        dv, terms = kernels.value_backward(v, t1, t2, dout, a, mode == "principled")
        dalphas = np.array([np.sum(terms[k]) * _group_scale(counts[k], dtype) for k in range(3)], dtype=dtype)
        return dv, dalphas
    s = sign(v)
    v_groups = (v, v * t1, v * t2)
    signs = (s, t1 * s, t2 * s)  # sign(v * T) with sign(0) = 0 outside the group
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

def _attn_max(a, max_over, reduce=None):
    """max A over the tensor (over the ranks of reduce), or over each attention row (no collective)."""
    if max_over == "row":
        return a.max(axis=-1, keepdims=True)
    return a.max() if reduce is None else reduce.max(a.max())


def gsb_attn_masks(a, max_over="tensor", reduce=None):
    """GSB group masks of attention probabilities: T1 = 1[A > 0.7 max A], T2 = 1[A > 0.9 max A].

    max_over="tensor" takes max A over the whole tensor (official code, depends on the batch);
    max_over="row" takes it over each attention row (last axis), batch-independent at inference.

    Args: a (..., N) float array; reduce: None or the Collective whose ranks hold a's slices.
    Returns: (t1, t2) boolean arrays of a's shape.
    """
    check_choice(max_over, GSB_MAX_OVER, "max_over")
    amax = _attn_max(a, max_over, reduce)
    return a > GSB_T1_FRACTION * amax, a > GSB_T2_FRACTION * amax


def gsb_attn_init(a, max_over="tensor", reduce=None):
    """First-batch initialisation of the three GSB attention scales (official GSB code).

    alpha1 = 4 mean|A|, alpha2 = 4 mean|A| over T1 minus T2, alpha3 = 4 mean|A| over T2 (|A| = A for
    softmax outputs with the bias at its initial 0). Empty groups fall back as in gsb_value_init
    (T1 minus T2 -> T1 -> all; T2 -> all: T2 holds the maximum whenever it is > 0, otherwise T1 is
    empty too), so the result is never NaN.

    Args: a (..., N) float array; max_over "tensor" | "row"; reduce: None or the Collective whose ranks
    hold a's slices.  Returns: alphas (3,) in a's dtype.
    """
    check_float_array(a, "a", nonempty=True)
    t1, t2 = gsb_attn_masks(a, max_over, reduce)
    means = _mean_abs_with_fallback(a, [[], [t1 & ~t2, t1], [t2]], reduce)  # [] : alpha1 over all of A
    return (4 * np.array(means)).astype(a.dtype)


def gsb_attn_forward(a, alphas, mode="official", max_over="tensor", reduce=None):
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
      reduce: None, or the Collective whose ranks hold a's slices (max A and |T_k| of the whole tensor).
    Returns: out (a's shape, a's dtype), cache for gsb_attn_backward.
    """
    check_float_array(a, "a", nonempty=True)
    check_choice(mode, GSB_MODES, "mode")
    check_choice(max_over, GSB_MAX_OVER, "max_over")
    al = _effective_alphas(alphas, a.dtype)
    kernels = _fused_kernels(a) if reduce is None and max_over == "tensor" else None
    if kernels is not None:  # one pass for max A, one for the level, the masks, their counts and out
        amax = kernels.tensor_extrema(a)[1]
        out, t1, t2, c1, c2 = kernels.attn_forward(a, al, GSB_T1_FRACTION * amax, GSB_T2_FRACTION * amax)
        return out, (a, al, t1, t2, amax, np.array([a.size, c1, c2], dtype=np.int64), mode)
    amax = _attn_max(a, max_over, reduce)
    t1, t2 = a > GSB_T1_FRACTION * amax, a > GSB_T2_FRACTION * amax
    out = _attn_output(a, al, t1, t2)
    cache = (a, al, t1, t2, amax, _group_counts(a, t1, t2, reduce), mode)
    return out, cache


def _attn_output(a, al, t1, t2):
    """a1 clamp(round(A / a1), 0, 1) + a2 T1 + a3 T2: gsb_attn_forward's output (the fused pass's bits)."""
    return np.clip(np.rint(a / al[0]), 0, 1) * al[0] + t1 * al[1] + t2 * al[2]


def gsb_attn_backward(dout, cache):
    """Backward of gsb_attn_forward (formulas in its docstring).

    Args: dout (a's shape), cache.  Returns: da (a's shape), dalphas (3,).
    """
    a, al, t1, t2, amax, counts, mode = cache
    dtype = a.dtype
    kernels = _fused_kernels(a, dout) if mode == "official" else None
    if kernels is not None:  # da and the three terms in one pass; the sums stay np.sum's
        da, terms = kernels.attn_backward_official(a, t1, t2, dout, al)
        scales = [_group_scale(counts[k], dtype) for k in range(3)]
        return da, np.array([np.sum(terms[k]) * scales[k] for k in range(3)], dtype=dtype)
    q = a / al[0]
    below, above = q < 0, q > 1
    inside = ~below & ~above
    dalphas = np.empty(3, dtype=dtype)
    dalphas[0] = np.sum((above + inside * (np.rint(q) - q)) * dout) * _group_scale(counts[0], dtype)
    scale2, scale3 = _group_scale(counts[1], dtype), _group_scale(counts[2], dtype)
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
    (gsb_value_init of y). Input v: (B, heads, N, head_dim). collective: as quant._Quantizer's.
    """

    collective = None

    def __init__(self, heads, head_dim, mode="official", dtype=np.float32):
        check_choice(mode, GSB_MODES, "mode")
        self.heads, self.head_dim, self.mode = heads, head_dim, mode
        self.dtype = np.dtype(dtype)
        self.params = {"shift": np.zeros((heads, head_dim), self.dtype),
                       "alpha": np.full(3, np.nan, self.dtype)}
        self.buffers = {}

    def forward(self, v, training):
        """v: (B, heads, N, head_dim) -> out (same shape), cache."""
        _check_input(v, (self.heads, None, self.head_dim), self.dtype, "GSBValueQuantizer")
        y = np.subtract(v, self.params["shift"][:, None, :], order="C")  # C order: the layout the sums walk
        reduce = self.collective if training else None
        _init_or_check(self.params["alpha"], lambda x: gsb_value_init(x, reduce), y, training, "GSBValueQuantizer")
        return gsb_value_forward(y, self.params["alpha"], mode=self.mode, reduce=reduce)

    def backward(self, dout, cache):
        """Returns dv (B, heads, N, head_dim) and grads {"shift": (heads, head_dim), "alpha": (3,)}."""
        dy, dalpha = gsb_value_backward(dout, cache)
        return dy, {"shift": -dy.sum(axis=(0, 2)), "alpha": dalpha}

    def can_recompute(self, cache):
        return True

    def recompute(self, cache):
        """The forward's output again from the cached input and masks: a1 S + a2 (T1 S) + a3 (T2 S),
        gsb_value_forward's formula, whose bits both of its paths give (in one fused pass where it applies)."""
        v, a, t1, t2 = cache[:4]
        kernels = _fused_kernels(v, a)
        return _value_output(v, a, t1, t2) if kernels is None else kernels.value_output(v, a, t1, t2)

    def basis_form(self, cache):
        """([S, T1 S, T2 S], (a1, a2, a3)): V_q = sum_k a_k * basis_k with integer bases (S = sign)."""
        v, a, t1, t2 = cache[:4]
        s = sign(v)
        return [s, t1 * s, t2 * s], a

    def packed_basis_form(self, cache):
        """(sign bits [..., d, W], masks [..., 2, d, W], (a1, a2, a3)): basis_form's S, T1, T2 packed
        along the token axis (the layout of kernels.gsb_partial_products' v_signs / v_masks)."""
        v, a, t1, t2 = cache[:4]
        if not quant.USE_FUSED:
            return None
        from .kernels.quantize import pack_mask_columns, pack_sign_columns  # Numba, on first use

        return pack_sign_columns(v), np.stack([pack_mask_columns(t1), pack_mask_columns(t2)], axis=-3), a

    def __repr__(self):
        return f"GSBValueQuantizer(heads={self.heads}, head_dim={self.head_dim}, mode={self.mode!r})"


class GSBAttnQuantizer:
    """GSB attention quantizer with its learnable additive bias after softmax (official `move_att`).

    forward: y = a + bias[h, i, j] (broadcast over batch), then gsb_attn_forward(y, alpha).
    params: "bias" (heads, N, N) init 0; "alpha" (3,) NaN until the first training batch
    (gsb_attn_init of y). Input a: (B, heads, N, N) softmax probabilities. collective: as
    quant._Quantizer's.
    """

    collective = None

    def __init__(self, heads, tokens, mode="official", max_over="tensor", dtype=np.float32):
        check_choice(mode, GSB_MODES, "mode")
        check_choice(max_over, GSB_MAX_OVER, "max_over")
        self.heads, self.tokens, self.mode, self.max_over = heads, tokens, mode, max_over
        self.dtype = np.dtype(dtype)
        self.params = {"bias": np.zeros((heads, tokens, tokens), self.dtype),
                       "alpha": np.full(3, np.nan, self.dtype)}
        self.buffers = {}

    def forward(self, a, training):
        """a: (B, heads, N, N) -> out (same shape), cache."""
        _check_input(a, (self.heads, self.tokens, self.tokens), self.dtype, "GSBAttnQuantizer")
        y = a + self.params["bias"]
        reduce = self.collective if training else None
        _init_or_check(self.params["alpha"], lambda x: gsb_attn_init(x, self.max_over, reduce), y, training,
                       "GSBAttnQuantizer")
        return gsb_attn_forward(y, self.params["alpha"], mode=self.mode, max_over=self.max_over, reduce=reduce)

    def backward(self, dout, cache):
        """Returns da (B, heads, N, N) and grads {"bias": (heads, N, N), "alpha": (3,)}."""
        dy, dalpha = gsb_attn_backward(dout, cache)
        return dy, {"bias": dy.sum(axis=0), "alpha": dalpha}

    def can_recompute(self, cache):
        return True

    def recompute(self, cache):
        """The forward's output again from the cached input and masks (gsb_attn_forward's formula,
        in the fused pass where that ran: max A over the tensor)."""
        a, al, t1, t2, amax = cache[:5]
        kernels = _fused_kernels(a) if np.ndim(amax) == 0 else None
        if kernels is None:
            return _attn_output(a, al, t1, t2)
        return kernels.attn_forward(a, al, GSB_T1_FRACTION * amax, GSB_T2_FRACTION * amax)[0]

    def basis_form(self, cache):
        """([clamp(round(A/a1), 0, 1), T1, T2], (a1, a2, a3)): A_q = sum_k a_k * basis_k, {0, 1} bases."""
        a, al, t1, t2 = cache[:4]
        return [np.clip(np.rint(a / al[0]), 0, 1), t1.astype(a.dtype), t2.astype(a.dtype)], al

    def packed_basis_form(self, cache):
        """(bases [..., 3, M, W], (a1, a2, a3), K, dtype): basis_form's three {0, 1} bases packed along
        the key axis (the layout of kernels.gsb_partial_products' a_bases), K = the number of keys."""
        a, al, t1, t2 = cache[:4]
        if not quant.USE_FUSED:
            return None
        from .kernels.pack import pack_bits  # Numba, on first use

        level1 = np.rint(a / al[0]) >= 1  # clamp(round(A / a1), 0, 1) == 1
        return np.stack([pack_bits(level1), pack_bits(t1), pack_bits(t2)], axis=-3), al, a.shape[-1], a.dtype

    def __repr__(self):
        return (f"GSBAttnQuantizer(heads={self.heads}, tokens={self.tokens}, mode={self.mode!r}, "
                f"max_over={self.max_over!r})")



# ------------------------------------------------------------------------------------------------
# GSB: refined scale gradient of the signed elastic binarizer
# ------------------------------------------------------------------------------------------------

def refined_alpha_terms(x, q, inside):
    """Per-element terms of GSB's refined elastic-binarizer scale gradient: sign(x) - 1[|q| <= 1] q.

    dL/dalpha = sum(terms * g) / sqrt(N) (quant.elastic_binarize_backward with alpha_grad="gsb").
    Args: x, q = x / alpha, inside = 1[|q| <= 1], all of x's shape.  Returns: terms, x's shape.
    """
    return sign(x) - inside * q


# ------------------------------------------------------------------------------------------------
# GSB's quantizer tables (minibvit.methods builds the stages from them)
# ------------------------------------------------------------------------------------------------

STAGE1_TABLE = {"blocks.*.mlp.fc1.weight": "w_binary", "blocks.*.mlp.fc2.weight": "w_binary"}
"""GSB stage 1: only the MLP weights binary, everything else full precision."""


def gsb_table(binary_table):
    """The GSB table from the binary baseline: the refined alpha gradient in every signed elastic
    binarizer, and group superposition binarization of the attention probabilities and the values."""
    refined = {role: ("a_elastic_signed_gsb" if spec == "a_elastic_signed" else spec)
               for role, spec in binary_table.items()}
    return {**refined, "blocks.*.attn.attn": "gsb_attn", "blocks.*.attn.v": "gsb_value"}
