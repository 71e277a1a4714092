"""TerViT (Xu et al. 2022, "TerViT: An Efficient Ternary Vision Transformer", arXiv 2201.08050):
channel-wise ternary weights and progressive training, our reconstruction. docs/methods.md.

Channel-wise ternary weights (TWN's rule, Li et al. 2016, arXiv 1605.04711, with the statistics per
output channel c as TerViT uses them):
    Delta_c = 0.7 mean_c |W|
    T = sign(W) 1[|W| > Delta_c]            in {-1, 0, +1}
    alpha_c = mean of |W| over the entries of channel c with |W| > Delta_c
    forward:  W_q = alpha_c T               (alpha, Delta detached)
    pseudo-gradient: dL/dW = dL/dW_q        (identity straight-through estimator)
The rule itself is generic and stays in minibvit.quant (ternarize_forward / ternary_codes,
per_channel=True here, per_channel=False for TWN's per-tensor ternary; spec "w_ternary_channel"):
one implementation for both, this file says how TerViT uses it.

--ternary-granularity tensor swaps in TWN's per-tensor rule (granular_spec) as an ablation.

The fast training path (quant.USE_FUSED, bit for bit the NumPy one; reference_tests/test_fused_tervit.py):
the ternarizer and the min-max 8-bit quantizers run as fused kernels (kernels.quantize_int: the ternary
statistics, levels and output in one pass per channel; min-max a statistics pass, then the output and
the per-tensor activations' uint8 codes in one); the linear layers' products are byte dot products of
those codes and the weight's levels (ops.byte_matmul: VPDPBUSD on AVX512-VNNI, the integer exact, so
levels_matmul's bits), and the other exact integer products (ops.levels_matmul: attention) take their
float32 exactness bound from the quantizers' level ranges (level_bound: 1 for T, 127 or max(zp, 255 - zp)
for 8-bit levels) instead of scanning both operands.

Progressive training (the stages of minibvit.methods' "tervit" record):
    fp           full-precision ViT
    tervit_w8a8  8-bit weights and activations everywhere (W8A8_TABLE), from fp's weights
    tervit       ternary channel-wise weights in the block linears, activations still 8-bit
                 (TERNARY_TABLE), from tervit_w8a8's latent weights
Each stage starts from the previous stage's best checkpoint, so the ternary stage starts from
weights already adapted to quantized activations. --tervit-direct leaves tervit_w8a8 out (the
ternary stage starts from fp), the ablation of the progressive schedule. TerViT has no public code and we worked from its
abstract and summary; our choices where it is silent (docs/methods.md "What we could not read"):
TWN's Delta = 0.7 mean|W|, identity STE, min-max 8-bit activations per tensor and per batch (symmetric
for signed tensors, asymmetric for non-negative ones), min-max 8-bit weights per output channel in
stage 1, and no knowledge distillation.
"""

W8A8_TABLE = {
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
"""TerViT stage 1: 8-bit activations everywhere and 8-bit weights."""

TERNARY_GRANULARITIES = ("channel", "tensor")
TERNARY_SPECS = {"channel": "w_ternary_channel", "tensor": "w_ternary_tensor"}
"""The ternary weight spec of each granularity (--ternary-granularity): TerViT's Delta_c, alpha_c per
output channel, or TWN's one Delta, alpha per tensor (the same rule, quant.ternarize_forward)."""


def granular_spec(spec, granularity):
    """A spec with its ternary granularity set: a ternary weight spec becomes TERNARY_SPECS[granularity],
    any other spec stays."""
    return TERNARY_SPECS[granularity] if spec in TERNARY_SPECS.values() else spec


TERNARY_TABLE = {**W8A8_TABLE, "blocks.*.attn.*.weight": "w_ternary_channel",
                 "blocks.*.mlp.*.weight": "w_ternary_channel"}
"""TerViT stage 2: the block linears' weights ternary per output channel, activations 8-bit."""
