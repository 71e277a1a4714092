"""Bit-packed binary and ternary matrix kernels (Numba), each with a NumPy reference beside it.

Bit convention (larq compute-engine): bit 0 encodes +1, bit 1 encodes -1, and sign(0) = +1, so
``x >= 0`` packs to bit 0 (``-0.0`` too) and ``x < 0`` packs to bit 1 (NaN packs to bit 0).
Packing runs along the reduction axis K into uint64 words: bit j of word w holds element
64*w + j. The tail of the last word (its bits beyond K) is zero, so for two packed +-1 vectors of
true length K

    dot(a, b) = K - 2 * popcount(a XOR b)      (summed over words).

The zero tail is a contract (kernels.pack): the packers write it, the kernels rely on it without
checking it (no cost in the hot loops), and check_zero_tail checks operands from elsewhere once (the
packed engine does at export and load).

    kernels.pack     pack_signs / pack_bits / pack_weight / pack_ternary_weight and their inverses
    kernels.binary   binary_gemm, binary_gemm_packing (sign packing fused in), binary_bmm, and_bmm; the
                     popcount-matmul core they share
    kernels.ternary  ternary_gemm_binary, ternary_gemm_int8, ternary_weight_sums (TerViT);
                     ternary_weight_quads + ternary_gemm_quads (operands laid out by the caller)
    kernels.int8     dot4_bmm, uint8_int8_bmm: 8-bit x 8-bit batched products (TerViT's attention)
    kernels.gsb      gsb_partial_products, gsb_combine, gsb_attention_product (GSB)

Every fast kernel ``f`` has a plain NumPy ``f_reference``; the tests hold them bit-exact.
See docs/kernels.md for the measured speed and the AVX2 / AVX-512 notes.
"""
from ..intrinsics import popcount
from .binary import (and_bmm, and_bmm_reference, binary_bmm, binary_bmm_reference, binary_gemm,
                     binary_gemm_packing, binary_gemm_reference)
from .gsb import (gsb_attention_product, gsb_attention_product_reference, gsb_combine, gsb_partial_products,
                  gsb_partial_products_reference)
from .pack import (WORD_BITS, check_zero_tail, pack_bits, pack_bits_reference, pack_signs, pack_signs_reference,
                   pack_ternary_weight, pack_weight, tail_mask, unpack_bits, unpack_signs, unpack_ternary)
from .ternary import (ternary_gemm_binary, ternary_gemm_binary_reference, ternary_gemm_int8,
                      ternary_gemm_int8_reference, ternary_weight_sums)

__all__ = ["WORD_BITS", "popcount", "check_zero_tail", "tail_mask", "pack_signs", "pack_bits", "pack_weight",
           "pack_ternary_weight", "pack_signs_reference", "pack_bits_reference", "unpack_bits", "unpack_signs",
           "unpack_ternary",
           "binary_gemm", "binary_gemm_packing", "binary_gemm_reference", "binary_bmm", "binary_bmm_reference", "and_bmm",
           "and_bmm_reference", "ternary_gemm_binary", "ternary_gemm_binary_reference", "ternary_gemm_int8",
           "ternary_gemm_int8_reference", "ternary_weight_sums", "gsb_partial_products", "gsb_partial_products_reference",
           "gsb_combine", "gsb_attention_product", "gsb_attention_product_reference"]
