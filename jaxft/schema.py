"""Typed configuration: frozen dataclasses read from plain dicts (YAML) with one-line errors, and their reference.

Every config section in jaxft is a frozen dataclass. `from_dict(cls, data, where)` builds one from a mapping,
recursing into nested dataclass fields, and refuses unknown keys with a suggestion ranked by meaning as well as by
spelling: a name users bring from HF `TrainingArguments`, TRL or peft (`learning_rate`, `lora_r`) is mapped to
jaxft's key through `ALIASES`, a key written in the wrong section is pointed to its section, and only then is the
closest spelling suggested. `apply_overrides(data, ["optim.lr=1e-4", ...])` applies dotted `key=value` overrides
(values parsed as YAML).

The reference (`python -m jaxft.train --help-config`) is generated from the dataclasses: `describe(cls, prefix)`
lists every key with its type, default and the one-line doc that the class docstring gives it in the
`name: text.` style (`a, b: text.` and `a / b: text.` document several keys at once), or that a field's
`metadata["doc"]` gives.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from jaxft.errors import ConfigError  # re-exported: `from jaxft.schema import ConfigError` keeps working
from jaxft.io.files import read_text

T = TypeVar("T")


# Names from HF TrainingArguments, TRL's SFTConfig and peft's LoraConfig -> (jaxft key, how to write it there).
# Every target is checked against the config reference by tests/test_cli.py, so this table cannot point at a key
# that no longer exists.
ALIASES: dict[str, tuple[str, str]] = {
    # HF TrainingArguments
    "learning_rate": ("optim.lr", ""),
    "per_device_train_batch_size": ("train.batch_size", ""),
    "train_batch_size": ("train.batch_size", ""),
    "per_device_eval_batch_size": ("eval.batch_size", ""),
    "num_train_epochs": ("train.epochs", ""),
    "max_steps": ("train.steps", ""),
    "gradient_accumulation_steps": ("train.grad_accum", ""),
    "warmup_ratio": ("optim.warmup_ratio", "a fraction of the total steps, as HF's"),
    "warmup_steps": ("optim.warmup_steps", ""),
    "lr_scheduler_type": ("optim.schedule", "cosine, linear or constant"),
    "weight_decay": ("optim.weight_decay", ""),
    "max_grad_norm": ("optim.max_grad_norm", ""),
    "adam_beta1": ("optim.b1", ""),
    "adam_beta2": ("optim.b2", ""),
    "adam_epsilon": ("optim.eps", ""),
    "logging_steps": ("train.log_every", ""),
    "eval_steps": ("train.eval_every", ""),
    "eval_strategy": ("train.eval_every", "evaluate every N steps; 0 = only at the end"),
    "evaluation_strategy": ("train.eval_every", "evaluate every N steps; 0 = only at the end"),
    "save_steps": ("train.save_every", ""),
    "save_total_limit": ("train.keep_last", ""),
    "seed": ("train.seed", "data.seed seeds the eval carve and the mixing"),
    "output_dir": ("output_dir", ""),
    "bf16": ("model.compute_dtype", "compute_dtype: bfloat16"),
    "fp16": ("model.compute_dtype", "float16 is not supported; compute_dtype: bfloat16"),
    "gradient_checkpointing": ("model.remat", "remat: full"),
    "model_name_or_path": ("model.path", ""),
    # TRL SFTConfig
    "max_seq_length": ("data.seq_len", ""),
    "max_length": ("data.seq_len", ""),
    "packing": ("data.packing", ""),
    "dataset_text_field": ("data.train", "a text record is {\"text\": ...} with format: text; rename the column"),
    "completion_only_loss": ("data.loss_on", "loss_on: completion"),
    "assistant_only_loss": ("data.loss_on", "loss_on: assistant"),
    # peft LoraConfig, and the lora_ prefixes of other trainers
    "lora_r": ("method.r", ""),
    "lora_rank": ("method.r", ""),
    "rank": ("method.r", ""),
    "r": ("method.r", ""),
    "lora_alpha": ("method.alpha", ""),
    "lora_dropout": ("method.dropout", ""),
    "target_modules": ("method.target_modules", ""),
    "lora_target_modules": ("method.target_modules", ""),
    "use_rslora": ("method.use_rslora", ""),
    "use_dora": ("method.type", "type: dora"),
    "peft_type": ("method.type", ""),
    "modules_to_save": ("method.modules_to_save", ""),
}


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio()


def suggest(key: str, where: str, valid: Sequence[str], known: Sequence[str] = ()) -> str:
    """The hint for the unknown key `key` in section `where` (dotted, "" = top level) whose valid keys are `valid`.

    Ranked by meaning first: a key listed in `ALIASES` (or a misspelling of one) gets the jaxft key it means; a key
    that exists in another section of `known` (all dotted keys of the config) is pointed there; then the closest
    valid spelling (difflib ratio >= 0.6); else the list of valid keys."""
    here = f"{where}." if where else ""
    alias = ALIASES.get(key.lower())
    if alias is None:
        close = max(ALIASES, key=lambda a: _ratio(key, a))
        if _ratio(key, close) >= 0.85:
            alias = ALIASES[close]
    if alias is not None and alias[0] != f"{here}{key}":
        target, how = alias
        notes = [how] if how else []
        if "." not in target and where:
            notes.insert(0, "at the top level")
        return f"did you mean '{target}'?" + (f" ({'; '.join(notes)})" if notes else "")
    elsewhere = [k for k in known if k.rsplit(".", 1)[-1] == key and k != f"{here}{key}"]
    if elsewhere:
        return f"'{key}' belongs elsewhere: {' or '.join(sorted(elsewhere))}"
    scored = sorted(((max(_ratio(key, v), _ratio(key.replace("_", ""), v.replace("_", ""))), v) for v in valid),
                    reverse=True)
    if scored and scored[0][0] >= 0.6:
        return f"did you mean '{scored[0][1]}'?"
    return f"valid keys: {', '.join(sorted(valid))}"


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(tp: Any, value: Any, where: str, known: Sequence[str] = ()) -> Any:
    """Check (and gently coerce) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, known)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where, known)
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item = args[0]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]", known) for i, (a, v) in enumerate(zip(args, value)))
        else:
            item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{where}[{i}]", known) for i, v in enumerate(value))
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(kt, k, _join(where, str(k))): _coerce(vt, v, _join(where, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "config",
              known: Sequence[str] = ()) -> T:
    """Build the frozen dataclass `cls` from `data`, refusing unknown keys (with a suggestion, see `suggest`;
    `known`: every dotted key of the whole config, to point a key written in the wrong section to its own) and bad
    types."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            section = re.sub(r"\[\d+\]", "[]", where)
            raise ConfigError(f"{where or 'config'}: unknown key '{key}'; "
                              f"{suggest(str(key), section, list(fields), known)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], _join(where, name), known)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{name}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config dataclass (tuples become lists), suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict; values are parsed as YAML (`lr=1e-4`, `targets=[q_proj]`)."""
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected dotted.key=value, e.g. optim.lr=1e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key part")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, Mapping):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping from `path` with a one-line error for a missing, unreadable, non-UTF-8 or malformed file
    (`FileFormatError` for the file, `ConfigError` for its content)."""
    text = read_text(path, "a YAML config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{path}{at}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# ---- the reference -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key of the reference: dotted `key`, readable `type`, `default` as YAML text ("required" when
    there is none) and `doc` (one line; "" when its class documents nothing for it)."""

    key: str
    type: str
    default: str
    doc: str


def _doc_entries(cls: type) -> dict[str, str]:
    """`name: text` entries of the docstrings of `cls` and its bases (the class's own win)."""
    names = sorted((f.name for f in dataclasses.fields(cls)), key=len, reverse=True)
    if not names:
        return {}
    name = "(?:" + "|".join(re.escape(n) for n in names) + ")"
    head = rf"{name}(?:\s*(?:,|/|\bor\b)\s*{name})*(?:\s*\([^()]*\))?"
    # an entry starts at the start of the docstring, of a line, or after a sentence; its head names fields
    start = re.compile(rf"(?:^|(?<=[.;:]\s)|(?<=\n))\s*`?({head})`?:\s")
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = klass.__dict__.get("__doc__") or ""
        if klass is not cls and not dataclasses.is_dataclass(klass):
            continue
        matches = list(start.finditer(text))
        for m, nxt in zip(matches, matches[1:] + [None]):
            body = " ".join(text[m.end(): nxt.start() if nxt else len(text)].split())
            heading = " ".join(m.group(1).split())
            keys = list(dict.fromkeys(re.findall(rf"\b{name}\b", heading)))
            line = body if heading in keys else f"{heading}: {body}"
            for k in keys:
                out[k] = line
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The one-line doc of each field of the dataclass `cls`: `metadata["doc"]`, else its docstring entry, else ""."""
    entries = _doc_entries(cls)
    return {f.name: f.metadata.get("doc") or entries.get(f.name, "") for f in dataclasses.fields(cls) if f.init}


def type_name(tp: Any) -> str:
    """A readable name of the annotation `tp` for the reference (`int`, `'a' or 'b'`, `list of str`, ...)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        parts = dict.fromkeys(type_name(a) for a in args if a is not type(None))
        return " or ".join(list(parts) + (["null"] if type(None) in args else []))
    if origin is typing.Literal:
        return " or ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return "section"
    if origin in (tuple, list, collections.abc.Sequence) or tp in (tuple, list):
        item = args[0] if args else Any
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item = args[0]
        if typing.get_origin(item) is tuple:  # a mapping frozen as pairs
            k, v = typing.get_args(item)[:2]
            return f"mapping of {type_name(k)} to {type_name(v)}"
        return f"list of {type_name(item)}"
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        k, v = args if args else (Any, Any)
        return f"mapping of {type_name(k)} to {type_name(v)}"
    return getattr(tp, "__name__", str(tp))


def yaml_value(value: Any) -> str:
    """`value` as it is written in a YAML config (tuples as lists, None as null), on one line."""
    return yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def describe(cls: type, prefix: str = "", skip: Sequence[str] = ()) -> list[KeyDoc]:
    """Every key of the dataclass `cls` under `prefix` (dotted), recursing into nested dataclass sections; the
    fields named in `skip` are left out (sections the caller describes itself)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key)
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple and typing.get_args(tp) else None
        if dataclasses.is_dataclass(item):  # a list of sections: the list, then the keys of one item
            text = "required" if default is dataclasses.MISSING else yaml_value(default)
            rows.append(KeyDoc(key, f"list of {item.__name__}", text, docs[f.name]))
            rows += describe(item, f"{key}[]")
            continue
        text = "required" if default is dataclasses.MISSING else yaml_value(default)
        rows.append(KeyDoc(key, type_name(tp), text, docs[f.name]))
    return rows


def format_reference(sections: Sequence[tuple[str, str, Sequence[KeyDoc]]], markdown: bool = False,
                     title: str = "", preamble: str = "") -> str:
    """The reference as text for a terminal, or as Markdown. `sections`: (heading, intro line, keys)."""
    out = []
    if markdown:
        out += [f"# {title}", "", preamble, ""]
        for heading, intro, rows in sections:
            out += [f"## {heading}", ""] + ([intro, ""] if intro else [])
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
            for r in rows:
                cells = [f"`{r.key}`", r.type, f"`{r.default}`", r.doc]
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            out.append("")
        return "\n".join(out).rstrip() + "\n"
    out += [title, preamble, ""]
    for heading, intro, rows in sections:
        out.append(f"[{heading}]" + (f"  {intro}" if intro else ""))
        for r in rows:
            out.append(f"  {r.key}  ({r.type}, default {r.default})")
            out.append(f"      {r.doc}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
