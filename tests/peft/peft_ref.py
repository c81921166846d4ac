"""Helpers for the tests against the real peft library (torch, CPU, fp32): tiny models, random non-zero adapter
weights, logits on both sides."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

import jaxft
from hf_models import hf_tiny
from optional_import import optional  # torch-free CI leg: tests/conftest.py

torch = optional("torch")

# Two rows, no padding: peft and jaxft give the virtual tokens the same positions only without left padding.
IDS = np.array([[3, 17, 5, 42, 8, 11, 90], [60, 2, 33, 7, 71, 19, 4]], np.int64)


def tiny_pair(variant: str, tmp_path, seed: int = 0):
    """(hf_model, config, params): the same random tiny model in transformers and jaxft."""
    model = hf_tiny(variant, seed)
    d = os.path.join(str(tmp_path), f"base_{variant}_{seed}")
    if not os.path.isdir(d):
        model.save_pretrained(d)
    config, params = jaxft.load_pretrained(d)
    return model, config, params


def randomize(peft_model, seed: int = 1, scale: float = 0.3) -> None:
    """Every trainable adapter tensor (lora_A/B, magnitude, ia3_l, prompt encoders, modules_to_save copies) set to
    random non-zero values, so that parity cannot pass on zero-initialised adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            if "magnitude" in name or "ia3_l" in name:
                p.copy_(1.0 + scale * torch.randn(p.shape, generator=g))
            else:
                p.add_(scale * torch.randn(p.shape, generator=g))


def torch_logits(model, ids: np.ndarray = IDS) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids)).logits.float().numpy()


# Unrolled layers: eager op-by-op execution is cached across tests, while an eager `scan` recompiles its body on
# every call (seconds per forward on this CPU). The layer loop slices composite leaves exactly as `scan` does;
# `test_scan_matches_unrolled` checks the scanned path on the same adapters.
UNROLLED = jaxft.ModelOptions(scan_layers=False)


def jax_logits(config, params, ids: np.ndarray = IDS, **kw) -> np.ndarray:
    kw.setdefault("options", UNROLLED)
    return np.asarray(jaxft.forward(config, params, jnp.asarray(ids, jnp.int32), **kw))


def hf_state(model) -> dict[str, np.ndarray]:
    """A transformers model's weights by HF name (merged models from peft's merge_and_unload)."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def jax_state(config, params) -> dict[str, np.ndarray]:
    from jaxft.io.convert import iter_hf_tensors

    return dict(iter_hf_tensors(config, params))


class BernoulliRecorder:
    """Records the keep masks peft draws with torch.bernoulli (DARE), in draw order, so jaxft can be given the same."""

    def __init__(self, monkeypatch):
        self.masks, self._orig = [], torch.bernoulli
        monkeypatch.setattr(torch, "bernoulli", self)

    def __call__(self, *args, **kwargs):
        out = self._orig(*args, **kwargs)
        self.masks.append(out.clone())
        return out
