"""The packed model file: export a trained checkpoint to it, read it back, check it.

Packed file: safetensors with the minibvit metadata of minibvit.checkpoint (``kind`` =
"minibvit-packed"). Its tensors are described once, by _format: tensor_specs(cfg, scheme, options)
gives {name: TensorSpec(dtype, shape, content, packed_k)}; export writes exactly those tensors, in
those dtypes and shapes, and read_packed / check_tensors refuse a file with anything else (a missing,
unexpected or retyped tensor, a wrong shape, a set bit in a bit-plane's zero tail). docs/engine.md
lists the format. packed_kind(scheme) says how a quantizer table's blocks are packed and run ("binary", "ternary" or
"gsb"): it reads the table's ``packed`` attribute in the method registry (minibvit.methods), so the
engine never looks at a method's name.
"""
import functools
import math
import os
from dataclasses import dataclass, fields

import numpy as np

from .. import checkpoint, kernels, methods, quant
from ..binaryvit import ASM, asm_fold_threshold
from ..gsb import GSBAttnQuantizer, GSBValueQuantizer
from ..kernels.pack import words
from ..model import ViTConfig

PACKED_KIND = "minibvit-packed"
PACKED_VERSION = 1
# The quantizer tables with a packed form, from the registry; engine code branches on the kind.
EXPORTABLE_SCHEMES = tuple(name for name, table in methods.TABLES.items() if table.packed)
_F32 = np.float32


def packed_kind(scheme):
    """"binary" (sign-binary weights and activations), "ternary" (TerViT: ternary weights, 8-bit
    activations) or "gsb" (binary, with GSB's group-superposition attention) for an exportable
    method; ValueError for one without a packed form."""
    if scheme not in EXPORTABLE_SCHEMES:
        raise ValueError(f"the packed engine runs {EXPORTABLE_SCHEMES}, not {scheme!r}")
    return methods.TABLES[scheme].packed


