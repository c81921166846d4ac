"""The trainer's typed config: `python -m jaxft.train CONFIG.yaml [dotted.key=value ...]`.

Sections: `model`, `data` (jaxft.data.DataConfig), `method` (`type:` plus the fields of that method's peft spec;
`type: qlora` is LoRA, rsLoRA or DoRA (`adapter:`) over an NF4-quantised base), `quantize` (how `qlora` quantises
the base), `optim` (jaxft.train.optim.OptimConfig), `train`, `eval`, `export`, `parallel` (jaxft.parallel.ParallelSection:
the device mesh, the sharding rules, multi-host start-up), and `output_dir`. Unknown keys are errors with
the closest valid key suggested; every check that can run without weights runs before any compute.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp

from jaxft import peft
from jaxft.data.config import DataConfig, data_config_from_dict
from jaxft.models.llama import ModelOptions
from jaxft.parallel.config import ParallelSection
from jaxft.schema import ConfigError, apply_overrides, describe, from_dict, load_yaml, to_dict
from jaxft.train.optim import OptimConfig

REPORTERS = ("tensorboard", "wandb")
QLORA = "qlora"
QLORA_ADAPTERS = ("lora", "dora")  # rsLoRA is lora with use_rslora
METHODS = ("full", *peft.method_names(), QLORA)
LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEVER_QUANTIZED = ("embed_tokens", "norm", "input_layernorm", "post_attention_layernorm")
NF4_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """path: HF model directory, .gguf file, or `smollm2-135m-instruct`. param_dtype: the dtype the weights are
    stored in (the trainable master copy is always float32). compute_dtype: the dtype of activations and matmuls
    (`auto`: bfloat16 on GPU and TPU, float32 on CPU, whose XLA backend has no fast bfloat16 matmul).
    remat: rematerialisation policy per layer. scan_layers: run layers under lax.scan (fast compile) or unrolled.
    attention: the self-attention of training and evaluation: `auto` (splash attention on TPU and jaxft's Triton
    flash attention on GPU where the sequence length is a multiple of 128, else `xla`), `xla` (blocked attention,
    every platform), `splash` or `flash` (that kernel; on another platform in Pallas interpret mode, for tests)."""

    path: str = "smollm2-135m-instruct"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    scan_layers: bool = True
    attention: Literal["auto", "xla", "splash", "flash"] = "auto"

    def resolved_compute_dtype(self, platform: str | None = None) -> str:
        """`compute_dtype` on `platform` ("cpu", "gpu", "tpu"; default: jax's default backend, so call it after
        `jax.distributed` starts): `auto` is "bfloat16" on accelerators, "float32" on CPU."""
        if self.compute_dtype != "auto":
            return self.compute_dtype
        platform = jax.default_backend() if platform is None else platform
        return "float32" if platform == "cpu" else "bfloat16"

    def options(self, platform: str | None = None) -> ModelOptions:
        """The `ModelOptions` this section runs the model with on `platform` (see `resolved_compute_dtype`)."""
        return ModelOptions(dtype=jnp.dtype(self.resolved_compute_dtype(platform)), remat=self.remat,
                            scan_layers=self.scan_layers, attention=self.attention)


@dataclasses.dataclass(frozen=True)
class LoopSection:
    """steps: optimizer steps (0 = derive from epochs). batch_size: rows per micro-batch across all devices (the
    global batch: each of the data * fsdp data-parallel groups gets batch_size / (data * fsdp) rows, so a run's
    numbers do not depend on the device count; it must divide by that size); grad_accum micro-batches make one step, and the loss is normalised by the loss tokens of the whole step. log_every / eval_every /
    save_every: in steps (0 = only at the end). keep_last / keep_best: checkpoints kept for resume / by eval loss.
    divergence_factor: stop when the running average of the loss exceeds this multiple of its lowest value (and
    that value by at least one nat) after warm-up; a non-finite loss always stops the run.
    early_stopping_patience: stop after this many evaluations in a row (every eval_every steps) without a new best
    eval loss (0 = off; needs eval_every and an eval split). report_to: where metrics go besides metrics.jsonl, as
    TRL names them: a list of `tensorboard` (events under <output_dir>/tb) and `wandb` (Weights & Biases, the wandb
    package; WANDB_MODE=offline works without a network), or `none`.

    epochs: passes over the train rows when steps is 0 (fractional allowed).
    grad_accum: micro-batches per optimizer step (the effective batch is batch_size * grad_accum rows).
    seed: the seed of initialisation, dropout and the batch order.
    """

    steps: int = 0
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    keep_best: int = 1
    divergence_factor: float = 4.0
    early_stopping_patience: int = 0
    report_to: tuple[str, ...] | str | None = ("tensorboard",)

    def __post_init__(self):
        report = self.report_to
        report = () if report in (None, "none") else ((report,) if isinstance(report, str) else tuple(report))
        for r in report:
            if r not in REPORTERS:
                raise ConfigError(f"train.report_to: '{r}' is not one of {', '.join(REPORTERS)} (or none)")
        object.__setattr__(self, "report_to", report)
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be at least 1, got {getattr(self, name)}")
        if self.steps < 0 or self.epochs <= 0 and self.steps == 0:
            raise ConfigError("train: set steps > 0 or epochs > 0")
        for name in ("log_every", "eval_every", "save_every", "keep_last", "keep_best", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise ConfigError("train.keep_last: at least 1 checkpoint must be kept for resume")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """generate: how many eval examples to score by greedy generation (exact match) before and after training
    (0 = none). max_new_tokens: the generation budget per example. batch_size: rows per generation/eval batch.
    base: also score the model before training (the 'before' of the summary)."""

    generate: int = 100
    max_new_tokens: int = 32
    batch_size: int = 16
    base: bool = True


@dataclasses.dataclass(frozen=True)
class ExportSection:
    """adapter: write a peft adapter directory (PEFT methods). merged: write a merged HF model directory.
    verify: reload each export with transformers/peft and compare logits (`auto`: when torch, transformers and
    peft are importable). verify_layers: how many decoder layers the check loads into torch (None: all of them when
    the model fits in half of the available host memory in fp32, otherwise the first layers that fit, at least one);
    the summary and the model card say how many were checked. verify_tolerance: the largest max relative logit
    error an export may show against jaxft's own float32 logits; above it the run fails (exit 1) naming the export
    (null: 1e-4 with float32 weights, 37x the 2.7e-6 the quickstart's 30-layer adapter measures; 1e-1 with
    bfloat16 weights, whose rounding the adapter's check sees against the original base: 3.4x the 2.9e-2 measured
    on tiny random models, 9.4e-3 on SmolLM2).
    checkpoint: which weights are exported, `last` (the final step) or `best` (the kept checkpoint with the best
    `best_metric`; needs train.eval_every and train.keep_best >= 1). best_metric: the metric that ranks checkpoints,
    `eval_loss` (lower is better; HF's metric_for_best_model)."""

    adapter: bool = True
    merged: bool = False
    verify: Literal["auto", "on", "off"] = "auto"
    verify_layers: int | None = None
    verify_tolerance: float | None = None
    checkpoint: Literal["last", "best"] = "last"
    best_metric: Literal["eval_loss"] = "eval_loss"

    def __post_init__(self):
        if self.verify_tolerance is not None and not self.verify_tolerance > 0:
            raise ConfigError(f"export.verify_tolerance: must be > 0, got {self.verify_tolerance!r}")
        if self.verify_layers is not None and self.verify_layers < 1:
            raise ConfigError(f"export.verify_layers: must be a positive number of layers or null (automatic), "
                              f"got {self.verify_layers!r}")


@dataclasses.dataclass(frozen=True)
class QuantizeSection:
    """How `method.type: qlora` quantises the frozen base to NF4 (4-bit NormalFloat, bit-exact with bitsandbytes)
    while it loads; the adapter trains in model.compute_dtype over it. Other methods refuse a non-default section.

    targets: the linear projections stored in NF4: `all-linear` (q/k/v/o and gate/up/down of every layer) or a
        list of those names; embeddings and norms never are.
    lm_head: also quantise an untied output head (bitsandbytes' default leaves it dense); a head tied to the
        embeddings always stays dense, and true there is an error.
    storage_dtype: the array type holding the packed codes: uint8, or bfloat16 (the same bytes, four codes per
        element, as FSDP-QLoRA stores them so a sharded base has one dtype).
    double_quant: quantise the absmax of each 64-value block to 8 bits in blocks of 256 (QLoRA's double
        quantisation: 0.127 instead of 0.5 bits per weight).
    block_size: values per absmax; 64 (bitsandbytes' and QLoRA's) is the one implemented.
    """

    targets: tuple[str, ...] | str = "all-linear"
    lm_head: bool = False
    storage_dtype: Literal["uint8", "bfloat16"] = "uint8"
    double_quant: bool = True
    block_size: int = NF4_BLOCK

    def __post_init__(self):
        targets = self.targets
        if isinstance(targets, str) and targets != "all-linear":
            targets = (targets,)
        if not isinstance(targets, str):
            targets = tuple(str(t) for t in targets)
            if not targets:
                raise ConfigError("quantize.targets: empty; give all-linear or a list of linear projections "
                                  f"({', '.join(LINEAR_PROJECTIONS)})")
            for t in targets:
                name = t.rsplit(".", 1)[-1]
                if name in NEVER_QUANTIZED or "norm" in name:
                    raise ConfigError(f"quantize.targets: '{t}' is an embedding or a norm, which stay dense; list "
                                      f"linear projections only ({', '.join(LINEAR_PROJECTIONS)})")
                if name == "lm_head":
                    raise ConfigError("quantize.targets: 'lm_head' is set by quantize.lm_head: true, not in targets")
                if name not in LINEAR_PROJECTIONS:
                    raise ConfigError(f"quantize.targets: '{t}' is not a linear projection of a Llama layer; "
                                      f"choose from {', '.join(LINEAR_PROJECTIONS)} or all-linear")
        object.__setattr__(self, "targets", targets)
        if self.block_size != NF4_BLOCK:
            raise ConfigError(f"quantize.block_size: {self.block_size} is not implemented; NF4 here uses blocks of "
                              f"{NF4_BLOCK} (bitsandbytes' and QLoRA's), set block_size: {NF4_BLOCK}")

    @property
    def projections(self) -> tuple[str, ...]:
        """The projection names quantised in every layer (`targets` with all-linear expanded)."""
        return LINEAR_PROJECTIONS if self.targets == "all-linear" else tuple(self.targets)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run config (see the module docstring for the sections).

    output_dir: the run directory: config.yaml, checkpoints, metrics, exports and the summary; re-running with the
        same config resumes there.
    """

    output_dir: str
    data: DataConfig
    model: ModelSection = ModelSection()
    method: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"type": "lora"})
    optim: OptimConfig = OptimConfig()
    train: LoopSection = LoopSection()
    eval: EvalSection = EvalSection()
    export: ExportSection = ExportSection()
    parallel: ParallelSection = ParallelSection()
    quantize: QuantizeSection = QuantizeSection()

    @property
    def method_type(self) -> str:
        return str(self.method.get("type", "lora"))

    @property
    def quantized(self) -> bool:
        """Whether the base is NF4-quantised (`method.type: qlora`)."""
        return self.method_type == QLORA

    def quantization(self) -> QuantizeSection | None:
        """The `quantize` section when the base is quantised (`method.type: qlora`), else None."""
        return self.quantize if self.quantized else None


def method_spec(method: Mapping[str, Any]):
    """The typed peft spec of the `method` section (None for full fine-tuning)."""
    kind = method.get("type", "lora")
    if kind not in METHODS:
        close = difflib.get_close_matches(str(kind), METHODS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(METHODS)}"
        raise ConfigError(f"method.type: unknown method '{kind}'; {hint}")
    rest = {k: v for k, v in method.items() if k not in ("type", "init_from")}
    if kind == QLORA:
        adapter = rest.pop("adapter", "lora")
        if adapter not in QLORA_ADAPTERS:
            raise ConfigError(f"method.adapter: '{adapter}' cannot train over an NF4 base; choose "
                              f"{' or '.join(QLORA_ADAPTERS)} (rsLoRA: adapter: lora, use_rslora: true)")
        return peft.spec_from_dict(adapter, rest, "method")
    if "adapter" in rest:
        raise ConfigError(f"method.adapter: only method.type: {QLORA} takes an adapter (the method over the "
                          f"quantised base); remove it or set method.type: {QLORA}")
    if kind == "full":
        if method.get("init_from") is not None:
            raise ConfigError("method.init_from: continues a PEFT adapter, and method.type is full (which would drop "
                              "it); remove init_from, or set method.type to the adapter's method")
        if rest:
            raise ConfigError(f"method: full fine-tuning takes no options, got {', '.join(rest)}")
        return None
    return peft.spec_from_dict(kind, rest, "method")


def method_name(spec) -> str:
    """The `method.type` of a peft spec ('full' for None)."""
    return "full" if spec is None else peft.method_name(spec)


def parse_config(raw: Mapping[str, Any], where: str = "config") -> TrainConfig:
    """Build and validate a TrainConfig from a plain dict. An unknown key's message suggests the key it means
    (`jaxft.schema.suggest`: HF/TRL/peft names, a key of another section, then the closest spelling)."""
    raw = dict(raw)
    if "data" not in raw:
        raise ConfigError(f"{where}: missing required section 'data' (train: [path/to/train.jsonl])")
    known = [r.key for r in describe(TrainConfig)]
    data = data_config_from_dict(raw.pop("data"), "data", known)
    cfg = from_dict(TrainConfig, dict(raw, data=data), "", known)
    method_spec(cfg.method)  # validate now, before any compute
    if not cfg.quantized and cfg.quantize != QuantizeSection():
        raise ConfigError(f"quantize: only method.type: {QLORA} quantises the base (method.type is "
                          f"{cfg.method_type}); remove the quantize section or set method.type: {QLORA}")
    init_from = cfg.method.get("init_from")
    if init_from is not None and not isinstance(init_from, str):
        raise ConfigError("method.init_from: expected a peft adapter directory path")
    return cfg


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read `path` (YAML), apply dotted overrides, validate. An error is blamed on the command-line override that
    set the key it concerns (`override 'optim.lr=-1': optim.lr: ...`), otherwise on the YAML file."""
    raw = apply_overrides(load_yaml(path), list(overrides))
    try:
        return parse_config(raw, path)
    except ConfigError as e:
        raise ConfigError(f"{_blame(str(e), path, overrides)}: {e}") from None


def _blame(message: str, path: str, overrides: list[str] | tuple[str, ...]) -> str:
    """Where an error comes from: the last override that set the key (or a key inside the section) the message
    starts with, else the YAML file."""
    head = message.split(": ", 1)[0]
    unknown = re.match(r"[^:]*: unknown key '([^']*)'", message)
    key = f"{head}.{unknown.group(1)}" if unknown and head not in ("", "config") else (
        unknown.group(1) if unknown else head)
    key = re.sub(r"\[\d+\]", "", key)
    for item in reversed(list(overrides)):
        set_key = re.sub(r"\[\d+\]", "", item.split("=", 1)[0].strip())
        if key == set_key or key.startswith(f"{set_key}.") or set_key.startswith(f"{key}."):
            return f"override '{item}'"
    return path


def check_quantize(quantize: QuantizeSection | None, model_config: Any) -> None:
    """Refuse, before any weight is read, a `quantize` section the model cannot take: `lm_head: true` on a head tied
    to the embeddings (the table is an embedding too, and stays dense), and input features that are not a multiple
    of the block size (blocks run along the input axis). `model_config` is a `jaxft.models.LlamaConfig`."""
    if quantize is None:
        return
    if quantize.lm_head and model_config.tie_word_embeddings:
        raise ConfigError("quantize.lm_head: true, but this model's output head is tied to its embeddings, which "
                          "stay dense; set quantize.lm_head: false")
    d_in = {"q_proj": model_config.hidden_size, "k_proj": model_config.hidden_size,
            "v_proj": model_config.hidden_size, "o_proj": model_config.num_attention_heads * model_config.head_dim,
            "gate_proj": model_config.hidden_size, "up_proj": model_config.hidden_size,
            "down_proj": model_config.intermediate_size}
    if quantize.lm_head:
        d_in["lm_head"] = model_config.hidden_size
    for name in (*quantize.projections, *(("lm_head",) if quantize.lm_head else ())):
        if d_in[name] % quantize.block_size:
            raise ConfigError(f"quantize.targets: {name} has {d_in[name]} input features, not a multiple of the "
                              f"NF4 block ({quantize.block_size}); leave it out of quantize.targets")


def resolved_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The fully resolved config as plain data (written to the run directory)."""
    return to_dict(cfg)
