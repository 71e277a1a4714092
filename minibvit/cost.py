"""Size and OPs accounting of a ViT (DeiT) or Swin under the project's low-bit methods.

    report = model_cost('deit-small', 'binaryvit')          # or any ViTConfig-like object
    print(format_report(report, per_layer=True))
    report.size_ratio, report.ops_ratio                      # FP32 model / this model

    python -m minibvit.cost --preset deit-small --method binaryvit [--batch 1] [--per-layer] [--json]

Every layer of the model is one row with its parameters, its storage (FP32 and as deployed: bit-packed
weights plus every scale, threshold and full-precision leftover, part by part), its MACs, FLOPs and
BOPs, and OPs = FLOPs + BOPs / 64 (Bi-Real Net, Liu et al. 2018; the convention of BiT, BiViT and
BinaryViT). The counting choices that papers make differently are explicit options (`Conventions`);
docs/cost.md lists them and shows which ones reproduce the papers' claims.

Methods (precision of every tensor):
- fp: everything FP32.
- binary (BiT / GSB-style baseline): block linears (qkv, proj, fc1, fc2) W1A1 with a per-output-
  channel FP32 weight scale and one FP32 elastic alpha per activation binarizer; Q.K^T with binary Q, K;
  unsigned 1-bit attention probabilities times binary V; patch embedding and head W8A8 (per-output-
  channel FP32 weight scale; the 8-bit activations are min-max quantized, their step taken from each
  batch at run time, so nothing is stored for them); LayerNorm, softmax, GELU, residuals, biases,
  class/position tokens FP32.
- binaryvit: binary + ASM, one FP32 threshold per channel (last axis) of every activation binarizer
  except the attention probabilities (as minibvit.methods): embed_dim channels in front of the
  linears and mlp_hidden in front of fc2, head_dim for Q, K and V (one threshold vector shared by the
  heads).
- gsb: binary, but attention probabilities and V each as `gsb_bases` binary bases (A.V = bases^2 binary
  products), plus the learnable attention bias (heads x N x N), the V shift (heads x head_dim), three FP32
  scales per GSB quantizer, a distillation token and a second head. ViT only.
- tervit: block linears ternary weights (per-output-channel FP32 scale) x 8-bit activations; both
  attention matmuls 8-bit x 8-bit; patch embedding and head W8A8. Every 8-bit activation is min-max
  quantized at run time (step and, for the unsigned post-GELU and attention probabilities, zero point
  from each batch): nothing stored.
The deployed bytes are those of minibvit.engine.export's file: the sum of its tensors' bytes equals
the predicted packed bytes exactly for every method (the file adds only its JSON header).
Swin's patch-merging reduction is quantized like the block linears; its relative-position-bias tables
stay FP32.
"""
import argparse
import json
import math
import numbers
import sys
from dataclasses import asdict, dataclass, field

from . import methods

METHODS = tuple(methods.METHODS)
"""The methods of the registry (minibvit.methods), in its order."""
EDGE_CHOICES = ("method", "block", "int8", "fp32")
MULTIBIT_MACS_CHOICES = ("bops", "flops")
FLOPS_PER_MAC_CHOICES = (1, 2)
TERNARY_BITS_CHOICES = ("2", "log2(3)")
FP32 = 32  # bit width standing for "full precision" in the precision tables below
WORD_BITS = 64  # binary weights are packed along K into uint64 words, the tail of the last word zero

# FLOPs per element of the element-wise work, counted only with `elementwise=True`.
ELEMENTWISE_FLOPS = {
    "layernorm": 7,  # mean (add), centre (sub), variance (mul, add), normalise (mul by 1/sigma), affine (mul, add)
    "softmax": 5,  # max (compare), subtract, exp, sum, divide
    "gelu": 5,  # x / sqrt(2), erf, + 1, * x, * 0.5 (erf counted as one operation)
    "add": 1,  # residual, bias, position embedding, attention bias, pooling sum, V shift
    "scale": 1,  # FP32 attention 1/sqrt(d); the rescale of every integer/popcount matmul output
    "binarize": 1,  # compare with the threshold (sign, or the ASM threshold folded into it)
    "quantize8": 2,  # multiply by 1/step, round-and-clamp
    "gsb_mask": 1,  # per GSB basis: compare with its threshold
    "gsb_combine": 2,  # per GSB basis product and output element: scale (mul) and accumulate (add)
}


@dataclass(frozen=True)
class ViTShape:
    """The fields of a DeiT/ViT that the accounting reads (minibvit.model.ViTConfig has them all)."""

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


