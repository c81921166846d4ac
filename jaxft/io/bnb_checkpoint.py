"""Import of transformers' bitsandbytes 4-bit checkpoints (`BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")` then `save_pretrained`) as `NF4Tensor` leaves, without re-quantising.

transformers 5 / bitsandbytes 0.50 write each quantised linear `<module>.weight` as:
- `weight`: the packed codes of the flattened row-major `[out, in]` tensor, two per byte, stored as uint8
  `[ceil(n/2), 1]` (or those bytes viewed as `bnb_4bit_quant_storage`, e.g. bf16 for FSDP-QLoRA);
- `weight.absmax`: fp32 `[ceil(n/64)]`, or uint8 codes with double quantisation, then `weight.nested_absmax` fp32
  `[ceil(n/64/256)]` and `weight.nested_quant_map` (the 256-entry signed dynamic map);
- `weight.quant_map`: the 16 NF4 values;
- `weight.quant_state.bitsandbytes__nf4`: uint8 bytes of a JSON object (`quant_type`, `blocksize`, `dtype`, `shape`,
  and with double quantisation `nested_blocksize`, `nested_dtype`, `nested_offset`, the fp32 offset printed as a
  double, so it round-trips exactly).

Every table is checked against the one jaxft implements (NF4 values and dynamic map bit for bit, blocks of 64 and
256, fp32 statistics) and anything else is refused by name before any weight is converted; the codes and
statistics are then permuted into `NF4Tensor`'s layout by `jaxft.quant.from_bnb`, which is exact, so the model
dequantises to the very values bitsandbytes' `dequantize_4bit` gives. A weight whose input features are not a
multiple of 64 (NF4Tensor's blocks run along them) is dequantised exactly to a dense leaf instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxft.errors import FileFormatError, UnsupportedConfigError
from jaxft.io.convert import TensorEntry
from jaxft.io.stored import StoredTensor
from jaxft.quant import BnbNF4, NF4Tensor, dequantize_bnb, from_bnb
from jaxft.quant.bnb_format import BLOCK, DYNAMIC_MAP, NESTED_BLOCK, NF4_CODES

_STATE = ".quant_state.bitsandbytes__"
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_DTYPES = ("float32", "bfloat16", "float16")  # the dense dtypes a quant_state may name


def bnb_4bit_config(hf: dict, where: str) -> dict | None:
    """The `quantization_config` of an HF `config.json` dict when it is bitsandbytes 4-bit NF4, None when the model
    is not quantised; any other quantisation is refused by name (one line, `UnsupportedConfigError`)."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    fix = "load the unquantised model (jaxft quantises it itself with method: qlora)"
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise UnsupportedConfigError(f"{where}: quantization_config.quant_method '{method}' is not implemented "
                                     f"(jaxft imports bitsandbytes 4-bit NF4 checkpoints only); {fix}")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise UnsupportedConfigError(f"{where}: quantization_config.load_in_8bit: bitsandbytes 8-bit (LLM.int8) "
                                     f"checkpoints are not implemented; {fix}")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise UnsupportedConfigError(f"{where}: quantization_config names bitsandbytes but neither load_in_4bit nor "
                                     f"load_in_8bit; {fix}")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' and transformers' default is fp4
    if quant_type != "nf4":
        raise UnsupportedConfigError(f"{where}: quantization_config.bnb_4bit_quant_type is '{quant_type}'; jaxft "
                                     "implements nf4 only: quantise with bnb_4bit_quant_type='nf4', or " + fix)
    return qc


def refuse_unconfigured(stored: list[StoredTensor], where: str) -> None:
    """A checkpoint holding bitsandbytes quant states while its config.json has no `quantization_config`: refused
    by name (its codes are not dense weights)."""
    for t in stored:
        if _STATE in t.name:
            raise FileFormatError(f"{where}: holds bitsandbytes 4-bit tensors ('{t.name}') but its config.json has "
                                  "no quantization_config; restore it (transformers' save_pretrained writes it)")


def _raw(t: StoredTensor) -> np.ndarray:
    """The stored bytes of `t` as uint8, whatever its dtype (bitsandbytes' packed codes are bytes in any storage)."""
    with open(t.path, "rb") as f:
        f.seek(t.offset)
        raw = np.frombuffer(f.read(t.nbytes), np.uint8)
    if raw.size != t.nbytes:
        raise FileFormatError(f"{t.path}: tensor '{t.name}' ends past the end of the file (truncated or corrupt)")
    return raw


