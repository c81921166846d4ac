"""Numerical building blocks: the weight dispatch, attention, RoPE, RMSNorm and the chunked loss."""

from jaxft.ops.attention import attention, attention_mask
from jaxft.ops.linear import Weight, dense, linear, materialize
from jaxft.ops.loss import causal_lm_loss, cross_entropy_sum
from jaxft.ops.norms import rms_norm
from jaxft.ops.rope import apply_rope, rope_tables

__all__ = ["Weight", "apply_rope", "attention", "attention_mask", "causal_lm_loss", "cross_entropy_sum", "dense",
           "linear", "materialize", "rms_norm", "rope_tables"]
