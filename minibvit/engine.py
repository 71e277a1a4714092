"""Export a trained low-bit ViT to packed bits, and run it end to end on the bit-packed kernels.

    report = export("runs/.../best.safetensors", "model.packed.safetensors")   # -> ExportReport
    engine = PackedViT.load("model.packed.safetensors")
    logits = engine.forward(images)        # images (B, C, H, W) float32, normalised like training

Methods: ``binary``, ``binaryvit`` (every ASM centre), ``gsb`` and ``tervit``. A full-precision or
intermediate-stage checkpoint is refused with a ValueError.

Why the logits have the same bits as the training-time forward ``ViT.forward(x, training=False)``
(binary, binaryvit, tervit; GSB to a tolerance, see below):

- The simulated forward computes every product of two quantized operands on their integer levels,
  ``y = float32(x_levels @ w_levels.T) * (s_x * s_w) + bias`` (ops.linear_forward,
  ops.attention_forward). The engine computes the same integers with popcounts
  (kernels.binary_gemm, binary_bmm, and_bmm) or byte dot products (kernels.ternary_gemm_int8) and
  applies the same float32 scale vector and bias, in the same order, without fused multiply-adds.
- A binarizer's decision on a binary linear's output is a function of the output column c and the
  integer I alone (the value is float32(I) * s_c + b_c). The engine tabulates it at load time with
  the same float operations as the model (ops.gelu_forward itself for GELU before the fc2
  binarizer) and packs bits straight from the integer accumulators, through one interval of I per
  column (decision_intervals): no float pass, the same bits. The softmax of binary attention scores
  reads its exp values from a table built the same way (exp_table), sums them in float64 in ops'
  order, and finds each row's binarization threshold on the scores.
- Every other float operation repeats minibvit.ops: LayerNorm in float64 as ops._layernorm_rows
  (fused with the residual add before it and the sign packing after it), the ASM thresholds folded
  at export (running centre + shift, the same float32 sum) or, for the 'token' centre, NumPy's mean
  as in binaryvit.ASM; the 8-bit patch embedding (float BLAS on the 8-bit values, as the model), the
  final norm, pooling and head, and the whole TerViT block except its ternary linears call ops.
- GSB's A_q and V_q are sums of three scaled binary bases, so A_q V_q is a sum of nine scaled
  integer products. The engine computes them exactly (kernels.gsb_partial_products) and combines
  them in a fixed float64 order (gsb_combine); the simulated forward multiplies the float32 sums
  with BLAS, whose rounding noise (~1e-9 where the exact product is 0) decides some sign bits of the
  proj input: the logits agree to a tolerance. With that product computed on the integer levels in
  the simulated forward too (the reference in reference_tests/test_engine.py), they agree bit for bit.
- Batch-wide statistics belong to some methods: the 8-bit patch-embedding and head inputs and all of
  TerViT's activations use min-max scales of the whole batch tensor, and GSB's masks its maximum.
  The engine computes them the same way, so it equals the simulated forward on the same batch.
  binary / binaryvit blocks treat each image on its own, so they run image by image: with every
  decision tabulated, all blocks in one parallel region with the images split between the threads
  (_binary_net), else one call per operation on chunks of chunk_images images (the same bits).

Packed file: safetensors with the minibvit metadata of minibvit.checkpoint (``kind`` =
"minibvit-packed"); ``export`` lists the tensors, docs/engine.md the format and measurements.
"""
import math
import os
from collections import namedtuple
from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import checkpoint, kernels, methods, ops, quant
from .binaryvit import ASM, asm_fold_threshold
from .gsb import gsb_attn_masks, gsb_value_masks
from .model import ViTConfig

PACKED_KIND = "minibvit-packed"
PACKED_VERSION = 1
EXPORTABLE_SCHEMES = ("binary", "binaryvit", "gsb", "tervit")
_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
CHUNK_BYTES = 16 << 20  # fc1 output bytes per chunk of images (binary / binaryvit; best measured, 2 cores)
_F32 = np.float32


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
    from .train import load_model

    model, meta = load_model(checkpoint_path)
    scheme = meta["scheme"]
    if scheme not in EXPORTABLE_SCHEMES:
        what = "a full-precision model has no low-bit weights to pack" if scheme == "fp" else \
            f"'{scheme}' is an intermediate training stage"
        raise ValueError(f"cannot export {checkpoint_path}: {what}; export a checkpoint of "
                         f"{', '.join(EXPORTABLE_SCHEMES)} (the final stage of their recipes)")
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
        for t in ("q", "k") if scheme == "gsb" else ("q", "k", "attn", "v"):
            _export_activation(f"{b}.attn.{t}", attn[t], out)
        if scheme == "gsb":
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
# Numba kernels: the float operations of minibvit.ops, fused with sign packing
#
# Exactness rules followed below: no fastmath (no reassociation, no contraction into FMA), the
# same operand precisions as ops (ops' LayerNorm and softmax accumulate float32 inputs in float64),
# the same operation order. Bits are packed as kernels.pack_signs (bit 1 = -1, element 64w + j in
# bit j of word w, tail bits 0); {0, 1} levels as kernels.pack_bits (bit 1 = level 1).
# ---------------------------------------------------------------------------------------------

_ROWS_PER_TASK = 16


@njit(inline="always")
def _normalize_row(x, mean, var, gamma, beta, eps, out):
    """The last step of ops._layernorm_rows for one row, from its float64 mean and variance:
    out = float32(((x - mean) / sqrt(var + eps)) * gamma + beta) (float64 arithmetic, as there)."""
    s = 1.0 / math.sqrt(var + eps)
    for j in range(x.shape[0]):
        h = (x[j] - mean) * s
        out[j] = h * gamma[j] + beta[j]


@njit(inline="always")
def _layernorm_row(x, gamma, beta, eps, out):
    """ops._layernorm_rows on one row x (n,) into out (n,)."""
    mean, var = ops._layernorm_moments(x)
    _normalize_row(x, mean, var, gamma, beta, eps, out)


@njit(inline="always")
def _layernorm_rows8(x, r, gamma64, beta64, eps, squares, out):
    """ops._layernorm_rows on rows r .. r + 7 of x into out[0..7], with ops' eight-row moments (squares:
    (8, n) float64 scratch). gamma64, beta64: gamma and beta converted to float64 (exact)."""
    means, variances = ops._layernorm_moments8(x, r, squares)
    for k in range(8):
        _normalize_row(x[r + k], means[k], variances[k], gamma64, beta64, eps, out[k])


# Packing 64 comparisons into a word: the intrinsics below load 64 elements as one vector, compare
# them and bitcast the 64 results to an i64 (vector compares into mask registers on AVX-512,
# VMOVMSKPS-style sequences on AVX2; the idea of kernels._bits64). Each reads elements start ..
# start + 63 of contiguous 1-D arrays; partial last words go through the scalar loops.

def _is_row(array, dtype):
    return isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C" and array.dtype == dtype


def _load64(context, builder, array_type, array, start):
    data = context.make_array(array_type)(context, builder, array).data
    vector_t = ir.VectorType(context.get_value_type(array_type.dtype), 64)
    return builder.load(builder.bitcast(builder.gep(data, [start]), vector_t.as_pointer()),
                        align=array_type.dtype.bitwidth // 8)


@intrinsic
def _below_bits64(typingctx, values, shift, start):
    """Bit j = not (values[start + j] - shift[start + j] >= 0) (float32 subtraction; NaN -> 1)."""
    if not (_is_row(values, types.float32) and _is_row(shift, types.float32)):
        return None

    def codegen(context, builder, signature, args):
        diff = builder.fsub(_load64(context, builder, signature.args[0], args[0], args[2]),
                            _load64(context, builder, signature.args[1], args[1], args[2]))
        below = builder.fcmp_unordered("<", diff, ir.Constant(diff.type, [0.0] * 64))
        return builder.bitcast(below, ir.IntType(64))

    return types.uint64(values, shift, start), codegen


@intrinsic
def _at_least_bits64(typingctx, values, start, threshold):
    """Bit j = values[start + j] >= threshold (int32)."""
    if not (_is_row(values, types.int32) and isinstance(threshold, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        v = _load64(context, builder, signature.args[0], args[0], args[1])
        t = context.cast(builder, args[2], signature.args[2], types.int32)
        splat = builder.insert_element(ir.Constant(v.type, ir.Undefined), t, ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), 64), [0] * 64))
        return builder.bitcast(builder.icmp_signed(">=", v, splat), ir.IntType(64))

    return types.uint64(values, start, threshold), codegen


@intrinsic
def _interval_bits64(typingctx, values, lo, span, flip, start):
    """Bit j = (uint32(values - lo) <= uint32(span)) != (flip != 0) at element start + j (int32
    arrays): lo <= value <= lo + span, inverted where flip is set (see _interval_operands)."""
    if not all(_is_row(a, types.int32) for a in (values, lo, span, flip)):
        return None

    def codegen(context, builder, signature, args):
        v, low, width, invert = (_load64(context, builder, signature.args[i], args[i], args[4]) for i in range(4))
        inside = builder.icmp_unsigned("<=", builder.sub(v, low), width)
        flipped = builder.icmp_unsigned("!=", invert, ir.Constant(invert.type, [0] * 64))
        return builder.bitcast(builder.xor(inside, flipped), ir.IntType(64))

    return types.uint64(values, lo, span, flip, start), codegen


