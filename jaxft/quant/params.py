"""NF4 in a model's parameter tree: which leaves are quantised, quantising a tree or a checkpoint while it loads,
the logical axes of the NF4 fields, and the guard that keeps a quantised base out of an optimizer.

A plan (`QuantPlan`) names the linear projections to quantise; embeddings and norms never are, nor a head tied to
the embeddings (there is no separate head leaf), and an untied `lm_head` only when asked (bitsandbytes' and
QLoRA's default leaves it dense).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import UnsupportedConfigError
from jaxft.parallel.distributed import array_from_blocks
from jaxft.quant.bnb_format import BLOCK, NESTED_BLOCK, double_quantize
from jaxft.quant.layout import CHUNK
from jaxft.quant.nf4 import NF4Tensor, quantize, view_codes, with_storage

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """Which kernels are stored in NF4 and how. projections: names among `PROJECTIONS`; lm_head: quantise an
    untied head; storage_dtype: `uint8` or `bfloat16` (see `jaxft.quant.nf4.view_codes`); double_quant: 8-bit
    absmax tables."""

    projections: tuple[str, ...] = PROJECTIONS
    lm_head: bool = False
    storage_dtype: str = "uint8"
    double_quant: bool = True

    @classmethod
    def from_section(cls, section: Any) -> "QuantPlan":
        """The plan of a trainer config's `quantize` section (`jaxft.train.config.QuantizeSection`)."""
        return cls(tuple(section.projections), bool(section.lm_head), str(section.storage_dtype),
                   bool(section.double_quant))

    def targets(self, path: tuple[str, ...]) -> bool:
        """Whether the leaf at `path` (dict keys into the params) is stored in NF4."""
        if path == ("lm_head", "kernel"):
            return self.lm_head
        return len(path) >= 2 and path[-1] == "kernel" and path[-2] in self.projections

    def stack(self, shape: tuple[int, ...], dtype: Any, shardings: "NF4Tensor | None" = None) -> "NF4Stack":
        """An empty NF4 leaf of dense shape `shape` (`[L, in, out]` or `[in, out]`), filled one matrix at a time;
        with `shardings` (an `NF4Tensor` of its fields' shardings) it keeps only this process's part."""
        return NF4Stack(shape, np.dtype(dtype), self, shardings)


