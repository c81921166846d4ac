"""What `python -m jaxft.generate` and `python -m jaxft.chat` share: the model/adapter/sampling flags and building
an `Engine` from them."""

from __future__ import annotations

import argparse

from jaxft.generate.engine import Engine
from jaxft.generate.sampling import SamplingParams
from jaxft.generate.text import eos_token_ids, load_for_generation


def add_model_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="HF model directory, .gguf file, or smollm2-135m-instruct (default)")
    ap.add_argument("--adapter", default=None, help="a peft adapter directory to apply (any method jaxft loads)")
    ap.add_argument("--merge", action="store_true", help="merge a LoRA/DoRA/IA3 adapter into the weights first")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=2048, help="KV cache slots per row (prompt + reply)")


def add_sampling_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 (default): off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 (default): off")
    ap.add_argument("--min-p", type=float, default=0.0, help="0 (default): off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p)


def build(args: argparse.Namespace, slots: int, num_logprobs: int = -1):
    """`(engine, tokenizer)` for the parsed flags."""
    config, params, tokenizer, extras = load_for_generation(args.model, args.adapter, args.merge)
    engine = Engine(config, params, slots=slots, max_len=args.max_len, eos_token_ids=eos_token_ids(config, tokenizer),
                    num_logprobs=num_logprobs, seed=args.seed, **extras)
    return engine, tokenizer
