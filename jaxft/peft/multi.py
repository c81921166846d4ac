"""Multi-adapter batches: one base and up to N LoRA adapters in a fixed-capacity stack, each batch row naming its own.

The S-LoRA / Punica pattern: the adapters cannot be merged into the base (rows differ), so every targeted linear
module computes `x @ W + scale[id] * (x @ A[id]) @ B[id]`, gathering each row's factors from the stack. The row's
adapter id is an input of the call (`jaxft.forward(..., adapter_ids=ids)`, bound into the `MultiLora` leaves by
`jaxft.ops.rows.bind_rows`), never part of the parameter tree's shapes, so one compiled function serves every mix of
adapters, and adding or removing an adapter writes one slot of the stack's arrays without recompiling.

Layout of the stack's arrays (`AdapterStack.arrays`), a tree keyed like the base tree's module paths:

    arrays[path] = {'lora_a': [L, N, in, R], 'lora_b': [L, N, R, out], 'scale': [L, N]}

(no leading `L` for an unstacked module such as `lm_head`). N is the capacity, R the largest rank the stack takes;
an adapter of smaller rank is zero-padded (exact: the padding contributes zero), a module or layer it does not
transform has scale 0 in its slot, and each adapter keeps its own scale per layer (alpha / r, rsLoRA alpha /
sqrt(r), `rank_pattern` / `alpha_pattern`). The modules are the union of the adapters' targets (`from_adapters`) or
every linear layer module (`AdapterStack.create(targets='all-linear')`, what a server that loads adapters later
needs). Row id -1 is the base model.

    stack = AdapterStack.create(params, capacity=4, max_rank=16)
    stack.add("sql", *peft.load_adapter("adapters/sql", config), params)
    ids = stack.ids(["sql", None, "sql"])                         # int32 [B]; None = base
    logits = jaxft.forward(config, bind_stack(params, stack.arrays), tokens, adapter_ids=ids)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import ConfigError
from jaxft.ops.linear import linear
from jaxft.ops.rows import RowWeight
from jaxft.peft.specs import ALL_LINEAR, LoraSpec
from jaxft.peft.targets import HEAD, Module, ModulePlan, get_path, linear_modules, plan, set_path
from jaxft.peft.protocol import copy_spine

BASE = -1  # the row id of "no adapter"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MultiLora(RowWeight):
    """`y[b] = linear(x[b], base, bias) + scale[rows[b]] * (x[b] @ a[rows[b]]) @ b[rows[b]]`, rows[b] = -1: base.

    base: weight `[in, out]` (a plain array or a composite such as NF4). a `[N, in, R]`, b `[N, R, out]`,
    scale `[N]` (every field with the layer axis in front when stacked, sliced by the layer scan). rows `[B]` int32:
    the call's per-row slot, bound by `with_rows` (None until then). Inference only (no custom VJP; gradients
    flow through plain einsums).
    """

    base: Any
    a: jax.Array
    b: jax.Array
    scale: jax.Array
    rows: jax.Array | None = None

    def with_rows(self, rows: jax.Array) -> MultiLora:
        lead = self.scale.shape[:-1]  # [L] when stacked: the scan slices rows with the layer
        return dataclasses.replace(self, rows=jnp.broadcast_to(rows, (*lead, rows.shape[-1])))

    def apply(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        if self.rows is None:
            raise ValueError("a multi-adapter stack is bound into these weights: pass adapter_ids=[B] (one slot per "
                             "row, -1 for the base) to jaxft.forward / forward_cached")
        if self.rows.shape[-1] != x.shape[0]:
            raise ValueError(f"adapter_ids has {self.rows.shape[-1]} rows, the batch has {x.shape[0]}")
        y = linear(x, self.base, bias)
        has = self.rows >= 0
        slot = jnp.where(has, self.rows, 0)
        a = jnp.take(self.a, slot, axis=0).astype(x.dtype)  # [B, in, R]: each row's factors (Punica's gather)
        b = jnp.take(self.b, slot, axis=0).astype(x.dtype)  # [B, R, out]
        s = jnp.where(has, jnp.take(self.scale, slot), 0.0).astype(x.dtype)  # [B]; the base row adds zero
        xa = jnp.einsum("b...i,bir->b...r", x, a)
        delta = jnp.einsum("b...r,bro->b...o", xa, b)
        return y + (s.reshape(s.shape + (1,) * (delta.ndim - 1)) * delta).astype(y.dtype)

    def materialize(self) -> jax.Array:
        raise ValueError("a multi-adapter stack has no single dense weight (each row has its own adapter); merge "
                         "one adapter with jaxft.peft.merge instead")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)


def bind_stack(params: dict, arrays: dict) -> dict:
    """`params` with a `MultiLora` leaf on every module the stack holds (a pure tree transform, usable inside
    `jit` with `arrays` as an argument). Rows are bound per call by `forward(..., adapter_ids=ids)`."""
    out = dict(params)

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if "lora_a" in node:
            copy_spine(out, (*path, "kernel"))
            mod = dict(get_path(out, path))
            mod["kernel"] = MultiLora(mod["kernel"], node["lora_a"], node["lora_b"], node["scale"])
            set_path(out, path, mod)
            return
        for k, v in node.items():
            visit(v, (*path, k))

    visit(arrays, ())
    return out


def _stack_modules(params: dict, targets: Any) -> list[Module]:
    """The linear modules named by `targets`: 'all-linear' (every module but lm_head), or module names (`q_proj`,
    `self_attn.q_proj`, `lm_head`) matched as peft matches a suffix."""
    mods = linear_modules(params)
    if targets == ALL_LINEAR:
        return [m for m in mods if m.path[-1] != HEAD]
    names = [targets] if isinstance(targets, str) else list(targets)
    out = [m for m in mods if any(m.short == t or m.short.endswith("." + t) for t in names)]
    missing = [t for t in names if not any(m.short == t or m.short.endswith("." + t) for m in mods)]
    if missing:
        raise ConfigError(f"AdapterStack targets: '{missing[0]}' names no linear module; the modules are: "
                          f"{', '.join(m.short for m in mods)}")
    return out


def _slot_axis(path: tuple, leaf: jax.Array) -> int:
    """The capacity axis of a stack leaf: after the layer axis when stacked (`[L, N, ...]`), else first."""
    name = path[-1].key
    return leaf.ndim - (1 if name == "scale" else 3)


@functools.partial(jax.jit, donate_argnums=0)
def _write_slot(arrays: dict, slot: jax.Array, entry: dict) -> dict:
    """`arrays` with `entry` (the same tree without the capacity axis) written at `slot` (traced: one compilation
    serves every slot)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, s, v: jax.lax.dynamic_update_index_in_dim(s, v.astype(s.dtype), slot, _slot_axis(p, s)),
        arrays, entry)


