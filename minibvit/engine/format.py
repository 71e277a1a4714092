"""The packed model file: export a trained checkpoint to it, read it back, check it.

Packed file: safetensors with the minibvit metadata of minibvit.checkpoint (``kind`` =
"minibvit-packed"); ``export`` lists the tensors, docs/engine.md the format and measurements.
packed_kind(scheme) says how a quantizer table's blocks are packed and run ("binary", "ternary" or
"gsb"): it reads the table's ``packed`` attribute in the method registry (minibvit.methods), so the
engine never looks at a method's name.
"""
import os
from dataclasses import dataclass

import numpy as np

from .. import checkpoint, kernels, methods, quant
from ..binaryvit import ASM, asm_fold_threshold
from ..kernels.pack import words
from ..model import ViTConfig

PACKED_KIND = "minibvit-packed"
PACKED_VERSION = 1
# The quantizer tables with a packed form, from the registry; engine code branches on the kind.
EXPORTABLE_SCHEMES = tuple(name for name, table in methods.TABLES.items() if table.packed)
_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_F32 = np.float32


def packed_kind(scheme):
    """"binary" (sign-binary weights and activations), "ternary" (TerViT: ternary weights, 8-bit
    activations) or "gsb" (binary, with GSB's group-superposition attention) for an exportable
    method; ValueError for one without a packed form."""
    if scheme not in EXPORTABLE_SCHEMES:
        raise ValueError(f"the packed engine runs {EXPORTABLE_SCHEMES}, not {scheme!r}")
    return methods.TABLES[scheme].packed


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


def _effective_scale(alpha):
    """A learnt scale as the quantizer's forward uses it: max(alpha, SCALE_FLOOR) in float32."""
    return np.maximum(alpha.astype(_F32), _F32(quant.SCALE_FLOOR))


def _export_weight(name, q, w, out):
    """Quantize latent weight ``w`` with its own quantizer and store the integer form."""
    _, cache = q.forward(w, False)
    levels, scale = q.integer_form(cache)
    scale = np.ascontiguousarray(np.broadcast_to(scale, (w.shape[0],)), dtype=_F32)
    if isinstance(q, quant.WeightBinarizer):
        out[f"{name}.weight_bits"] = kernels.pack_weight(levels.reshape(w.shape[0], -1))
    elif isinstance(q, quant.Ternarizer):
        nonzero, negative = kernels.pack_ternary_weight(levels.reshape(w.shape[0], -1))
        out[f"{name}.weight_nonzero"], out[f"{name}.weight_sign"] = nonzero, negative
    elif isinstance(q, quant.MinMaxQuantizer) and q.bits == 8 and q.signed and q.channel_axis == 0:
        out[f"{name}.weight_codes"] = levels.astype(np.int8)
    else:
        raise ValueError(f"export: no packed form for the weight quantizer {q!r} of {name}")
    out[f"{name}.weight_scale"] = scale


def _export_activation(name, q, out):
    """Store a binarizer's scale and its ASM threshold (folded) or shift (centre 'token')."""
    if isinstance(q, quant.MinMaxQuantizer):
        return  # dynamic: computed from each batch at run time
    if isinstance(q, ASM):
        if q.center == "token":
            out[f"{name}_shift"] = q.params["shift"].astype(_F32)
        else:
            out[f"{name}_threshold"] = asm_fold_threshold(q).astype(_F32)
        q = q.inner
    if not isinstance(q, quant.ElasticBinarizer):
        raise ValueError(f"export: no packed form for the activation quantizer {q!r} of {name}")
    if np.isnan(q.params["alpha"]).any():
        raise ValueError(f"export: {name} has an uninitialised alpha; export a trained checkpoint")
    out[f"{name}_scale"] = _effective_scale(q.params["alpha"])


def _export_gsb(prefix, qz, out):
    """GSB attention (alphas, bias) and value (alphas, shift) quantizer parameters."""
    for name, q, param in (("attn", qz["attn"], "bias"), ("v", qz["v"], "shift")):
        if np.isnan(q.params["alpha"]).any():
            raise ValueError(f"export: {prefix}.{name} has uninitialised GSB alphas; export a trained checkpoint")
        out[f"{prefix}.{name}_alphas"] = _effective_scale(q.params["alpha"])
        out[f"{prefix}.{name}_{param}"] = q.params[param].astype(_F32)


