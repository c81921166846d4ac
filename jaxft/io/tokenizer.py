"""Tokenizers: the Hugging Face tokenizer of a model directory, GGUF file or the embedded model."""

from __future__ import annotations

import os

from jaxft.errors import FileFormatError
from jaxft.io.default import DEFAULT_MODEL, resolve_model_path
from jaxft.io.files import read_json

_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str):
    """Return the HF tokenizer (with its chat template) for an HF directory, a `.gguf` file, a Hub id or the
    embedded name. A missing or damaged tokenizer file is a one-line `FileFormatError` naming it."""
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        try:
            return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
        except Exception as e:  # transformers' GGUF reader raises many types on a damaged file
            raise FileFormatError(f"{path}: the tokenizer cannot be read from this GGUF file "
                                  f"({type(e).__name__}: {_first_line(e)})") from None
    if os.path.isdir(path):
        present = [f for f in _FILES if os.path.exists(os.path.join(path, f))]
        if not present:
            raise FileFormatError(f"{path}: no tokenizer files ({', '.join(_FILES)}); save the tokenizer with the "
                                  "model (tokenizer.save_pretrained(dir))")
        for name in ("tokenizer.json", "tokenizer_config.json"):  # JSON errors with their line and column
            if name in present:
                read_json(os.path.join(path, name), f"the tokenizer's {name}")
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:  # tokenizers/sentencepiece raise their own types on damaged files
            raise FileFormatError(f"{path}: the tokenizer cannot be loaded ({type(e).__name__}: {_first_line(e)}); "
                                  "save it again with tokenizer.save_pretrained(dir)") from None
    if not os.path.exists(path):
        raise FileFormatError(f"{path}: no such file or directory (expected a model directory, a .gguf file, a "
                              f"Hub id org/name or '{DEFAULT_MODEL}'); check the path")
    raise FileFormatError(f"{path}: not a model directory, a .gguf file or '{DEFAULT_MODEL}'")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "no message"
