"""Typed, frozen specs of the PEFT methods: one dataclass per method, no flags that switch methods.

Names follow peft's configs where peft has the option (`r`, `target_modules`, `rank_pattern`, ...), so a peft
`adapter_config.json` translates field by field (see `jaxft.peft.io`). Module names are HF module paths
(`model.layers.3.self_attn.q_proj`); a target given as a list matches a module whose name equals it or ends with
`.<target>` (peft's rule), a target given as one string is a regular expression matched against the whole name,
and `all-linear` means every linear layer but the output head (peft's meaning).

Specs are hashable (mappings are stored as sorted tuples of pairs), so they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, Mapping, Union

from jaxft.errors import ConfigError

Targets = Union[str, tuple[str, ...]]
Pattern = Union[tuple[tuple[str, float], ...], Mapping[str, float]]

ALL_LINEAR = "all-linear"
SAVABLE_MODULES = ("embed_tokens", "lm_head")


def _freeze_pattern(spec, name: str, cast) -> None:
    value = getattr(spec, name)
    items = value.items() if isinstance(value, Mapping) else value
    try:
        frozen = tuple((str(k), cast(v)) for k, v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{type(spec).__name__}.{name}: expected a mapping of module-name pattern to number, "
                          f"got {value!r}") from None
    object.__setattr__(spec, name, frozen)


def _freeze_targets(spec, name: str) -> None:
    value = getattr(spec, name)
    if value is None or isinstance(value, str):
        return
    object.__setattr__(spec, name, tuple(str(v) for v in value))


def _check_modules_to_save(spec) -> None:
    object.__setattr__(spec, "modules_to_save", tuple(spec.modules_to_save))
    for m in spec.modules_to_save:
        if m.split(".")[-1] not in SAVABLE_MODULES:
            raise ConfigError(f"{type(spec).__name__}.modules_to_save: '{m}' is not supported (jaxft trains whole "
                              f"modules only for {', '.join(SAVABLE_MODULES)})")


@dataclasses.dataclass(frozen=True)
class _LowRankSpec:
    """Fields shared by LoRA and DoRA (abstract: use `LoraSpec` or `DoraSpec`).

    r: the rank of the update B A.
    alpha: the scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA).
    dropout: dropout on the adapter's input (peft's lora_dropout).
    target_modules: the modules to adapt: a list of names (a module matches its name or .name suffix), a regular
        expression string, or `all-linear` (every linear layer but the head).
    exclude_modules: modules left out of target_modules (same forms).
    use_rslora: rank-stabilised scaling alpha / sqrt(r).
    init: the initialisation of A: `kaiming` uniform (peft's default) or `gaussian` (std 1/r).
    rank_pattern: per-module ranks overriding r: {module-name pattern: rank}.
    alpha_pattern: per-module alphas overriding alpha: {module-name pattern: alpha}.
    layers_to_transform: adapt only these layer indices (null = all layers).
    modules_to_save: whole modules trained and saved besides the adapter (embed_tokens, lm_head).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: Targets = ("q_proj", "v_proj")
    exclude_modules: Targets | None = None
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    rank_pattern: Pattern = ()
    alpha_pattern: Pattern = ()
    layers_to_transform: tuple[int, ...] | None = None
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        name = type(self).__name__
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{name}.r: rank must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{name}.dropout: must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"{name}.init: '{self.init}' is not one of 'kaiming', 'gaussian'")
        _freeze_targets(self, "target_modules")
        _freeze_targets(self, "exclude_modules")
        _freeze_pattern(self, "rank_pattern", int)
        _freeze_pattern(self, "alpha_pattern", float)
        for key, rank in self.rank_pattern:
            if rank < 1:
                raise ConfigError(f"{name}.rank_pattern['{key}']: rank must be positive, got {rank}")
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            layers = (layers,) if isinstance(layers, int) else tuple(int(i) for i in layers)
            object.__setattr__(self, "layers_to_transform", layers)
            if isinstance(self.target_modules, str):
                raise ConfigError(f"{name}.layers_to_transform: cannot be combined with a regex target_modules "
                                  "string (peft refuses it too); list the module names instead")
        _check_modules_to_save(self)

    def scaling(self, r: int, alpha: float) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r


@dataclasses.dataclass(frozen=True)
class LoraSpec(_LowRankSpec):
    """LoRA (and rsLoRA with `use_rslora`): `y = x W + s (x A) B`, A kaiming-uniform (a=sqrt(5)) or gaussian
    (std 1/r), B zero."""


@dataclasses.dataclass(frozen=True)
class DoraSpec(_LowRankSpec):
    """DoRA: LoRA's direction update plus a trained magnitude per output feature, initialised to the column norms of
    `W + s B A` (`= ||W||` with B zero)."""


