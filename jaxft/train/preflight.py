"""The first stage of a run, `prepare(cfg) -> Prepared`: every check that needs no weights, the tokenizer, the data
and the model's config. It reads files and writes nothing, so a refused run leaves its `output_dir` as it was.

    prep = prepare(cfg)            # raises a one-line ConfigError on anything wrong, before any compute
    print(prep.data.stats.summary(), prep.total_steps)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Any

import yaml

import jaxft
from jaxft import data as jdata
from jaxft import peft
from jaxft.models.config import LlamaConfig
from jaxft.models.params import abstract_params
from jaxft.peft.targets import iter_instances, plan
from jaxft.schema import ConfigError, to_dict
from jaxft.train.config import (QLORA, QLORA_ADAPTERS, TrainConfig, check_quantize, method_name, method_spec,
                                parse_config, resolved_dict)
from jaxft.train.optim import warmup_steps
from jaxft.train.step import adds_inputs


_ABSENT = object()


def _targeted(spec: Any, config: LlamaConfig) -> frozenset[str]:
    """The HF module names `spec` transforms on a model of `config`."""
    return frozenset(name for mp in plan(spec, abstract_params(config)) for _, name in iter_instances(mp))


def _same_choice(spec: Any, key: str, value: Any, config: LlamaConfig) -> bool:
    """Whether setting `key` to `value` leaves `spec` as it is; module selections compare by the modules they pick
    (`all-linear` and the list of names peft writes for it are the same choice)."""
    try:
        other = dataclasses.replace(spec, **{key: value})
    except (ConfigError, TypeError, ValueError):
        return False
    if other == spec:
        return True
    if key in ("target_modules", "exclude_modules", "layers_to_transform") and dataclasses.replace(
            other, **{key: getattr(spec, key)}) == spec:
        try:
            return _targeted(other, config) == _targeted(spec, config)
        except ConfigError:
            return False
    return False


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What `prepare` found: the config (its method section the one that runs, see `resolve_init_from`), the method's typed spec (None for full fine-tuning), the model's config, its
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


# Export settings that may change between a run and its re-run: which exports to write and how to check them
# (a finished run run again writes the missing ones). Which weights are exported may not change.
_REEXPORTABLE = ("adapter", "merged", "verify", "verify_layers", "verify_tolerance")


def check_output_dir(cfg: TrainConfig) -> bool:
    """True when `output_dir` holds this very run (resume, or a finished run to complete its exports); raise if it
    holds anything else. The export section may differ in which exports it asks for and how they are checked."""
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
    try:  # a run saved by an older jaxft lacks the keys added since; they held their defaults
        before = saved_config(parse_config(before, saved))
    except ConfigError:  # keys since removed: compare as written
        pass
    now = saved_config(cfg)
    for d in (before, now):
        for key in _REEXPORTABLE:
            (d.get("export") or {}).pop(key, None)
        model = d.get("model") or {}
        if model.get("compute_dtype") == "auto":  # compare what runs here (a run saved before `auto` says float32)
            model["compute_dtype"] = cfg.model.resolved_compute_dtype()
    diff = _first_difference(before, now)
    if diff:
        raise ConfigError(f"output_dir {out}: holds another run (config differs at {diff}); choose another "
                          "output_dir, or restore that config to resume it")
    return True


def resolve_init_from(cfg: TrainConfig, config: LlamaConfig) -> tuple[TrainConfig, Any]:
    """`(cfg, spec)` with the method section of `method.init_from`'s adapter when there is one: continuing an adapter
    takes its structure (method, rank, targets, ...) from the file. A key the config sets explicitly to another value
    than the file's is an error naming each; what is recorded (config.yaml, summary, model card) is what runs.

    Under `method.type: qlora` the file's method is the adapter trained over the NF4 base (`method.adapter`): a
    LoRA or DoRA adapter saved by any run (qlora, lora, dora) continues there when its type matches `adapter` (or
    sets it, when the config does not); another method is refused in one line."""
    init_from = cfg.method.get("init_from")
    if init_from is None:
        return cfg, method_spec(cfg.method)
    if not os.path.isdir(init_from):
        raise ConfigError(f"method.init_from: {init_from} is not a directory; give a peft adapter directory "
                          "(adapter_config.json + adapter_model.safetensors)")
    file_spec, _ = peft.load_adapter(init_from, config)
    kind = method_name(file_spec)
    qlora = cfg.method.get("type") == QLORA
    if qlora and kind not in QLORA_ADAPTERS:
        raise ConfigError(f"method.init_from: {init_from} holds a {kind} adapter, and method.type: {QLORA} trains "
                          f"{' or '.join(QLORA_ADAPTERS)} over the NF4 base; continue it with method.type: {kind}, "
                          "or train a new adapter without init_from")
    disagree = []
    if qlora and cfg.method.get("adapter", kind) != kind:
        disagree.append(f"adapter {cfg.method['adapter']} (file: {kind})")
    elif not qlora and "type" in cfg.method and cfg.method["type"] != kind:
        disagree.append(f"type {cfg.method['type']} (file: {kind})")
    for key, value in cfg.method.items():
        if key in ("type", "init_from") or (qlora and key == "adapter"):
            continue
        try:
            wanted = getattr(peft.spec_from_dict(kind if qlora else str(cfg.method.get("type", kind)), {key: value},
                                                 "method"), key)
        except ConfigError:
            wanted = value
        have = getattr(file_spec, key, _ABSENT)
        if have is _ABSENT:
            disagree.append(f"{key} {value!r} (a {kind} adapter has no {key})")
        elif not _same_choice(file_spec, key, wanted, config):
            disagree.append(f"{key} {value!r} (file: {to_dict(have)!r})")
    if disagree:
        raise ConfigError(f"method.init_from: {init_from} holds a {kind} adapter that the method section contradicts: "
                          f"{'; '.join(disagree)}; remove those keys (a continued adapter keeps the file's "
                          "structure) or train a new adapter without init_from")
    head = {"type": QLORA, "adapter": kind} if qlora else {"type": kind}
    method = {**head, **to_dict(file_spec), "init_from": init_from}
    return dataclasses.replace(cfg, method=method), file_spec


def total_steps(cfg: TrainConfig, train_rows: int) -> int:
    """Optimizer steps of the run: `train.steps`, or `train.epochs` over `train_rows` packed rows."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return cfg.train.steps or max(1, math.ceil(cfg.train.epochs * train_rows / per_step))


