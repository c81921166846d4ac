"""The README's Python snippets run as written: each ```python block, in a fresh interpreter, in a scratch directory
that sees the repository's configs/ and data/ (the snippets' relative paths). Slow: loads SmolLM2-135M and compiles
a gradient and a 2-step run, about 2 minutes on 2 cores."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from optional_import import needs_gguf_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets() -> list[tuple[str, str]]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [(f"block{i}:{b.splitlines()[0][:30]}", b) for i, b in enumerate(blocks)]


def test_readme_has_snippets():
    assert len(_snippets()) >= 3


@pytest.mark.slow
@needs_gguf_tokenizer  # every snippet loads the embedded model's tokenizer
@pytest.mark.parametrize("name, code", _snippets(), ids=[n for n, _ in _snippets()])
def test_readme_snippet_runs(tmp_path, name, code):
    for d in ("configs", "data"):
        os.symlink(os.path.join(ROOT, d), tmp_path / d)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"README snippet {name} failed:\n{proc.stderr[-3000:]}"
