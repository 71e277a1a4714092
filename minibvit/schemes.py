"""Which quantizer sits on which tensor: one table per method.

A method is a choice of quantizer per tensor role, never a copy of the model. Roles are

    patch_embed.proj.weight, patch_embed.proj.input
    blocks.<i>.attn.qkv.weight / .input, blocks.<i>.attn.proj.weight / .input,
    blocks.<i>.mlp.fc1.weight / .input, blocks.<i>.mlp.fc2.weight / .input,
    blocks.<i>.attn.q, blocks.<i>.attn.k   (before Q K^T)
    blocks.<i>.attn.attn                   (the softmax probabilities, before A V)
    blocks.<i>.attn.v                      (the values, before A V)
    head.weight / .input, head_dist.weight / .input

A table maps shell-style patterns (fnmatch: ``*`` also matches dots) to quantizer specs; for each
role the LAST matching pattern wins, so overrides are appended. Specs are the names of
``minibvit.quant.QUANTIZER_SPECS`` plus ``asm:<spec>`` (the activation shift module in front of an
activation binarizer), ``gsb_attn`` and ``gsb_value`` (minibvit.methods). Roles that match no
pattern, and the spec ``fp``, stay full precision. LayerNorm, softmax, GELU and residual adds are
full precision in every method.
"""
from dataclasses import dataclass
from fnmatch import fnmatchcase

from . import methods, quant

_BINARY = {
    "patch_embed.proj.weight": "w_minmax8",
    "patch_embed.proj.input": "a_minmax8_signed",
    "blocks.*.attn.qkv.weight": "w_binary",
    "blocks.*.attn.qkv.input": "a_elastic_signed",
    "blocks.*.attn.q": "a_elastic_signed",
    "blocks.*.attn.k": "a_elastic_signed",
    "blocks.*.attn.attn": "a_elastic_unsigned",
    "blocks.*.attn.v": "a_elastic_signed",
    "blocks.*.attn.proj.weight": "w_binary",
    "blocks.*.attn.proj.input": "a_elastic_signed",
    "blocks.*.mlp.fc1.weight": "w_binary",
    "blocks.*.mlp.fc1.input": "a_elastic_signed",
    "blocks.*.mlp.fc2.weight": "w_binary",
    "blocks.*.mlp.fc2.input": "a_elastic_unsigned",  # post-GELU: {0, alpha}
    "head*.weight": "w_minmax8",
    "head*.input": "a_minmax8_signed",
}

# BinaryViT (reconstruction): the baseline with ASM in front of every activation binarizer except the
# attention probabilities (a non-negative, row-normalised tensor whose threshold is already learnt
# through alpha). GRS acts on the gradients of every "w_binary" weight (see minibvit.train).
_BINARYVIT = {**_BINARY, **{role: f"asm:{spec}" for role, spec in _BINARY.items()
                            if spec.startswith("a_elastic") and not role.endswith("attn.attn")}}

# GSB: the baseline with the refined alpha gradient in every signed elastic binarizer and group
# superposition binarization of A and V. The model also has a distillation token (train.py).
_GSB = {**{role: ("a_elastic_signed_gsb" if spec == "a_elastic_signed" else spec) for role, spec in _BINARY.items()},
        "blocks.*.attn.attn": "gsb_attn", "blocks.*.attn.v": "gsb_value"}

# TerViT: 8-bit activations everywhere; stage 1 has 8-bit weights, stage 2 ternary channel-wise weights.
_TERVIT_W8A8 = {
    "patch_embed.proj.weight": "w_minmax8",
    "patch_embed.proj.input": "a_minmax8_signed",
    "blocks.*.weight": "w_minmax8",
    "blocks.*.input": "a_minmax8_signed",
    "blocks.*.mlp.fc2.input": "a_minmax8_unsigned",  # post-GELU, min >= -0.17: asymmetric range
    "blocks.*.attn.q": "a_minmax8_signed",
    "blocks.*.attn.k": "a_minmax8_signed",
    "blocks.*.attn.attn": "a_minmax8_unsigned",
    "blocks.*.attn.v": "a_minmax8_signed",
    "head*.weight": "w_minmax8",
    "head*.input": "a_minmax8_signed",
}

SCHEMES = {
    "fp": {},
    "binary": _BINARY,
    "binaryvit": _BINARYVIT,
    "gsb_stage1": {"blocks.*.mlp.fc1.weight": "w_binary", "blocks.*.mlp.fc2.weight": "w_binary"},
    "gsb": _GSB,
    "tervit_w8a8": _TERVIT_W8A8,
    "tervit": {**_TERVIT_W8A8, "blocks.*.attn.*.weight": "w_ternary_channel", "blocks.*.mlp.*.weight": "w_ternary_channel"},
}


