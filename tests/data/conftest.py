"""Session fixtures for the data pipeline tests: the SmolLM2 tokenizer (about 10 s to load) and a tiny Llama-3-style one."""

from __future__ import annotations

import pytest
from data_helpers import LLAMA3_TEMPLATE, make_tiny_tokenizer


@pytest.fixture(scope="session")
def smol():
    from jaxft.io.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_llama3():
    return make_tiny_tokenizer(LLAMA3_TEMPLATE)
