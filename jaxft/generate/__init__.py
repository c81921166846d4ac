"""Generation: a slot-level engine (prefill into a slot, decode all active slots, free a slot) over a donated KV
cache, sampling with per-row parameters, stop conditions (stop strings on the host: `StopScanner`), a chat helper,
and greedy decoding for evaluations."""

from jaxft.generate.engine import Counters, Engine, Event, Slots, length_bucket
from jaxft.generate.greedy import greedy_generate
from jaxft.generate.sampling import GREEDY, SamplingParams, filtered_logits, sample
from jaxft.generate.stops import StopScanner

__all__ = ["GREEDY", "Counters", "Engine", "Event", "SamplingParams", "Slots", "StopScanner", "filtered_logits",
           "greedy_generate", "length_bucket", "sample"]