def export(checkpoint_path, out_path):
    """Turn a trained binary / binaryvit / gsb / tervit checkpoint into a packed model file.

    checkpoint_path: a minibvit training checkpoint (``train.load_model`` reads it).
    out_path: the packed safetensors file to write (atomically, via checkpoint.save_checkpoint).
    Stored tensors (float32 unless stated; W = ceil(K / 64), N = output channels):
      <linear>.weight_bits uint64 [W, N]        sign(W - mean_row W) packed (kernels.pack_weight)
      <linear>.weight_nonzero / weight_sign     uint64 [W, N] ternary bit-planes (TerViT)
      <linear>.weight_codes int8 (N, ...)       8-bit patch-embedding / head weights
      <linear>.weight_scale (N,)                per-output-channel alpha (or 8-bit scale)
      <linear>.input_scale (1,)                 elastic alpha of the input binarizer (floored)
      <linear>.input_threshold (C,)             ASM running centre + shift, folded
      <linear>.input_shift (C,)                 ASM shift when the centre is "token" (run time)
      blocks.<i>.attn.{q,k,v,attn}_scale / _threshold / _shift   the attention binarizers
      blocks.<i>.attn.{attn,v}_alphas (3,), attn_bias (H, N, N), v_shift (H, d)   GSB
      every bias, LayerNorm weight/bias, cls_token, dist_token, pos_embed: as trained.
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
    gsb = packed_kind(scheme) == "gsb"
    cfg, P, Q = model.cfg, model.params, model.quantizers
    out = {}
    for name in ("cls_token", "dist_token", "pos_embed", "patch_embed.proj.bias", "norm.weight", "norm.bias",
                 "head.bias", "head_dist.bias"):
        if name in P:
            out[name] = P[name]
    linears = ["patch_embed.proj", "head"] + (["head_dist"] if cfg.distilled else [])
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.bias",
                     "attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias"):
            if f"{b}.{name}" in P:
                out[f"{b}.{name}"] = P[f"{b}.{name}"]
        linears += [f"{b}.{name}" for name in _LINEARS]
        attn = {t: Q[f"{b}.attn.{t}"] for t in ("q", "k", "attn", "v")}
        for t in ("q", "k") if gsb else ("q", "k", "attn", "v"):
            _export_activation(f"{b}.attn.{t}", attn[t], out)
        if gsb:
            _export_gsb(f"{b}.attn", attn, out)
    for name in linears:
        _export_weight(name, Q[f"{name}.weight"], P[f"{name}.weight"], out)
        if name != "patch_embed.proj":
            _export_activation(f"{name}.input", Q[f"{name}.input"], out)
    out = {k: np.ascontiguousarray(v) for k, v in out.items()}
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
    """(cfg, scheme, options, tensors, metadata) of a packed model file written by ``export``.

    Raises checkpoint.CheckpointError for a missing, corrupt or foreign file (a training
    checkpoint included: export it first) and ValueError for an unsupported packed version."""
    tensors, meta = checkpoint.load_checkpoint(path)
    if meta.get("kind") != PACKED_KIND:
        hint = (" (it is a training checkpoint: run `python -m minibvit.infer export --checkpoint "
                f"{path} --out <packed file>` first)") if "model_config" in meta else ""
        raise checkpoint.CheckpointError(f"{path} is not a packed minibvit model{hint}")
    if meta.get("packed_version") != PACKED_VERSION:
        raise ValueError(f"{path} has packed format version {meta.get('packed_version')!r}; this minibvit "
                         f"reads version {PACKED_VERSION}: re-export it with this version")
    return (ViTConfig.from_dict(meta["model_config"]), meta["scheme"],
            methods.QuantizerOptions(**meta.get("scheme_options", {})), tensors, meta)


def check_tensors(cfg, kind, tensors):
    """Every tensor the forward of a packed model of this kind needs is present with the right
    shape (a clear CheckpointError, not a Numba crash, for a damaged or hand-made file)."""
    c, t = cfg, tensors
    D, Hd, N, H = c.embed_dim, c.mlp_hidden, c.num_tokens, c.num_heads
    d = D // H
    need = {"cls_token": (1, 1, D), "pos_embed": (1, N, D), "patch_embed.proj.bias": (D,),
            "patch_embed.proj.weight_codes": (D, c.in_chans, c.patch_size, c.patch_size),
            "patch_embed.proj.weight_scale": (D,), "norm.weight": (D,), "norm.bias": (D,)}
    for head in ("head", "head_dist") if c.distilled else ("head",):
        need.update({f"{head}.weight_codes": (c.num_classes, D), f"{head}.weight_scale": (c.num_classes,),
                     f"{head}.bias": (c.num_classes,)})
    if c.distilled:
        need["dist_token"] = (1, 1, D)
    for i in range(c.depth):
        b = f"blocks.{i}"
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            need[f"{b}.{name}"] = (D,)
        for name, k, n in (("attn.qkv", D, 3 * D), ("attn.proj", D, D), ("mlp.fc1", D, Hd), ("mlp.fc2", Hd, D)):
            planes = ("weight_nonzero", "weight_sign") if kind == "ternary" else ("weight_bits",)
            for plane in planes:
                need[f"{b}.{name}.{plane}"] = (words(k), n)
            need[f"{b}.{name}.weight_scale"] = (n,)
            if name != "attn.qkv" or c.qkv_bias:
                need[f"{b}.{name}.bias"] = (n,)
        if kind == "gsb":
            need.update({f"{b}.attn.attn_alphas": (3,), f"{b}.attn.attn_bias": (H, N, N),
                         f"{b}.attn.v_alphas": (3,), f"{b}.attn.v_shift": (H, d)})
    missing = sorted(k for k in need if k not in t)
    bad = [f"{k}: {t[k].shape} instead of {need[k]}" for k in need if k in t and t[k].shape != need[k]]
    if missing or bad:
        raise checkpoint.CheckpointError("the packed model is incomplete or does not match its config:"
                                         + (f"\n  missing: {missing}" if missing else "")
                                         + (f"\n  wrong shape: {bad}" if bad else ""))
