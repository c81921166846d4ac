"""Every PEFT method jaxft has, by name and by spec class. Adding a method: one module in `jaxft/peft/methods/`
implementing `jaxft.peft.protocol.Method`, and one line here."""

from __future__ import annotations

from typing import Any, Mapping

from jaxft.errors import ConfigError
from jaxft.peft.methods.bitfit import BitFitMethod
from jaxft.peft.methods.dora import DoraMethod
from jaxft.peft.methods.houlsby import HoulsbyMethod
from jaxft.peft.methods.ia3 import IA3Method
from jaxft.peft.methods.lora import LoraMethod
from jaxft.peft.methods.prefix import PrefixMethod
from jaxft.peft.methods.prompt import PromptMethod
from jaxft.peft.protocol import Method
from jaxft.schema import from_dict

METHODS: tuple[Method, ...] = (
    LoraMethod(),
    DoraMethod(),
    IA3Method(),
    PromptMethod(),
    PrefixMethod(),
    HoulsbyMethod(),
    BitFitMethod(),
)
_BY_NAME = {m.name: m for m in METHODS}
_BY_SPEC = {m.spec: m for m in METHODS}


def method_names() -> tuple[str, ...]:
    """The method names (`lora`, `dora`, ...), as the trainer's `method.type` spells them."""
    return tuple(_BY_NAME)


def method_for(spec: Any) -> Method:
    """The method of a spec instance."""
    method = _BY_SPEC.get(type(spec))
    if method is None:
        raise ConfigError(f"{type(spec).__name__}: not a PEFT spec jaxft knows (specs: "
                          f"{', '.join(m.spec.__name__ for m in METHODS)})")
    return method


def method_named(name: str) -> Method:
    if name not in _BY_NAME:
        raise ConfigError(f"unknown PEFT method '{name}'; choose one of {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def method_name(spec: Any) -> str:
    """The name of a spec's method (`LoraSpec(...)` -> 'lora')."""
    return method_for(spec).name


def spec_class(name: str) -> type:
    """The spec dataclass of method `name` (`'lora'` -> `LoraSpec`)."""
    return method_named(name).spec


def spec_from_dict(name: str, fields: Mapping[str, Any] | None, where: str = "method") -> Any:
    """The spec of method `name` from plain fields (a config section), refusing unknown keys and bad types."""
    return from_dict(method_named(name).spec, fields, where)


def method_reading(cfg: dict, where: str) -> Method:
    """The method whose peft `adapter_config.json` this is."""
    for method in METHODS:
        if method.reads(cfg):
            return method
    raise ConfigError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (supported: LORA (incl. DoRA), "
                      "IA3, PROMPT_TUNING, PREFIX_TUNING, and jaxft's JAXFT_HOULSBY, JAXFT_BITFIT)")
