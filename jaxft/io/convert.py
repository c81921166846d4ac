"""The HF <-> jaxft name table, derived from `param_specs` (never written twice).

Rules: a leaf under `model.layers` is stacked: HF name `model.layers.{i}.<rest>` is slice `i`. A leaf named `kernel`
is HF's `weight` transposed (`[in, out]` here, `[out, in]` there). Everything else maps one to one.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import numpy as np

from jaxft.models.config import LlamaConfig
from jaxft.models.params import ParamSpec, is_spec, param_specs, path_str
from jaxft.ops.linear import materialize
from jaxft.parallel.distributed import host_array


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One HF tensor: where it lives in the jaxft tree and how to convert it."""

    hf_name: str
    path: tuple[str, ...]  # keys into the params tree
    layer: int | None  # slice of the stacked leaf, or None
    transpose: bool  # HF stores weight[out, in]; jaxft kernel[in, out]
    hf_shape: tuple[int, ...]


def _hf_leaf_name(path: tuple[str, ...]) -> tuple[str, ...]:
    return (*path[:-1], "weight") if path[-1] == "kernel" else path


def tensor_table(config: LlamaConfig) -> list[TensorEntry]:
    """Every HF tensor name of `config`'s checkpoint with its place in the jaxft tree."""
    out = []
    for kpath, spec in jax.tree_util.tree_flatten_with_path(param_specs(config), is_leaf=is_spec)[0]:
        path = tuple(path_str([k]) for k in kpath)
        spec: ParamSpec
        transpose = path[-1] == "kernel"
        shape = spec.shape
        if path[:2] == ("model", "layers"):
            inner = shape[1:]
            hf_shape = tuple(reversed(inner)) if transpose else inner
            rest = ".".join(_hf_leaf_name(path[2:]))
            for i in range(config.num_hidden_layers):
                out.append(TensorEntry(f"model.layers.{i}.{rest}", path, i, transpose, hf_shape))
        else:
            hf_shape = tuple(reversed(shape)) if transpose else shape
            out.append(TensorEntry(".".join(_hf_leaf_name(path)), path, None, transpose, hf_shape))
    return out


def iter_hf_tensors(config: LlamaConfig, params: dict, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_name, numpy array in HF layout)` one tensor at a time (for export). Composite leaves are
    materialised once per leaf, on the devices; each HF tensor (one layer of a stacked leaf) comes to host memory
    alone, gathered across processes when its leaf is sharded over several (then every process must iterate, in
    the same order). `dtype` casts (default: the leaf's dtype)."""
    current_path, current = None, None
    for e in tensor_table(config):
        if e.path != current_path:
            leaf = params
            for k in e.path:
                leaf = leaf[k]
            current_path, current = e.path, materialize(leaf)
        value = host_array(current if e.layer is None else current[e.layer])
        if dtype is not None:
            value = value.astype(dtype)
        if tuple(value.shape) != tuple(reversed(e.hf_shape)) and e.transpose or (
                not e.transpose and tuple(value.shape) != e.hf_shape):
            raise ValueError(f"{e.hf_name}: parameter has shape {value.shape}, the config expects "
                             f"{e.hf_shape} in HF layout")
        yield e.hf_name, np.ascontiguousarray(value.T if e.transpose else value)
