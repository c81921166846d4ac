"""The `data:` section of the trainer's config: which records to read, how to render, mask, truncate, pack and mix.

`DataConfig` is built from the YAML mapping with `data_config_from_dict(yaml_dict["data"])`, which accepts a train or
eval source given as a plain path string (`train: [a.jsonl, {path: b.parquet, weight: 2}]`) and then calls
`jaxft.schema.from_dict`. Every check that needs no file is made here, so a bad value fails while the config is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

from jaxft.schema import ConfigError, from_dict

Format = Literal["auto", "messages", "prompt_completion", "alpaca", "text"]
LossOn = Literal["assistant", "all", "completion", "last_turn"]
Truncation = Literal["drop", "left"]
OnMalformed = Literal["skip", "fail"]
Mixing = Literal["weight", "temperature"]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One dataset.

    path: a local `.jsonl`, `.json`, `.parquet` or `.csv` file (a glob such as `data/*.jsonl` is allowed), a local
      directory, or a Hugging Face hub name (`owner/name`, needs a network).
    format: `auto` detects the format from the columns: `messages` -> messages; `prompt` + `completion` ->
      prompt_completion; `instruction` + `output` -> alpaca; `text` -> text (first match in that order).
    weight: relative sampling weight under `mixing: weight` (see `jaxft.data.mixing`).
    split: the split to read from a hub dataset or a directory; a local file is read whole.
    name: the hub dataset's configuration name, if it has several.
    limit: read at most this many records (0 = all); applied before any filtering.
    """

    path: str
    format: Format = "auto"
    weight: float = 1.0
    split: str = "train"
    name: str | None = None
    limit: int = 0

    def __post_init__(self):
        if not self.path:
            raise ConfigError("source path is empty; give a file, directory or hub dataset name")
        if not self.weight > 0:
            raise ConfigError(f"source {self.path}: weight must be > 0, got {self.weight}")
        if self.limit < 0:
            raise ConfigError(f"source {self.path}: limit must be >= 0 (0 = all records), got {self.limit}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How the trainer's data is read and turned into packed token rows.

    train / eval: the sources, each a path string or a mapping with the keys of `SourceConfig` (`data.train[]`).
    eval_size: with no eval source, carve this many records from the (deduplicated) train records as the eval split,
      deterministically from `seed` (0 = none).
    eval_fraction: with no eval source, carve this fraction of the train records instead (0 = none); set eval_size
      or eval_fraction, not both.
    seq_len: tokens per row. An example longer than this is handled by `truncation`.
    packing: best-fit-decreasing packing of several examples per row (segment ids keep them apart); false = one
      example per row, right-padded.
    loss_on: `assistant` (every assistant turn), `all` (every token), `completion` (the assistant turns of the final
      completion: the `completion` column of prompt/completion data, otherwise the last run of assistant turns),
      `last_turn` (the last assistant turn only). A turn's trained span is its content and the end-of-turn token.
      A `text` record trains every token whatever `loss_on` says.
    truncation: `drop` an over-long example, or cut it from the `left` while the final completion and at least one
      token before it still fit (else drop). A `text` record longer than seq_len is dropped under both policies.
    mixing: `weight` (p_i proportional to weight_i) or `temperature` (p_i proportional to N_i ** temperature).
    temperature: the exponent of `mixing: temperature` (1 = proportional to size, 0 < t < 1 flattens the mix).
    on_malformed: `skip` (and count, with the first line numbers) or `fail` on the first malformed record.
    dedup: drop exact duplicate records (after whitespace normalisation) from train and from eval.
    decontaminate: drop train records that also appear in the eval split.
    chat_template: a Jinja chat template that overrides the tokenizer's own.
    seed: the seed of the eval carve and of mixing (the batch order takes its own seed).
    """

    train: tuple[SourceConfig, ...]
    eval: tuple[SourceConfig, ...] = ()
    eval_size: int = 0
    eval_fraction: float = 0.0
    seq_len: int = 1024
    packing: bool = True
    loss_on: LossOn = "assistant"
    truncation: Truncation = "drop"
    mixing: Mixing = "weight"
    temperature: float = 1.0
    on_malformed: OnMalformed = "skip"
    dedup: bool = True
    decontaminate: bool = True
    chat_template: str | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.train:
            raise ConfigError("data.train: no train source; list at least one file or dataset name")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len: must be >= 2 tokens, got {self.seq_len}")
        if self.eval_size < 0:
            raise ConfigError(f"data.eval_size: must be >= 0, got {self.eval_size}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.eval_size and self.eval_fraction:
            raise ConfigError("data: both eval_size and eval_fraction are set; keep one of them")
        if self.eval and (self.eval_size or self.eval_fraction):
            raise ConfigError("data: eval sources and eval_size/eval_fraction are both set; the eval split comes from one of them")
        if not self.temperature > 0:
            raise ConfigError(f"data.temperature: must be > 0, got {self.temperature}")
        if self.mixing == "temperature" and any(s.weight != 1.0 for s in self.train):
            raise ConfigError("data: source weights are not used with mixing: temperature; remove them or set mixing: weight")


def _normalize_sources(value: Any) -> Any:
    if isinstance(value, (str, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return value  # from_dict reports the type error
    return [{"path": v} if isinstance(v, str) else v for v in value]


def data_config_from_dict(data: Mapping[str, Any] | None, where: str = "data", known=()) -> DataConfig:
    """Build a `DataConfig` from the `data:` mapping of a YAML config; a source may be a plain path string.
    `known`: every dotted key of the whole config, so a key of another section written here is pointed there."""
    if data is None:
        raise ConfigError(f"{where}: missing; add a data section with at least `train: [path.jsonl]`")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    for key in ("train", "eval"):
        if key in data and data[key] is not None:
            data[key] = _normalize_sources(data[key])
    if data.get("eval") is None:
        data.pop("eval", None)
    return from_dict(DataConfig, data, where, known)
