"""Shared fixtures: tiny random HF models of every supported variant, and the real embedded model (loaded once)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

from hf_models import VARIANTS, hf_tiny, rel_err  # noqa: E402,F401  (re-exported for tests)
from optional_import import installed  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The torch-free CI leg (Python 3.12, current jax: see .ci/run) has none of these. A test that reaches for one of
# them there is reported as skipped, naming what it needed; every other test runs. Test modules import them inside
# the tests or at the top through `optional_import.optional`, never with a plain top-level import: collecting a
# module must not fail for want of torch, and a module must not be skipped whole when some of its tests need no
# torch. (`pytest.importorskip("peft")` does not skip where peft is missing: `tests/peft/` imports as a namespace
# package `peft`; `optional` and this hook know that.)
TORCH_STACK = ("torch", "peft", "accelerate", "bitsandbytes")
MISSING = frozenset(name for name in TORCH_STACK if not installed(name))


def _missing_module(exc: BaseException | None) -> str | None:
    """The missing torch-stack module behind `exc` or the exceptions it was raised from, if any. transformers'
    model classes raise a plain ImportError ('... requires PyTorch ..., but PyTorch was not found')."""
    while exc is not None:
        if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] in MISSING:  # also `from peft import X`
            return exc.name.split(".")[0]
        if isinstance(exc, ImportError) and "torch" in MISSING and "PyTorch was not found" in str(exc):
            return "torch"
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    name = _missing_module(call.excinfo.value) if MISSING and report.failed and call.excinfo else None
    if name is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: needs {name}, which this environment "
                           f"lacks (the torch-free CI leg runs every test that does not)")
    return report


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