@dataclass(frozen=True)
class SwinShape:
    """Swin Transformer (Liu et al. 2021) as published: 4x4 patch embedding + LayerNorm, stages of
    window-attention blocks with relative-position-bias tables ((2w-1)^2 x heads), patch merging
    (LayerNorm(4C) + Linear(4C, 2C, no bias)) between stages, final LayerNorm, mean pool, head."""

    image_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    qkv_bias: bool = True


PRESETS = {
    "deit-tiny": ViTShape(embed_dim=192, num_heads=3),
    "deit-small": ViTShape(embed_dim=384, num_heads=6),
    "deit-base": ViTShape(embed_dim=768, num_heads=12),
    "swin-tiny": SwinShape(depths=(2, 2, 6, 2)),
    "swin-small": SwinShape(depths=(2, 2, 18, 2)),
}


@dataclass(frozen=True)
class Conventions:
    """The counting choices (docs/cost.md discusses each one).

    patch_embed, head: precision of the patch embedding and of the head(s) in a low-bit model:
        "method" (W8A8, the project's choice), "block" (as the block linears: W1A1 binary, W2A8 ternary),
        "int8" (W8A8) or "fp32". The fp method and the FP32 reference are FP32 throughout.
    multibit_macs: a MAC whose operands are both quantized but not both 1-bit: "bops" counts it as
        b_w * b_a BOPs (8x8 -> 64 BOPs = 1 OP, ternary x 8-bit -> 16 BOPs = 1/4 OP), "flops" as one FLOP.
        A MAC with an FP32 operand is always a FLOP, a 1-bit x 1-bit MAC always one BOP.
    flops_per_mac: 1 (a multiply-accumulate is one operation: the "FLOPs" of DeiT, Swin and fvcore)
        or 2 (multiply and add counted apart); applies to FLOPs and BOPs alike.
    elementwise: count the FP32 element-wise work (LayerNorm, softmax, GELU, residual/bias/position
        adds, attention scaling, activation quantizers, matmul rescales) with ELEMENTWISE_FLOPS.
    ternary_bits: storage of a ternary weight: "2" (two bit-planes, sign and non-zero, each packed
        into uint64 words like binary weights) or "log2(3)" (the entropy bound, ~1.585 bits).
    gsb_bases: binary bases of GSB's attention probabilities and of its V (A.V = gsb_bases^2 products).
    count_scales: count the quantizer parameters (weight scales, activation alphas / 8-bit steps, ASM
        thresholds, GSB basis scales) in parameters and storage. Many papers leave them out.
    """

    patch_embed: str = "method"
    head: str = "method"
    multibit_macs: str = "bops"
    flops_per_mac: int = 1
    elementwise: bool = False
    ternary_bits: str = "2"
    gsb_bases: int = 3
    count_scales: bool = True

    def __post_init__(self):
        for name, choices in (("patch_embed", EDGE_CHOICES), ("head", EDGE_CHOICES),
                              ("multibit_macs", MULTIBIT_MACS_CHOICES), ("flops_per_mac", FLOPS_PER_MAC_CHOICES),
                              ("ternary_bits", TERNARY_BITS_CHOICES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("elementwise", "count_scales"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.gsb_bases, int) or isinstance(self.gsb_bases, bool) or self.gsb_bases < 1:
            raise ValueError(f"gsb_bases must be a positive integer, got {self.gsb_bases!r}")


@dataclass(frozen=True)
class Part:
    """One stored tensor (or group of scalars) of a layer: how many numbers, and their bytes as
    deployed (a float only for the log2(3) ternary bound)."""

    count: int
    nbytes: float


@dataclass(frozen=True)
class LayerCost:
    """One layer. `storage` maps part names ("weight", "weight_scale", "bias", "act_scale",
    "act_threshold", "q.act_scale", "gsb_bias", ...) to Parts; `precision` reads e.g. "W1A1", "W2A8",
    "W8A8", "1b x 1b", "FP32"."""

    name: str
    group: str
    precision: str
    storage: dict = field(default_factory=dict)
    macs: int = 0
    flops: int = 0
    bops: int = 0

    @property
    def params(self):
        return sum(p.count for p in self.storage.values())

    @property
    def fp32_bytes(self):
        return 4 * self.params

    @property
    def packed_bytes(self):
        return sum(p.nbytes for p in self.storage.values())

    @property
    def ops(self):
        return self.flops + self.bops / 64

    def to_dict(self):
        return {"name": self.name, "group": self.group, "precision": self.precision,
                "params": self.params, "fp32_bytes": self.fp32_bytes, "packed_bytes": self.packed_bytes,
                "storage": {k: {"count": p.count, "bytes": p.nbytes} for k, p in self.storage.items()},
                "macs": self.macs, "flops": self.flops, "bops": self.bops, "ops": self.ops}


@dataclass(frozen=True)
class Totals:
    params: int
    fp32_bytes: int
    packed_bytes: float
    macs: int
    flops: int
    bops: int

    @property
    def ops(self):
        return self.flops + self.bops / 64

    @classmethod
    def of(cls, rows):
        return cls(params=sum(r.params for r in rows), fp32_bytes=sum(r.fp32_bytes for r in rows),
                   packed_bytes=sum(r.packed_bytes for r in rows), macs=sum(r.macs for r in rows),
                   flops=sum(r.flops for r in rows), bops=sum(r.bops for r in rows))

    def to_dict(self):
        return {**asdict(self), "ops": self.ops}


@dataclass(frozen=True)
class CostReport:
    """Rows of one model under one method, and `reference`, the totals of the FP32 model of the same
    shape under the same conventions (the denominator-free side of every ratio)."""

    model: str
    method: str
    batch: int
    conventions: Conventions
    rows: tuple
    reference: Totals

    @property
    def totals(self):
        return Totals.of(self.rows)

    @property
    def size_ratio(self):
        """FP32 model bytes / this model's deployed bytes."""
        return self.reference.packed_bytes / self.totals.packed_bytes

    @property
    def ops_ratio(self):
        """FP32 model OPs / this model's OPs."""
        return self.reference.ops / self.totals.ops

    def groups(self):
        """Totals per row group, in order of first appearance."""
        order = list(dict.fromkeys(r.group for r in self.rows))
        return {g: Totals.of([r for r in self.rows if r.group == g]) for g in order}

    def to_dict(self):
        return {"model": self.model, "method": self.method, "batch": self.batch,
                "conventions": asdict(self.conventions), "totals": self.totals.to_dict(),
                "reference_fp32": self.reference.to_dict(), "size_ratio": self.size_ratio,
                "ops_ratio": self.ops_ratio, "groups": {g: t.to_dict() for g, t in self.groups().items()},
                "rows": [r.to_dict() for r in self.rows]}


# ------------------------------------------------------------------------------------------------
# precisions


def _precision(method):
    """Bits of (weight, input) of the block linears, of (Q, K) and (A, V) of the attention matmuls, and
    the quantizer extras: the registry's minibvit.methods.Method.precision. 32 = FP32, 2 = ternary."""
    return methods.get_method(method).precision


def _edge_bits(choice, method):
    """(weight, input) bits of the patch embedding or the head under a Conventions choice."""
    if not _precision(method).quantized or choice == "fp32":
        return FP32, FP32
    if choice == "block":
        return _precision(method).linear
    return 8, 8


def _precision_label(w_bits, a_bits):
    if w_bits == FP32 and a_bits == FP32:
        return "FP32"
    return f"W{w_bits}A{a_bits}"


def _operand_label(a_bits, b_bits):
    return "FP32" if FP32 in (a_bits, b_bits) else f"{a_bits}b x {b_bits}b"


def _mac_cost(a_bits, b_bits, macs, conv):
    """(flops, bops) of `macs` multiply-accumulates with operands of a_bits and b_bits."""
    n = macs * conv.flops_per_mac
    if FP32 in (a_bits, b_bits):
        return n, 0
    if a_bits == 1 and b_bits == 1:
        return 0, n
    if conv.multibit_macs == "flops":
        return n, 0
    return 0, n * a_bits * b_bits


def _weight_bytes(bits, k, n, conv):
    """Deployed bytes of an (n, k) weight: FP32 4 B, int8 1 B, binary ceil(k/64) words of 8 B per row,
    ternary two such bit-planes (or k n log2(3) / 8 with ternary_bits="log2(3)")."""
    words = math.ceil(k / WORD_BITS) * 8 * n
    if bits == FP32:
        return 4 * k * n
    if bits == 8:
        return k * n
    if bits == 1:
        return words
    if bits == 2:
        return 2 * words if conv.ternary_bits == "2" else k * n * math.log2(3) / 8
    raise ValueError(f"no storage rule for {bits}-bit weights")


def _fp32_part(count):
    return Part(count, 4 * count)


# Storage parts that are quantizer parameters, dropped with count_scales=False.
QUANTIZER_PARTS = ("weight_scale", "act_scale", "act_threshold", "basis_scales")


def _kept(storage, conv):
    if conv.count_scales:
        return storage
    return {k: p for k, p in storage.items() if not k.endswith(QUANTIZER_PARTS)}


def _act_quantizer(method, bits, channels, prefix="", probabilities=False):
    """Stored parameters of one activation quantizer (as minibvit.methods sets them up and
    minibvit.engine.export stores them): a 1-bit binarizer's FP32 alpha and, for binaryvit, its
    per-channel ASM threshold (channels = the binarized tensor's last axis) in front of every
    activation binarizer but the attention probabilities. An 8-bit activation is min-max quantized
    with a step (and zero point) taken from each batch at run time: nothing is stored."""
    if bits != 1:
        return {}
    parts = {f"{prefix}act_scale": _fp32_part(1)}
    if _precision(method).asm_thresholds and not probabilities:
        parts[f"{prefix}act_threshold"] = _fp32_part(channels)
    return parts


def _quantize_flops(bits):
    return {FP32: 0, 1: ELEMENTWISE_FLOPS["binarize"], 8: ELEMENTWISE_FLOPS["quantize8"]}[bits]


# ------------------------------------------------------------------------------------------------
# row builders


def _linear(name, group, rows, k, n, bias, bits, method, conv):
    """A linear layer applied to `rows` input rows of width k, output width n."""
    w_bits, a_bits = bits
    storage = {"weight": Part(k * n, _weight_bytes(w_bits, k, n, conv))}
    if w_bits != FP32:
        storage["weight_scale"] = _fp32_part(n)  # per output channel
    if bias:
        storage["bias"] = _fp32_part(n)
    storage.update(_act_quantizer(method, a_bits, k))
    macs = rows * k * n
    flops, bops = _mac_cost(w_bits, a_bits, macs, conv)
    if conv.elementwise:
        rescale = ELEMENTWISE_FLOPS["scale"] if w_bits != FP32 else 0
        bias_add = ELEMENTWISE_FLOPS["add"] if bias else 0
        flops += rows * k * _quantize_flops(a_bits) + rows * n * (rescale + bias_add)
    return LayerCost(name, group, _precision_label(w_bits, a_bits), _kept(storage, conv), macs, flops, bops)


def _elementwise(name, group, elements, kind, conv, params=0):
    """Element-wise FP32 work over `elements` values; `params` FP32 numbers stored with it."""
    storage = {"params": _fp32_part(params)} if params else {}
    flops = elements * ELEMENTWISE_FLOPS[kind] if conv.elementwise else 0
    return LayerCost(name, group, "FP32", storage, 0, flops, 0)


def _layernorm(name, group, rows, width, conv):
    return _elementwise(name, group, rows * width, "layernorm", conv, params=2 * width)


def _attention(prefix, method, conv, heads, head_dim, scores, outputs, macs, tokens, bias_table=0):
    """Rows of one attention core: Q.K^T, (relative position bias), softmax, A.V.

    scores: attention-score elements (B x windows x heads x n x n); outputs: elements of Q, K, V and of
    A.V (B x tokens x D); macs: MACs of each of the two matmuls; tokens: n, the keys per attention row
    (GSB's heads x n x n bias); bias_table:
    FP32 relative-position-bias entries (Swin)."""
    rows = []
    qk_bits, av_bits = _precision(method).qk, _precision(method).av
    ew = conv.elementwise

    # Q, K and V are binarized per head: their ASM thresholds have head_dim channels, shared by the heads
    storage = {**_act_quantizer(method, qk_bits[0], head_dim, "q."),
               **_act_quantizer(method, qk_bits[1], head_dim, "k.")}
    flops, bops = _mac_cost(*qk_bits, macs, conv)
    if ew:  # FP32: 1/sqrt(d) scaling; quantized: the rescale (1/sqrt(d) folded in) of each score
        flops += (outputs * (_quantize_flops(qk_bits[0]) + _quantize_flops(qk_bits[1]))
                  + scores * ELEMENTWISE_FLOPS["scale"])
    rows.append(LayerCost(f"{prefix}.q@k", "attention matmuls", _operand_label(*qk_bits), _kept(storage, conv), macs,
                          flops, bops))

    if bias_table:
        rows.append(_elementwise(f"{prefix}.relative_position_bias_table", "position tokens/tables", scores, "add",
                                 conv, params=bias_table))
    rows.append(_elementwise(f"{prefix}.softmax", "softmax", scores, "softmax", conv))

    if _precision(method).gsb_attention:
        nb = conv.gsb_bases
        storage = {"attn.gsb_bias": _fp32_part(heads * tokens * tokens), "attn.basis_scales": _fp32_part(nb),
                   "v.shift": _fp32_part(heads * head_dim), "v.basis_scales": _fp32_part(nb)}
        flops, bops = _mac_cost(1, 1, nb * nb * macs, conv)
        if ew:  # bias add and masks on A, shift and masks on V, combine nb^2 scaled products
            flops += (scores * (ELEMENTWISE_FLOPS["add"] + nb * ELEMENTWISE_FLOPS["gsb_mask"])
                      + outputs * (ELEMENTWISE_FLOPS["add"] + nb * ELEMENTWISE_FLOPS["gsb_mask"])
                      + outputs * nb * nb * ELEMENTWISE_FLOPS["gsb_combine"])
        label = f"{nb}x{nb} 1b x 1b"
    else:
        storage = {**_act_quantizer(method, av_bits[0], tokens, "attn.", probabilities=True),
                   **_act_quantizer(method, av_bits[1], head_dim, "v.")}
        flops, bops = _mac_cost(*av_bits, macs, conv)
        if ew:
            rescale = ELEMENTWISE_FLOPS["scale"] * outputs if av_bits[0] != FP32 else 0
            flops += scores * _quantize_flops(av_bits[0]) + outputs * _quantize_flops(av_bits[1]) + rescale
        label = _operand_label(*av_bits)
    rows.append(LayerCost(f"{prefix}.a@v", "attention matmuls", label, _kept(storage, conv), macs, flops, bops))
    return rows


def _mlp(prefix, rows, dim, hidden, bits, method, conv):
    return [_linear(f"{prefix}.fc1", "block linears", rows, dim, hidden, True, bits, method, conv),
            _elementwise(f"{prefix}.gelu", "GELU", rows * hidden, "gelu", conv),
            _linear(f"{prefix}.fc2", "block linears", rows, hidden, dim, True, bits, method, conv)]


# ------------------------------------------------------------------------------------------------
# models


def _vit_rows(cfg, method, batch, conv):
    D, H, depth = cfg.embed_dim, cfg.num_heads, cfg.depth
    hd, hidden = D // H, int(D * cfg.mlp_ratio)
    p = cfg.patch_size
    patches = (cfg.image_size // p) ** 2
    distilled = bool(getattr(cfg, "distilled", False)) or _precision(method).distilled
    N = patches + 1 + distilled
    T = batch * N  # token rows
    lin_bits = _precision(method).linear
    pe_bits, head_bits = _edge_bits(conv.patch_embed, method), _edge_bits(conv.head, method)

    rows = [_linear("patch_embed.proj", "patch embedding", batch * patches, cfg.in_chans * p * p, D, True, pe_bits,
                    method, conv),
            LayerCost("cls_token", "position tokens/tables", "FP32", {"params": _fp32_part(D)})]
    if distilled:
        rows.append(LayerCost("dist_token", "position tokens/tables", "FP32", {"params": _fp32_part(D)}))
    rows.append(_elementwise("pos_embed", "position tokens/tables", T * D, "add", conv, params=N * D))
    for i in range(depth):
        b = f"blocks.{i}"
        rows.append(_layernorm(f"{b}.norm1", "LayerNorm", T, D, conv))
        rows.append(_linear(f"{b}.attn.qkv", "block linears", T, D, 3 * D, cfg.qkv_bias, lin_bits, method, conv))
        rows += _attention(f"{b}.attn", method, conv, H, hd, scores=batch * H * N * N, outputs=T * D,
                           macs=batch * H * N * N * hd, tokens=N)
        rows.append(_linear(f"{b}.attn.proj", "block linears", T, D, D, True, lin_bits, method, conv))
        rows.append(_elementwise(f"{b}.add1", "residual adds", T * D, "add", conv))
        rows.append(_layernorm(f"{b}.norm2", "LayerNorm", T, D, conv))
        rows += _mlp(f"{b}.mlp", T, D, hidden, lin_bits, method, conv)
        rows.append(_elementwise(f"{b}.add2", "residual adds", T * D, "add", conv))
    rows.append(_layernorm("norm", "LayerNorm", T, D, conv))
    if getattr(cfg, "global_pool", "token") == "mean":
        rows.append(_elementwise("pool", "head", batch * patches * D, "add", conv))
    rows.append(_linear("head", "head", batch, D, cfg.num_classes, True, head_bits, method, conv))
    if distilled:
        rows.append(_linear("head_dist", "head", batch, D, cfg.num_classes, True, head_bits, method, conv))
        rows.append(_elementwise("head_mean", "head", 2 * batch * cfg.num_classes, "add", conv))
    return rows


def _swin_rows(cfg, method, batch, conv):
    if _precision(method).gsb_attention:
        raise ValueError(f"method {method!r} is defined for ViT/DeiT only (it needs a class token, a distillation "
                         "token and a fixed token count); use a deit-* preset or another method")
    lin_bits = _precision(method).linear
    pe_bits, head_bits = _edge_bits(conv.patch_embed, method), _edge_bits(conv.head, method)
    w = cfg.window_size
    side = cfg.image_size // cfg.patch_size
    C = cfg.embed_dim
    rows = [_linear("patch_embed.proj", "patch embedding", batch * side * side, cfg.in_chans * cfg.patch_size ** 2,
                    C, True, pe_bits, method, conv),
            _layernorm("patch_embed.norm", "LayerNorm", batch * side * side, C, conv)]
    for s, (depth, H) in enumerate(zip(cfg.depths, cfg.num_heads)):
        win = min(w, side)  # Swin shrinks the window to the feature map (and stops shifting)
        T = batch * side * side
        for i in range(depth):
            b = f"layers.{s}.blocks.{i}"
            rows.append(_layernorm(f"{b}.norm1", "LayerNorm", T, C, conv))
            rows.append(_linear(f"{b}.attn.qkv", "block linears", T, C, 3 * C, cfg.qkv_bias, lin_bits, method, conv))
            rows += _attention(f"{b}.attn", method, conv, H, C // H, scores=T * H * win * win, outputs=T * C,
                               macs=T * win * win * C, tokens=win * win, bias_table=(2 * win - 1) ** 2 * H)
            rows.append(_linear(f"{b}.attn.proj", "block linears", T, C, C, True, lin_bits, method, conv))
            rows.append(_elementwise(f"{b}.add1", "residual adds", T * C, "add", conv))
            rows.append(_layernorm(f"{b}.norm2", "LayerNorm", T, C, conv))
            rows += _mlp(f"{b}.mlp", T, C, int(C * cfg.mlp_ratio), lin_bits, method, conv)
            rows.append(_elementwise(f"{b}.add2", "residual adds", T * C, "add", conv))
        if s < len(cfg.depths) - 1:
            side //= 2
            merged = batch * side * side
            rows.append(_layernorm(f"layers.{s}.downsample.norm", "LayerNorm", merged, 4 * C, conv))
            rows.append(_linear(f"layers.{s}.downsample.reduction", "patch merging", merged, 4 * C, 2 * C, False,
                                lin_bits, method, conv))
            C *= 2
    rows.append(_layernorm("norm", "LayerNorm", batch * side * side, C, conv))
    rows.append(_elementwise("pool", "head", batch * side * side * C, "add", conv))
    rows.append(_linear("head", "head", batch, C, cfg.num_classes, True, head_bits, method, conv))
    return rows


_VIT_FIELDS = ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
               "num_classes", "qkv_bias")
_SWIN_FIELDS = ("image_size", "patch_size", "in_chans", "embed_dim", "depths", "num_heads", "window_size",
                "mlp_ratio", "num_classes", "qkv_bias")


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _resolve(cfg):
    """(name, shape, builder) for a preset name or a ViT / Swin config object."""
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise ValueError(f"unknown preset {cfg!r}; choose one of {sorted(PRESETS)} or pass a config object")
        name, cfg = cfg, PRESETS[cfg]
    else:
        name = None
    is_swin = hasattr(cfg, "depths")
    needed = _SWIN_FIELDS if is_swin else _VIT_FIELDS
    missing = [f for f in needed if not hasattr(cfg, f)]
    if missing:
        raise TypeError(f"{type(cfg).__name__} is not a ViT or Swin config: it lacks {missing}; pass a preset name "
                        f"({sorted(PRESETS)}), a minibvit ViTConfig, or a cost.ViTShape / cost.SwinShape")
    for f in ("image_size", "patch_size", "in_chans", "embed_dim", "num_classes") + (
            ("window_size",) if is_swin else ("depth", "num_heads")):
        _positive_int(getattr(cfg, f), f)
    if not int(cfg.embed_dim * cfg.mlp_ratio) >= 1:
        raise ValueError(f"mlp_ratio {cfg.mlp_ratio!r} gives an MLP width int(embed_dim * mlp_ratio) below 1")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} must be divisible by patch_size {cfg.patch_size}")
    if is_swin:
        if len(cfg.depths) != len(cfg.num_heads) or not cfg.depths:
            raise ValueError(f"depths {cfg.depths} and num_heads {cfg.num_heads} must be non-empty and of one length")
        side, C = cfg.image_size // cfg.patch_size, cfg.embed_dim
        for s, (d, h) in enumerate(zip(cfg.depths, cfg.num_heads)):
            _positive_int(d, f"depths[{s}]")
            _positive_int(h, f"num_heads[{s}]")
            if C % h:
                raise ValueError(f"stage {s}: width {C} must be divisible by num_heads {h}")
            if side % min(cfg.window_size, side):
                raise ValueError(f"stage {s}: feature map side {side} must be divisible by window_size "
                                 f"{cfg.window_size}")
            if s < len(cfg.depths) - 1:
                if side % 2:
                    raise ValueError(f"stage {s}: feature map side {side} must be even for patch merging")
                side, C = side // 2, 2 * C
        name = name or (f"Swin(embed_dim={cfg.embed_dim}, depths={tuple(cfg.depths)}, "
                        f"window={cfg.window_size}, {cfg.image_size}px)")
        return name, cfg, _swin_rows
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"embed_dim {cfg.embed_dim} must be divisible by num_heads {cfg.num_heads}")
    name = name or (f"ViT(embed_dim={cfg.embed_dim}, depth={cfg.depth}, heads={cfg.num_heads}, "
                    f"{cfg.image_size}px/{cfg.patch_size})")
    return name, cfg, _vit_rows


