"""What a PEFT method implements: one `Method` per method (jaxft/peft/methods/), found through `jaxft.peft.registry`.

Shared code (`tree`, `merge`, `io`, `serve`) asks the method of a spec for everything that differs between methods:

    init / bind / trainable_mask / logical_axes     the adapter tree, its composite leaves, what trains, its axes
    merge_module / unmerge_module                   fold the adapter into a module's weights and take it out again
    reads / spec_from_config / config_fields        the peft `adapter_config.json` fields
    peft_tensors / load_tensors                     the peft `adapter_model.safetensors` tensors
    serve_problems                                  why vLLM would not serve it
    virtual_tokens / forward_inputs / model_inputs  extra model inputs (prompt and prefix tuning)

Most methods put a composite weight on chosen linear modules (LoRA, DoRA, IA3, Houlsby, BitFit's biases):
`LinearMethod` runs the per-module loop once (targets from `jaxft.peft.targets.plan`) and asks the method only for
one module's leaves (`init_module`, `bind_module`, ...). `modules_to_save` copies are shared by every method that
has the field (see `jaxft.peft.saved`).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import ConfigError, FileFormatError
from jaxft.models.config import LlamaConfig
from jaxft.models.params import param_specs
from jaxft.peft import saved
from jaxft.peft.peft_fields import listify
from jaxft.peft.targets import ModulePlan, get_path, iter_instances, plan, set_path

PREFIX = "base_model.model."


class Method(abc.ABC):
    """One PEFT method: its name (the trainer's `method.type`), its spec class, and what it does to a model."""

    name: ClassVar[str]
    spec: ClassVar[type]
    description: ClassVar[str]  # for messages: "LoRA", "prompt tuning"
    mergeable: ClassVar[bool] = False  # `merge` folds it into plain weights
    weight_delta: ClassVar[bool] = False  # it changes only weight matrices (`to_lora` re-expresses it)
    peft_format: ClassVar[bool] = True  # the peft library loads what `save_adapter` writes

    # ---- the adapter tree ----
    @abc.abstractmethod
    def init(self, spec: Any, config: LlamaConfig, params: dict, rng: jax.Array, *, tokenizer=None,
             dtype=jnp.float32) -> dict:
        """A fresh adapter tree for `spec` on `params`."""

    @abc.abstractmethod
    def bind(self, spec: Any, params: dict, adapter: dict, *, train: bool, rng: jax.Array | None) -> dict:
        """`params` with the adapter's composite leaves in place (no arithmetic)."""

    def trainable_mask(self, spec: Any, params: dict, adapter: dict) -> dict:
        """Bool arrays like `adapter`: False where an entry must not move (padding, untransformed layers). A leaf
        that trains whole is `all_true(shape)`, a view that holds one value."""
        return jax.tree.map(lambda v: all_true(v.shape), adapter)

    @abc.abstractmethod
    def logical_axes(self, spec: Any, config: LlamaConfig, adapter: dict) -> dict:
        """A tree like `adapter` of logical axis-name tuples (those of `jaxft.models.params`, plus `lora_rank`,
        `bottleneck`, `virtual_tokens`)."""

    # ---- merging ----
    def merge(self, spec: Any, params: dict, adapter: dict, bound: dict) -> dict:
        """`bound` (= bind(params, spec, adapter), a fresh spine) with the adapter folded into plain arrays."""
        raise ValueError(f"merge: {self.description} {self.not_mergeable}")

    def unmerge(self, spec: Any, merged: dict, adapter: dict, **kw) -> dict:
        raise ValueError(f"unmerge: {self.description} {self.not_mergeable}")

    not_mergeable: ClassVar[str] = "cannot be merged into the weights; keep it as an adapter"

    # ---- peft files ----
    @abc.abstractmethod
    def reads(self, cfg: dict) -> bool:
        """Whether an `adapter_config.json` (a dict) is this method's."""

    @abc.abstractmethod
    def spec_from_config(self, cfg: dict, where: str, tied: bool) -> Any:
        """The spec of an `adapter_config.json` this method reads (refusing options it does not implement)."""

    @abc.abstractmethod
    def config_fields(self, spec: Any, config: LlamaConfig, params: dict) -> dict:
        """The `adapter_config.json` fields (without `base_model_name_or_path`)."""

    @abc.abstractmethod
    def peft_tensors(self, spec: Any, adapter: dict, config: LlamaConfig, params: dict) -> dict[str, np.ndarray]:
        """The tensors of `adapter_model.safetensors`, by key."""

    @abc.abstractmethod
    def load_tensors(self, spec: Any, tensors: dict[str, np.ndarray], config: LlamaConfig, params: dict, *,
                     files: tuple[str, str], dtype) -> dict:
        """The adapter tree from the file's tensors, each checked against the model (`FileFormatError` naming
        `files`: the config's path and the tensors' path)."""

    # ---- serving and inputs ----
    def serve_problems(self, spec: Any, plans: list[ModulePlan] | None) -> list[str]:
        """Why vLLM would not serve this adapter (empty when it would); `plans` (from `jaxft.peft.targets.plan`, or
        None) adds the per-layer checks."""
        return [f"{self.description}: vLLM serves plain LoRA only"] + saved.serve_problems(spec)

    def virtual_tokens(self, spec: Any) -> int:
        """How many positions the method adds in front of every row (0: it adds no model inputs)."""
        return 0

    def model_inputs(self, spec: Any, adapter: dict) -> dict:
        """Keyword arguments that give generation (`jaxft.generate.greedy_generate`) the method's extra inputs."""
        return {}

    def forward_inputs(self, spec: Any, adapter: dict, input_ids: jax.Array, segment_ids: jax.Array,
                       config: LlamaConfig | None, params: dict | None, dtype) -> tuple[dict, int]:
        """Keyword arguments of `jaxft.forward` that add the method's inputs, and how many leading outputs belong to
        virtual tokens (see `jaxft.peft.prompt_inputs`)."""
        raise ConfigError(f"prompt_inputs: {type(spec).__name__} is not a prompt method")


def all_true(shape: tuple[int, ...]) -> np.ndarray:
    """A read-only bool array of `shape`, all True, in one byte of memory (a broadcast view): the mask of a leaf
    that trains whole, which `jaxft.peft.mask_updates` reduces to a plain True."""
    return np.broadcast_to(np.True_, tuple(shape))


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """One peft tensor of one module instance: `key` (after the module name), the adapter leaf and the index into
    its per-instance slice, and the transforms between peft's layout and jaxft's."""

    key: str
    leaf: str
    index: tuple
    peft_shape: tuple[int, ...]
    to_jaxft: Callable[[np.ndarray], np.ndarray]
    to_peft: Callable[[np.ndarray], np.ndarray]


def stack_shape(mp: ModulePlan, *shape: int) -> tuple[int, ...]:
    """`shape` with the layer axis in front when the module is stacked."""
    return (len(mp.active), *shape) if mp.module.stacked else shape


def per_instance(mp: ModulePlan, v: np.ndarray) -> np.ndarray:
    """Per-instance values `[n]` as stored on a leaf: `[L]` when stacked, a scalar otherwise."""
    return v if mp.module.stacked else v[0]


def require_full(mp: ModulePlan, where: str) -> None:
    if not mp.active.all():
        raise ConfigError(f"{where}: target_modules match only some layers of {mp.module.short}; this method needs "
                          "every layer of a stacked module (target the module by name)")


def check_shape(value: Any, expected: tuple[int, ...], where: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"adapter tensor {where} has shape {tuple(value.shape)}, the base model expects "
                         f"{tuple(expected)}")


def adapter_leaf(adapter: dict, path: tuple[str, ...], name: str, expected: tuple[int, ...] | None = None) -> Any:
    """`adapter[path][name]`, refused by name when missing or of another shape."""
    node = get_path(adapter, path)
    if not isinstance(node, dict) or name not in node:
        raise ValueError(f"adapter is missing {'.'.join(path)}.{name}; it was not made for this spec and model "
                         "(build it with jaxft.peft.init or load_adapter)")
    if expected is not None:
        check_shape(node[name], expected, ".".join((*path, name)))
    return node[name]


def copy_spine(tree: dict, path: tuple[str, ...]) -> None:
    """Make every dict on `path` a fresh copy, so that assignments below never touch the caller's tree."""
    node = tree
    for k in path[:-1]:
        node[k] = dict(node[k])
        node = node[k]


def kernel_axes(config: LlamaConfig, mp: ModulePlan) -> tuple[str, ...]:
    """The logical axes of a module's kernel: `('layers', in, out)` stacked, `(in, out)` otherwise."""
    return get_path(param_specs(config), (*mp.module.path, "kernel")).axes


class LinearMethod(Method):
    """A method that puts a composite weight (or an adapter copy) on chosen linear modules: the loop over
    `plan(spec, params)` lives here; a method implements one module's leaves."""

    kernel_leaf: ClassVar[str] = "kernel"  # the module entry the method replaces ("bias" for BitFit)

    # ---- per module ----
    @abc.abstractmethod
    def init_module(self, spec: Any, mp: ModulePlan, node: dict, key: jax.Array, dtype) -> Any:
        """The adapter entry of one module (a dict of arrays, or one array)."""

    @abc.abstractmethod
    def bind_module(self, spec: Any, mp: ModulePlan, node: dict, entry: Any, key: jax.Array | None,
                    train: bool) -> Any:
        """The new value of `node[kernel_leaf]` (a composite weight), from the adapter `entry` (shape-checked)."""

    def entry_shapes(self, spec: Any, mp: ModulePlan) -> dict[str, tuple[int, ...]]:
        """Shapes of the entry's leaves (checked in `bind`)."""
        return {}

    @abc.abstractmethod
    def entry_axes(self, spec: Any, mp: ModulePlan, axes: tuple[str, ...]) -> Any:
        """Logical axes of the entry's leaves, from the kernel's `axes` (`('layers', in, out)` or `(in, out)`)."""

    def mask_module(self, spec: Any, mp: ModulePlan, entry: Any) -> Any:
        return jax.tree.map(lambda v: all_true(v.shape), entry)

    def merge_module(self, spec: Any, mp: ModulePlan, node: dict, base: dict) -> None:
        """Fold the bound composite in `node` into plain arrays (in `base`'s dtypes), in place."""
        raise ValueError(f"merge: {self.description} {self.not_mergeable}")

    def unmerge_module(self, spec: Any, mp: ModulePlan, node: dict, bound: Any, **kw) -> None:
        raise ValueError(f"unmerge: {self.description} {self.not_mergeable}")

    def tensor_slots(self, spec: Any, mp: ModulePlan, i: int) -> list[TensorSlot]:
        """The peft tensors of instance `i` of a module (peft-format methods)."""
        raise NotImplementedError(f"{self.description} has no peft tensors")

    def empty_entry(self, spec: Any, mp: ModulePlan) -> dict[str, np.ndarray]:
        """Host buffers of one module's entry, holding what peft does not store (padding, untransformed layers)."""
        raise NotImplementedError(f"{self.description} has no peft tensors")

    # ---- the loops ----
    def plans(self, spec: Any, params: dict, where: str | None = None) -> list[ModulePlan]:
        return plan(spec, params, where or type(spec).__name__)

    def _entry_path(self, mp: ModulePlan) -> tuple[str, ...]:
        return (*mp.module.path, self.kernel_leaf)

    def init(self, spec, config, params, rng, *, tokenizer=None, dtype=jnp.float32):
        where = type(spec).__name__
        adapter: dict = {}
        plans = self.plans(spec, params, where)
        keys = jax.random.split(rng, max(len(plans), 1))
        for mp, key in zip(plans, keys):
            node = get_path(params, mp.module.path)
            set_path(adapter, self._entry_path(mp), self.init_module(spec, mp, node, key, dtype))
        saved.init(spec, params, adapter, dtype, where)
        return adapter

    def dropout_rate(self, spec: Any) -> float:
        return 0.0

    def bind(self, spec, params, adapter, *, train=False, rng=None):
        where = type(spec).__name__
        rate = self.dropout_rate(spec) if train else 0.0
        if rate > 0.0 and rng is None:
            raise ValueError(f"bind: {where} has dropout={rate} and train=True, so it needs rng=a PRNG key")
        out = dict(params)
        for idx, mp in enumerate(self.plans(spec, params, where)):
            path = self._entry_path(mp)
            copy_spine(out, path)
            node = get_path(out, mp.module.path)
            shapes = self.entry_shapes(spec, mp)
            if shapes:
                entry = {k: adapter_leaf(adapter, path, k, s) for k, s in shapes.items()}
            else:
                entry = adapter_leaf(adapter, mp.module.path, self.kernel_leaf,
                                     tuple(node[self.kernel_leaf].shape))
            key = None
            if rate > 0.0:
                key = jax.random.fold_in(rng, idx)
                key = jax.random.split(key, len(mp.active)) if mp.module.stacked else key
            node[self.kernel_leaf] = self.bind_module(spec, mp, node, entry, key, rate > 0.0)
        saved.bind(spec, params, adapter, out, where)
        return out

    def trainable_mask(self, spec, params, adapter):
        masks = jax.tree.map(lambda v: all_true(v.shape), adapter)
        for mp in self.plans(spec, params):
            path = self._entry_path(mp)
            set_path(masks, path, self.mask_module(spec, mp, get_path(masks, path)))
        return masks

    def logical_axes(self, spec, config, adapter):
        out = jax.tree.map(lambda v: None, adapter)
        params = param_specs(config)
        for mp in self.plans(spec, params):
            set_path(out, self._entry_path(mp), self.entry_axes(spec, mp, kernel_axes(config, mp)))
        saved.logical_axes(spec, config, out)
        return out

    def merge(self, spec, params, adapter, bound):
        for mp in self.plans(spec, params):
            self.merge_module(spec, mp, get_path(bound, mp.module.path), get_path(params, mp.module.path))
        saved.merge(spec, params, bound)
        return bound

    def unmerge(self, spec, merged, adapter, **kw):
        saved.refuse_unmerge(spec)
        out = dict(merged)
        bound = self.bind(spec, merged, adapter)  # composites around the merged kernels: a, b, scale, vectors
        for mp in self.plans(spec, merged):
            path = mp.module.path
            node = dict(get_path(merged, path))
            self.unmerge_module(spec, mp, node, get_path(bound, path)[self.kernel_leaf], **kw)
            copy_spine(out, (*path, "_"))
            get_path(out, path[:-1])[path[-1]] = node
        return out

    # ---- peft tensors ----
    def peft_tensors(self, spec, adapter, config, params):
        out: dict[str, np.ndarray] = {}
        for mp in self.plans(spec, params):
            node = {k: np.asarray(v) for k, v in get_path(adapter, self._entry_path(mp)).items()}
            for i, name in iter_instances(mp):
                at = (i,) if mp.module.stacked else ()
                for slot in self.tensor_slots(spec, mp, i):
                    out[f"{PREFIX}{name}.{slot.key}"] = slot.to_peft(node[slot.leaf][(*at, *slot.index)])
        out.update(saved.peft_tensors(adapter, config))
        return out

    def expected_tensors(self, spec: Any, params: dict, where: str) -> tuple[dict, dict]:
        """Host buffers of the adapter and the table of expected peft tensors:
        key -> (adapter path, index into the leaf, transform from peft's layout, peft shape)."""
        adapter: dict = {}
        expected: dict = {}
        for mp in self.plans(spec, params, where):
            path = self._entry_path(mp)
            for i, name in iter_instances(mp):
                at = (i,) if mp.module.stacked else ()
                for slot in self.tensor_slots(spec, mp, i):
                    expected[f"{PREFIX}{name}.{slot.key}"] = ((*path, slot.leaf), (*at, *slot.index), slot.to_jaxft,
                                                              slot.peft_shape)
            set_path(adapter, path, self.empty_entry(spec, mp))
        saved.expected_tensors(spec, params, adapter, expected)
        return adapter, expected

    def load_tensors(self, spec, tensors, config, params, *, files, dtype):
        cfg_path, w_path = files
        adapter, expected = self.expected_tensors(spec, params, cfg_path)
        for key, value in tensors.items():
            if key not in expected:
                raise FileFormatError(f"{w_path}: tensor '{key}' does not belong to this adapter config on a "
                                      f"{config.model_type} model (modules: {_short_modules(expected)})")
            path, index, transform, shape = expected.pop(key)
            if tuple(value.shape) != shape:
                raise FileFormatError(f"{w_path}: tensor '{key}' has shape {tuple(value.shape)}, the model expects "
                                      f"{shape}")
            leaf = np.asarray(get_path(adapter, path))
            leaf[index] = transform(value.astype(np.float32))
            set_path(adapter, path, leaf)
        if expected:
            missing = sorted(expected)
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FileFormatError(f"{w_path}: missing tensor '{missing[0]}'{more} that the adapter config implies")
        return jax.tree.map(lambda v: jnp.asarray(v, dtype), adapter)


def _short_modules(expected: dict) -> str:
    return ", ".join(sorted({k.rsplit(".", 2)[0].split(".")[-1] for k in expected})) or "none left"


def flat_tree(tree: Any, path: tuple[str, ...] = ()) -> dict[str, Any]:
    """`{'a.b.c': leaf}` for a nested dict of leaves."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat_tree(v, (*path, k)))
        return out
    return {".".join(path): tree}


class OwnFormat:
    """The file format of methods peft does not have (Houlsby, BitFit): tensor keys are the adapter tree's dotted
    paths, and loading checks each against the tree `init` builds for the spec and model (shapes only)."""

    peft_format: ClassVar[bool] = False

    def peft_tensors(self, spec, adapter, config, params):
        return {k: np.asarray(v) for k, v in flat_tree(adapter).items()}

    def load_tensors(self, spec, tensors, config, params, *, files, dtype):
        where = files[1]
        expected = flat_tree(jax.eval_shape(lambda p: self.init(spec, config, p, jax.random.key(0)), params))
        for key, value in tensors.items():
            if key not in expected:
                raise FileFormatError(f"{where}: tensor '{key}' does not belong to a {type(spec).__name__} adapter "
                                      f"on this {config.model_type} model; was it saved for another model?")
            if tuple(value.shape) != tuple(expected[key].shape):
                raise FileFormatError(f"{where}: tensor '{key}' has shape {tuple(value.shape)}, the model expects "
                                      f"{tuple(expected[key].shape)}; the adapter was made for another model")
        missing = sorted(set(expected) - set(tensors))
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FileFormatError(f"{where}: missing tensor '{missing[0]}'{more} that the adapter config implies")
        adapter: dict = {}
        for key, value in tensors.items():
            set_path(adapter, tuple(key.split(".")), jnp.asarray(value, dtype))
        return adapter

    def reads(self, cfg):
        return cfg.get("peft_type") == self.peft_type

    def spec_from_config(self, cfg, where, tied):
        fields = {f.name for f in dataclasses.fields(self.spec)}
        return self.spec(**{k: listed(v) if k == "target_modules" else v for k, v in cfg.items() if k in fields})

    def config_fields(self, spec, config, params):
        return {"peft_type": self.peft_type, **{k: listify(v) for k, v in dataclasses.asdict(spec).items()}}


def listed(value: Any) -> Any:
    """A JSON list as the tuple a spec holds (strings and None as they are)."""
    return value if value is None or isinstance(value, str) else tuple(value)

