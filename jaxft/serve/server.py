"""Build a served model from vLLM-style options: the base, the adapter stack, the engine, the scheduler, the app.

    state = build(ServeOptions(model="path/to/model", lora_modules={"sql": "adapters/sql"}, enable_lora=True))
    uvicorn.run(create_app(state), host="127.0.0.1", port=8000)   # after state.scheduler.start()
"""

from __future__ import annotations

import dataclasses
import json
import os

from jaxft import peft
from jaxft.errors import ConfigError, FileFormatError
from jaxft.generate.engine import Engine
from jaxft.generate.text import eos_token_ids
from jaxft.io.hf import load_pretrained
from jaxft.io.tokenizer import load_tokenizer
from jaxft.peft.multi import AdapterStack, bind_stack
from jaxft.serve.app import ServeState
from jaxft.serve.scheduler import Scheduler

# generation_config.json fields that give the server's sampling defaults (vLLM's `--generation-config auto`).
_DEFAULT_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "max_new_tokens": "max_tokens"}


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What `python -m jaxft.serve` takes (vLLM's flag names). model: an HF directory or a model name jaxft
    knows. enable_lora: serve adapters (a stack of `max_loras` slots of rank up to `max_lora_rank` on every linear
    layer module). lora_modules: adapters loaded at start, name -> peft directory. max_model_len: cache slots per
    row (prompt + completion). max_num_seqs: rows decoded together. max_logprobs: the most `top_logprobs` a
    request may ask. served_model_name: the base model's name in requests (default: `model`)."""

    model: str
    enable_lora: bool = False
    lora_modules: dict = dataclasses.field(default_factory=dict)
    max_loras: int = 4
    max_lora_rank: int = 16
    max_model_len: int = 1024
    max_num_seqs: int = 8
    max_logprobs: int = 5
    served_model_name: str | None = None
    seed: int = 0


def generation_defaults(model: str) -> dict:
    """Sampling defaults from `model/generation_config.json` (empty when there is none)."""
    path = os.path.join(model, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise FileFormatError(f"{path}: not readable JSON ({e}); fix or remove it") from None
    return {ours: cfg[theirs] for theirs, ours in _DEFAULT_FIELDS.items() if cfg.get(theirs) is not None}


def build(opts: ServeOptions) -> ServeState:
    """Load the model and the adapters and make the (not yet started) scheduler and the app's state. Raises
    `ConfigError` / `FileFormatError` for bad options or adapters, before serving anything."""
    if opts.lora_modules and not opts.enable_lora:
        raise ConfigError("--lora-modules needs --enable-lora")
    if len(opts.lora_modules) > opts.max_loras:
        raise ConfigError(f"--lora-modules gives {len(opts.lora_modules)} adapters but --max-loras is "
                          f"{opts.max_loras}; raise --max-loras")
    if opts.max_num_seqs < 1 or opts.max_logprobs < 0:
        raise ConfigError("--max-num-seqs must be >= 1 and --max-logprobs >= 0")
    config, params = load_pretrained(opts.model)
    tokenizer = load_tokenizer(opts.model)
    capacity = opts.max_loras if opts.enable_lora else 1
    stack = AdapterStack.create(params, capacity=capacity, max_rank=opts.max_lora_rank if opts.enable_lora else 1)
    for name, path in opts.lora_modules.items():
        spec, tree = peft.load_adapter(path, config)
        stack.add(name, spec, tree, params)
    engine = Engine(config, bind_stack(params, stack.arrays), slots=opts.max_num_seqs, max_len=opts.max_model_len,
                    eos_token_ids=eos_token_ids(config, tokenizer), num_logprobs=opts.max_logprobs, seed=opts.seed,
                    multi_adapter=True)
    scheduler = Scheduler(engine, stack, params, tokenizer)
    return ServeState(scheduler, tokenizer, config, opts.served_model_name or opts.model, opts.max_model_len,
                      opts.max_logprobs, generation_defaults(opts.model))