# ---------------------------------------------------------------------------------------------
# the format: one table of every tensor, which export writes from and the loader checks against
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the packed format: its dtype, exact shape and content. ``packed_k`` > 0 marks a
    word-major bit-plane [ceil(K / 64), N] of K-long rows: the tail of its last word (bits K % 64 ..
    63 of row W - 1) must be zero (the kernels' zero-tail contract, kernels.pack)."""

    dtype: np.dtype
    shape: tuple
    content: str
    packed_k: int = 0

    def describe(self):
        return f"{self.dtype} {list(self.shape)}"


_U64, _I8, _F32_DTYPE = np.dtype(np.uint64), np.dtype(np.int8), np.dtype(_F32)


def _effective_scale(alpha):
    """A learnt scale as the quantizer's forward uses it: max(alpha, SCALE_FLOOR) in float32."""
    return np.maximum(alpha.astype(_F32), _F32(quant.SCALE_FLOOR))


def _trained(q, name, param, what):
    """q.params[param], refused while NaN (set by the first training forward)."""
    value = q.params[param]
    if np.isnan(value).any():
        raise ValueError(f"export: {name} has {what}; export a trained checkpoint")
    return value


def _weight_entries(name, q, shape, w):
    """Tensors of linear ``name``'s weight quantizer q for a weight of ``shape`` (N, ...):
    {tensor: (TensorSpec, value)}; value() packs the latent weight w with q's own integer form."""
    n, k = shape[0], math.prod(shape[1:])
    form = functools.cache(lambda: q.integer_form(q.forward(w, False)[1]))

    def levels():
        return form()[0].reshape(n, k)

    if isinstance(q, quant.WeightBinarizer):
        entries = {f"{name}.weight_bits": (TensorSpec(_U64, (words(k), n), "sign bits of W - mean_row(W) "
                                                      "(bit 1 = -1), word-major (kernels.pack_weight)", k),
                                           lambda: kernels.pack_weight(levels()))}
    elif isinstance(q, quant.Ternarizer):
        planes = functools.cache(lambda: kernels.pack_ternary_weight(levels()))
        entries = {f"{name}.weight_nonzero": (TensorSpec(_U64, (words(k), n), "ternary weight != 0, word-major "
                                                         "(kernels.pack_ternary_weight)", k), lambda: planes()[0]),
                   f"{name}.weight_sign": (TensorSpec(_U64, (words(k), n), "ternary weight < 0, word-major "
                                                      "(kernels.pack_ternary_weight)", k), lambda: planes()[1])}
    elif isinstance(q, quant.MinMaxQuantizer) and q.bits == 8 and q.signed and q.channel_axis == 0:
        entries = {f"{name}.weight_codes": (TensorSpec(_I8, tuple(shape), "8-bit min-max codes"), lambda: form()[0])}
    else:
        raise ValueError(f"export: no packed form for the weight quantizer {q!r} of {name}")
    entries[f"{name}.weight_scale"] = (TensorSpec(_F32_DTYPE, (n,), "per-output-channel weight scale"),
                                       lambda: np.broadcast_to(form()[1], (n,)))
    return entries


def _activation_entries(role, q, channels, cfg):
    """Tensors of activation quantizer q of ``role`` on ``channels`` channels: none for a dynamic
    8-bit quantizer (its scale comes from each batch); an elastic binarizer's floored alpha, with
    its ASM threshold (folded) or shift (centre 'token'); GSB's alphas and bias / shift."""
    H, N, d = cfg.num_heads, cfg.num_tokens, cfg.embed_dim // cfg.num_heads
    if isinstance(q, quant.MinMaxQuantizer):
        return {}
    if isinstance(q, (GSBAttnQuantizer, GSBValueQuantizer)):
        param, shape = ("bias", (H, N, N)) if isinstance(q, GSBAttnQuantizer) else ("shift", (H, d))
        return {f"{role}_alphas": (TensorSpec(_F32_DTYPE, (3,), "GSB's three scales (floored)"),
                                   lambda: _effective_scale(_trained(q, role, "alpha", "uninitialised GSB alphas"))),
                f"{role}_{param}": (TensorSpec(_F32_DTYPE, shape, f"GSB's learnt {param}"), lambda: q.params[param])}
    entries = {}
    binarizer = q
    if isinstance(q, ASM):
        asm, binarizer = q, q.inner
        if asm.center == "token":
            entries[f"{role}_shift"] = (TensorSpec(_F32_DTYPE, (channels,), "ASM shift (centre 'token': the "
                                                   "token's mean is added at run time)"),
                                        lambda: asm.params["shift"])
        else:
            entries[f"{role}_threshold"] = (TensorSpec(_F32_DTYPE, (channels,), "ASM threshold folded: running "
                                                       "centre + shift"), lambda: asm_fold_threshold(asm))
    if not isinstance(binarizer, quant.ElasticBinarizer):
        raise ValueError(f"export: no packed form for the activation quantizer {q!r} of {role}")
    entries[f"{role}_scale"] = (TensorSpec(_F32_DTYPE, (1,), "elastic alpha (floored)"),
                                lambda: _effective_scale(_trained(binarizer, role, "alpha", "an uninitialised alpha")))
    return entries


def _format(cfg, quantizers, params=None):
    """{tensor name: (TensorSpec, value)}: every tensor of the packed model of a config and its
    quantizers ({role: quantizer}, e.g. methods.build_quantizers). value() computes the stored
    tensor from the trained ``params`` and quantizers (export); tensor_specs uses the specs alone."""
    c, P = cfg, params or {}
    D, Hd, N, d = c.embed_dim, c.mlp_hidden, c.num_tokens, c.embed_dim // c.num_heads
    entries = {}

    def parameter(name, shape, content):
        entries[name] = (TensorSpec(_F32_DTYPE, shape, content), lambda: P[name])

    def activation(role, channels):
        entries.update(_activation_entries(role, quantizers.get(role), channels, c))

    def linear(name, shape, bias=True):
        entries.update(_weight_entries(name, quantizers.get(f"{name}.weight"), shape, P.get(f"{name}.weight")))
        if bias:
            parameter(f"{name}.bias", shape[:1], "bias, as trained")
        activation(f"{name}.input", math.prod(shape[1:]))

    parameter("cls_token", (1, 1, D), "as trained")
    if c.distilled:
        parameter("dist_token", (1, 1, D), "as trained")
    parameter("pos_embed", (1, N, D), "as trained")
    linear("patch_embed.proj", (D, c.in_chans, c.patch_size, c.patch_size))
    for i in range(c.depth):
        b = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            parameter(f"{b}.{norm}.weight", (D,), "LayerNorm weight, as trained")
            parameter(f"{b}.{norm}.bias", (D,), "LayerNorm bias, as trained")
        linear(f"{b}.attn.qkv", (3 * D, D), bias=c.qkv_bias)
        for role, channels in (("q", d), ("k", d), ("attn", N), ("v", d)):
            activation(f"{b}.attn.{role}", channels)
        linear(f"{b}.attn.proj", (D, D))
        linear(f"{b}.mlp.fc1", (Hd, D))
        linear(f"{b}.mlp.fc2", (D, Hd))
    parameter("norm.weight", (D,), "LayerNorm weight, as trained")
    parameter("norm.bias", (D,), "LayerNorm bias, as trained")
    for head in ("head", "head_dist") if c.distilled else ("head",):
        linear(head, (c.num_classes, D))
    return entries


def tensor_specs(cfg, scheme, options=None):
    """The packed format of a model: {tensor name: TensorSpec} for a config, an exportable quantizer
    table (scheme) and its options (methods.QuantizerOptions). Export writes exactly these tensors
    in these dtypes and shapes; the loader (check_tensors) refuses anything else."""
    packed_kind(scheme)
    quantizers = methods.build_quantizers(cfg, scheme, options=options)
    return {name: spec for name, (spec, _) in _format(cfg, quantizers).items()}


def format_problems(specs, tensors):
    """What is wrong with ``tensors`` against the format ``specs`` (tensor_specs): one line per
    problem (missing, unexpected, wrong dtype or shape, a set bit in a bit-plane's zero tail), [] if
    nothing. Reads only the shapes, dtypes and each bit-plane's last word row."""
    missing = [name for name in specs if name not in tensors]
    unexpected = sorted(name for name in tensors if name not in specs)
    present = {name: spec for name, spec in specs.items() if name in tensors}
    wrong = [name for name, spec in present.items()
             if _dtype(tensors[name]) != spec.dtype or np.shape(tensors[name]) != spec.shape]
    problems = ([f"missing: {_some(missing)}"] if missing else []) + \
        ([f"unexpected: {_some(unexpected)}"] if unexpected else []) + \
        [f"{name} is {_describe(tensors[name])}; the format stores {specs[name].describe()} ({specs[name].content})"
         for name in wrong[:_SHOWN]]
    if len(wrong) > _SHOWN:
        problems.append(f"... and {len(wrong) - _SHOWN} more tensors of the wrong dtype or shape")
    for name, spec in present.items():
        if spec.packed_k and name not in wrong:
            try:
                kernels.check_zero_tail(tensors[name], spec.packed_k, name, word_axis=0)
            except ValueError as error:
                problems.append(str(error))
    return problems


def check_tensors(cfg, scheme, options, tensors, source="the packed model"):
    """Refuse tensors that do not match the packed format of a model (tensor_specs): every tensor
    present, nothing else, each with its exact dtype and shape, and the zero tail of every bit-plane
    (format_problems). The CheckpointError names ``source``, each bad tensor and what to do: a
    damaged, edited or hand-made file is refused, never run to a wrong result or a kernel crash."""
    problems = format_problems(tensor_specs(cfg, scheme, options), tensors)
    if problems:
        raise checkpoint.CheckpointError(
            f"{source} does not match the packed format of its model_config and scheme {scheme!r}:\n  "
            + "\n  ".join(problems) + "\nThe file was damaged, edited or written by another program: export it "
            "again from its training checkpoint (python -m minibvit.infer export --checkpoint CHECKPOINT --out FILE).")


_SHOWN = 10  # problems of each kind listed in a message


def _some(names):
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _dtype(array):
    return getattr(array, "dtype", None)


def _describe(array):
    return f"{_dtype(array)} {list(np.shape(array))}"


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    """What export wrote. Sizes in bytes; ``ratio`` = fp32_bytes / file_bytes."""

    path: str
    scheme: str
    file_bytes: int
    fp32_bytes: int          # 4 bytes per parameter of the ViT (quantizer parameters not counted)
    ratio: float
    bytes_by_kind: dict      # "binary weight bits", "ternary weight bit-planes", "int8 codes", "float32"

    def summary(self):
        lines = [f"{self.path}: {self.scheme}, {self.file_bytes:,} bytes "
                 f"({self.file_bytes / 2 ** 20:.3f} MiB); FP32 parameters {self.fp32_bytes:,} bytes "
                 f"({self.fp32_bytes / 2 ** 20:.3f} MiB); ratio {self.ratio:.2f}x"]
        lines += [f"  {kind:<28} {size:>12,} bytes" for kind, size in self.bytes_by_kind.items()]
        return "\n".join(lines)


def _stored(name, spec, value):
    """value as the file stores it: C-contiguous in the format's dtype (an exact conversion; anything
    else is a bug in export, refused before anything is written)."""
    value = np.asarray(value)
    stored = np.ascontiguousarray(value, dtype=spec.dtype)
    if stored.shape != spec.shape or (value.dtype.kind != stored.dtype.kind and not np.array_equal(stored, value)):
        raise ValueError(f"export: {name} came out as {_describe(value)}, not the format's {spec.describe()}")
    return stored


def export(checkpoint_path, out_path):
    """Turn a trained binary / binaryvit / gsb / tervit checkpoint into a packed model file.

    checkpoint_path: a minibvit training checkpoint (``train.load_model`` reads it).
    out_path: the packed safetensors file to write (atomically, via checkpoint.save_checkpoint).
    Stored tensors: exactly those of tensor_specs(cfg, scheme, options), each in its dtype and shape
    (docs/engine.md lists them); the weight bits, codes and scales come from the model's own
    quantizers (forward, then integer_form). The stored tensors are checked as the loader checks
    them (format_problems, the bit-planes' zero tails included) before anything is written.
    Metadata: kind, packed_version, model_config, scheme, scheme_options, roles ({role: spec}),
    dataset and data options of the training run, source checkpoint name.
    Returns an ExportReport (file size and its ratio to the FP32 parameter bytes).
    Raises checkpoint.CheckpointError for a missing, corrupt or foreign file and ValueError for a
    checkpoint of a method with nothing to pack (fp) or no packed form here.
    """
    from ..train import load_model

    model, meta = load_model(checkpoint_path)
    scheme = meta["scheme"]
    if scheme not in EXPORTABLE_SCHEMES:
        what = "a full-precision model has no low-bit weights to pack" if not model.quantizers else \
            f"'{scheme}' is an intermediate training stage"
        raise ValueError(f"cannot export {checkpoint_path}: {what}; export a checkpoint of "
                         f"{', '.join(EXPORTABLE_SCHEMES)} (the final stage of their recipes)")
    cfg, P = model.cfg, model.params
    options = methods.QuantizerOptions(**meta.get("scheme_options", {}))
    entries = _format(cfg, model.quantizers, P)
    out = {name: _stored(name, spec, value()) for name, (spec, value) in entries.items()}
    problems = format_problems(tensor_specs(cfg, scheme, options), out)
    if problems:  # a model whose quantizers are not those of its scheme, or a bug in export
        raise ValueError(f"export of {checkpoint_path}: the packed tensors do not match the format:\n  "
                         + "\n  ".join(problems))
    train_cfg = meta.get("train_config", {})
    packed_meta = {"kind": PACKED_KIND, "packed_version": PACKED_VERSION, "model_config": cfg.to_dict(),
                   "scheme": scheme, "scheme_options": meta.get("scheme_options", {}),
                   "roles": methods.resolve(cfg, scheme), "source": os.path.basename(str(checkpoint_path)),
                   "dataset": meta.get("dataset"),
                   "data_options": {k: train_cfg.get(k) for k in ("data_dir", "image_size")}}
    checkpoint.save_checkpoint(out_path, out, packed_meta)
    by_kind = {"binary weight bits": 0, "ternary weight bit-planes": 0, "int8 codes": 0, "float32": 0}
    for name, arr in out.items():
        kind = ("binary weight bits" if name.endswith("weight_bits") else
                "ternary weight bit-planes" if name.endswith(("weight_nonzero", "weight_sign")) else
                "int8 codes" if arr.dtype == np.int8 else "float32")
        by_kind[kind] += arr.nbytes
    file_bytes = os.path.getsize(out_path)
    by_kind["safetensors header"] = file_bytes - sum(by_kind.values())
    fp32_bytes = 4 * sum(v.size for v in P.values())
    return ExportReport(str(out_path), scheme, file_bytes, fp32_bytes, fp32_bytes / file_bytes, by_kind)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def read_packed(path):
    """(cfg, scheme, options, tensors, metadata) of a packed model file written by ``export``, its
    metadata and every tensor checked (check_tensors) before anything runs.

    Raises checkpoint.CheckpointError for a missing, corrupt or foreign file (a training checkpoint
    included: export it first), metadata without a valid ``scheme``, ``model_config`` or
    ``scheme_options``, and tensors that do not match the format; ValueError for an unsupported
    packed version. Each message names the file and what to do."""
    tensors, meta = checkpoint.load_checkpoint(path)
    if meta.get("kind") != PACKED_KIND:
        hint = (" (it is a training checkpoint: run `python -m minibvit.infer export --checkpoint "
                f"{path} --out <packed file>` first)") if "model_config" in meta else ""
        raise checkpoint.CheckpointError(f"{path} is not a packed minibvit model{hint}")
    if meta.get("packed_version") != PACKED_VERSION:
        raise ValueError(f"{path} has packed format version {meta.get('packed_version')!r}; this minibvit "
                         f"reads version {PACKED_VERSION}: re-export it with this version")
    cfg, scheme, options = _read_metadata(path, meta)
    check_tensors(cfg, scheme, options, tensors, source=str(path))
    return cfg, scheme, options, tensors, meta


def _read_metadata(path, meta):
    """(ViTConfig, scheme, QuantizerOptions) from a packed file's metadata; CheckpointError naming
    the file and the bad entry."""
    again = ("export the model again from its training checkpoint (python -m minibvit.infer export "
             "--checkpoint CHECKPOINT --out FILE)")

    def refuse(what):
        return checkpoint.CheckpointError(f"{path}: the packed model's metadata {what}; {again}")

    if "scheme" not in meta:
        raise refuse("has no 'scheme' (the quantizer table the model was exported from)")
    scheme = meta["scheme"]
    if scheme not in EXPORTABLE_SCHEMES:
        raise refuse(f"names scheme {scheme!r}, which has no packed form (the engine runs "
                     f"{', '.join(EXPORTABLE_SCHEMES)})")
    if "model_config" not in meta:
        raise refuse("has no 'model_config' (the ViT's sizes)")
    config = meta["model_config"]
    if not isinstance(config, dict):
        raise refuse(f"has a 'model_config' of type {type(config).__name__}, not a mapping of ViTConfig fields")
    try:
        cfg = ViTConfig.from_dict(config)
    except (TypeError, ValueError) as error:
        raise refuse(f"has an invalid 'model_config' ({error})") from None
    given = meta.get("scheme_options", {})
    if not isinstance(given, dict):
        raise refuse(f"has 'scheme_options' of type {type(given).__name__}, not a mapping")
    known = [f.name for f in fields(methods.QuantizerOptions)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise refuse(f"has unknown scheme option(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
    try:
        options = methods.QuantizerOptions(**given)
    except (TypeError, ValueError) as error:
        raise refuse(f"has an invalid scheme option ({error})") from None
    return cfg, scheme, options