def _array(t: StoredTensor, dtype: str, where: str, what: str) -> np.ndarray:
    """`t` as a flat array of the stored dtype it must have (`dtype`: "U8" or "F32")."""
    if t.dtype != dtype:
        raise UnsupportedConfigError(f"{where}: '{t.name}' ({what}) is stored as {t.dtype}; bitsandbytes writes "
                                     f"{dtype} and jaxft implements that only")
    return _raw(t).view({"U8": np.uint8, "F32": "<f4"}[dtype]).astype({"U8": np.uint8, "F32": np.float32}[dtype])


def split_bnb_tensors(stored: list[StoredTensor], where: str) -> tuple[list[StoredTensor],
                                                                          dict[str, dict[str, StoredTensor]]]:
    """`(dense tensors, {quantised weight name: {"weight", "absmax", ..., "quant_state": StoredTensor}})`: the
    tensors of each quantised weight grouped under its name (e.g. `model.layers.0.mlp.up_proj.weight`). A
    `quant_state` of another type (fp4) is refused by name; statistics without their weight are refused."""
    by_name = {t.name: t for t in stored}
    groups: dict[str, dict[str, StoredTensor]] = {}
    for t in stored:
        if _STATE in t.name:
            base, kind = t.name.split(_STATE, 1)
            if kind != "nf4":
                raise UnsupportedConfigError(f"{where}: '{base}' is bitsandbytes {kind}-quantised "
                                             f"('{t.name}'); jaxft implements nf4 only: quantise with "
                                             "bnb_4bit_quant_type='nf4', or load the unquantised model")
            if base not in by_name:
                raise FileFormatError(f"{where}: '{t.name}' has no weight '{base}'; the checkpoint is incomplete")
            groups[base] = {"weight": by_name[base], "quant_state": t}
    dense = []
    for t in stored:
        if t.name in groups or _STATE in t.name:
            continue
        base, _, part = t.name.rpartition(".")
        if part in _PARTS:
            if base not in groups:
                raise FileFormatError(f"{where}: '{t.name}' (bitsandbytes statistics) has no quant_state "
                                      f"'{base}{_STATE}nf4'; the checkpoint is incomplete")
            groups[base][part] = t
            continue
        dense.append(t)
    return dense, groups


