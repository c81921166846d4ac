"""Load and save models: HF directories (safetensors, single or sharded), GGUF files, the embedded default.

Loading checks every name and shape against the config before reading any data, then streams each tensor a slab of
rows at a time into preallocated leaves of the target dtype (`jaxft.io.stored`): the host holds one copy of the model
plus one slab, and a half-filled tree is never handed out.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxft.errors import ConfigError, FileFormatError, JaxftError, OutputExistsError, UnsupportedConfigError
from jaxft.io.bnb_checkpoint import bnb_4bit_config, nf4_leaves, refuse_unconfigured, split_bnb_tensors
from jaxft.io.convert import TensorEntry, iter_hf_tensors, tensor_table
from jaxft.io.default import resolve_model_path
from jaxft.io.files import read_json
from jaxft.io.gguf import config_from_gguf, gguf_model, open_gguf
from jaxft.io.stored import StoredTensor, safetensors_tensors
from jaxft.models.config import LlamaConfig, from_hf, to_hf
from jaxft.parallel.distributed import agree, array_from_blocks, put_global

_BENIGN_EXTRA = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": np.float32, "fp32": np.float32, "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
           "float16": np.float16, "fp16": np.float16}


def _np_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype '{dtype}' is not supported (use float32, bfloat16 or float16)")
        return np.dtype(_DTYPES[dtype])
    return np.dtype(dtype)


def config_from_hf_file(path: str) -> LlamaConfig:
    """The `LlamaConfig` of an HF `config.json` file; every problem with the file is a one-line jaxft error that
    starts with its path: not JSON / not UTF-8 / empty (`FileFormatError`), a missing or mistyped field
    (`FileFormatError` naming the field), a feature jaxft does not implement (`UnsupportedConfigError`)."""
    hf = read_json(path, "an HF model config.json")
    try:
        return from_hf(hf, source=path)
    except UnsupportedConfigError:
        raise
    except ConfigError as e:  # a field missing or mistyped: the file is what is broken
        raise FileFormatError(str(e)) from None


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        weight_map = read_json(index, "a safetensors index (model.safetensors.index.json)").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FileFormatError(f"{index}: no 'weight_map' (or an empty one); the index is damaged: "
                                  "save the model again or delete the index of a single-file model")
        files = sorted(set(weight_map.values()))
        return [os.path.join(model_dir, f) for f in files]
    if os.path.exists(single):
        return [single]
    found = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(model_dir, f) for f in found]
    if any(f.endswith(".bin") for f in os.listdir(model_dir)):
        raise FileFormatError(f"{model_dir}: holds PyTorch .bin weights only; convert them to safetensors "
                         "(transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise FileFormatError(f"{model_dir}: no model.safetensors or model.safetensors.index.json; the directory "
                          "holds no weights jaxft can read")


def _host_buffer(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised host array whose data starts on an `align`-byte boundary: XLA:CPU adopts such a buffer as a
    device array without copying it (`device_put(..., may_alias=True)`); a plain `np.empty` is 16-byte aligned and
    gets copied, which briefly doubles each leaf."""
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + n].view(dtype).reshape(shape)