def model_cost(cfg_or_preset, method, batch=1, *, patch_embed="method", head="method", multibit_macs="bops",
               flops_per_mac=1, elementwise=False, ternary_bits="2", gsb_bases=3, count_scales=True):
    """Per-layer and total parameters, storage, FLOPs, BOPs and OPs of a model under a method.

    Args:
      cfg_or_preset: a preset name (PRESETS: deit-tiny/small/base, swin-tiny/small), or a config object
        with ViT fields (image_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
        num_classes, qkv_bias; optional distilled, global_pool) or Swin fields (depths, num_heads tuples,
        window_size, ...), e.g. minibvit.model.ViTConfig, ViTShape or SwinShape.
      method: one of METHODS.
      batch: images per forward pass (scales MACs, FLOPs, BOPs; not storage).
      patch_embed, head, multibit_macs, flops_per_mac, elementwise, ternary_bits, gsb_bases, count_scales:
        the counting conventions, see Conventions.
    Returns: CostReport (rows, totals, reference FP32 totals, size_ratio, ops_ratio).
    """
    if method not in methods.METHODS:  # the live registry (METHODS is its snapshot at import)
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(methods.METHODS)}")
    _positive_int(batch, "batch")
    conv = Conventions(patch_embed=patch_embed, head=head, multibit_macs=multibit_macs, flops_per_mac=flops_per_mac,
                       elementwise=elementwise, ternary_bits=ternary_bits, gsb_bases=gsb_bases,
                       count_scales=count_scales)
    name, cfg, build = _resolve(cfg_or_preset)
    rows = tuple(build(cfg, method, batch, conv))
    reference = Totals.of(build(cfg, "fp", batch, conv))
    return CostReport(name, method, batch, conv, rows, reference)


