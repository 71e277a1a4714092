"""Export a trained low-bit ViT to packed bits, and run it end to end on the bit-packed kernels.

    report = export("runs/.../best.safetensors", "model.packed.safetensors")   # -> ExportReport
    engine = PackedViT.load("model.packed.safetensors")
    logits = engine.forward(images)        # images (B, C, H, W) float32, normalised like training

Methods: ``binary``, ``binaryvit`` (every ASM centre), ``gsb`` and ``tervit``. A full-precision or
intermediate-stage checkpoint is refused with a ValueError.

Why the logits have the same bits as the training-time forward ``ViT.forward(x, training=False)``
(every method: binary, binaryvit, tervit and gsb; reference_tests/test_engine.py holds them equal):

- The simulated forward computes every product of two quantized operands on their integer levels,
  ``y = float32(x_levels @ w_levels.T) * (s_x * s_w) + bias`` (ops.levels_matmul, composed with the
  quantizers by minibvit.model). The engine computes the same integers with popcounts
  (kernels.binary_gemm, binary_bmm, and_bmm) or byte dot products (kernels.ternary_gemm_int8) and
  applies the same float32 scale vector and bias, in the same order, without fused multiply-adds.
- A binarizer's decision on a binary linear's output is a function of the output column c and the
  integer I alone (the value is float32(I) * s_c + b_c). The engine tabulates it at load time with
  the same float operations as the model (ops.gelu_forward itself for GELU before the fc2
  binarizer) and packs bits straight from the integer accumulators, through one interval of I per
  column (decision_intervals): no float pass, the same bits. The softmax of binary attention scores
  reads its exp values from a table built the same way (exp_table), sums them in float64 in ops'
  order, and finds each row's binarization threshold on the scores.
- Every other float operation repeats minibvit.ops: LayerNorm with numerics' own float64 moments
  and normalise step (fused with the residual add before it and the sign packing after it), the ASM thresholds folded
  at export (running centre + shift, the same float32 sum) or, for the 'token' centre, NumPy's mean
  as in binaryvit.ASM; the 8-bit patch embedding (float BLAS on the 8-bit values, as the model), the
  final norm, pooling and head, and the whole TerViT block except its ternary linears call ops.
- GSB's A_q and V_q are sums of three scaled binary bases, so A_q V_q is a sum of nine scaled
  integer products. The engine computes them exactly (kernels.gsb_partial_products) and combines
  them in a fixed float64 order (kernels.gsb_combine); the simulated forward computes the same nine
  integer products on the quantizers' bases (ops.basis_matmul) and combines them with the same
  gsb_combine, so the logits have the same bits. (A float32 BLAS product of the summed A_q and V_q,
  as the simulated forward once computed, leaves rounding noise of ~1e-9 where the exact product is
  0, which decided some sign bits of the proj input: docs/engine.md.)
- Batch-wide statistics belong to some methods: the 8-bit patch-embedding and head inputs and all of
  TerViT's activations use min-max scales of the whole batch tensor, and GSB's masks its maximum.
  The engine computes them the same way, so it equals the simulated forward on the same batch.
  binary / binaryvit blocks treat each image on its own, so they run image by image: with every
  decision tabulated, all blocks in one parallel region with the images split between the threads
  (engine.binary_net), else one call per operation on chunks of chunk_images images (the same bits).

    engine.format      the packed file: its one tensor table (tensor_specs), export, read_packed and
                       check_tensors (every tensor's dtype, shape and zero tail), packed_kind
    engine.fused       fused float kernels: residual + LayerNorm + packing, exp and decision tables,
                       the binary-score softmax, the 8-bit patch and head helpers
    engine.binary_net  the one-region binary network (run_binary_net)
    engine.packed      PackedViT

Packed file: safetensors with the minibvit metadata of minibvit.checkpoint (``kind`` =
"minibvit-packed"). Its tensors are one table, ``tensor_specs(cfg, scheme, options)`` (name ->
dtype, shape, content): export writes exactly those, and the loader refuses a file with a missing,
unexpected, retyped or reshaped tensor, a set bit in a bit-plane's zero tail, or metadata without a
valid scheme, model_config or scheme_options. docs/engine.md lists the format and measurements.
"""
from ..kernels.gsb import gsb_combine
from .format import (EXPORTABLE_SCHEMES, PACKED_KIND, PACKED_VERSION, ExportReport, TensorSpec, check_tensors,
                     export, format_problems, packed_kind, read_packed, tensor_specs)
from .fused import decision_intervals, decision_table, exp_table, linear_values, table_is_monotone
from .packed import CHUNK_BYTES, PackedViT

__all__ = ["export", "ExportReport", "PackedViT", "packed_kind", "read_packed", "check_tensors", "tensor_specs",
           "TensorSpec", "format_problems", "PACKED_KIND",
           "PACKED_VERSION", "EXPORTABLE_SCHEMES", "CHUNK_BYTES", "gsb_combine", "exp_table", "table_is_monotone",
           "linear_values", "decision_table", "decision_intervals"]
