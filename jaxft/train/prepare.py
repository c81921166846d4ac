"""The first stage of a run, `prepare(cfg) -> Prepared`: every check that needs no weights, the tokenizer, the data
and the model's config. It reads files and writes nothing, so a refused run leaves its `output_dir` as it was.

    prep = prepare(cfg)            # raises a one-line ConfigError on anything wrong, before any compute
    print(prep.data.stats.summary(), prep.total_steps)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import yaml

import jaxft
from jaxft import data as jdata
from jaxft.models.config import LlamaConfig
from jaxft.schema import ConfigError
from jaxft.train.config import TrainConfig, method_spec, resolved_dict
from jaxft.train.optim import warmup_steps
from jaxft.train.step import is_prompt_method


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What `prepare` found: the config, the method's typed spec (None for full fine-tuning), the model's config, its
    tokenizer, the prepared data (`jaxft.data.Prepared`), the run's length in optimizer steps, and whether
    `output_dir` already holds this run (a resume)."""

    cfg: TrainConfig
    spec: Any
    model_config: LlamaConfig
    tokenizer: Any
    data: jdata.Prepared
    total_steps: int
    resuming: bool


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    return None if a == b else f"{path} ({a!r} there, {b!r} now)"


def saved_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as `config.yaml` holds it (plain YAML data)."""
    return json.loads(json.dumps(resolved_dict(cfg)))


def check_output_dir(cfg: TrainConfig) -> bool:
    """True when `output_dir` holds this very run (resume); raise if it holds anything else."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir {out}: exists and is a file; choose a directory path")
    if not os.path.exists(out) or not os.listdir(out):
        return False
    saved = os.path.join(out, "config.yaml")
    if not os.path.exists(saved):
        raise ConfigError(f"output_dir {out}: exists and holds files that are not a jaxft run; choose another "
                          "output_dir (nothing there is overwritten)")
    with open(saved) as f:
        before = yaml.safe_load(f)
    diff = _first_difference(before, saved_config(cfg))
    if diff:
        raise ConfigError(f"output_dir {out}: holds another run (config differs at {diff}); choose another "
                          "output_dir, or restore that config to resume it")
    return True


def total_steps(cfg: TrainConfig, train_rows: int) -> int:
    """Optimizer steps of the run: `train.steps`, or `train.epochs` over `train_rows` packed rows."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return cfg.train.steps or max(1, math.ceil(cfg.train.epochs * train_rows / per_step))


def prepare(cfg: TrainConfig) -> Prepared:
    """Check everything that needs no weights, then read the tokenizer and the data. Writes nothing."""
    resuming = check_output_dir(cfg)
    spec = method_spec(cfg.method)
    config = jaxft.load_config(cfg.model.path)
    n_virtual = getattr(spec, "num_virtual_tokens", 0) if is_prompt_method(spec) else 0
    config.check_sequence_length(cfg.data.seq_len + n_virtual, "data.seq_len")
    if is_prompt_method(spec) and cfg.data.packing:
        raise ConfigError(f"method.type={cfg.method_type} prepends virtual tokens to whole rows: set data.packing=false")
    tokenizer = jaxft.load_tokenizer(cfg.model.path)
    data = jdata.prepare(cfg.data, tokenizer)
    steps = total_steps(cfg, len(data.train_rows))
    return Prepared(cfg, spec, config, tokenizer, data, steps, resuming)
