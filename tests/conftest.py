"""Shared fixtures: tiny random HF models of every supported variant, and the real embedded model (loaded once)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

from hf_models import VARIANTS, hf_tiny, rel_err  # noqa: E402,F401  (re-exported for tests)

jax.config.update("jax_default_matmul_precision", "highest")

@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory):
    from jaxft.io.default import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def smollm_hf(smollm_dir):
    """transformers' SmolLM2-135M-Instruct from the embedded GGUF (fp32), loaded once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    d, name = os.path.split(smollm_dir)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm_jax(smollm_dir):
    """jaxft's (config, params) of the embedded model, loaded once per session."""
    from jaxft import load_pretrained

    return load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from jaxft import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")
