"""Loading's peak host memory: about the model in its target dtype (issue: "about 1.2x, not 2-3x").

Measured in a fresh process by resetting the kernel's resident-set high-water mark (`/proc/self/clear_refs`) just
before `load_pretrained` and reading `VmHWM` after it. The bound asserted is 1.2x.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxft
from jaxft.models.config import LlamaConfig
from jaxft.models.params import init_params

_CHILD = r"""
import gc, json, sys
import jax, numpy as np, jaxft

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

jaxft.load_config(sys.argv[1])
out = {}
for dtype in ("float32", "bfloat16"):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = kib("VmRSS")
    config, params = jaxft.load_pretrained(sys.argv[1], dtype=dtype)
    model = sum(x.nbytes for x in jax.tree.leaves(params))
    out[dtype] = (kib("VmHWM") - before) * 1024 / model
    del params
print(json.dumps(out))
"""


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peaks(path: str) -> dict[str, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _CHILD, path], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check(ratios: dict[str, float]) -> None:
    assert set(ratios) == {"float32", "bfloat16"} and np.isfinite(list(ratios.values())).all()
    for dtype, ratio in ratios.items():
        assert ratio <= 1.2, f"loading to {dtype} peaked at {ratio:.2f}x the model"


_LINUX_PEAK = pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux /proc/self/clear_refs to reset the RSS peak")


@_LINUX_PEAK
def test_safetensors_load_peak_memory_is_about_one_model(tmp_path):
    # ~115 MB in fp32, so that a whole-tensor temporary (the 32 MB embedding) or a copied leaf shows up clearly.
    config = LlamaConfig(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
    params = init_params(config, jax.random.PRNGKey(0))
    jaxft.save_pretrained(config, params, str(tmp_path / "m"))
    del params
    _check(_peaks(str(tmp_path / "m")))  # measured 1.01x (fp32), 1.00x (bf16); the old loader 2.03x


@_LINUX_PEAK
def test_gguf_load_peak_memory_is_about_one_model(smollm_dir):
    _check(_peaks(smollm_dir))  # the embedded Q8_0/Q4_1 SmolLM2: measured 1.05x (fp32), 1.07x (bf16); old 2.06x
