"""Exports at the end of a run: a peft adapter directory and/or a merged HF model directory, each with a model card,
each checked by reloading it with transformers / peft and comparing logits with jaxft's."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Any

import numpy as np

from jaxft.schema import to_dict


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_files(cfg) -> list[tuple[str, str]]:
    """(path, sha256) of every local data file of the run."""
    import glob

    out = []
    for src in (*cfg.data.train, *cfg.data.eval):
        for p in sorted(glob.glob(src.path)) or [src.path]:
            out.append((p, sha256(p) if os.path.isfile(p) else "not a local file"))
    return out


def model_card(cfg, kind: str, metrics: dict[str, Any], verify: str, notes: list[str]) -> str:
    rows = "\n".join(f"| `{p}` | `{h}` |" for p, h in dataset_files(cfg))
    hp = json.dumps({"method": dict(cfg.method), "optim": to_dict(cfg.optim), "train": to_dict(cfg.train),
                     "seq_len": cfg.data.seq_len}, indent=2)
    m = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    limits = "\n".join(f"- {n}" for n in notes) or "- none recorded"
    return f"""# {kind} trained with jaxft

Base model: `{cfg.model.path}`. Method: `{cfg.method_type}`.

## Data
| file | sha256 |
|---|---|
{rows}

## Hyper-parameters
```json
{hp}
```

## Metrics
| metric | value |
|---|---|
{m}

## Verification
{verify}

## Known limits
{limits}
"""


def verify_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))


def _torch_base(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxft.io.default import resolve_model_path

    path = resolve_model_path(model_path)
    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def verify_merged(merged_dir: str, jax_logits: np.ndarray, ids: np.ndarray) -> float:
    """Max relative logit error of transformers loading `merged_dir` against jaxft's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    return _rel(jax_logits, ref)


def verify_adapter(model_path: str, adapter_dir: str, jax_logits: np.ndarray, ids: np.ndarray) -> float:
    """Max relative logit error of peft's `PeftModel.from_pretrained(base, adapter_dir)` against jaxft's logits."""
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(_torch_base(model_path), adapter_dir).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    return _rel(jax_logits[:, -ref.shape[1]:], ref[:, -jax_logits.shape[1]:])


def export_all(cfg, model, trainable, frozen, params, tokenizer, prepared, metrics: dict) -> dict[str, Any]:
    """Write the exports the config asks for, verify each, and return summary entries."""
    import jax.numpy as jnp

    import jaxft
    from jaxft import peft
    from jaxft.train.step import final_hidden, is_prompt_method

    out: dict[str, Any] = {}
    want_verify = cfg.export.verify == "on" or (cfg.export.verify == "auto" and verify_available())
    if cfg.export.verify == "on" and not verify_available():
        out["verify"] = "requested but torch/transformers/peft are not importable (pip install -e '.[verify]')"
        want_verify = False
    probe = [np.asarray(ex.ids[:64]) for ex in prepared.eval[:2]] or [np.asarray(prepared.train[0].ids[:64])]
    width = min(len(p) for p in probe)
    ids = np.stack([p[:width] for p in probe]).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.ones(ids.shape, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(width), ids.shape).astype(jnp.int32)}
    h, bound = final_hidden(model, trainable, frozen, batch)
    logits = np.asarray(jaxft.linear(h, jaxft.models.llama.head_weight(model.config, bound)).astype(jnp.float32))
    card_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    notes = []
    if model.spec is not None and cfg.export.adapter:
        d = os.path.join(cfg.output_dir, "adapter")
        warnings = peft.save_adapter(model.spec, trainable, d, model.config,
                                     base_model_name_or_path=cfg.model.path) or []
        notes += list(warnings)
        check = "not run"
        if want_verify:
            err = verify_adapter(cfg.model.path, d, logits, ids)
            check = f"peft PeftModel.from_pretrained logits vs jaxft: max relative error {err:.2e}"
            out["adapter verify (rel. err)"] = err
        with open(os.path.join(d, "README.md"), "w") as f:
            f.write(model_card(cfg, "Adapter", card_metrics, check, notes))
        out["adapter"] = d
    if cfg.export.merged or model.spec is None:
        if model.spec is not None and is_prompt_method(model.spec):
            out["merged"] = "not written: prompt and prefix tuning cannot be merged into the weights"
        else:
            d = os.path.join(cfg.output_dir, "merged")
            merged = trainable if model.spec is None else peft.merge(frozen, model.spec, trainable)
            jaxft.save_pretrained(model.config, merged, d, tokenizer)
            check = "not run"
            if want_verify:
                err = verify_merged(d, logits, ids)
                check = f"transformers AutoModelForCausalLM logits vs jaxft: max relative error {err:.2e}"
                out["merged verify (rel. err)"] = err
            with open(os.path.join(d, "README.md"), "w") as f:
                f.write(model_card(cfg, "Model", card_metrics, check, notes))
            out["merged"] = d
    return out
