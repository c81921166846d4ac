"""Generation: a slot-level engine (prefill into a slot, decode all active slots, free a slot) over a donated KV
cache, sampling with per-row parameters, stop conditions, a chat helper, and greedy decoding for evaluations."""

from jaxft.generate.engine import Engine, Event, Slots
from jaxft.generate.greedy import greedy_generate
from jaxft.generate.sampling import GREEDY, SamplingParams, filtered_logits, sample

__all__ = ["GREEDY", "Engine", "Event", "SamplingParams", "Slots", "filtered_logits", "greedy_generate", "sample"]
