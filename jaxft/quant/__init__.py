"""Quantised weight types: `NF4Tensor` (4-bit NormalFloat, bit-exact with bitsandbytes) and its kernels."""

from jaxft.quant.bnb_format import BnbNF4, dequantize_bnb, quantize_bnb
from jaxft.quant.nf4 import NF4Tensor, dequantize, from_bnb, quantize, to_bnb

__all__ = ["BnbNF4", "NF4Tensor", "dequantize", "dequantize_bnb", "from_bnb", "quantize", "quantize_bnb", "to_bnb"]