@dataclasses.dataclass(frozen=True)
class IA3Spec:
    """(IA)^3: a learned vector (initialised to ones) scaling the output of each target, or its input for the
    `feedforward_modules` (which must be targets too).

    target_modules: the modules whose output (or input, for feedforward_modules) gets a learned vector.
    feedforward_modules: the targets scaled on their input instead of their output.
    exclude_modules: modules left out of target_modules.
    modules_to_save: whole modules trained and saved besides the adapter (embed_tokens, lm_head).
    """

    target_modules: Targets = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: Targets = ("down_proj",)
    exclude_modules: Targets | None = None
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        _freeze_targets(self, "target_modules")
        _freeze_targets(self, "feedforward_modules")
        _freeze_targets(self, "exclude_modules")
        if isinstance(self.target_modules, tuple) and isinstance(self.feedforward_modules, tuple):
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise ConfigError(f"IA3Spec.feedforward_modules: {', '.join(extra)} not in target_modules "
                                  f"({', '.join(self.target_modules)}); every feedforward module must be a target")
        _check_modules_to_save(self)


@dataclasses.dataclass(frozen=True)
class PromptTuningSpec:
    """Prompt tuning: `num_virtual_tokens` learned embeddings prepended to the input. `init='random'` draws them
    from N(0, 1) (peft's `nn.Embedding` default); `init='text'` copies the embeddings of `init_text`'s tokens,
    repeated or cut to length (peft's TEXT init).

    num_virtual_tokens: how many learned embeddings are prepended to the input.
    init: `random` (N(0, 1)) or `text` (the embeddings of init_text's tokens).
    init_text: the text whose token embeddings initialise the prompt when init is text.
    """

    num_virtual_tokens: int = 20
    init: Literal["random", "text"] = "random"
    init_text: str | None = None

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"PromptTuningSpec.num_virtual_tokens: must be >= 1, got {self.num_virtual_tokens}")
        if self.init not in ("random", "text"):
            raise ConfigError(f"PromptTuningSpec.init: '{self.init}' is not one of 'random', 'text'")
        if self.init == "text" and not self.init_text:
            raise ConfigError("PromptTuningSpec.init_text: init='text' needs a non-empty init_text")


@dataclasses.dataclass(frozen=True)
class PrefixTuningSpec:
    """Prefix tuning: learned keys and values (`num_virtual_tokens` of them, N(0, 1) init as peft's) prepended in
    every layer. No reparameterisation MLP (peft's `prefix_projection`).

    num_virtual_tokens: how many learned key/value positions are prepended in every layer.
    """

    num_virtual_tokens: int = 20

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"PrefixTuningSpec.num_virtual_tokens: must be >= 1, got {self.num_virtual_tokens}")


@dataclasses.dataclass(frozen=True)
class HoulsbySpec:
    """Houlsby bottleneck adapters (down-projection to `bottleneck`, `activation`, up-projection, residual) on the
    output of `target_modules` (default: after the attention block and after the MLP). Down-projection N(0,
    init_std), up-projection zero: the model is unchanged at initialisation.

    bottleneck: the width of the adapter's down-projection.
    activation: the nonlinearity between down- and up-projection.
    target_modules: the modules whose output goes through an adapter.
    init_std: the standard deviation of the down-projection's initialisation.
    """

    bottleneck: int = 64
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    target_modules: Targets = ("o_proj", "down_proj")
    init_std: float = 0.01

    def __post_init__(self):
        _freeze_targets(self, "target_modules")
        if self.bottleneck < 1:
            raise ConfigError(f"HoulsbySpec.bottleneck: must be >= 1, got {self.bottleneck}")
        if self.activation not in ("relu", "gelu", "silu", "tanh"):
            raise ConfigError(f"HoulsbySpec.activation: '{self.activation}' is not one of relu, gelu, silu, tanh")


@dataclasses.dataclass(frozen=True)
class BitFitSpec:
    """BitFit: only the model's existing biases train (`target_modules`: which modules' biases; 'all' = every
    bias the model has).

    target_modules: which modules' biases train (`all` = every bias the model has).
    """

    target_modules: Targets = "all"
    biases_only: ClassVar[bool] = True  # `targets.plan`: only modules that have a bias

    def __post_init__(self):
        _freeze_targets(self, "target_modules")


LoRALike = (LoraSpec, DoraSpec)
TreeSpec = Union[LoraSpec, DoraSpec, IA3Spec, HoulsbySpec, BitFitSpec]
PromptSpec = Union[PromptTuningSpec, PrefixTuningSpec]
Spec = Union[TreeSpec, PromptSpec]
