"""`optional(name)`: a module the suite compares against (torch, peft, transformers' torch models) imported where it is
installed, and otherwise a stand-in, so that a test module mixing torch-free tests with torch comparisons still
imports on the torch-free CI leg (Python 3.12, current jax). Using the stand-in (calling anything reached through
it) raises `ModuleNotFoundError` for the missing module, which `conftest.py` reports as a skip naming it; tests
that never touch it run as usual. Attribute chains stay lazy (`optional("torch").optim.SGD` is evaluated only when
called), so module-level parametrize tables may name torch functions."""

from __future__ import annotations

import importlib
import importlib.util


class _Missing:
    """Stands for an attribute path under a module that is not installed; calling it raises ModuleNotFoundError."""

    def __init__(self, missing: str, path: str):
        self._missing, self._path = missing, path

    def __getattr__(self, attr: str) -> _Missing:
        if attr.startswith("__"):  # copy, pickle, inspect and pytest probe dunders: answer as a plain object would
            raise AttributeError(attr)
        return _Missing(self._missing, f"{self._path}.{attr}")

    def __call__(self, *args, **kwargs):
        raise ModuleNotFoundError(f"No module named '{self._missing}' (needed for {self._path})", name=self._missing)

    def __repr__(self) -> str:
        return f"<{self._path}: {self._missing} is not installed>"


def installed(name: str) -> bool:
    """Whether top-level package `name` is installed. A namespace package does not count: with pytest's rootdir
    on sys.path, `tests/peft/` (no `__init__.py`) imports as a namespace package `peft` where peft is missing."""
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None


def optional(name: str, attr: str | None = None):
    """`import name` (and `getattr(module, attr)` when given), or a stand-in when its top-level package is not
    installed or the import fails because a module is missing; any other import error is raised."""
    root = name.split(".")[0]
    if not installed(root):
        return _Missing(root, f"{name}.{attr}" if attr else name)
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        return _Missing(e.name or name, f"{name}.{attr}" if attr else name)
    return getattr(module, attr) if attr else module


def needs_gguf_tokenizer(test):
    """Skip `test` where torch is missing: it reads the embedded model's tokenizer, and transformers reads a tokenizer
    from a GGUF file only through its GGUF reader, which imports torch (jaxft.load_tokenizer then raises a one-line
    FileFormatError saying so)."""
    import pytest

    reason = "reads the tokenizer of the embedded GGUF, which transformers' GGUF reader does only with torch"
    return pytest.mark.skipif(not installed("torch"), reason=reason)(test)
