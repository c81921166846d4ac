"""Quantised weight types: `NF4Tensor` (4-bit NormalFloat, bit-exact with bitsandbytes), its kernels, and NF4 in a
parameter tree (`QuantPlan`: which kernels; `quantize_params`; loading with `jaxft.load_pretrained(...,
quantize=plan)`; the fields' logical axes; the guard against training a quantised base)."""

from jaxft.quant.bnb_format import BnbNF4, dequantize_bnb, quantize_bnb
from jaxft.quant.nf4 import NF4Tensor, dequantize, from_bnb, quantize, to_bnb, view_codes, with_storage
from jaxft.quant.params import (QuantPlan, abstract_quantized, compute_view, dequantizing_to, nf4_axes, nf4_leaves, quantize_params,
                                refuse_trainable, tree_axes)

__all__ = ["BnbNF4", "NF4Tensor", "QuantPlan", "abstract_quantized", "compute_view", "dequantize", "dequantize_bnb", "dequantizing_to",
           "from_bnb", "nf4_axes", "nf4_leaves", "quantize", "quantize_bnb", "quantize_params", "refuse_trainable",
           "to_bnb", "tree_axes", "view_codes", "with_storage"]
