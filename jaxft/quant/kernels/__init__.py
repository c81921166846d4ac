"""Pallas kernels for NF4 weights (dequantize, `x @ W`, `g @ W^T`) and the dispatch that picks them or XLA."""