@jax.jit
def _quantize_rows(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Packed codes and fp32 absmax of one packing chunk of rows `w[rows <= 256, out]` (blocks run along rows, so
    a chunk quantises on its own exactly as inside the whole matrix)."""
    t = quantize(w, double_quant=False)
    return t.codes, t.absmax


@jax.jit
def _absmax_rows(w: jax.Array) -> jax.Array:
    """The fp32 absmax `[rows/64, out]` of rows `w[rows, out]` (what `_quantize_rows` computes, without codes)."""
    k, n = w.shape
    return jnp.max(jnp.abs(w.astype(jnp.float32).reshape(k // BLOCK, BLOCK, n)), axis=-2)


@jax.jit
def _double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One matrix's fp32 absmax `[in/64, out]` -> (uint8 `[in/64, out]`, nested, offset), bitsandbytes' order."""
    k64, n = absmax.shape
    q, nested, offset = double_quantize(absmax.T.reshape(-1))
    return q.reshape(n, k64).T, nested, offset


def _aligned(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """An uninitialised host array starting on an `align`-byte boundary, which XLA:CPU adopts as a device array
    without copying it (`device_put(..., may_alias=True)`)."""
    dtype = np.dtype(dtype)
    raw = np.empty(math.prod(shape) * dtype.itemsize + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)


def _box(shape: tuple[int, ...], shardings: NF4Tensor | None, per_row: int) -> tuple[range, ...]:
    """The part of a dense NF4 leaf `shape` (`[..., in, out]`) that this process's devices hold under `shardings`
    (an `NF4Tensor` of its fields' shardings; None: all of it), one `range` per dense axis: the union over every
    field's addressable shards, `in` widened to whole packing chunks (a chunk quantises on its own). `per_row`:
    rows of `in` per stored row of codes (2 for uint8, 4 for bfloat16)."""
    if shardings is None:
        return tuple(range(d) for d in shape)
    *lead, k, n = shape
    lo, hi = list(shape), [0] * len(shape)

    def cover(field_shape: tuple[int, ...], sharding: Any, scale: tuple[int, ...]) -> None:
        for index in sharding.addressable_devices_indices_map(field_shape).values():
            for ax, (sl, dim, f) in enumerate(zip(index, field_shape, scale)):
                start, stop, _ = sl.indices(dim)
                lo[ax], hi[ax] = min(lo[ax], start * f), max(hi[ax], stop * f)

    ones = (1,) * len(lead)
    cover((*lead, k // per_row, n), shardings.codes, (*ones, per_row, 1))
    cover((*lead, k // BLOCK, n), shardings.absmax, (*ones, BLOCK, 1))
    for field in (shardings.nested_absmax, shardings.offset):  # layer axes only: the whole of each matrix
        if field is not None:
            cover(tuple(lead), field, ones)
    lo[-2], hi[-2] = lo[-2] // CHUNK * CHUNK, min(k, -(-hi[-2] // CHUNK) * CHUNK)
    return tuple(range(a, max(a, b)) for a, b in zip(lo, hi))


class NF4Stack:
    """Host buffers of one NF4 leaf, filled matrix by matrix (`set`) while a checkpoint loads: the host holds the
    quantised fields and one dense matrix, never the dense stack. `finish` hands out the `NF4Tensor`.

    With `shardings` (an `NF4Tensor` of its fields' shardings, e.g. over a multi-host mesh) the buffers hold only
    the box of layers, rows and columns this process's devices need (`_box`), `read_index` says which part of
    each matrix `set` needs, and `finish` builds global arrays from the box. Double quantisation needs every
    block's absmax (its offset is their mean), so it reads whole matrices but stores and encodes only the box."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, plan: QuantPlan, shardings: NF4Tensor | None = None):
        *lead, k, n = shape
        if k % BLOCK:
            raise UnsupportedConfigError(f"quantize: a weight with {k} input features is not a multiple of the NF4 "
                                         f"block ({BLOCK}); leave it out of quantize.targets")
        if len(lead) > 1:
            raise UnsupportedConfigError(f"quantize: weights of shape {shape}: one leading (layer) axis at most")
        self.shape, self.dtype, self.plan, self.shardings = tuple(shape), dtype, plan, shardings
        self.box = _box(self.shape, shardings, 2 * np.dtype(jnp.dtype(plan.storage_dtype)).itemsize)
        *lb, rows, cols = self.box
        self.lead = tuple(len(r) for r in lb)
        self.codes = _aligned((*self.lead, len(rows) // 2, len(cols)), np.uint8)
        self.absmax = _aligned((*self.lead, len(rows) // BLOCK, len(cols)),
                               np.uint8 if plan.double_quant else np.float32)
        self.nested = _aligned((*self.lead, math.ceil(k * n / BLOCK / NESTED_BLOCK)), np.float32) \
            if plan.double_quant else None
        self.offset = _aligned(self.lead, np.float32) if plan.double_quant else None
        self.filled = np.zeros(self.lead, bool)

    def layers(self) -> list[int | None]:
        """The layers `set` needs (None: an unstacked leaf)."""
        return list(self.box[0]) if len(self.shape) == 3 else [None]

    def read_index(self) -> tuple[slice, slice]:
        """The part `[in, out]` of each dense matrix that `set` needs: the whole matrix with double quantisation,
        else only this process's box."""
        rows, cols = self.box[-2:]
        if self.plan.double_quant:
            return slice(0, self.shape[-2]), slice(0, self.shape[-1])
        return slice(rows.start, rows.stop), slice(cols.start, cols.stop)

    def set(self, layer: int | None, w: np.ndarray) -> None:
        """Quantise the dense matrix of layer `layer` (None: an unstacked leaf), `w` its part `read_index()`, one
        packing chunk of 256 rows at a time so that the quantiser's temporaries stay a small multiple of a chunk."""
        at = () if layer is None else (layer - self.box[0].start,)
        rows, cols = self.box[-2:]
        r0 = self.read_index()[0].start
        c = slice(cols.start, cols.stop) if self.plan.double_quant else slice(None)  # columns of w to keep
        absmax = np.empty((w.shape[0] // BLOCK, w.shape[1]), np.float32)
        for s in range(0, w.shape[0], CHUNK):
            g = r0 + s  # the chunk's first row in the whole matrix
            if rows.start <= g < rows.stop:
                codes, amax = _quantize_rows(jnp.asarray(w[s:s + CHUNK]))
                local = (g - rows.start) // 2
                self.codes[at][local:local + codes.shape[0]] = np.asarray(codes)[:, c]
            else:  # outside the box: its absmax only (the double quantisation needs it)
                amax = _absmax_rows(jnp.asarray(w[s:s + CHUNK]))
            absmax[s // BLOCK:(s + CHUNK) // BLOCK] = np.asarray(amax)
        if self.plan.double_quant:
            q, nested, offset = _double_quantize(jnp.asarray(absmax))
            self.absmax[at] = np.asarray(q)[rows.start // BLOCK:rows.stop // BLOCK, c]
            self.nested[at] = np.asarray(nested)
            self.offset[at] = np.asarray(offset)
        else:
            self.absmax[at] = absmax
        self.filled[at] = True

    def finish(self) -> NF4Tensor:
        if not self.filled.all():
            raise ValueError("NF4Stack.finish: some matrices were never set")
        if self.shardings is None:
            # aligned host buffers become the arrays without a copy on CPU (bfloat16 storage is one bitcast copy)
            arr = lambda v: None if v is None else jax.device_put(v, may_alias=True)  # noqa: E731
            codes = view_codes(arr(self.codes), self.plan.storage_dtype)
            t = NF4Tensor(codes, arr(self.absmax), arr(self.nested), arr(self.offset), self.dtype.name)
        else:
            t = self._finish_sharded()
        self.codes = self.absmax = self.nested = self.offset = None
        return t

    def _finish_sharded(self) -> NF4Tensor:
        """Global arrays of the fields' shardings, each process's shards cut from its box."""
        *lead, k, n = self.shape
        *lb, rows, cols = self.box
        s = self.shardings

        def build(host: np.ndarray | None, shape: tuple[int, ...], sharding: Any, first: tuple[int, ...]):
            """A global array `shape` of `sharding` whose part held here is `host`, starting at index `first`."""
            if host is None:
                return None

            def cut(index: tuple[slice, ...]) -> np.ndarray:
                local = []
                for sl, dim, f0, m in zip(index, shape, first, host.shape):
                    a, b, _ = sl.indices(dim)
                    if a < f0 or b - f0 > m:
                        raise ValueError(f"NF4Stack: shard {index} of {shape} lies outside this process's box")
                    local.append(slice(a - f0, b - f0))
                return host[tuple(local)]
            return array_from_blocks(shape, sharding, cut)

        layer0 = tuple(r.start for r in lb)
        codes = build(self.codes, (*lead, k // 2, n), s.codes, (*layer0, rows.start // 2, cols.start))
        if jnp.dtype(self.plan.storage_dtype) != jnp.uint8:  # the same shards viewed as bfloat16 pairs
            codes = jax.jit(lambda c: view_codes(c, self.plan.storage_dtype), out_shardings=s.codes)(codes)
        absmax = build(self.absmax, (*lead, k // BLOCK, n), s.absmax, (*layer0, rows.start // BLOCK, cols.start))
        nested = None if self.nested is None else build(self.nested, (*lead, self.nested.shape[-1]),
                                                        s.nested_absmax, (*layer0, 0))
        offset = build(self.offset, tuple(lead), s.offset, layer0)
        return NF4Tensor(codes, absmax, nested, offset, self.dtype.name)


def _paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, NF4Tensor))[0]
    return [(tuple(str(getattr(k, "key", k)) for k in p), v) for p, v in flat]


def quantize_params(params: dict, plan: QuantPlan) -> dict:
    """`params` with the plan's kernels replaced by `NF4Tensor`s (quantised layer by layer, on the devices). For a
    tree already in memory; `jaxft.load_pretrained(..., quantize=plan)` quantises while reading instead."""
    out = jax.tree.map(lambda x: x, params)
    for path, leaf in _paths(params):
        if plan.targets(path) and not isinstance(leaf, NF4Tensor):
            stack = plan.stack(tuple(leaf.shape), leaf.dtype)
            for i in (range(leaf.shape[0]) if leaf.ndim == 3 else [None]):
                stack.set(i, leaf if i is None else leaf[i])
            node = out
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = stack.finish()
    return out


def abstract_quantized(base: Any, plan: QuantPlan) -> Any:
    """The abstract base (`jax.ShapeDtypeStruct` leaves) with each kernel `plan` targets as the `NF4Tensor` that
    quantising it makes (packed codes, absmax, double-quantisation tables in their storage dtypes): shapes only,
    nothing computed."""
    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*path, k)) for k, v in node.items()}
        if not plan.targets(path):
            return node
        return jax.eval_shape(lambda w: quantize(w, double_quant=plan.double_quant,
                                                 storage_dtype=plan.storage_dtype), node)
    return walk(base, ())


def compute_view(tree: Any) -> Any:
    """`tree` with every NF4 leaf's codes as uint8 (a bitcast of bfloat16 storage; uint8 storage is unchanged).
    Call it where the step starts, outside the layer scan: XLA:CPU canonicalises NaN bit patterns of bfloat16
    values sliced inside a loop, which would change stored code bytes."""
    def view(x):
        return with_storage(x, jnp.uint8) if isinstance(x, NF4Tensor) else x
    return jax.tree.map(view, tree, is_leaf=lambda x: isinstance(x, NF4Tensor))


def dequantizing_to(tree: Any, dtype: Any) -> Any:
    """`tree` with every NF4 leaf relabelled to dequantise to `dtype` (its codes and tables shared, nothing
    computed). With `float32`, `materialize` gives `code * absmax` unrounded: the weights a float32 forward over the
    NF4 base multiplies by, and those of bitsandbytes' `dequantize_4bit` for an fp32 quant state (the export check
    writes them as the base that peft's adapter is checked on)."""
    name = jnp.dtype(dtype).name

    def relabel(x):
        return dataclasses.replace(x, dtype_name=name) if isinstance(x, NF4Tensor) else x
    return jax.tree.map(relabel, tree, is_leaf=lambda x: isinstance(x, NF4Tensor))


def nf4_leaves(tree: Any) -> list[str]:
    """Dotted paths of the `NF4Tensor` leaves of `tree`."""
    return [".".join(p) for p, v in _paths(tree) if isinstance(v, NF4Tensor)]


def refuse_trainable(tree: Any, where: str = "optimizer") -> None:
    """Raise when `tree` (what an optimizer would update) holds an NF4 weight: a quantised base is frozen; train an
    adapter over it (method.type: qlora), or load the base unquantised to train it."""
    found = nf4_leaves(tree)
    if found:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise UnsupportedConfigError(
            f"{where}: {found[0]}{more} is an NF4-quantised base weight handed over as trainable; a quantised base "
            "is frozen (train a LoRA/DoRA adapter over it, and keep quantised modules out of modules_to_save)")


def nf4_axes(axes: tuple[str | None, ...], leaf: NF4Tensor,
             shards: Mapping[str | None, int] | None = None) -> NF4Tensor:
    """The logical axes of an NF4 leaf's fields from its dense kernel's `axes` (`(..., in_axis, out_axis)`): codes
    and absmax take the kernel's axes, the double-quantisation tables only the leading (layer) axes.

    A shard along `in` must hold whole packing chunks (256 rows) so that no block of 64, and no byte pair, crosses a
    shard boundary: where `shards[in_axis]` (devices the rules split that axis over) leaves a shard of fewer or
    not a multiple of 256 rows, the `in` axis of codes and absmax is replicated instead."""
    *lead, ax_in, ax_out = axes
    k = leaf.shape[-2]
    n_in = (shards or {}).get(ax_in, 1)
    if n_in > 1 and (k % n_in or (k // n_in) % 256):
        ax_in = None
    field = (*lead, ax_in, ax_out)
    return NF4Tensor(field, field, None if leaf.nested_absmax is None else (*lead, None),
                     None if leaf.offset is None else tuple(lead), leaf.dtype_name)


def tree_axes(axes_tree: Any, params: Any, shards: Mapping[str | None, int] | None = None) -> Any:
    """`axes_tree` (the dense model's logical axes, `jaxft.models.params.logical_axes`) with each leaf that is an
    `NF4Tensor` in `params` replaced by its fields' axes (`nf4_axes`): the axes tree of a quantised base. `shards`:
    logical axis -> devices the rules split it over (from the mesh), for the chunk-alignment rule."""
    out = jax.tree.map(lambda x: x, axes_tree, is_leaf=lambda x: isinstance(x, tuple))
    for path, leaf in _paths(params):
        if isinstance(leaf, NF4Tensor):
            node = out
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = nf4_axes(node[path[-1]], leaf, shards)
    return out