# ------------------------------------------------------------------------------------------------
# printing


def _mb(nbytes):
    return f"{nbytes / 1e6:,.3f}"


def _m(count):
    return f"{count / 1e6:,.2f}"


def describe_conventions(conv):
    edge = {"method": "W8A8", "block": "as block linears", "int8": "W8A8", "fp32": "FP32"}
    mb = "b_w*b_a BOPs per MAC" if conv.multibit_macs == "bops" else "1 FLOP per MAC"
    counted = lambda flag: "counted" if flag else "not counted"
    return (f"patch embedding {edge[conv.patch_embed]}, head {edge[conv.head]}; multi-bit quantized MACs: {mb}; "
            f"{conv.flops_per_mac} op(s) per MAC; element-wise FLOPs {counted(conv.elementwise)}; ternary weights "
            f"{conv.ternary_bits} bits; GSB bases {conv.gsb_bases}; quantizer scales {counted(conv.count_scales)}")


def _table(header, lines):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


_COLUMNS = ["params", "FP32 MB", "packed MB", "MMACs", "MFLOPs", "MBOPs", "MOPs"]


def _cells(t):
    return [f"{t.params:,}", _mb(t.fp32_bytes), _mb(t.packed_bytes), _m(t.macs), _m(t.flops), _m(t.bops), _m(t.ops)]


