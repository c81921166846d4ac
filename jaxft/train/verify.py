"""Checking an export against transformers / peft, on the whole model or, when that does not fit in host memory, on
its first layers.

transformers builds the model in fp32: about 4 bytes per parameter (plus the adapter for the adapter check). When
that exceeds half of the available host memory, the check runs on the first `k` layers only, the most that fit:

    jaxft side   the bound parameter trees cut to their first k stacked layers, the config to k layers, then the
                 same forward (embeddings, k layers, final norm, head) as the full check;
    torch side   a temporary HF directory with the config cut to k layers and a safetensors file holding only the
                 tensors of layers < k plus the embeddings, final norm and head, read tensor by tensor from the
                 export (or the base model) and never the whole file set at once; for the adapter check, a copy of
                 the adapter with the tensors of layers < k, loaded with `PeftModel.from_pretrained` on that base.

A `.gguf` base is read with jaxft's own dequantisation (`jaxft.io.gguf.gguf_model`, only the tensors kept):
the partial adapter check then tests the adapter and the model's math, not jaxft's GGUF conversion.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.io.default import resolve_model_path
from jaxft.io.files import read_json
from jaxft.io.gguf import gguf_model
from jaxft.io.hf import safetensors_files  # the loader's own file discovery (index or single file)
from jaxft.models.config import LlamaConfig, to_hf
from jaxft.models.llama import head_weight
from jaxft.models.params import layer_specs, param_specs
from jaxft.ops.linear import linear
from jaxft.parallel.distributed import host_array
from jaxft.train.step import StaticModel, count_params, final_hidden

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def verify_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))


def available_memory() -> int | None:
    """Bytes of host memory available now: /proc/meminfo's MemAvailable (os.sysconf elsewhere), capped by a cgroup
    v2 memory limit when the process runs under one (a container sees the host's MemAvailable). None if unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            avail = min(avail, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return avail


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


@dataclasses.dataclass(frozen=True)
class VerifyPlan:
    """How much of the model a check loads: `layers` of `total`; `need_bytes` the fp32 size of the whole model
    (plus the adapter) in torch, `available_bytes` the host memory available when planned (None: unknown);
    `forced` when export.verify_layers chose `layers`; `adapter` when the adapter comes on top of the model."""

    layers: int
    total: int
    need_bytes: int
    available_bytes: int | None
    forced: bool = False
    adapter: bool = False

    @property
    def partial(self) -> bool:
        return self.layers < self.total

    @property
    def layers_arg(self) -> int | None:
        """The `layers=` argument of `verify_merged` / `verify_adapter` (None: the whole model)."""
        return self.layers if self.partial else None

    def describe(self) -> str:
        avail = "available memory unknown"
        if self.available_bytes is not None:
            avail = f"{_size(self.available_bytes)} available"
        what = "the whole model and adapter need" if self.adapter else "the whole model needs"
        sizes = f"{what} {_size(self.need_bytes)} in fp32; {avail}"
        if not self.partial:
            return f"all {self.total} layers ({sizes})"
        why = f"export.verify_layers={self.layers}; " if self.forced else ""
        half = "" if self.forced else ", at most half of it used"
        return f"first {self.layers} of {self.total} layers ({why}{sizes}{half})"


def plan_verify(config: LlamaConfig, *, adapter: Any = None, forced: int | None = None,
                available: int | None = None) -> VerifyPlan:
    """Choose how many layers a check loads into torch (fp32, 4 bytes a parameter).

    adapter: the adapter tree whose torch copy comes on top of the base (None for the merged check). forced: the
    number of layers to check (export.verify_layers), else all layers when the whole model fits in half of
    `available` bytes (default: `available_memory()`), otherwise the most that fit, at least one.
    """
    total = config.num_hidden_layers
    per_layer = 4 * count_params(layer_specs(config))
    fixed = 4 * count_params(param_specs(config)) - total * per_layer
    if adapter is not None:
        layers = adapter.get("model", {}).get("layers") if isinstance(adapter, dict) else None
        in_layers = 4 * count_params(layers) if layers is not None else 0
        per_layer += in_layers // total
        fixed += 4 * count_params(adapter) - in_layers
    need = fixed + total * per_layer
    if available is None:
        available = available_memory()
    with_adapter = adapter is not None
    if forced is not None:
        return VerifyPlan(min(forced, total), total, need, available, True, with_adapter)
    if available is None or need <= available // 2:
        return VerifyPlan(total, total, need, available, False, with_adapter)
    k = (available // 2 - fixed) // per_layer
    return VerifyPlan(int(min(max(k, 1), total)), total, need, available, False, with_adapter)


def _cut(tree: Any, k: int) -> Any:
    """A parameter or adapter tree with its stacked layers (and prefix-tuning keys/values) cut to the first k."""
    if not isinstance(tree, dict):
        return tree
    out = dict(tree)
    for name in ("prefix_keys", "prefix_values"):
        if name in out:
            out[name] = out[name][:k]
    if isinstance(out.get("model"), dict) and "layers" in out["model"]:
        # Every leaf under model.layers, composite weights' arrays included, is stacked on axis 0.
        out["model"] = dict(out["model"], layers=jax.tree.map(lambda x: x[:k], out["model"]["layers"]))
    return out


def truncate(model: StaticModel, trainable: Any, frozen: Any, k: int):
    """`(model, trainable, frozen)` of the same run cut to its first `k` decoder layers (a `StaticModel`
    whose config has `num_hidden_layers=k`)."""
    config = model.config.replace(num_hidden_layers=k)
    return dataclasses.replace(model, config=config), _cut(trainable, k), _cut(frozen, k)


def probe_logits(model: StaticModel, trainable: Any, frozen: Any, ids: np.ndarray, layers: int | None = None) -> np.ndarray:
    """jaxft's float32 logits `[B, T, V]` of `ids[B, T]` (one unpadded segment per row) for a run's `(model,
    trainable, frozen)` as the trainer holds them, on the model cut to its first `layers` (None: the whole model)."""
    if layers is not None:
        model, trainable, frozen = truncate(model, trainable, frozen, layers)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "segment_ids": jnp.ones(ids.shape, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape).astype(jnp.int32)}
    h, bound = final_hidden(model, trainable, frozen, batch)
    return host_array(linear(h, head_weight(model.config, bound)).astype(jnp.float32))  # every process calls it


def _keep(name: str, k: int) -> bool:
    m = _LAYER.search(name)
    return m is None or int(m.group(1)) < k


def _hf_config(hf: dict, k: int) -> dict:
    hf = dict(hf, num_hidden_layers=k)
    if isinstance(hf.get("layer_types"), list):  # transformers checks len(layer_types) == num_hidden_layers
        hf["layer_types"] = hf["layer_types"][:k]
    return hf


def _source_tensors(src: str, k: int) -> tuple[dict, Iterator[tuple[str, Any]]]:
    """The HF config dict of `src` (an HF directory or a .gguf file) and its tensors of layers < k plus the
    non-layer ones, read one at a time as torch tensors."""
    import torch

    src = resolve_model_path(src)
    if src.endswith(".gguf"):
        config, stored = gguf_model(src)
        return to_hf(config), ((t.name, torch.from_numpy(t.array())) for t in stored if _keep(t.name, k))
    hf = read_json(os.path.join(src, "config.json"), "a model config.json")
    files = safetensors_files(src)

    def tensors():
        from safetensors import safe_open

        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if _keep(name, k):
                        yield name, f.get_tensor(name)

    return hf, tensors()


def write_truncated_model(src: str, out_dir: str, k: int) -> str:
    """Write an HF directory holding the first `k` layers of the model at `src` (HF directory or .gguf): its
    config with `num_hidden_layers=k` and one safetensors file with the tensors of layers < k plus the rest."""
    from safetensors.torch import save_file

    hf, tensors = _source_tensors(src, k)
    os.makedirs(out_dir, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(_hf_config(hf, k), f, indent=2)
    return out_dir


def write_truncated_adapter(adapter_dir: str, out_dir: str, k: int) -> str:
    """Write a copy of a peft adapter directory for the model's first `k` layers: the tensors of layers < k (prefix
    tuning: the first k layers of each virtual token's keys/values), `layers_to_transform` and `num_layers` cut."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    tensors = {}
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if _keep(name, k):
                tensors[name] = f.get_tensor(name)
    if cfg.get("peft_type") == "PREFIX_TUNING":
        emb = tensors["prompt_embeddings"]  # [P, L * 2 * K * hd], per virtual token: layer, key|value, head, dim
        tensors["prompt_embeddings"] = emb.reshape(emb.shape[0], cfg["num_layers"], -1)[:, :k].reshape(
            emb.shape[0], -1).contiguous()
    if "num_layers" in cfg:
        cfg["num_layers"] = k
    layers = cfg.get("layers_to_transform")
    if layers not in (None, []):
        kept = [i for i in ([layers] if isinstance(layers, int) else layers) if i < k]
        if not kept:
            raise ValueError(f"{adapter_dir}: layers_to_transform={layers} has no layer among the first {k}; "
                             f"set export.verify_layers above {min([layers] if isinstance(layers, int) else layers)}")
        cfg["layers_to_transform"] = kept
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


def _torch_base(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_path)
    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _scratch(near: str) -> str:
    """A temporary directory on the export's file system (the cut model can be large; /tmp may be a small tmpfs)."""
    return tempfile.mkdtemp(prefix=".jaxft-verify-", dir=os.path.dirname(os.path.abspath(near)))


def verify_merged(merged_dir: str, jax_logits: np.ndarray, ids: np.ndarray, *, layers: int | None = None) -> float:
    """Max relative logit error of transformers loading `merged_dir` against jaxft's logits `[B, T, V]` for
    `ids[B, T]`. With `layers=k` transformers loads only the first k layers (jax_logits must come from the model cut
    the same way, see `truncate`)."""
    import torch
    from transformers import AutoModelForCausalLM

    tmp = None if layers is None else _scratch(merged_dir)
    try:
        src = merged_dir if tmp is None else write_truncated_model(merged_dir, tmp, layers)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = model(torch.tensor(ids)).logits.numpy()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return _rel(jax_logits, ref)


def verify_adapter(model_path: str, adapter_dir: str, jax_logits: np.ndarray, ids: np.ndarray, *,
                   layers: int | None = None) -> float:
    """Max relative logit error of peft's `PeftModel.from_pretrained(base, adapter_dir)` against jaxft's logits
    (the real tokens' positions of both). With `layers=k` the base and the adapter are cut to their first k layers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp = None if layers is None else _scratch(adapter_dir)
    try:
        if tmp is None:
            base, adapter = _torch_base(model_path), adapter_dir
        else:
            base_dir = write_truncated_model(model_path, os.path.join(tmp, "base"), layers)
            adapter = write_truncated_adapter(adapter_dir, os.path.join(tmp, "adapter"), layers)
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, adapter).eval()
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return _rel(jax_logits[:, -ref.shape[1]:], ref[:, -jax_logits.shape[1]:])