def _one_slot_zeros(arrays: dict) -> dict:
    def zeros(p, s):
        axis = _slot_axis(p, s)
        return jnp.zeros(s.shape[:axis] + s.shape[axis + 1:], s.dtype)

    return jax.tree_util.tree_map_with_path(zeros, arrays)


class AdapterStack:
    """The host side of a multi-adapter stack: which adapter sits in which slot, and the device arrays.

    `arrays` is replaced (not mutated) by `add` / `remove`; shapes and dtypes never change, so a jitted function
    taking `arrays` as an argument does not recompile. Not thread-safe: one owner calls `add` / `remove` between
    passes (the server's scheduler loop does).
    """

    def __init__(self, modules: Sequence[Module], arrays: dict, capacity: int, max_rank: int):
        self.modules = tuple(modules)
        self.arrays = arrays
        self.capacity = capacity
        self.max_rank = max_rank
        self.slots: list[str | None] = [None] * capacity

    # ---- building ----
    @classmethod
    def create(cls, params: dict, *, capacity: int, max_rank: int, targets: Any = ALL_LINEAR,
               dtype=jnp.float32) -> AdapterStack:
        """An empty stack of `capacity` slots of rank up to `max_rank` on the modules `targets` names (default:
        every linear module of the layers; an adapter targeting a module outside is refused by `add`)."""
        if capacity < 1:
            raise ConfigError(f"AdapterStack capacity={capacity}: must be at least 1 (--max-loras)")
        if max_rank < 1:
            raise ConfigError(f"AdapterStack max_rank={max_rank}: must be at least 1 (--max-lora-rank)")
        modules = _stack_modules(params, targets)
        arrays: dict = {}
        for m in modules:
            lead = (len(m.names), capacity) if m.stacked else (capacity,)
            set_path(arrays, m.path, {"lora_a": jnp.zeros((*lead, m.d_in, max_rank), dtype),
                                      "lora_b": jnp.zeros((*lead, max_rank, m.d_out), dtype),
                                      "scale": jnp.zeros(lead, jnp.float32)})
        return cls(modules, arrays, capacity, max_rank)

    @classmethod
    def from_adapters(cls, params: dict, adapters: Sequence[tuple[str, Any, dict]], *, capacity: int | None = None,
                      max_rank: int | None = None, dtype=jnp.float32) -> AdapterStack:
        """A stack holding `adapters` (`(name, spec, adapter)` each) on the union of their targets, rank padded to
        the largest (or `max_rank`), `capacity` slots (default: one per adapter)."""
        if not adapters:
            raise ConfigError("AdapterStack.from_adapters: no adapters given")
        plans = [_lora_plans(name, spec, params) for name, spec, _ in adapters]
        paths = {mp.module.path for ps in plans for mp in ps}
        shorts = [m.short for m in linear_modules(params) if m.path in paths]
        rank = max(mp.max_rank for ps in plans for mp in ps)
        stack = cls.create(params, capacity=capacity or len(adapters), max_rank=max_rank or rank, targets=shorts,
                           dtype=dtype)
        for name, spec, adapter in adapters:
            stack.add(name, spec, adapter, params)
        return stack

    # ---- slots ----
    @property
    def names(self) -> list[str]:
        """The loaded adapters' names, in slot order."""
        return [n for n in self.slots if n is not None]

    def add(self, name: str, spec: Any, adapter: dict, params: dict) -> int:
        """Write `adapter` (a LoRA/rsLoRA adapter tree for `spec`, e.g. from `jaxft.peft.load_adapter`) into a free
        slot and return it. Raises `ConfigError` (nothing written) when the name is taken, the stack is full, the
        method is not LoRA, a rank exceeds `max_rank` or a target lies outside the stack's modules."""
        if name in self.slots:
            raise ConfigError(f"adapter '{name}' is already loaded (slot {self.slots.index(name)}); unload it first "
                              "or choose another name")
        if None not in self.slots:
            raise ConfigError(f"adapter '{name}': all {self.capacity} slots are in use ({', '.join(self.names)}); "
                              "unload one or raise --max-loras")
        plans = _lora_plans(name, spec, params)
        held = {m.path for m in self.modules}
        for mp in plans:
            if mp.module.path not in held:
                raise ConfigError(f"adapter '{name}' targets {mp.module.short}, which this stack does not hold "
                                  f"(it holds {', '.join(m.short for m in self.modules)})")
            if mp.max_rank > self.max_rank:
                raise ConfigError(f"adapter '{name}': rank {mp.max_rank} on {mp.module.short} exceeds the stack's "
                                  f"max rank {self.max_rank}; raise --max-lora-rank to at least {mp.max_rank}")
        by_path = {mp.module.path: mp for mp in plans}
        entry: dict = {}
        for m in self.modules:
            mp = by_path.get(m.path)
            node = get_path(self.arrays, m.path)
            if mp is None:
                set_path(entry, m.path, _one_slot_zeros(node))
                continue
            src = get_path(adapter, (*m.path, "kernel"))
            if not isinstance(src, dict) or "lora_a" not in src:
                raise ConfigError(f"adapter '{name}' has no LoRA factors for {m.short}; it was not made for this "
                                  "spec and model (load it with jaxft.peft.load_adapter)")
            a, b, r = jnp.asarray(src["lora_a"]), jnp.asarray(src["lora_b"]), self.max_rank
            pad = r - a.shape[-1]
            a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
            b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
            scale = jnp.asarray(mp.scale if m.stacked else mp.scale[0], jnp.float32)
            want = _drop_slot_axis(node["lora_a"], m), _drop_slot_axis(node["lora_b"], m)
            if a.shape != want[0] or b.shape != want[1]:
                raise ConfigError(f"adapter '{name}': {m.short} factors {a.shape} / {b.shape} do not fit the model "
                                  f"({want[0]} / {want[1]})")
            set_path(entry, m.path, {"lora_a": a, "lora_b": b, "scale": scale})
        slot = self.slots.index(None)
        self.arrays = _write_slot(self.arrays, jnp.int32(slot), entry)
        self.slots[slot] = name
        return slot

    def remove(self, name: str) -> int:
        """Zero `name`'s slot (a stale id then computes the base) and free it; returns the slot."""
        slot = self.slot(name)
        zeros = _one_slot_zeros(self.arrays)
        self.arrays = _write_slot(self.arrays, jnp.int32(slot), zeros)
        self.slots[slot] = None
        return slot

    def slot(self, name: str) -> int:
        """The slot of a loaded adapter (`ConfigError` naming the loaded ones otherwise)."""
        if name not in self.slots:
            loaded = ", ".join(self.names) or "none"
            raise ConfigError(f"adapter '{name}' is not loaded (loaded: {loaded})")
        return self.slots.index(name)

    def ids(self, names: Sequence[str | None]) -> np.ndarray:
        """`int32[B]` row ids for `forward(..., adapter_ids=)`: each row's slot, -1 for None (the base)."""
        return np.asarray([BASE if n is None else self.slot(n) for n in names], np.int32)


def _drop_slot_axis(v: jax.Array, m: Module) -> tuple[int, ...]:
    """The shape of one slot of a stack leaf (the capacity axis is 1 when stacked, 0 otherwise)."""
    axis = 1 if m.stacked else 0
    return tuple(v.shape[:axis]) + tuple(v.shape[axis + 1:])


def _lora_plans(name: str, spec: Any, params: dict) -> list[ModulePlan]:
    """The module plans of a LoRA adapter; other methods and options a stack cannot hold are refused by name."""
    if type(spec) is not LoraSpec:
        raise ConfigError(f"adapter '{name}': {type(spec).__name__} cannot share a multi-adapter batch; only LoRA "
                          "and rsLoRA can (jaxft.peft.to_lora re-expresses DoRA and other weight deltas as LoRA)")
    if spec.modules_to_save:
        raise ConfigError(f"adapter '{name}': modules_to_save ({', '.join(spec.modules_to_save)}) replaces whole "
                          "modules, which rows of one batch cannot share; merge it or serve it alone")
    return plan(spec, params, f"adapter '{name}'")