def format_report(report, per_layer=False):
    """A readable table: one line per group (or per layer with per_layer), then totals and ratios.
    MB = 10^6 bytes; M = 10^6."""
    if per_layer:
        body = _table(["layer", "precision"] + _COLUMNS, [[r.name, r.precision] + _cells(Totals.of([r]))
                                                          for r in report.rows])
    else:
        body = _table(["group"] + _COLUMNS, [[g] + _cells(t) for g, t in report.groups().items()])
    t, ref = report.totals, report.reference
    return "\n".join([
        f"{report.model} | method {report.method} | batch {report.batch}",
        f"conventions: {describe_conventions(report.conventions)}",
        "",
        body,
        "",
        _table(["", *_COLUMNS], [["total", *_cells(t)], ["FP32 model", *_cells(ref)]]),
        "",
        f"size: {_mb(ref.packed_bytes)} MB FP32 -> {_mb(t.packed_bytes)} MB packed ({report.size_ratio:.2f}x smaller)",
        f"OPs:  {_m(ref.ops)} M FP32 -> {_m(t.ops)} M ({report.ops_ratio:.2f}x fewer)",
    ])


def format_comparison(reports):
    """One line per report: totals and ratios to FP32."""
    lines = [[r.model, r.method, f"{r.totals.params:,}", _mb(r.totals.packed_bytes), f"{r.size_ratio:.2f}",
              _m(r.totals.flops), _m(r.totals.bops), _m(r.totals.ops), f"{r.ops_ratio:.2f}"] for r in reports]
    header = ["model", "method", "params", "packed MB", "size x", "MFLOPs", "MBOPs", "MOPs", "OPs x"]
    return (f"batch {reports[0].batch}; conventions: {describe_conventions(reports[0].conventions)}\n\n"
            + _table(header, lines))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m minibvit.cost",
        description="Parameters, storage, FLOPs, BOPs and OPs (= FLOPs + BOPs/64) of DeiT/Swin under "
                    "the project's low-bit methods. One preset and one method print the full report; "
                    "several print a comparison.")
    parser.add_argument("--preset", nargs="+", required=True, metavar="NAME",
                        help=f"one or more of {', '.join(PRESETS)}")
    parser.add_argument("--method", nargs="+", required=True, metavar="METHOD",
                        help=f"one or more of {', '.join(METHODS)}")
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--per-layer", action="store_true", help="one line per layer instead of per group")
    parser.add_argument("--json", action="store_true", help="print JSON (a list for several reports)")
    parser.add_argument("--patch-embed", choices=EDGE_CHOICES, default="method",
                        help="precision of the patch embedding in a low-bit model: method (= W8A8, default), "
                             "block (as the block linears), int8 or fp32")
    parser.add_argument("--head", choices=EDGE_CHOICES, default="method",
                        help="precision of the head(s) in a low-bit model (choices as --patch-embed)")
    parser.add_argument("--multibit-macs", choices=MULTIBIT_MACS_CHOICES, default="bops",
                        help="count a quantized multi-bit MAC as b_w*b_a BOPs (default) or as one FLOP")
    parser.add_argument("--flops-per-mac", type=int, choices=FLOPS_PER_MAC_CHOICES, default=1,
                        help="operations per multiply-accumulate (default 1, as DeiT/Swin/fvcore 'FLOPs')")
    parser.add_argument("--elementwise", action="store_true",
                        help="count LayerNorm/softmax/GELU/add/quantizer FLOPs (default: not counted)")
    parser.add_argument("--ternary-bits", choices=TERNARY_BITS_CHOICES, default="2",
                        help="storage of a ternary weight: 2 bit-planes (default) or the log2(3) bound")
    parser.add_argument("--gsb-bases", type=int, default=3, help="GSB binary bases of A and of V (default 3)")
    parser.add_argument("--no-scales", action="store_true",
                        help="leave quantizer scales/thresholds out of parameters and storage (default: counted)")
    args = parser.parse_args(argv)
    for p in args.preset:
        if p not in PRESETS:
            parser.error(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}")
    for m in args.method:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    options = dict(patch_embed=args.patch_embed, head=args.head, multibit_macs=args.multibit_macs,
                   flops_per_mac=args.flops_per_mac, elementwise=args.elementwise, ternary_bits=args.ternary_bits,
                   gsb_bases=args.gsb_bases, count_scales=not args.no_scales)
    try:
        reports = [model_cost(p, m, args.batch, **options) for p in args.preset for m in args.method]
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        out = [r.to_dict() for r in reports]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=1))
    elif len(reports) == 1:
        print(format_report(reports[0], per_layer=args.per_layer))
    else:
        print(format_comparison(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