def _match(config: LlamaConfig, stored: list[StoredTensor], where: str, done: frozenset = frozenset()
           ) -> tuple[dict, dict[str, StoredTensor]]:
    """Check every name and shape against the config before any data is read; returns the name table (less the
    leaves in `done`, read elsewhere: the quantised ones) and the stored tensor of each name."""
    table = {e.hf_name: e for e in tensor_table(config) if e.path not in done}
    found: dict[str, StoredTensor] = {}
    for t in stored:
        e: TensorEntry | None = table.get(t.name)
        if e is None:
            if t.name.endswith(_BENIGN_EXTRA) or (t.name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            raise FileFormatError(f"{where}: unexpected tensor '{t.name}' for a {config.model_type} model with this config")
        if t.dtype is not None and t.dtype[0] in "IU":  # safetensors integers: only bitsandbytes' codes
            raise FileFormatError(f"{where}: tensor '{t.name}' has dtype {t.dtype}; jaxft reads floating weights (a "
                                  "bitsandbytes checkpoint needs its quantization_config in config.json)")
        if t.shape != e.hf_shape:
            raise FileFormatError(f"{where}: tensor '{t.name}' has shape {t.shape}, the config expects {e.hf_shape}")
        found[t.name] = t
    missing = [n for n in table if n not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileFormatError(f"{where}: missing tensors {', '.join(missing[:3])}{more}; the file is incomplete or "
                         "does not match its config")
    return table, found


def _leaf_shape(config: LlamaConfig, e: TensorEntry) -> tuple[int, ...]:
    shape = tuple(reversed(e.hf_shape)) if e.transpose else e.hf_shape
    return (config.num_hidden_layers, *shape) if e.layer is not None else shape


def _tree(leaves: dict[tuple[str, ...], Any]) -> dict:
    params: dict[str, Any] = {}
    for path, leaf in leaves.items():
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return params


def _fill(config: LlamaConfig, stored: list[StoredTensor], dtype: np.dtype, where: str, quantize: Any = None,
          done: dict[tuple[str, ...], Any] | None = None) -> dict:
    """Check every name and shape against the config, then copy the tensors slab by slab into preallocated leaves
    of the target dtype; return the jax tree (the host buffers become the arrays without a copy on CPU). A leaf
    `quantize.targets(path)` names is built by `quantize.stack(shape, dtype)` one matrix at a time instead (NF4:
    the host holds its quantised fields plus one dense matrix). `done`: leaves already built (the NF4 ones of a
    bitsandbytes checkpoint), by tree path."""
    done = done or {}
    table, found = _match(config, stored, where, frozenset(done))
    buffers: dict[tuple[str, ...], Any] = {}
    for e in table.values():
        if e.path not in buffers:
            quantized = quantize is not None and quantize.targets(e.path)
            buffers[e.path] = (quantize.stack if quantized else _host_buffer)(_leaf_shape(config, e), dtype)
    for name, t in found.items():
        e = table[name]
        if not isinstance(buffers[e.path], np.ndarray):  # quantised: one dense matrix at a time
            one = _host_buffer(e.hf_shape, dtype)
            t.copy_into(one)
            buffers[e.path].set(e.layer, one.T if e.transpose else one)
            del one
            continue
        dst = buffers[e.path] if e.layer is None else buffers[e.path][e.layer]
        t.copy_into(dst.T if e.transpose else dst)
    leaves = dict(done)
    for path in list(buffers):
        b = buffers.pop(path)
        leaves[path] = jax.device_put(b, may_alias=True) if isinstance(b, np.ndarray) else b.finish()
    return _tree(leaves)


def _fill_sharded(config: LlamaConfig, stored: list[StoredTensor], dtype: np.dtype, where: str,
                  shardings: Any, quantize: Any = None) -> dict:
    """Like `_fill`, but each leaf becomes an array of its sharding in `shardings` (a tree like the params) built
    by `array_from_blocks` (`jax.make_array_from_callback` a device at a time): each process reads, for each of its devices, only that device's block of
    each tensor (the rows it needs, a slab at a time), so no process holds more than its shards plus one slab.
    A shard repeated on consecutive local devices (a replicated axis) is read once. A leaf `quantize` targets has
    an `NF4Tensor` of shardings in `shardings`: it is quantised a matrix at a time and only this process's part of
    its fields is kept (`jaxft.quant.params.NF4Stack`)."""
    table, found = _match(config, stored, where)
    by_path: dict[tuple[str, ...], dict[int | None, StoredTensor]] = {}
    for name, t in found.items():
        by_path.setdefault(table[name].path, {})[table[name].layer] = t
    entries = {e.path: e for e in table.values()}
    leaves = {}
    for path, e in entries.items():
        node = shardings
        try:
            for k in path:
                node = node[k]
        except (KeyError, TypeError):
            raise ConfigError(f"{where}: the shardings tree has no entry for '{'.'.join(path)}'; build it from "
                              "this model's parameter specs") from None
        tensors, shape, cache = by_path[path], _leaf_shape(config, e), {}

        def block(t: StoredTensor, index: tuple[slice, ...], transpose: bool) -> np.ndarray:
            if transpose:  # jaxft [in, out] is HF [out, in] transposed
                return t.block(tuple(reversed(index)), dtype).T
            return t.block(index, dtype)

        if quantize is not None and quantize.targets(path):
            stack = quantize.stack(shape, dtype, shardings=node)
            for layer in stack.layers():  # one dense matrix (or this process's block of it) at a time
                stack.set(layer, block(tensors[layer], stack.read_index(), e.transpose))
            leaves[path] = stack.finish()
            continue

        def read(index: tuple[slice, ...], tensors=tensors, shape=shape, transpose=e.transpose,
                 stacked=e.layer is not None, cache=cache) -> np.ndarray:
            key = tuple((s.start, s.stop, s.step) for s in index)
            if cache.get("key") != key:  # only the last block is kept: the host holds one shard beyond the arrays
                cache.clear()
                if stacked:
                    layers, value = range(shape[0])[index[0]], None
                    for j, i in enumerate(layers):  # filled in place: no second copy of the block
                        layer = block(tensors[i], index[1:], transpose)
                        if value is None:
                            value = np.empty((len(layers), *layer.shape), dtype)
                        value[j] = layer
                else:
                    value = block(tensors[None], index, transpose)
                cache.update(key=key, value=value)
            return cache["value"]

        leaves[path] = array_from_blocks(shape, node, read)
        cache.clear()
    return _tree(leaves)


def _place_host(params: dict, shardings: Any) -> dict:
    """`params` (whole on every process) as arrays of `shardings`, each process placing only its own shards."""
    return jax.tree.map(put_global, params, shardings)


def load_config(path: str) -> LlamaConfig:
    """The `LlamaConfig` of an HF directory, a `.gguf` file or the embedded model, without reading weights."""
    path = resolve_model_path(path)
    if os.path.isdir(path):
        return config_from_hf_file(os.path.join(path, "config.json"))
    if path.endswith(".gguf") and os.path.isfile(path):
        return config_from_gguf(open_gguf(path), path)
    raise _bad_path(path)


def is_bnb_checkpoint(path: str) -> bool:
    """Whether `path` is an HF directory of a transformers bitsandbytes 4-bit checkpoint (read from config.json)."""
    path = resolve_model_path(path)
    config_file = os.path.join(path, "config.json")
    return os.path.isfile(config_file) and bnb_4bit_config(read_json(config_file, "an HF model config.json"),
                                                           config_file) is not None


def _bad_path(path: str) -> JaxftError:
    if not os.path.exists(path):
        return FileFormatError(f"{path}: no such file or directory (expected an HF model directory, a .gguf file, "
                               "a Hub id org/name or 'smollm2-135m-instruct'); check the path")
    return FileFormatError(f"{path}: not an HF model directory, a .gguf file or 'smollm2-135m-instruct'")


def load_pretrained(path: str, dtype="float32", shardings: Any = None, quantize: Any = None
                    ) -> tuple[LlamaConfig, dict]:
    """Load `(config, params)` from an HF directory (safetensors), a `.gguf` file, or `smollm2-135m-instruct`.

    `dtype` is the parameter dtype (float32, bfloat16, float16). Tensors are streamed one at a time.
    `shardings`: a tree like the params of `jax.sharding.Sharding`s (e.g. over a multi-host mesh): each leaf is
    then built from the blocks this process's devices hold, read straight from the file (see `_fill_sharded`).
    `quantize`: a `jaxft.quant.QuantPlan`; the kernels it targets are quantised to NF4 tensor by tensor as they are
    read (the host peaks near the quantised model plus one dense matrix). With `shardings` too (their NF4 leaves
    from `jaxft.quant.tree_axes`), each process keeps only its part of the NF4 fields.
    A transformers bitsandbytes 4-bit NF4 checkpoint (`quantization_config` in config.json) loads its quantised
    linear weights as `NF4Tensor` leaves, exactly, without re-quantising (`jaxft.io.bnb_checkpoint`).
    """
    np_dtype = _np_dtype(dtype)
    path = resolve_model_path(path)
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        config = config_from_hf_file(config_file)
        stored = [t for f in safetensors_files(path) for t in safetensors_tensors(f)]
        if bnb_4bit_config(read_json(config_file, "an HF model config.json"), config_file) is not None:
            stored, groups = split_bnb_tensors(stored, path)
            table = {e.hf_name: e for e in tensor_table(config)}
            done = nf4_leaves(table, groups, config.num_hidden_layers, np_dtype, path)
            params = _fill(config, stored, np_dtype, path, quantize, done=done)
            # already quantised (a quarter of the dense bytes): read whole, then each process keeps its shards
            return config, params if shardings is None else _place_host(params, shardings)
        refuse_unconfigured(stored, path)
    elif path.endswith(".gguf") and os.path.isfile(path):
        config, stored = gguf_model(path)
    else:
        raise _bad_path(path)
    if shardings is not None:
        return config, _fill_sharded(config, stored, np_dtype, path, shardings, quantize)
    return config, _fill(config, stored, np_dtype, path, quantize)


def _shard_bytes(limit: int | str) -> int:
    if isinstance(limit, int):
        return limit
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = limit.strip().upper()
    for u, m in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def save_pretrained(config: LlamaConfig, params: dict, out_dir: str, tokenizer=None, *, dtype=None,
                    max_shard_size: int | str = "2GB", overwrite: bool = False) -> str:
    """Write an HF model directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Composite leaves (LoRA, DoRA, ...) are materialised. In a multi-host run every process calls it (each tensor
    is gathered across them, one at a time) and process 0 writes the directory. Tensors are written in shards of at
    most `max_shard_size` with an index when there is more than one. The directory is assembled beside `out_dir` and moved into place, so
    a crash never leaves a half-written model; an existing non-empty `out_dir` is refused unless `overwrite`.
    """
    from safetensors.numpy import save_file

    # a multi-host run: every process gathers each tensor (a collective), process 0 alone writes
    primary = jax.process_index() == 0
    if agree(os.path.exists(out_dir) and bool(os.listdir(out_dir)) and not overwrite):
        raise OutputExistsError(f"{out_dir}: exists and is not empty; choose another directory or pass overwrite=True")
    np_dtype = _np_dtype(dtype) if dtype is not None else None
    if not primary:
        for _ in iter_hf_tensors(config, params, np_dtype):
            pass
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".jaxft-save-", dir=parent)
    try:
        limit = _shard_bytes(max_shard_size)
        shards: list[dict[str, np.ndarray]] = [{}]
        size, written_dtype = 0, None
        for name, value in iter_hf_tensors(config, params, np_dtype):
            written_dtype = written_dtype or value.dtype
            if shards[-1] and size + value.nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][name] = value
            size += value.nbytes
        # Writing shard by shard keeps at most one shard in host memory beyond the params themselves.
        n = len(shards)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k] = fname
                total += v.nbytes
            shards[i] = {}
        if n > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        hf = to_hf(config)
        hf["torch_dtype"] = {"bfloat16": "bfloat16", "float16": "float16"}.get(str(written_dtype), "float32")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