# The packers below build each word in a loop of constant trip count 64 (LLVM vectorizes it; a
# variable bound made them ~10x slower) and the partial last word in a second loop.

@njit(inline="always")
def _signed_bit(v, centre, shift):
    return np.uint64(not v - (centre + shift) >= 0)


@njit(inline="always")
def _pack_signed_row(y, centre, shift, words):
    """words[w] bit j = not (y[64w + j] - (centre + shift[64w + j]) >= 0): the sign bit of an
    (ASM-shifted) signed binarizer, sign(0) = +1."""
    n = y.shape[0]
    full = n // 64
    for w in range(full):
        word = np.uint64(0)
        for j in range(64):
            word |= _signed_bit(y[64 * w + j], centre, shift[64 * w + j]) << np.uint64(j)
        words[w] = word
    if full < words.shape[0]:
        word = np.uint64(0)
        for j in range(n - 64 * full):
            word |= _signed_bit(y[64 * full + j], centre, shift[64 * full + j]) << np.uint64(j)
        words[full] = word


@njit(inline="always")
def _residual_norm_pack_rows(x, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps, shift, bits, h,
                             out_mode, r0, r1):
    """_residual_norm_pack on rows r0 .. r1 - 1 (one thread)."""
    n = x.shape[1]
    for r in range(r0, r1):
        xr = x[r]
        if add_mode == 1:
            ar = add[r]
            for j in range(n):
                xr[j] = xr[j] + ar[j]
        elif add_mode == 2:
            cr = acc[r]
            for j in range(n):
                y = np.float32((cr[j] + colsum[j]) // 2) * scale[j]
                xr[j] = xr[j] + (y + bias[j])
    if out_mode == 0:
        return
    buf = np.empty((8, n), np.float32)
    squares = np.empty((8, n), np.float64)
    gamma64, beta64 = gamma.astype(np.float64), beta.astype(np.float64)
    r = r0
    while r < r1:
        if r + 8 <= r1:
            _layernorm_rows8(x, r, gamma64, beta64, eps, squares, buf)
            count = 8
        else:
            _layernorm_row(x[r], gamma, beta, eps, buf[0])
            count = 1
        for k in range(count):
            if out_mode == 1:
                _pack_below_row(buf[k], shift, bits[r + k])
            else:
                h[r + k] = buf[k]
        r += count


@njit(inline="always")
def _pack_below_row(y, shift, words):
    """words = packed not (y - shift >= 0): _pack_signed_row with centre 0, vectorized."""
    n = y.shape[0]
    full = n // 64
    for w in range(full):
        words[w] = _below_bits64(y, shift, 64 * w)
    if full < words.shape[0]:
        _below_tail(y, shift, full, words)


@njit(cache=True)
def _below_tail(y, shift, full, words):
    """words[full]: the partial last word of _pack_below_row (see _interval_tail)."""
    word = np.uint64(0)
    for j in range(y.shape[0] - 64 * full):
        word |= _signed_bit(y[64 * full + j], np.float32(0.0), shift[64 * full + j]) << np.uint64(j)
    words[full] = word


@njit(parallel=True, cache=True)
def _residual_norm_pack(x, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps, shift, bits, h, out_mode):
    """The residual add that ends a sub-block, fused with the next LayerNorm and the sign packing
    of its output (the next linear's input binarizer). Rows of x [M, D] in parallel:

    add_mode 0: x unchanged;  1: x += add (float32 [M, D]);  2: x += float32((acc + colsum) / 2)
        * scale + bias  (acc int32 [M, D] from binary_gemm of the +-1 recoding of {0, 1} levels:
        sum_k l_k w_k = (sum_k s_k w_k + sum_k w_k) / 2; then ops.linear_forward's epilogue).
    out_mode 0: nothing more;  1: bits [M, W] = packed sign(LN(x) - shift) (threshold per column);
        2: h [M, D] = LN(x) (float32), for an ASM 'token' centre computed by NumPy afterwards.
    """
    rows = x.shape[0]
    tasks = (rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(tasks):
        _residual_norm_pack_rows(x, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps, shift, bits, h,
                                 out_mode, task * _ROWS_PER_TASK, min(rows, (task + 1) * _ROWS_PER_TASK))


@njit(parallel=True, cache=True)
def _pack_signed_rows(y, centres, shift, bits):
    """bits[r] = packed not(y[r] - (centres[r] + shift) >= 0), rows in parallel (ASM 'token')."""
    for r in prange(y.shape[0]):
        _pack_signed_row(y[r], centres[r], shift, bits[r])


@njit(parallel=True, cache=True)
def _pack_qkv(qkv, n_batch, n_tokens, n_heads, centres, shifts, qk_bits, vt_bits):
    """Split the fused qkv output [B*N, 3D] into packed binarizer bits, per (batch, head) task:
    qk_bits [2, B*H, N, Wd]: sign bits of q and k along the head dim d;
    vt_bits [B*H, d, Wn] (zero on entry): sign bits of v transposed, packed along the tokens.
    Threshold of element (b, h, n, j) of tensor t: centres[t, (b*H + h)*N + n] + shifts[t, j]."""
    dim = qkv.shape[1] // 3
    d = dim // n_heads
    for task in prange(n_batch * n_heads):
        b = task // n_heads
        hd = (task % n_heads) * d
        for n in range(n_tokens):
            row = qkv[b * n_tokens + n]
            r = task * n_tokens + n
            for t in range(2):
                _pack_signed_row(row[t * dim + hd:t * dim + hd + d], centres[t, r], shifts[t], qk_bits[t, task, n])
            word, bit = n // 64, np.uint64(n % 64)
            c = centres[2, r]
            for j in range(d):
                v = row[2 * dim + hd + j] - (c + shifts[2, j])
                vt_bits[task, j, word] |= np.uint64(not v >= 0) << bit


@njit(inline="always")
def _pack_interval_range(acc, lo, span, flip, c0, n, words):
    """words = packed decisions of columns c0 .. c0 + n - 1 of one accumulator row: bit =
    (lo <= acc <= lo + span) != flip per column (int32 operands of _interval_operands)."""
    full = n // 64
    for w in range(full):
        words[w] = _interval_bits64(acc, lo, span, flip, c0 + 64 * w)
    if full < words.shape[0]:
        _interval_tail(acc, lo, span, flip, c0, n, full, words)


@njit(cache=True)
def _interval_tail(acc, lo, span, flip, c0, n, full, words):
    """words[full]: the partial last word of _pack_interval_range. A separate function writing into
    words: inlined (or returning the word), the scalar loop made every call ~10x slower (measured)."""
    word = np.uint64(0)
    for j in range(n - 64 * full):
        c = c0 + 64 * full + j
        word |= np.uint64((np.uint32(acc[c] - lo[c]) <= np.uint32(span[c])) != (flip[c] != 0)) << np.uint64(j)
    words[full] = word


@njit(cache=True)
def _pack_interval_rows(acc, lo, span, flip, bits):
    """bits [M, W] of every row of acc [M, C] (_pack_interval_range)."""
    for r in range(acc.shape[0]):
        _pack_interval_range(acc[r], lo, span, flip, 0, acc.shape[1], bits[r])


def _interval_operands(intervals):
    """decision_intervals' (lo, hi, invert) as the int32 (lo, span, flip) of _pack_interval_range;
    an empty interval (lo = K + 1 > hi = K) becomes the single integer K + 1, never reached."""
    lo, hi, invert = intervals
    hi = np.maximum(hi, lo)
    return lo.astype(np.int32), (hi - lo).astype(np.int32), invert.astype(np.int32)


@njit(inline="always")
def _transpose_bits64(a):
    """In-place transpose of a 64 x 64 bit matrix, row i = word a[i], column j = bit j: afterwards
    bit j of a[i] is bit i of the former a[j] (block swaps of 32, 16, ..., 1; Hacker's Delight 7-3)."""
    s = 32
    mask = np.uint64(0x00000000FFFFFFFF)
    while s:
        shift = np.uint64(s)
        for k in range(64):
            if k & s == 0:
                t = ((a[k] >> shift) ^ a[k + s]) & mask
                a[k + s] ^= t
                a[k] ^= t << shift
        s //= 2
        mask ^= mask << np.uint64(s)


@njit(cache=True)
def _pack_qkv_intervals(acc, lo, span, flip, n_images, n_tokens, n_heads, q_bits, k_words, v_words):
    """The q, k, v binarizers' bits from the integer qkv accumulator acc [b*N, 3D] (no epilogue)
    through per-column decision intervals, per (image, head) t, in the layouts the attention
    products read (kernels' popcount-matmul operands, planes word-major):
    q_bits [b*H, N, Wd]: q packed along the head dim d;  k_words [b*H, Wd, N]: the same for k,
    word-major;  v_words [b*H, Wn, d]: v packed along the tokens, word-major (64 x 64 bit
    transposes of v packed along d)."""
    dim = acc.shape[1] // 3
    d = dim // n_heads
    d_words, n_words = q_bits.shape[2], v_words.shape[1]
    v_rows = np.zeros((64 * n_words, d_words), np.uint64)    # rows past the last token stay 0
    k_row = np.empty(d_words, np.uint64)
    block = np.empty(64, np.uint64)
    for task in range(n_images * n_heads):
        b = task // n_heads
        hd = (task % n_heads) * d
        for n in range(n_tokens):
            row = acc[b * n_tokens + n]
            for t in range(3):
                c0 = t * dim + hd
                words = q_bits[task, n] if t == 0 else k_row if t == 1 else v_rows[n]
                _pack_interval_range(row, lo, span, flip, c0, d, words)
            for g in range(d_words):
                k_words[task, g, n] = k_row[g]
        for g in range(d_words):
            for w in range(n_words):
                block[:] = v_rows[64 * w:64 * w + 64, g]
                _transpose_bits64(block)
                for j in range(min(64, d - 64 * g)):
                    v_words[task, w, 64 * g + j] = block[j]


@njit(cache=True)
def _pack_heads_intervals(o, lo, span, flip, n_tokens, n_heads, bits):
    """Merge the heads of the integer attention output o [b*H, N, d] and pack the proj input's
    bits from per-column decision intervals: bits [b*N, Wd]."""
    n_bh, _, d = o.shape
    merged = np.empty(n_heads * d, np.int32)
    for r in range((n_bh // n_heads) * n_tokens):
        b, n = r // n_tokens, r % n_tokens
        for hh in range(n_heads):
            merged[hh * d:(hh + 1) * d] = o[b * n_heads + hh, n]
        _pack_interval_range(merged, lo, span, flip, 0, n_heads * d, bits[r])


@njit(parallel=True, cache=True)
def _pack_heads(o, scale, n_tokens, n_heads, centres, shift, bits):
    """Merge the heads of the attention output o [B*H, N, d] (float32, or int32 counts) and pack
    the proj input's sign bits: value float32(o) * scale, threshold centres[b*N + n] + shift[h*d + j];
    bits [B*N, Wd] (zero on entry). For GSB and ASM 'token' (else _pack_heads_intervals)."""
    n_bh, _, d = o.shape
    for r in prange((n_bh // n_heads) * n_tokens):
        b, n = r // n_tokens, r % n_tokens
        words = bits[r]
        c = centres[r]
        col = 0
        for hh in range(n_heads):
            orow = o[b * n_heads + hh, n]
            for j in range(d):
                v = np.float32(orow[j]) * scale - (c + shift[col])
                words[col // 64] |= np.uint64(not v >= 0) << np.uint64(col % 64)
                col += 1


@njit(inline="always")
def _unsigned_bit(v, centre, shift, alpha, flip):
    """The {0, 1} level of the unsigned elastic binarizer, clamp(round((v - (centre + shift)) /
    alpha), 0, 1) = ((v - (centre + shift)) / alpha > 0.5), xor flip."""
    return np.uint64((v - (centre + shift)) / alpha > 0.5) ^ flip


@njit(inline="always")
def _pack_unsigned_row(y, centre, shift, alpha, words, flip):
    n = y.shape[0]
    full = n // 64
    for w in range(full):
        word = np.uint64(0)
        for j in range(64):
            word |= _unsigned_bit(y[64 * w + j], centre, shift[64 * w + j], alpha, flip) << np.uint64(j)
        words[w] = word
    if full < words.shape[0]:
        word = np.uint64(0)
        for j in range(n - 64 * full):
            word |= _unsigned_bit(y[64 * full + j], centre, shift[64 * full + j], alpha, flip) << np.uint64(j)
        words[full] = word


@njit(cache=True)
def exp_table(d, s_qk, inv_sqrt_d):
    """The exp values ops' softmax takes on binary attention scores: the scores of one row are
    x(I) = float32(float32(I) * s_qk) * float32(1/sqrt d) for integers I in [-d, d] (Q K^T of +-1
    vectors of length d), so every exp(x_j - max_j x_j) of ops' float32 softmax is
    table[I_max + d, I_j + d] = exp(x(I_j) - x(I_max)), computed here with the same float32
    operations and the same exp (ops._exp_f32_rounded). Returns float32 [2d + 1, 2d + 1]."""
    x = np.empty(2 * d + 1, np.float32)
    for i in range(2 * d + 1):
        x[i] = (np.float32(i - d) * s_qk) * inv_sqrt_d
    table = np.empty((2 * d + 1, 2 * d + 1), np.float32)
    for a in range(2 * d + 1):
        for b in range(2 * d + 1):
            table[a, b] = ops._exp_f32_rounded(x[b] - x[a])
    return table


@njit(inline="always")
def _row_exps(scores, table, d):
    """The table row of exp(x_j - max x) for one row of binary scores."""
    top = scores[0]
    for j in range(1, scores.shape[0]):
        top = max(top, scores[j])
    return table[top + d]


@njit(inline="always")
def _softmax_rows4(s0, s1, s2, s3, table, d, out):
    """ops._softmax_rows_f32 on four rows of binary scores (int32) into out[0..3] (float32): exp values
    from the table, their float64 sums in order (four independent chains), out = float32(e / sum)."""
    e0, e1, e2, e3 = _row_exps(s0, table, d), _row_exps(s1, table, d), _row_exps(s2, table, d), _row_exps(s3, table, d)
    n = s0.shape[0]
    t0 = t1 = t2 = t3 = 0.0
    for j in range(n):
        a0, a1, a2, a3 = e0[s0[j] + d], e1[s1[j] + d], e2[s2[j] + d], e3[s3[j] + d]
        out[0, j], out[1, j], out[2, j], out[3, j] = a0, a1, a2, a3
        t0 += a0
        t1 += a1
        t2 += a2
        t3 += a3
    for k, total in enumerate((t0, t1, t2, t3)):
        inv = 1.0 / total
        for j in range(n):
            out[k, j] *= inv


@njit(inline="always")
def _softmax_row(scores, table, d, out):
    """_softmax_rows4 for a single row."""
    exps = _row_exps(scores, table, d)
    total = 0.0
    for j in range(scores.shape[0]):
        e = exps[scores[j] + d]
        out[j] = e
        total += e
    inv = 1.0 / total
    for j in range(scores.shape[0]):
        out[j] *= inv


@njit(inline="always")
def _softmax_task(scores, table, r0, r1, buf, probs, alpha, p_bits):
    """Softmax rows r0..r1 of scores [R, N]; write the probabilities (probs) or their unsigned-
    binarized bits (p_bits: level 1 where round(p / alpha) >= 1, i.e. p / alpha > 0.5)."""
    d = (table.shape[0] - 1) // 2
    zeros = np.zeros(scores.shape[1], np.float32)
    r = r0
    while r < r1:
        if r + 4 <= r1:
            _softmax_rows4(scores[r], scores[r + 1], scores[r + 2], scores[r + 3], table, d, buf)
            count = 4
        else:
            _softmax_row(scores[r], table, d, buf[0])
            count = 1
        for k in range(count):
            if p_bits.shape[0] == 0:
                probs[r + k] = buf[k]
            else:
                _pack_unsigned_row(buf[k], np.float32(0.0), zeros, alpha, p_bits[r + k], np.uint64(0))
        r += count


@njit(cache=True)
def _level_threshold(alpha):
    """The smallest float32 p with float32(p / alpha) > 0.5 (alpha > 0): the unsigned elastic
    binarizer's level of a probability p is 1 exactly where p >= this (division is monotone)."""
    p = np.float32(0.5) * alpha
    while p / alpha > 0.5:
        p = np.nextafter(p, np.float32(0.0))
    while not p / alpha > 0.5:
        p = np.nextafter(p, np.float32(np.inf))
    return p


@njit(inline="always")
def _row_max(scores):
    top = scores[0]
    for j in range(1, scores.shape[0]):
        top = max(top, scores[j])
    return top


@njit(inline="always")
def _exp_sum(scores, exps, d):
    """sum_j exps[scores[j] + d] in float64, in order (ops' softmax denominator); exps: a float64
    table row (the float32 exp values, converted exactly)."""
    total = 0.0
    for j in range(scores.shape[0]):
        total += exps[np.uint64(scores[j] + d)]
    return total


@njit(inline="always")
def _exp_sums8(s0, s1, s2, s3, s4, s5, s6, s7, e0, e1, e2, e3, e4, e5, e6, e7, d):
    """_exp_sum of eight rows as eight independent chains (the float64 add latency, not the
    arithmetic, bounds one row)."""
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = 0.0
    for j in range(s0.shape[0]):
        t0 += e0[np.uint64(s0[j] + d)]
        t1 += e1[np.uint64(s1[j] + d)]
        t2 += e2[np.uint64(s2[j] + d)]
        t3 += e3[np.uint64(s3[j] + d)]
        t4 += e4[np.uint64(s4[j] + d)]
        t5 += e5[np.uint64(s5[j] + d)]
        t6 += e6[np.uint64(s6[j] + d)]
        t7 += e7[np.uint64(s7[j] + d)]
    return t0, t1, t2, t3, t4, t5, t6, t7


@njit(inline="always")
def _pack_at_least(scores, threshold, words):
    """words = packed (scores[j] >= threshold)."""
    n = scores.shape[0]
    full = n // 64
    for w in range(full):
        words[w] = _at_least_bits64(scores, 64 * w, threshold)
    if full < words.shape[0]:
        _at_least_tail(scores, threshold, full, words)


@njit(cache=True)
def _at_least_tail(scores, threshold, full, words):
    """words[full]: the partial last word of _pack_at_least (see _interval_tail)."""
    word = np.uint64(0)
    for j in range(scores.shape[0] - 64 * full):
        word |= np.uint64(scores[64 * full + j] >= threshold) << np.uint64(j)
    words[full] = word


@njit(inline="always")
def _pack_attention_row(scores, exps, top, total, d, p_min, words):
    """The attention binarizer's bits of one row: p_j = float32(e_j * (1 / total)) has level 1 where
    p_j >= p_min (_level_threshold). With the table row exps (float64) non-decreasing in I, so is
    the level: the smallest I at level 1 is -d plus the number of I in [-d, top] at level 0
    (counted without branches), and the bits are scores >= that I."""
    inv = 1.0 / total
    zeros = 0
    for i in range(top + d + 1):
        zeros += np.float32(exps[i] * inv) < p_min
    _pack_at_least(scores, zeros - d, words)


@njit(inline="always")
def _softmax_rows(scores, table, table64, monotone, probs, alpha, p_min, p_bits, r0, r1):
    """_softmax on rows r0 .. r1 - 1 (one thread); table64: the exp table in float64, p_min:
    _level_threshold(alpha)."""
    d = (table.shape[0] - 1) // 2
    if not (monotone and p_bits.shape[0]):
        _softmax_task(scores, table, r0, r1, np.empty((4, scores.shape[1]), np.float32), probs, alpha, p_bits)
        return
    r = r0
    while r + 8 <= r1:
        s0, s1, s2, s3, s4, s5, s6, s7 = (scores[r], scores[r + 1], scores[r + 2], scores[r + 3], scores[r + 4],
                                          scores[r + 5], scores[r + 6], scores[r + 7])
        tops = (_row_max(s0), _row_max(s1), _row_max(s2), _row_max(s3), _row_max(s4), _row_max(s5),
                _row_max(s6), _row_max(s7))
        e0, e1, e2, e3, e4, e5, e6, e7 = (table64[tops[0] + d], table64[tops[1] + d], table64[tops[2] + d],
                                          table64[tops[3] + d], table64[tops[4] + d], table64[tops[5] + d],
                                          table64[tops[6] + d], table64[tops[7] + d])
        totals = _exp_sums8(s0, s1, s2, s3, s4, s5, s6, s7, e0, e1, e2, e3, e4, e5, e6, e7, d)
        _pack_attention_row(s0, e0, tops[0], totals[0], d, p_min, p_bits[r])
        _pack_attention_row(s1, e1, tops[1], totals[1], d, p_min, p_bits[r + 1])
        _pack_attention_row(s2, e2, tops[2], totals[2], d, p_min, p_bits[r + 2])
        _pack_attention_row(s3, e3, tops[3], totals[3], d, p_min, p_bits[r + 3])
        _pack_attention_row(s4, e4, tops[4], totals[4], d, p_min, p_bits[r + 4])
        _pack_attention_row(s5, e5, tops[5], totals[5], d, p_min, p_bits[r + 5])
        _pack_attention_row(s6, e6, tops[6], totals[6], d, p_min, p_bits[r + 6])
        _pack_attention_row(s7, e7, tops[7], totals[7], d, p_min, p_bits[r + 7])
        r += 8
    while r < r1:
        top = _row_max(scores[r])
        exps = table64[top + d]
        _pack_attention_row(scores[r], exps, top, _exp_sum(scores[r], exps, d), d, p_min, p_bits[r])
        r += 1


@njit(parallel=True, cache=True)
def _softmax(scores, table, monotone, probs, alpha, p_bits):
    """Attention probabilities of binary scores [R, N] (int32, R = B*H*N rows): into probs [R, N]
    when p_bits is empty, else binarized to {0, 1} and packed along the keys into p_bits [R, Wn]
    (through thresholds on the scores when every table row is non-decreasing: ``monotone``)."""
    rows = scores.shape[0]
    table64 = table.astype(np.float64)
    p_min = _level_threshold(alpha)
    tasks = (rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(tasks):
        _softmax_rows(scores, table, table64, monotone, probs, alpha, p_min, p_bits, task * _ROWS_PER_TASK,
                      min(rows, (task + 1) * _ROWS_PER_TASK))


def table_is_monotone(table):
    """Every row a of an exp_table non-decreasing over the columns b <= a it is read at."""
    steps = np.diff(table, axis=1)
    reachable = np.arange(table.shape[1] - 1)[None, :] < np.arange(table.shape[0])[:, None]
    return bool((steps[reachable] >= 0).all())


@njit(parallel=True, cache=True)
def _pack_unsigned_rows(g, centres, shift, alpha, bits):
    """fc2 input bits from the GELU output g [M, Hd] (the fallback of the decision intervals):
    level = clamp(round((g - (centre + shift)) / alpha), 0, 1), packed in the +-1 recoding
    s = 2 level - 1 that binary_gemm multiplies (bit 1 where the level is 0)."""
    for r in prange(g.shape[0]):
        _pack_unsigned_row(g[r], centres[r], shift, alpha, bits[r], np.uint64(1))


@njit(parallel=True, cache=True)
def _max_abs(x):
    """max |x| over a flat float32 array (a max is exact in any order), found as the largest
    |x| bit pattern: for floats of one sign the bit patterns are ordered as the values, and an
    integer max vectorizes (a float max does not, without fastmath). A NaN gives a NaN."""
    bits = x.view(np.int32)
    m = np.int32(0)
    for i in prange(x.size):
        m = max(m, bits[i] & np.int32(0x7FFFFFFF))
    return np.array([m], np.int32).view(np.float32)[0]


@njit(parallel=True, cache=True)
def _quantized_patches(x, scale, p, out):
    """The 8-bit patch-embedding input (quant.minmax_quant_forward, signed, per tensor: value =
    (clamp(round(x / scale), -127, 127) - 0) * scale) laid out as ops.patch_embed_forward's patch
    matrix: out [B * gh * gw, C * p * p], row (b, gy, gx), column (c, py, px)."""
    n_batch, channels, height, width = x.shape
    gh, gw = height // p, width // p
    zero = np.float32(0.0)
    for task in prange(n_batch * gh):
        b, gy = task // gh, task % gh
        for gx in range(gw):
            row = out[(b * gh + gy) * gw + gx]
            for c in range(channels):
                for py in range(p):
                    src = x[b, c, gy * p + py, gx * p:gx * p + p]
                    dst = row[(c * p + py) * p:(c * p + py) * p + p]
                    for px in range(p):
                        level = min(max(np.rint(src[px] / scale), np.float32(-127.0)), np.float32(127.0))
                        dst[px] = (np.float32(level) - zero) * scale


@njit(parallel=True, cache=True)
def _int8_matmul(a, w):
    """a @ w.T for int8 a [M, K] and w [N, K], exact in int64, as int64 [M, N]."""
    out = np.empty((a.shape[0], w.shape[0]), np.int64)
    for n in prange(w.shape[0]):
        wn = w[n]
        for m in range(a.shape[0]):
            am = a[m]
            total = 0
            for k in range(a.shape[1]):
                total += np.int32(am[k]) * np.int32(wn[k])
            out[m, n] = total
    return out


# ---------------------------------------------------------------------------------------------
# binary / binaryvit with every decision tabulated: the whole network in one parallel region
#
# Waking OpenMP's sleeping worker and waiting for it at the end of a region cost ~50 us each on
# the 2-core VM these were measured on, and a forward ran ~10 Numba regions per block: at batch 8
# two threads were no faster than one. Here each thread takes a contiguous share of the images
# and runs all blocks on them, a few images at a time; the blocks treat every image on its own, so
# the bits are those of the per-kernel path. The popcount products call kernels' one-thread core
# (_panel_rows on aligned weight panels, the layout of kernels.binary_gemm's tasks).
# ---------------------------------------------------------------------------------------------

_BinaryNet = namedtuple("_BinaryNet", [
    "norm1_weight", "norm1_bias", "qkv_threshold",        # [L, D] float32: norm1, qkv input binarizer
    "qkv_panels", "qkv_lo", "qkv_span", "qkv_flip",       # panels [L, blocks, Wd, width]; intervals [L, 3D]
    "exp_tables", "exp_tables64", "exp_monotone",         # [L, 2d+1, 2d+1] float32 / float64, [L] bool
    "attn_alpha", "attn_level_min",                       # [L] float32: alpha, _level_threshold(alpha)
    "heads_lo", "heads_span", "heads_flip",               # proj input intervals [L, D]
    "proj_panels", "proj_scale", "proj_bias",             # proj epilogue [L, D]
    "norm2_weight", "norm2_bias", "fc1_threshold",        # [L, D]
    "fc1_panels", "fc1_lo", "fc1_span", "fc1_flip",       # fc2 input intervals [L, Hd]
    "fc2_panels", "fc2_colsum", "fc2_scale", "fc2_bias",  # fc2 epilogue [L, D]
    "eps"])


@njit(cache=True)
def _weight_panels(w_packed_T):
    """A packed weight [W, N] as kernels' aligned, zero-padded panels [blocks, W, width]."""
    n_words, n_cols = w_packed_T.shape
    blocks, width = kernels._column_blocks(n_cols)
    panels = kernels._aligned_empty(blocks * n_words, width, np.uint64).reshape((blocks, n_words, width))
    planes = w_packed_T.reshape((1, n_words, n_cols))
    for cb in range(blocks):
        panels[cb] = kernels._copy_panel(planes, 0, cb * width, min(width, n_cols - cb * width), width)
    return panels


@njit(inline="always")
def _gemm_rows(a, panels, row_offset, row_scale, col_scale, bias, out):
    """out[0] = binary_gemm of a[0] [M, W] with the weight of `panels` (see _weight_panels), one
    thread: int32 (row_scale None) or its float32 epilogue."""
    n_cols, width = out.shape[2], panels.shape[2]
    for cb in range(panels.shape[0]):
        n0 = cb * width
        kernels._panel_rows(a, 0, 0, a.shape[1], panels[cb], None, n0, min(width, n_cols - n0), width,
                            row_offset, None, row_scale, col_scale, bias, out)


@njit(inline="always")
def _batched_rows(a, t, x_planes, y_planes, row_offset, out):
    """out[t] = kernels._popcount_matmul's product of a[t] with the planes of batch entry t, one
    thread: x_planes given: row_offset - 2 popcount(a ^ x) (binary_bmm); y_planes given:
    row_offset - 2 popcount(a & y) (and_bmm)."""
    n_cols = out.shape[2]
    blocks, width = kernels._column_blocks(n_cols)
    for cb in range(blocks):
        n0 = cb * width
        nb = min(width, n_cols - n0)
        kernels._panel_rows(a, t, 0, a.shape[1], kernels._copy_panel(x_planes, t, n0, nb, width),
                            kernels._copy_panel(y_planes, t, n0, nb, width), n0, nb, width, row_offset, None, None,
                            None, None, out)


@njit(cache=True)
def _binary_net_chunk(x, n_images, n_tokens, n_heads, net):
    """Every block of the binary network on the stream x [b*N, D] of n_images images, in place."""
    rows, dim = x.shape
    d = dim // n_heads
    hidden = net.fc1_lo.shape[1]
    bh = n_images * n_heads
    d_words, n_words = (d + 63) // 64, (n_tokens + 63) // 64
    bits = np.empty((1, rows, (dim + 63) // 64), np.uint64)
    h_bits = np.empty((1, rows, (hidden + 63) // 64), np.uint64)
    qkv = np.empty((1, rows, 3 * dim), np.int32)
    q_bits = np.empty((bh, n_tokens, d_words), np.uint64)
    k_words = np.empty((bh, d_words, n_tokens), np.uint64)
    v_words = np.empty((bh, n_words, d), np.uint64)
    scores = np.empty((bh, n_tokens, n_tokens), np.int32)
    p_bits = np.empty((bh, n_tokens, n_words), np.uint64)
    p_count = np.empty((bh, n_tokens), np.int64)
    o = np.empty((bh, n_tokens, d), np.int32)
    proj = np.empty((1, rows, dim), np.float32)
    fc1 = np.empty((1, rows, hidden), np.int32)
    fc2 = np.empty((1, rows, dim), np.int32)
    dim_offset = np.full((1, rows), dim, np.int64)
    hidden_offset = np.full((1, rows), hidden, np.int64)
    d_offset = np.full((bh, n_tokens), d, np.int64)
    ones = np.ones(rows, np.float32)
    no_probs = np.empty((0, n_tokens), np.float32)
    colsum, scale, bias = net.fc2_colsum[0], net.fc2_scale[0], net.fc2_bias[0]
    _residual_norm_pack_rows(x, x, fc2[0], colsum, scale, bias, 0, net.norm1_weight[0], net.norm1_bias[0], net.eps,
                             net.qkv_threshold[0], bits[0], x, 1, 0, rows)
    depth = net.norm1_weight.shape[0]
    for layer in range(depth):
        _gemm_rows(bits, net.qkv_panels[layer], dim_offset, None, None, None, qkv)
        _pack_qkv_intervals(qkv[0], net.qkv_lo[layer], net.qkv_span[layer], net.qkv_flip[layer], n_images, n_tokens,
                            n_heads, q_bits, k_words, v_words)
        for t in range(bh):
            _batched_rows(q_bits, t, k_words, None, d_offset, scores)
            _softmax_rows(scores[t], net.exp_tables[layer], net.exp_tables64[layer], net.exp_monotone[layer],
                          no_probs, net.attn_alpha[layer], net.attn_level_min[layer], p_bits[t], 0, n_tokens)
            for n in range(n_tokens):
                count = 0
                for w in range(n_words):
                    count += kernels.popcount(p_bits[t, n, w])
                p_count[t, n] = count
            _batched_rows(p_bits, t, None, v_words, p_count, o)
        _pack_heads_intervals(o, net.heads_lo[layer], net.heads_span[layer], net.heads_flip[layer], n_tokens, n_heads,
                              bits[0])
        _gemm_rows(bits, net.proj_panels[layer], dim_offset, ones, net.proj_scale[layer], net.proj_bias[layer], proj)
        _residual_norm_pack_rows(x, proj[0], fc2[0], colsum, scale, bias, 1, net.norm2_weight[layer],
                                 net.norm2_bias[layer], net.eps, net.fc1_threshold[layer], bits[0], x, 1, 0, rows)
        _gemm_rows(bits, net.fc1_panels[layer], dim_offset, None, None, None, fc1)
        _pack_interval_rows(fc1[0], net.fc1_lo[layer], net.fc1_span[layer], net.fc1_flip[layer], h_bits[0])
        _gemm_rows(h_bits, net.fc2_panels[layer], hidden_offset, None, None, None, fc2)
        following = min(layer + 1, depth - 1)
        _residual_norm_pack_rows(x, proj[0], fc2[0], net.fc2_colsum[layer], net.fc2_scale[layer], net.fc2_bias[layer],
                                 2, net.norm1_weight[following], net.norm1_bias[following], net.eps,
                                 net.qkv_threshold[following], bits[0], x, 1 if layer + 1 < depth else 0, 0, rows)


@njit(parallel=True, cache=True)
def _binary_net(x, n_images, n_tokens, n_heads, net, groups, step):
    """Every block on the stream x [B*N, D] (float32, in place): one parallel task per group of
    images (contiguous shares), each run through _binary_net_chunk `step` images at a time."""
    for g in prange(groups):
        i0, i1 = g * n_images // groups, (g + 1) * n_images // groups
        for s0 in range(i0, i1, step):
            s1 = min(s0 + step, i1)
            _binary_net_chunk(x[s0 * n_tokens:s1 * n_tokens], s1 - s0, n_tokens, n_heads, net)


def linear_values(k, scale, bias):
    """Every value a binary linear's output column c can take: float32(I) * scale[c] + bias[c] for
    I = -K .. K, with the float32 operations of ops.linear_forward's integer path. Returns float32
    [C, 2K + 1] (column I + K holds I)."""
    levels = np.arange(-k, k + 1, dtype=_F32)
    values = levels[None, :] * scale[:, None]
    values += bias[:, None]
    return values


def decision_table(values, threshold, alpha=None, gelu=None):
    """The bit a binarizer takes on each tabulated value (see linear_values), as bool [C, 2K + 1].

    Signed (alpha None): bit = not (v - threshold[c] >= 0), the pack_signs convention (1 = -1).
    Unsigned after GELU (alpha, gelu = "none" / "tanh"; ops.gelu_forward itself): bit = not
    (round((GELU(v) - threshold[c]) / alpha) >= 1), the +-1 recoding of the {0, 1} level (1 = level 0).
    threshold: (C,) float32, the binarizer's folded ASM threshold per column (zeros without ASM)."""
    threshold = threshold[:, None]
    if alpha is None:
        return ~((values - threshold) >= 0)
    g, _ = ops.gelu_forward(values, gelu)
    return ~((g - threshold) / alpha > 0.5)


def decision_intervals(table):
    """A decision table [C, 2K + 1] (bit of column c at integer I in table[c, I + K]) as intervals:
    (lo, hi) int32 [C] and invert uint64 [C] with bit = (lo <= I <= hi) != invert, or None when a
    column is not of that form. A sign decision on float32(I) * s + b (s > 0) is monotone in I, so an
    interval; GELU then a threshold is the complement of an interval (GELU falls, then rises)."""
    k = (table.shape[1] - 1) // 2

    def run(mask):
        """(is one contiguous run or empty, first I, last I); empty -> (K + 1, K)."""
        present = mask.any(axis=1)
        first = mask.argmax(axis=1)
        last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
        contiguous = ~present | (mask.sum(axis=1) == last - first + 1)
        return contiguous, np.where(present, first - k, k + 1), np.where(present, last - k, k)

    ones, lo1, hi1 = run(table)
    zeros, lo0, hi0 = run(~table)
    if not (ones | zeros).all():
        return None
    return (np.where(ones, lo1, lo0).astype(np.int32), np.where(ones, hi1, hi0).astype(np.int32),
            (~ones).astype(np.uint64))


def gsb_combine(partial, a_scales, v_scales):
    """GSB's A_q V_q from its integer partial products, in a fixed order:

        out = float32( sum_{i=0..2} sum_{j=0..2} (float64(a_i) * float64(b_j)) * C_ij )

    accumulated in float64 in the order (i, j) = (0, 0), (0, 1), ..., (2, 2), element by element.
    partial: int32 [BH, 3, 3, N, d] (kernels.gsb_partial_products); a_scales, v_scales: (3,) float32.
    Returns float32 [BH, N, d]. Any implementation that applies this formula to the same integers
    (e.g. a simulated forward computing C_ij on the levels) gets the same bits.
    """
    out = np.zeros(partial.shape[:1] + partial.shape[3:], np.float64)
    for i in range(3):
        for j in range(3):
            out += (np.float64(a_scales[i]) * np.float64(v_scales[j])) * partial[:, i, j]
    return out.astype(_F32)


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------

@dataclass
class _Binarizer:
    """Run-time form of an activation binarizer: scale (float32 scalar), per-channel threshold
    (folded ASM centre + shift, zeros without ASM) or, with token=True, the shift added to each
    token's own mean."""

    scale: np.float32
    shift: np.ndarray
    token: bool


class PackedViT:
    """A packed low-bit ViT (from ``export``) run with the bit-packed kernels.

    engine = PackedViT.load(path)
    logits = engine.forward(x)     # x (B, C, H, W) float32 -> (B, classes) float32
    engine.predict(x)              # argmax class per image

    Attributes: cfg (ViTConfig), scheme (str), options (methods.QuantizerOptions), tensors (dict).
    """

    def __init__(self, cfg, scheme, options, tensors):
        if scheme not in EXPORTABLE_SCHEMES:
            raise ValueError(f"PackedViT runs {EXPORTABLE_SCHEMES}, not {scheme!r}")
        self.cfg, self.scheme, self.options, self.tensors = cfg, scheme, options, tensors
        self._check_tensors()
        self.patch_weight = self._dequantized("patch_embed.proj")  # float32 8-bit values, as the model
        self._signed8 = quant.make_quantizer("a_minmax8_signed")
        self._unsigned8 = quant.make_quantizer("a_minmax8_unsigned")
        self.heads = [self._head(name) for name in (("head", "head_dist") if cfg.distilled else ("head",))]
        self.inv_sqrt_d = _F32(1.0 / math.sqrt(cfg.embed_dim // cfg.num_heads))   # ops.attention_forward's
        self.blocks = [self._block(f"blocks.{i}") for i in range(cfg.depth)]
        self.net = self._binary_net()
        # images per chunk of the binary / binaryvit blocks: one at a time per thread in _binary_net
        # (best measured, with 2), else fc1's int32 output within CHUNK_BYTES
        self.chunk_images = 1 if self.net is not None else max(1, CHUNK_BYTES // (4 * cfg.num_tokens * cfg.mlp_hidden))
        self._dummy_f = np.zeros((1, 1), _F32)
        self._dummy_i = np.zeros((1, 1), np.int32)
        self._dummy_v = np.zeros(1, _F32)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, path):
        """Read a packed model file written by ``export``.

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
        engine = cls(ViTConfig.from_dict(meta["model_config"]), meta["scheme"],
                     methods.QuantizerOptions(**meta.get("scheme_options", {})), tensors)
        engine.metadata = meta
        return engine

    def _check_tensors(self):
        """Every tensor the forward needs is present with the right shape (a clear error, not a
        Numba crash, for a damaged or hand-made file)."""
        c, t = self.cfg, self.tensors
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
        words = lambda k: (k + 63) // 64  # noqa: E731
        for i in range(c.depth):
            b = f"blocks.{i}"
            for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
                need[f"{b}.{name}"] = (D,)
            for name, k, n in (("attn.qkv", D, 3 * D), ("attn.proj", D, D), ("mlp.fc1", D, Hd), ("mlp.fc2", Hd, D)):
                planes = ("weight_nonzero", "weight_sign") if self.scheme == "tervit" else ("weight_bits",)
                for plane in planes:
                    need[f"{b}.{name}.{plane}"] = (words(k), n)
                need[f"{b}.{name}.weight_scale"] = (n,)
                if name != "attn.qkv" or c.qkv_bias:
                    need[f"{b}.{name}.bias"] = (n,)
            if self.scheme == "gsb":
                need.update({f"{b}.attn.attn_alphas": (3,), f"{b}.attn.attn_bias": (H, N, N),
                             f"{b}.attn.v_alphas": (3,), f"{b}.attn.v_shift": (H, d)})
        missing = sorted(k for k in need if k not in t)
        bad = [f"{k}: {t[k].shape} instead of {need[k]}" for k in need if k in t and t[k].shape != need[k]]
        if missing or bad:
            raise checkpoint.CheckpointError("the packed model is incomplete or does not match its config:"
                                             + (f"\n  missing: {missing}" if missing else "")
                                             + (f"\n  wrong shape: {bad}" if bad else ""))

    def _dequantized(self, name):
        """8-bit weight values (codes - 0) * scale, the float32 operations of minmax_quant_forward."""
        codes, scale = self.tensors[f"{name}.weight_codes"], self.tensors[f"{name}.weight_scale"]
        levels = codes.astype(_F32) - _F32(0)
        return levels * scale.reshape((-1,) + (1,) * (codes.ndim - 1))

    def _head(self, name):
        t = self.tensors
        return {"codes": t[f"{name}.weight_codes"], "scale": t[f"{name}.weight_scale"], "bias": t[f"{name}.bias"]}

    def _binarizer(self, name, channels):
        t = self.tensors
        if f"{name}_scale" not in t:
            raise checkpoint.CheckpointError(f"the packed model has no {name}_scale")
        token = f"{name}_shift" in t
        shift = t.get(f"{name}_shift" if token else f"{name}_threshold", np.zeros(channels, _F32))
        if shift.shape != (channels,):
            raise checkpoint.CheckpointError(f"{name} threshold has shape {shift.shape}, expected ({channels},)")
        return _Binarizer(t[f"{name}_scale"].reshape(()), np.ascontiguousarray(shift, _F32), token)

    def _block(self, b):
        c, t = self.cfg, self.tensors
        D, Hd = c.embed_dim, c.mlp_hidden
        d = D // c.num_heads
        blk = {"norm1": (t[f"{b}.norm1.weight"], t[f"{b}.norm1.bias"]),
               "norm2": (t[f"{b}.norm2.weight"], t[f"{b}.norm2.bias"])}
        for name, k, n in (("attn.qkv", D, 3 * D), ("attn.proj", D, D), ("mlp.fc1", D, Hd), ("mlp.fc2", Hd, D)):
            lin = {"k": k, "bias": t.get(f"{b}.{name}.bias", np.zeros(n, _F32)),
                   "w_scale": t[f"{b}.{name}.weight_scale"]}
            if self.scheme == "tervit":
                lin["nonzero"], lin["sign"] = t[f"{b}.{name}.weight_nonzero"], t[f"{b}.{name}.weight_sign"]
                # sum_k T[n, k] for the zero-point correction of unsigned 8-bit inputs
                lin["colsum"] = (np.bitwise_count(lin["nonzero"]).sum(axis=0, dtype=np.int64)
                                 - 2 * np.bitwise_count(lin["nonzero"] & lin["sign"]).sum(axis=0, dtype=np.int64))
            else:
                lin["bits"] = t[f"{b}.{name}.weight_bits"]
                x = self._binarizer(f"{b}.{name}.input", k)
                lin["input"] = x
                lin["scale"] = x.scale * lin["w_scale"]          # = ix[1] * iw[1] of the simulated forward
                lin["colsum"] = (k - 2 * np.bitwise_count(lin["bits"]).sum(axis=0, dtype=np.int64)).astype(np.int32)
            blk[name] = lin
        if self.scheme == "tervit":
            return blk
        gsb = self.scheme == "gsb"
        for name in ("q", "k") + (() if gsb else ("attn", "v")):
            blk[name] = self._binarizer(f"{b}.attn.{name}", c.num_tokens if name == "attn" else d)
        if gsb:
            blk["gsb"] = {key: t[f"{b}.attn.{key}"] for key in ("attn_alphas", "attn_bias", "v_alphas", "v_shift")}
        else:
            blk["s_av"] = blk["attn"].scale * blk["v"].scale
        blk["s_qk"] = blk["q"].scale * blk["k"].scale
        blk["exp_table"] = exp_table(d, blk["s_qk"], self.inv_sqrt_d)
        blk["exp_monotone"] = table_is_monotone(blk["exp_table"])
        # Decision intervals: the bits of a binarizer on a binary linear's output, taken straight
        # from the integer accumulator (exact: tabulated with the same float operations). Not for
        # input-adaptive ASM 'token' thresholds, nor for GSB's values (their float values are needed).
        qkv, fc1 = blk["attn.qkv"], blk["mlp.fc1"]
        fc2_input, proj_input = blk["mlp.fc2"]["input"], blk["attn.proj"]["input"]
        if not gsb and not any(blk[name].token for name in ("q", "k", "v")):
            threshold = np.concatenate([np.tile(blk[name].shift, c.num_heads) for name in ("q", "k", "v")])
            blk["qkv_intervals"] = decision_intervals(decision_table(linear_values(D, qkv["scale"], qkv["bias"]),
                                                                     threshold))
        if not fc2_input.token:
            blk["fc1_intervals"] = decision_intervals(decision_table(
                linear_values(D, fc1["scale"], fc1["bias"]), fc2_input.shift, fc2_input.scale, c.gelu_approximate))
        if not gsb and not proj_input.token:
            values = linear_values(c.num_tokens, np.full(D, blk["s_av"], _F32), np.zeros(D, _F32))
            blk["heads_intervals"] = decision_intervals(decision_table(values, proj_input.shift))
        return blk

    def _binary_net(self):
        """The stacked per-block arrays of _binary_net when every decision of every block is
        tabulated (binary, binaryvit without the 'token' centre), else None."""
        names = ("qkv_intervals", "heads_intervals", "fc1_intervals")
        if self.scheme not in ("binary", "binaryvit") or any(blk.get(n) is None for blk in self.blocks for n in names):
            return None

        def stack(get, dtype=None):
            return np.ascontiguousarray(np.stack([get(blk) for blk in self.blocks]), dtype)

        def intervals(name):
            operands = [_interval_operands(blk[name]) for blk in self.blocks]
            return tuple(np.stack([o[i] for o in operands]) for i in range(3))

        def panels(name):
            return stack(lambda blk: _weight_panels(blk[name]["bits"]))

        return _BinaryNet(
            stack(lambda blk: blk["norm1"][0], _F32), stack(lambda blk: blk["norm1"][1], _F32),
            stack(lambda blk: blk["attn.qkv"]["input"].shift, _F32),
            panels("attn.qkv"), *intervals("qkv_intervals"),
            stack(lambda blk: blk["exp_table"]), stack(lambda blk: blk["exp_table"], np.float64),
            stack(lambda blk: blk["exp_monotone"]), stack(lambda blk: blk["attn"].scale, _F32),
            stack(lambda blk: _level_threshold(_F32(blk["attn"].scale)), _F32),
            *intervals("heads_intervals"),
            panels("attn.proj"), stack(lambda blk: blk["attn.proj"]["scale"], _F32),
            stack(lambda blk: blk["attn.proj"]["bias"], _F32),
            stack(lambda blk: blk["norm2"][0], _F32), stack(lambda blk: blk["norm2"][1], _F32),
            stack(lambda blk: blk["mlp.fc1"]["input"].shift, _F32),
            panels("mlp.fc1"), *intervals("fc1_intervals"),
            panels("mlp.fc2"), stack(lambda blk: blk["mlp.fc2"]["colsum"]),
            stack(lambda blk: blk["mlp.fc2"]["scale"], _F32), stack(lambda blk: blk["mlp.fc2"]["bias"], _F32),
            _F32(self.cfg.layernorm_eps))

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x):
        """Logits (B, classes) float32 of images x (B, C, H, W) (cast to float32). A distilled
        model returns the mean of its two heads, as ViT.forward in evaluation."""
        c = self.cfg
        x = np.asarray(x)
        expected = (c.in_chans, c.image_size, c.image_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {x.shape}; resize the data or use a model built for it")
        x = x.astype(_F32, copy=False)
        B, N, D = x.shape[0], c.num_tokens, c.embed_dim
        stream = np.ascontiguousarray(self._embed(x).reshape(B * N, D))
        if self.scheme == "tervit":
            for blk in self.blocks:
                stream = self._tervit_block(blk, stream, B)
        elif self.net is not None:
            groups = min(B, numba.get_num_threads())
            _binary_net(stream, B, N, c.num_heads, self.net, groups, self.chunk_images)
        elif self.scheme == "gsb":
            self._binary_blocks(stream, B)
        else:
            # binary / binaryvit blocks treat every image on its own: run them on chunks of images
            # (the same bits, less memory traffic between the kernels)
            chunks = -(-B // self.chunk_images)
            bounds = [B * i // chunks for i in range(chunks + 1)]
            for start, stop in zip(bounds[:-1], bounds[1:]):
                self._binary_blocks(stream[start * N:stop * N], stop - start)
        return self._head_forward(stream.reshape(B, N, D))

    def predict(self, x):
        """Predicted class per image: argmax of forward(x)."""
        return self.forward(x).argmax(axis=1)

    def _embed(self, x):
        """8-bit patch embedding as ViT.forward computes it (float matmul of the 8-bit values) and
        the class / distillation tokens plus position embedding: (B, N, D)."""
        t, c = self.tensors, self.cfg
        B, p, D = x.shape[0], c.patch_size, c.embed_dim
        scale = _F32(_max_abs(x.reshape(-1))) / _F32(127)             # quant.minmax_codes, signed 8-bit
        scale = scale if scale > 0 else _F32(1)
        patches = np.empty((B * c.num_patches, c.in_chans * p * p), _F32)
        _quantized_patches(np.ascontiguousarray(x), scale, p, patches)
        tokens = patches @ self.patch_weight.reshape(D, -1).T         # ops.patch_embed_forward
        tokens += t["patch_embed.proj.bias"]
        tokens, _ = ops.tokens_forward(tokens.reshape(B, c.num_patches, D), t["pos_embed"], t["cls_token"],
                                       t.get("dist_token"))
        return tokens

    def _head_forward(self, x):
        """Final LayerNorm (only on the rows the pooling reads), pooling and the 8-bit head(s)."""
        c, t = self.cfg, self.tensors
        rows = x[:, :c.num_prefix_tokens] if c.global_pool == "token" else x
        h, _ = ops.layernorm_forward(np.ascontiguousarray(rows), t["norm.weight"], t["norm.bias"], c.layernorm_eps)
        pooled = [h[:, 0], h[:, 1]] if c.distilled else [ops.pool_forward(h, c.global_pool, c.num_prefix_tokens)[0]]
        logits = []
        for head, inp in zip(self.heads, pooled):
            codes, x_scale, _ = quant.minmax_codes(inp, 8, True, None)     # the head's input quantizer
            y = _int8_matmul(codes, head["codes"]).astype(_F32)           # exact, as ops.integer_matmul
            y *= x_scale.reshape(()) * head["scale"]                         # ops.linear_forward's epilogue
            y += head["bias"]
            logits.append(y)
        return (logits[0] + logits[1]) / 2 if c.distilled else logits[0]

    # -- binary, binaryvit, gsb ---------------------------------------------------------------

    def _norm_pack(self, stream, B, norm, binarizer, add_mode=0, add=None, acc=None, lin=None):
        """Residual add into the stream [B*N, D] in place (add_mode 1: add = proj output; 2: acc =
        fc2's integer accumulator with lin = fc2), then LayerNorm `norm` and the packed bits of the
        next linear's input `binarizer` [B*N, ceil(D / 64)]; binarizer None: the residual add only."""
        c = self.cfg
        gamma, beta = norm if norm is not None else (self._dummy_v, self._dummy_v)
        eps = _F32(c.layernorm_eps)
        add = self._dummy_f if add is None else add
        acc, colsum, scale, bias = ((self._dummy_i, self._dummy_i[0], self._dummy_v, self._dummy_v) if lin is None
                                    else (acc, lin["colsum"], lin["scale"], lin["bias"]))
        if binarizer is None:
            _residual_norm_pack(stream, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps,
                                self._dummy_v, np.zeros((1, 1), np.uint64), self._dummy_f, 0)
            return None
        bits = np.empty((stream.shape[0], (stream.shape[1] + 63) // 64), np.uint64)
        if not binarizer.token:
            _residual_norm_pack(stream, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps,
                                binarizer.shift, bits, self._dummy_f, 1)
            return bits
        h = np.empty_like(stream)
        _residual_norm_pack(stream, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps,
                            binarizer.shift, bits, h, 2)
        centres = h.reshape(B, c.num_tokens, c.embed_dim).mean(axis=-1, keepdims=True)  # as binaryvit.ASM
        _pack_signed_rows(h, np.ascontiguousarray(centres.reshape(-1)), binarizer.shift, bits)
        return bits

    def _binary_blocks(self, stream, B):
        c = self.cfg
        D, Hd = c.embed_dim, c.mlp_hidden
        blocks = self.blocks
        bits = self._norm_pack(stream, B, blocks[0]["norm1"], blocks[0]["attn.qkv"]["input"])
        for i, blk in enumerate(blocks):
            proj, fc2 = blk["attn.proj"], blk["mlp.fc2"]
            bits = self._attention_bits(blk, self._qkv_bits(blk, bits, B), B)
            a = kernels.binary_gemm(bits, proj["bits"], D, col_scale=proj["scale"], bias=proj["bias"])
            bits = self._norm_pack(stream, B, blk["norm2"], blk["mlp.fc1"]["input"], add_mode=1, add=a)
            bits = self._fc1_bits(blk, bits, B)
            acc = kernels.binary_gemm(bits, fc2["bits"], Hd)
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            bits = self._norm_pack(stream, B, nxt and nxt["norm1"], nxt and nxt["attn.qkv"]["input"],
                                   add_mode=2, acc=acc, lin=fc2)

    def _fc1_bits(self, blk, bits, B):
        """fc1 then GELU then the fc2 input binarizer: packed bits [M, ceil(Hd / 64)] (+-1 recoding)."""
        c, fc1, binarizer = self.cfg, blk["mlp.fc1"], blk["mlp.fc2"]["input"]
        out = np.empty((bits.shape[0], (c.mlp_hidden + 63) // 64), np.uint64)
        f = kernels.binary_gemm(bits, fc1["bits"], c.embed_dim, col_scale=fc1["scale"], bias=fc1["bias"])
        g, _ = ops.gelu_forward(f, c.gelu_approximate)
        centres = np.zeros(g.shape[0], _F32)
        if binarizer.token:
            centres = np.ascontiguousarray(g.reshape(B, c.num_tokens, -1).mean(axis=-1).reshape(-1))  # binaryvit.ASM
        _pack_unsigned_rows(g, centres, binarizer.shift, binarizer.scale, out)
        return out

    def _qkv_bits(self, blk, bits, B):
        """qkv linear and the q, k, v binarizers: (qk_bits [2, B*H, N, Wd], vt_bits [B*H, d, Wn],
        v values (B, H, N, d) float32 or None)."""
        c, qkv = self.cfg, blk["attn.qkv"]
        N, H, D = c.num_tokens, c.num_heads, c.embed_dim
        d = D // H
        qk_bits = np.empty((2, B * H, N, (d + 63) // 64), np.uint64)
        vt_bits = np.zeros((B * H, d, (N + 63) // 64), np.uint64)
        values = kernels.binary_gemm(bits, qkv["bits"], D, col_scale=qkv["scale"], bias=qkv["bias"])
        views = values.reshape(B, N, 3, H, d).transpose(2, 0, 3, 1, 4)   # q, k, v (B, H, N, d), as the model
        centres = np.zeros((3, B * H * N), _F32)
        shifts = np.zeros((3, d), _F32)
        for t, name in enumerate(("q", "k", "v")):
            if name in blk:  # GSB's v has its own quantizer (_gsb_product)
                shifts[t] = blk[name].shift
                if blk[name].token:
                    centres[t] = views[t].mean(axis=-1).reshape(-1)                   # as binaryvit.ASM
        _pack_qkv(values, B, N, H, centres, shifts, qk_bits, vt_bits)
        return qk_bits, vt_bits, views[2]

    def _attention_bits(self, blk, qkv_bits, B):
        """Attention from the packed q, k, v to the proj input's packed bits [B*N, Wd]."""
        c = self.cfg
        N, H, D = c.num_tokens, c.num_heads, c.embed_dim
        d = D // H
        qk_bits, vt_bits, v = qkv_bits
        scores = kernels.binary_bmm(qk_bits[0], qk_bits[1], d)
        if self.scheme == "gsb":
            o, o_scale = self._gsb_product(blk, scores, v, B), _F32(1.0)
        else:
            p_bits = np.empty((B * H * N, (N + 63) // 64), np.uint64)
            _softmax(scores.reshape(-1, N), blk["exp_table"], blk["exp_monotone"], np.empty((0, N), _F32),
                     _F32(blk["attn"].scale), p_bits)
            o, o_scale = kernels.and_bmm(p_bits.reshape(B * H, N, -1), vt_bits, N), blk["s_av"]
        bits = np.zeros((B * N, (D + 63) // 64), np.uint64)
        binarizer = blk["attn.proj"]["input"]
        centres = np.zeros(B * N, _F32)
        if binarizer.token:
            values = o.astype(_F32)
            values *= o_scale
            merged, _ = ops.merge_heads_forward(values.reshape(B, H, N, d))
            centres = np.ascontiguousarray(merged.mean(axis=-1).reshape(-1))             # as binaryvit.ASM
        _pack_heads(o, o_scale, N, H, centres, binarizer.shift, bits)
        return bits

    def _gsb_product(self, blk, scores, v, B):
        """GSB attention output A_q V_q [B*H, N, d] (float32) from the nine exact integer products
        of the binary bases (kernels.gsb_partial_products), combined by gsb_combine."""
        c, opt, gsb = self.cfg, self.options, blk["gsb"]
        N, H = c.num_tokens, c.num_heads
        probs = np.empty(scores.shape, _F32)
        _softmax(scores.reshape(-1, N), blk["exp_table"], False, probs.reshape(-1, N), _F32(1.0),
                 np.empty((0, 1), np.uint64))
        y = probs.reshape(B, H, N, N) + gsb["attn_bias"]                       # GSBAttnQuantizer
        t1, t2 = gsb_attn_masks(y, opt.gsb_max_over)
        level1 = np.clip(np.rint(y / gsb["attn_alphas"][0]), 0, 1) != 0
        a_bases = kernels.pack_bits(np.stack([level1, t1, t2], axis=2).reshape(B * H, 3, N, N))
        yv = v - gsb["v_shift"][:, None, :]                                   # GSBValueQuantizer
        t1v, t2v = gsb_value_masks(yv)
        v_signs = kernels.pack_signs(yv.swapaxes(-1, -2)).reshape(B * H, -1, (N + 63) // 64)
        v_masks = kernels.pack_bits(np.stack([t1v, t2v], axis=2).swapaxes(-1, -2)).reshape(B * H, 2, -1, (N + 63) // 64)
        return gsb_combine(kernels.gsb_partial_products(a_bases, v_signs, v_masks, N), gsb["attn_alphas"],
                           gsb["v_alphas"])

    # -- tervit -------------------------------------------------------------------------------

    def _ternary_linear(self, lin, x, signed):
        """8-bit per-tensor min-max input (quant.minmax_codes, as the model's quantizer) times the
        ternary weight: kernels.ternary_gemm_int8 on the codes, then the float32 epilogue."""
        codes, x_scale, zero_point = quant.minmax_codes(x, 8, signed, None)
        scale = x_scale.reshape(()) * lin["w_scale"]
        if signed:
            return kernels.ternary_gemm_int8(codes, lin["nonzero"], lin["sign"], lin["k"], col_scale=scale,
                                             bias=lin["bias"])
        # levels = codes - zp; sum_k levels t = sum_k (codes - 128) t + (128 - zp) sum_k t
        centred = (codes.astype(np.int16) - 128).astype(np.int8)
        dot = kernels.ternary_gemm_int8(centred, lin["nonzero"], lin["sign"], lin["k"]).astype(np.int64)
        dot += (128 - int(zero_point[0])) * lin["colsum"]
        y = dot.astype(_F32)
        y *= scale
        y += lin["bias"]
        return y

    def _quantized_product(self, a, b, quantizer_a, quantizer_b):
        """ops' product of two per-tensor 8-bit tensors on their integer levels (exact in float32)."""
        _, ca = quantizer_a.forward(a, False)
        _, cb = quantizer_b.forward(b, False)
        (la, sa), (lb, sb) = quantizer_a.integer_form(ca), quantizer_b.integer_form(cb)
        out = ops.integer_matmul(la, lb)
        out *= sa * sb
        return out

    def _tervit_block(self, blk, x, B):
        c = self.cfg
        N, D = c.num_tokens, c.embed_dim
        s8, u8 = self._signed8, self._unsigned8
        h, _ = ops.layernorm_forward(x, *blk["norm1"], c.layernorm_eps)
        qkv = self._ternary_linear(blk["attn.qkv"], h, True)
        (q, k, v), _ = ops.split_heads_forward(qkv.reshape(B, N, 3 * D), c.num_heads)
        scores = self._quantized_product(q, k.swapaxes(-1, -2), s8, s8)
        scores *= self.inv_sqrt_d
        attn, _ = ops.softmax_forward(scores)
        o = self._quantized_product(attn, v, u8, s8)
        o, _ = ops.merge_heads_forward(o)
        x = x + self._ternary_linear(blk["attn.proj"], o.reshape(B * N, D), True)
        h, _ = ops.layernorm_forward(x, *blk["norm2"], c.layernorm_eps)
        h, _ = ops.gelu_forward(self._ternary_linear(blk["mlp.fc1"], h, True), c.gelu_approximate)
        return x + self._ternary_linear(blk["mlp.fc2"], h, False)