def prepare(cfg: TrainConfig) -> Prepared:
    """Check everything that needs no weights, then read the tokenizer and the data. Writes nothing.

    Refused here, before any compute: a config that differs from the run in output_dir, a method that does not fit
    the model or contradicts `method.init_from`'s adapter, a sequence length beyond the model's, data that is missing
    or does not parse, an eval split larger than the data, warm-up longer than the run, and settings that need
    evaluations (export.checkpoint: best, early stopping) without any."""
    config = jaxft.load_config(cfg.model.path)
    cfg, spec = resolve_init_from(cfg, config)
    resuming = check_output_dir(cfg)
    n_virtual = peft.num_virtual_tokens(spec) if spec is not None else 0
    config.check_sequence_length(cfg.data.seq_len + n_virtual, "data.seq_len")
    check_quantize(cfg.quantization(), config)
    if adds_inputs(spec) and cfg.data.packing:
        raise ConfigError(f"method.type={cfg.method_type} prepends virtual tokens to whole rows: set data.packing=false")
    if "wandb" in cfg.train.report_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.report_to: wandb is not installed; pip install wandb, or drop it from report_to")
    tokenizer = jaxft.load_tokenizer(cfg.model.path)
    data = jdata.prepare(cfg.data, tokenizer)
    steps = total_steps(cfg, len(data.train_rows))
    warm = warmup_steps(cfg.optim, steps)
    if warm > steps:
        raise ConfigError(f"optim.warmup_steps: {warm} warm-up steps for a run of {steps} steps; lower it below "
                          "train.steps")
    needs_eval = [what for what, on in (("export.checkpoint: best", cfg.export.checkpoint == "best"),
                                        ("train.early_stopping_patience", cfg.train.early_stopping_patience > 0)) if on]
    if needs_eval and not data.eval_rows:
        raise ConfigError(f"{needs_eval[0]}: ranks checkpoints by eval loss, and the run has no eval split; set "
                          "data.eval or data.eval_size")
    if needs_eval and not cfg.train.eval_every:
        raise ConfigError(f"{needs_eval[0]}: ranks checkpoints by eval loss measured every train.eval_every steps; "
                          "set train.eval_every")
    if cfg.export.checkpoint == "best" and cfg.train.keep_best < 1:
        raise ConfigError("export.checkpoint: best needs the best checkpoint kept; set train.keep_best >= 1")
    return Prepared(cfg, spec, config, tokenizer, data, steps, resuming)


def check(cfg: TrainConfig) -> str:
    """What `--check` runs: every check of `prepare` (no weights are read, nothing is written); returns a line
    describing the run, or raises a one-line ConfigError."""
    prep = prepare(cfg)
    what = "resumes" if prep.resuming else "starts"
    return (f"valid: {prep.cfg.method_type} on {cfg.model.path}, {prep.total_steps} steps of "
            f"{cfg.train.batch_size * cfg.train.grad_accum} rows ({len(prep.data.train_rows)} train rows, "
            f"{len(prep.data.eval_rows)} eval rows); {what} {cfg.output_dir}")