def read_bnb_nf4(name: str, group: dict[str, StoredTensor], where: str) -> BnbNF4:
    """One quantised weight in bitsandbytes' layout, every field checked against what jaxft implements."""
    try:
        state = json.loads(_raw(group["quant_state"]).tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{where}: '{group['quant_state'].name}' is not a JSON quant state ({e})") from None
    if not isinstance(state, dict):
        raise FileFormatError(f"{where}: '{group['quant_state'].name}' is not a JSON object")

    def field(key: str) -> Any:
        if key not in state:
            raise FileFormatError(f"{where}: the quant state of '{name}' lacks '{key}'; the checkpoint is damaged")
        return state[key]

    def refuse(what: str) -> UnsupportedConfigError:
        return UnsupportedConfigError(f"{where}: '{name}' {what}; jaxft imports bitsandbytes NF4 with blocks of "
                                      f"{BLOCK} (nested {NESTED_BLOCK}): re-quantise with bitsandbytes' defaults or "
                                      "load the unquantised model")

    if field("quant_type") != "nf4":
        raise refuse(f"has quant_type '{state['quant_type']}' (nf4 only)")
    if field("blocksize") != BLOCK:
        raise refuse(f"is quantised in blocks of {state['blocksize']}")
    if field("dtype") not in _DTYPES:
        raise refuse(f"has dtype '{state['dtype']}' ({', '.join(_DTYPES)} implemented)")
    shape = tuple(int(d) for d in field("shape"))
    n = math.prod(shape)
    for part in ("absmax", "quant_map"):
        if part not in group:
            raise FileFormatError(f"{where}: '{name}.{part}' is missing; the checkpoint is incomplete")
    if not np.array_equal(_array(group["quant_map"], "F32", where, "quant_map").view(np.uint32),
                          NF4_CODES.view(np.uint32)):
        raise refuse("has a quant_map other than bitsandbytes' NF4 values")
    packed = _raw(group["weight"])
    if packed.size != (n + 1) // 2:
        raise FileFormatError(f"{where}: '{name}' holds {packed.size} bytes of codes, its shape {list(shape)} needs "
                              f"{(n + 1) // 2}; the checkpoint is damaged")
    nblocks = -(-n // BLOCK)
    nested = offset = None
    if "nested_absmax" in group or "nested_offset" in state:
        if "nested_absmax" not in group or "nested_quant_map" not in group:
            raise FileFormatError(f"{where}: '{name}' is double-quantised but lacks nested_absmax or "
                                  "nested_quant_map; the checkpoint is incomplete")
        if field("nested_blocksize") != NESTED_BLOCK:
            raise refuse(f"has nested blocks of {state['nested_blocksize']}")
        if field("nested_dtype") != "float32":
            raise refuse(f"has nested_dtype '{state['nested_dtype']}' (float32 only)")
        if not np.array_equal(_array(group["nested_quant_map"], "F32", where, "nested_quant_map").view(np.uint32),
                              DYNAMIC_MAP.view(np.uint32)):
            raise refuse("has a nested_quant_map other than bitsandbytes' signed dynamic map")
        absmax = _array(group["absmax"], "U8", where, "double-quantised absmax")
        nested = _array(group["nested_absmax"], "F32", where, "nested_absmax")
        offset = np.float32(float(field("nested_offset")))  # printed from fp32: exact
        want = -(-nblocks // NESTED_BLOCK)
        if nested.size != want:
            raise FileFormatError(f"{where}: '{name}.nested_absmax' has {nested.size} values, {want} expected")
    else:
        absmax = _array(group["absmax"], "F32", where, "absmax")
    if absmax.size != nblocks:
        raise FileFormatError(f"{where}: '{name}.absmax' has {absmax.size} values, {nblocks} expected for shape "
                              f"{list(shape)}")
    return BnbNF4(jnp.asarray(packed), jnp.asarray(absmax), None if nested is None else jnp.asarray(nested),
                  None if offset is None else jnp.asarray(offset), shape, jnp.dtype(state["dtype"]))


def nf4_leaves(table: dict[str, TensorEntry], groups: dict[str, dict[str, StoredTensor]], layers: int,
               dtype: np.dtype, where: str) -> dict[tuple[str, ...], Any]:
    """The leaves of the quantised weights: `{tree path: NF4Tensor}` (stacked over layers for leaves under
    `model.layers`), its dtype the load dtype (the dtype it dequantises to), or a dense array where the input
    features are not a multiple of 64. Every name and shape is checked before any conversion."""
    by_path: dict[tuple[str, ...], dict[int | None, str]] = {}
    for name in groups:
        e = table.get(name)
        if e is None or not e.transpose:
            raise FileFormatError(f"{where}: '{name}' is bitsandbytes-quantised but is not a linear weight of this "
                                  "model")
        by_path.setdefault(e.path, {})[e.layer] = name
    for path, names in by_path.items():
        if None not in names and len(names) != layers:
            missing = sorted(set(range(layers)) - set(names))
            raise UnsupportedConfigError(f"{where}: '{'.'.join(path)}' is quantised in some layers but not in layers "
                                         f"{missing[:5]}; jaxft needs all layers of a weight quantised alike")
    bnb = {}
    for name in groups:
        q = read_bnb_nf4(name, groups[name], where)
        if q.shape != table[name].hf_shape:
            raise FileFormatError(f"{where}: '{name}' has shape {list(q.shape)} in its quant state, the config "
                                  f"expects {list(table[name].hf_shape)}")
        bnb[name] = q
    out: dict[tuple[str, ...], Any] = {}
    for path, names in by_path.items():
        parts = []
        for layer in sorted(names, key=lambda i: -1 if i is None else i):
            q = bnb.pop(names[layer])
            if q.shape[1] % BLOCK:  # NF4Tensor blocks run along `in`: keep this weight dense (exact dequantisation)
                parts.append(np.asarray(dequantize_bnb(q)).T.astype(dtype))
                continue
            parts.append(dataclasses.replace(from_bnb(q), dtype_name=np.dtype(dtype).name))
        if None in names:
            out[path] = parts[0]
            continue
        kinds = {(type(p), getattr(p, "double_quant", None)) for p in parts}
        if len(kinds) != 1:
            raise UnsupportedConfigError(f"{where}: '{'.'.join(path)}' is double-quantised in some layers only; "
                                         "jaxft stacks the layers of a weight: quantise them alike")
        out[path] = (jnp.stack(parts) if isinstance(parts[0], np.ndarray) else
                     NF4Tensor(*(None if getattr(parts[0], f) is None else jnp.stack([getattr(p, f) for p in parts])
                                 for f in ("codes", "absmax", "nested_absmax", "offset")), parts[0].dtype_name))
    return out
