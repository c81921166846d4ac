"""Fused attention kernels for accelerators (Pallas): Triton flash attention for GPUs and a wrapper over jax's splash
attention for TPUs. Leaves: they import nothing from jaxft but `errors`; `jaxft.ops.attention` chooses among them."""

from jaxft.kernels.flash_gpu import FlashBlocks, flash_attention
from jaxft.kernels.splash_tpu import splash_attention

__all__ = ["FlashBlocks", "flash_attention", "splash_attention"]
