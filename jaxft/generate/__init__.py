"""Generation: batched greedy decoding with a KV cache (sampling and multi-adapter batches come with step 6)."""

from jaxft.generate.greedy import greedy_generate

__all__ = ["greedy_generate"]