@dataclass
class SchemeOptions:
    """Method switches that choose among a quantizer's variants."""

    asm_center: str = "mean"  # ASM data-driven centre: "mean", "median", "token" or "none"
    asm_momentum: float = 0.1
    gsb_mode: str = "official"  # "official" (the published code's gradients) or "principled"
    gsb_max_over: str = "tensor"  # GSB attention masks: max over the whole tensor or per "row"


def tensor_roles(cfg):
    """Every quantizable tensor role of a model config, in forward order."""
    roles = ["patch_embed.proj.weight", "patch_embed.proj.input"]
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        roles += [f"{b}.attn.qkv.weight", f"{b}.attn.qkv.input", f"{b}.attn.q", f"{b}.attn.k", f"{b}.attn.attn",
                  f"{b}.attn.v", f"{b}.attn.proj.weight", f"{b}.attn.proj.input", f"{b}.mlp.fc1.weight",
                  f"{b}.mlp.fc1.input", f"{b}.mlp.fc2.weight", f"{b}.mlp.fc2.input"]
    roles += ["head.weight", "head.input"]
    if cfg.distilled:
        roles += ["head_dist.weight", "head_dist.input"]
    return roles


def resolve(cfg, method, overrides=None):
    """{role: spec} for every quantized role of ``method`` with ``overrides`` (pattern -> spec)
    applied on top. Unknown methods or specs raise ValueError."""
    if method not in SCHEMES:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(SCHEMES)}")
    table = {**SCHEMES[method], **(overrides or {})}
    for spec in table.values():
        _check_spec(spec)
    out = {}
    for role in tensor_roles(cfg):
        spec = None
        for pattern, s in table.items():
            if fnmatchcase(role, pattern):
                spec = s
        if spec is not None and spec != "fp":
            out[role] = spec
    return out


def _check_spec(spec):
    base = spec[4:] if spec.startswith("asm:") else spec
    if base not in quant.QUANTIZER_SPECS and base not in ("gsb_attn", "gsb_value"):
        valid = sorted(quant.QUANTIZER_SPECS) + ["gsb_attn", "gsb_value", "asm:<activation spec>"]
        raise ValueError(f"unknown quantizer spec {spec!r}; valid specs: {', '.join(valid)}")


def _channels(cfg, role):
    """Channel count on the last axis of the tensor a role quantizes."""
    if role.endswith(("attn.q", "attn.k", "attn.v")):
        return cfg.embed_dim // cfg.num_heads
    if role.endswith("mlp.fc2.input"):
        return cfg.mlp_hidden
    if role == "patch_embed.proj.input":
        raise ValueError("ASM needs channels on the last axis; the patch-embedding input (B, C, H, W) has none")
    return cfg.embed_dim


def build_quantizers(cfg, method, overrides=None, options=None, dtype="float32"):
    """Fresh quantizer objects {role: quantizer} for a model config and method."""
    options = options or SchemeOptions()
    out = {}
    for role, spec in resolve(cfg, method, overrides).items():
        if spec == "gsb_attn":
            q = methods.GSBAttnQuantizer(cfg.num_heads, cfg.num_tokens, mode=options.gsb_mode,
                                         max_over=options.gsb_max_over, dtype=dtype)
        elif spec == "gsb_value":
            q = methods.GSBValueQuantizer(cfg.num_heads, cfg.embed_dim // cfg.num_heads, mode=options.gsb_mode, dtype=dtype)
        elif spec.startswith("asm:"):
            q = methods.ASM(quant.make_quantizer(spec[4:], dtype=dtype), _channels(cfg, role), center=options.asm_center,
                            momentum=options.asm_momentum, dtype=dtype)
        else:
            q = quant.make_quantizer(spec, dtype=dtype)
        out[role] = q
    return out


def binarized_weight_roles(quantizers):
    """Roles whose quantizer binarizes a latent weight (where GRS and the flip-rate diagnostics apply)."""
    return [role for role, q in quantizers.items() if isinstance(q, quant.WeightBinarizer)]


def describe(method, overrides=None):
    """The pattern table of a method as Markdown rows (used by docs and --help)."""
    table = {**SCHEMES[method], **(overrides or {})}
    return "\n".join(f"| `{pattern}` | `{spec}` |" for pattern, spec in table.items())
