"""The models an evaluation compares: a base model, and a tuned one given as a peft adapter directory, a merged model
directory or a jaxft run directory. Everything is resolved and checked (paths, files) before any weight is read."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from jaxft import peft
from jaxft.errors import FileFormatError
from jaxft.io.hf import load_pretrained
from jaxft.io.tokenizer import load_tokenizer
from jaxft.models.config import LlamaConfig
from jaxft.models.llama import ModelOptions

ADAPTER_CONFIG = "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class EvalModel:
    """A model ready to score: `params` is the tree the forward pass uses (an adapter's composite leaves bound in);
    `spec` and `adapter` are set only for methods that add model inputs (prompt and prefix tuning)."""

    name: str
    config: LlamaConfig
    params: Any
    tokenizer: Any
    options: ModelOptions = ModelOptions()
    spec: Any = None
    adapter: Any = None

    def eos_token_ids(self) -> list[int]:
        """The tokenizer's EOS and the model config's (one id or several): generation stops at any of them."""
        eos = {self.tokenizer.eos_token_id}
        eid = self.config.eos_token_id
        eos |= set(eid) if isinstance(eid, tuple) else {eid}
        return sorted(e for e in eos if e is not None)

    def generation_inputs(self) -> dict:
        """Keyword arguments of `greedy_generate` for prompt / prefix tuning (empty otherwise)."""
        return peft.generation_inputs(self.spec, self.adapter) if self.spec is not None else {}


@dataclasses.dataclass(frozen=True)
class TunedSource:
    """Where a tuned model's weights are: `kind` is "adapter" (peft adapter over `base`) or "merged" (a full model
    directory; `base` is only the model the run started from, when known)."""

    kind: str
    path: str
    base: str | None


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def _run_base(run_dir: str) -> str | None:
    """`model.path` of a jaxft run directory's resolved config.yaml (None when absent)."""
    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise FileFormatError(f"{path}: cannot be read as a run config ({type(e).__name__}); "
                              "pass the run's adapter/ or merged/ directory instead") from None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    value = model.get("path") if isinstance(model, dict) else None
    return value if isinstance(value, str) else None


def resolve_tuned(path: str) -> TunedSource:
    """Classify `path`: a peft adapter directory (adapter_config.json), a merged model directory (config.json), or a
    jaxft run directory (config.yaml with an `adapter/` or `merged/` export; the adapter is preferred, being what
    was trained). Anything else is a one-line `FileFormatError` saying what was expected."""
    if not os.path.isdir(path):
        raise FileFormatError(f"{path}: no such directory (the tuned model: a peft adapter directory, a merged model "
                              "directory or a jaxft run directory); check the path")
    if _is_adapter_dir(path):
        return TunedSource("adapter", path, None)
    if _is_model_dir(path):
        return TunedSource("merged", path, None)
    if os.path.isfile(os.path.join(path, "config.yaml")):
        base = _run_base(path)
        for kind in ("adapter", "merged"):
            sub = os.path.join(path, kind)
            if (_is_adapter_dir if kind == "adapter" else _is_model_dir)(sub):
                return TunedSource(kind, sub, base)
        raise FileFormatError(f"{path}: a jaxft run directory without an adapter/ or merged/ export; finish the run "
                              "(python -m jaxft.train CONFIG exports when training completes) or pass an export")
    raise FileFormatError(f"{path}: neither a peft adapter directory ({ADAPTER_CONFIG}), a model directory "
                          "(config.json) nor a jaxft run directory (config.yaml); pass one of those")


def check_model_path(path: str, what: str) -> None:
    """Refuse a local model path that does not exist, before anything is loaded (names and Hub ids pass)."""
    looks_local = os.sep in path or path.startswith(".") or path.endswith(".gguf")
    if looks_local and not os.path.exists(path):
        raise FileFormatError(f"{path}: no such file or directory ({what}: an HF model directory, a .gguf file, a Hub "
                              "id or smollm2-135m-instruct); check the path")


def load_base(path: str, *, name: str = "base", options: ModelOptions = ModelOptions()) -> EvalModel:
    """The model at `path` (HF directory, .gguf, Hub id or the embedded name) with its tokenizer, float32."""
    config, params = load_pretrained(path)
    return EvalModel(name, config, params, load_tokenizer(path), options)


def load_tuned(source: TunedSource, base: EvalModel, *, name: str = "tuned") -> EvalModel:
    """The tuned model: the adapter bound onto `base`'s weights (sharing them), or the merged directory's own
    weights and tokenizer (the base's tokenizer when the directory has none)."""
    if source.kind == "adapter":
        spec, adapter = peft.load_adapter(source.path, base.config)
        params = peft.bind(base.params, spec, adapter)
        extra = peft.adds_inputs(spec)
        return EvalModel(name, base.config, params, base.tokenizer, base.options,
                         spec if extra else None, adapter if extra else None)
    config, params = load_pretrained(source.path)
    has_tok = any(os.path.exists(os.path.join(source.path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    return EvalModel(name, config, params, load_tokenizer(source.path) if has_tok else base.tokenizer, base.options)
