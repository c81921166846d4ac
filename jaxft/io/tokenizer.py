"""Tokenizers: the Hugging Face tokenizer of a model directory, GGUF file or the embedded model."""

from __future__ import annotations

import os

from jaxft.io.default import resolve_model_path


def load_tokenizer(path: str):
    """Return the HF tokenizer (with its chat template) for an HF directory, a `.gguf` file or the embedded name."""
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json); save one with the model")
        return AutoTokenizer.from_pretrained(path)
    raise FileNotFoundError(f"{path}: not a model directory, a .gguf file or '{'smollm2-135m-instruct'}'")
