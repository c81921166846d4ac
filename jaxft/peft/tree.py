"""`init` an adapter tree for a spec, `bind` it to the base tree (composite leaves), and mask what must not train.

The adapter tree mirrors the base tree only where a target matched. For a stacked module at `path`
(e.g. `model.layers.self_attn.q_proj`) it holds, under `adapter[path]['kernel']`:

    LoRA     {'lora_a': [L, in, R], 'lora_b': [L, R, out]}            R = the largest rank over the layers
    DoRA     the same + {'magnitude': [L, out]}
    IA3      {'ia3_l': [L, out]} or [L, in] for feedforward targets
    Houlsby  {'down': [L, out, m], 'down_bias': [L, m], 'up': [L, m, out], 'up_bias': [L, out]}

BitFit holds `adapter[path]['bias']` (a copy of the base bias); `modules_to_save` holds a full copy of the module's
weight (`adapter['model']['embed_tokens']['weight']`, `adapter['lm_head']['kernel']`). Prompt tuning holds
`{'prompt_embeddings': [P, D]}` and prefix tuning `{'prefix_keys', 'prefix_values': [L, P, K, hd]}` (see
`jaxft.peft.prompt`).

Per-layer ranks are zero-padded to R and untransformed layers hold zeros (LoRA) or the base norm / ones (DoRA
magnitude / IA3): the composite leaves get `scale[L]` (0 off-layer) and `active[L]`, so those entries neither change
the output nor receive gradient. `trainable_mask` marks them for the optimizer (weight decay would move them).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.models.config import LlamaConfig
from jaxft.ops.linear import materialize
from jaxft.peft.specs import (BitFitSpec, DoraSpec, HoulsbySpec, IA3Spec, LoraSpec, PrefixTuningSpec,
                              PromptTuningSpec)
from jaxft.peft.targets import ModulePlan, get_path, plan, set_path
from jaxft.peft.types import IA3, Dora, Houlsby, Lora
from jaxft.schema import ConfigError

_PROMPT = (PromptTuningSpec, PrefixTuningSpec)


def _rank_mask(mp: ModulePlan) -> np.ndarray:
    """`[n, R]` bool: rank slot k of instance i is used (k < rank[i])."""
    return np.arange(mp.max_rank)[None, :] < mp.rank[:, None]


def _stack_shape(mp: ModulePlan, *shape: int) -> tuple[int, ...]:
    return (len(mp.active), *shape) if mp.module.stacked else shape


def _squeeze(mp: ModulePlan, v: np.ndarray) -> np.ndarray:
    """Per-instance values `[n]` as stored on the leaf: `[L]` when stacked, a scalar otherwise."""
    return v if mp.module.stacked else v[0]


def _require_full(mp: ModulePlan, where: str) -> None:
    if not mp.active.all():
        raise ConfigError(f"{where}: target_modules match only some layers of {mp.module.short}; this method needs "
                          "every layer of a stacked module (target the module by name)")


def _saved_paths(spec: Any, params: dict, where: str) -> list[tuple[str, ...]]:
    """Tree paths of the `modules_to_save` leaves."""
    out = []
    for m in getattr(spec, "modules_to_save", ()):
        short = m.split(".")[-1]
        if short == "embed_tokens":
            out.append(("model", "embed_tokens", "weight"))
        elif get_path(params, ("lm_head", "kernel")) is None:
            raise ConfigError(f"{where}.modules_to_save: 'lm_head' on a model with tied embeddings; list "
                              "'embed_tokens' instead (the shared matrix, head included)")
        else:
            out.append(("lm_head", "kernel"))
    return out


def _lora_init(spec, mp: ModulePlan, w: Any, key: jax.Array, dtype) -> dict:
    n_in, n_out, r = mp.module.d_in, mp.module.d_out, mp.max_rank
    mask = _rank_mask(mp)  # [n, R]
    if spec.init == "kaiming":
        # torch's kaiming_uniform_(a=sqrt(5)) on lora_A[r, in]: gain = sqrt(2 / (1 + a^2)) = sqrt(1/3),
        # bound = gain * sqrt(3 / fan_in) = 1 / sqrt(in) (nn.Linear's default init).
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(key, (len(mp.active), n_in, r), jnp.float32, -bound, bound)
    else:
        std = np.where(mp.rank > 0, 1.0 / np.maximum(mp.rank, 1), 0.0)  # peft: normal(std = 1 / r)
        a = jax.random.normal(key, (len(mp.active), n_in, r), jnp.float32) * std[:, None, None]
    a = jnp.where(mask[:, None, :], a, 0.0)
    out = {"lora_a": a.astype(dtype), "lora_b": jnp.zeros((len(mp.active), r, n_out), dtype)}
    if isinstance(spec, DoraSpec):
        out["magnitude"] = jnp.linalg.norm(materialize(w).astype(jnp.float32), axis=-2).reshape(
            len(mp.active), n_out).astype(dtype)
    if not mp.module.stacked:
        out = {k: v[0] for k, v in out.items()}
    return out


def init(spec: Any, config: LlamaConfig, params: dict, rng: jax.Array, *, tokenizer=None,
         dtype=jnp.float32) -> dict:
    """A fresh adapter tree for `spec` on `params` (see the module docstring for its layout), in `dtype`.

    `tokenizer` (an HF tokenizer) is needed only for `PromptTuningSpec(init='text')`. Raises `ConfigError` when a
    target matches no module (listing the modules that exist) or the method does not fit the model.
    """
    where = type(spec).__name__
    if isinstance(spec, _PROMPT):
        from jaxft.peft.prompt import init_prompt

        return init_prompt(spec, config, params, rng, tokenizer=tokenizer, dtype=dtype)
    adapter: dict = {}
    plans = plan(spec, params, where)
    keys = jax.random.split(rng, max(len(plans), 1))
    for mp, key in zip(plans, keys):
        node = get_path(params, mp.module.path)
        path = (*mp.module.path, "kernel")
        n = len(mp.active)
        if isinstance(spec, (LoraSpec, DoraSpec)):
            set_path(adapter, path, _lora_init(spec, mp, node["kernel"], key, dtype))
        elif isinstance(spec, IA3Spec):
            dim = mp.module.d_in if mp.feedforward else mp.module.d_out
            set_path(adapter, path, {"ia3_l": jnp.ones(_stack_shape(mp, dim), dtype)})
        elif isinstance(spec, HoulsbySpec):
            _require_full(mp, where)
            d, m = mp.module.d_out, spec.bottleneck
            down = spec.init_std * jax.random.normal(key, (n, d, m), jnp.float32)
            set_path(adapter, path, {
                "down": (down if mp.module.stacked else down[0]).astype(dtype),
                "down_bias": jnp.zeros(_stack_shape(mp, m), dtype),
                "up": jnp.zeros(_stack_shape(mp, m, d), dtype),
                "up_bias": jnp.zeros(_stack_shape(mp, d), dtype),
            })
        elif isinstance(spec, BitFitSpec):
            _require_full(mp, where)
            set_path(adapter, (*mp.module.path, "bias"), jnp.asarray(node["bias"], dtype))
        else:
            raise ConfigError(f"{where}: not a PEFT spec jaxft knows")
    for path in _saved_paths(spec, params, where):
        set_path(adapter, path, jnp.asarray(materialize(get_path(params, path)), dtype))
    return adapter


def _check_shape(value: Any, expected: tuple[int, ...], where: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"adapter tensor {where} has shape {tuple(value.shape)}, the base model expects "
                         f"{tuple(expected)}")


def _leaf(adapter: dict, path: tuple[str, ...], name: str, expected: tuple[int, ...] | None = None) -> Any:
    node = get_path(adapter, path)
    if not isinstance(node, dict) or name not in node:
        raise ValueError(f"adapter is missing {'.'.join(path)}.{name}; it was not made for this spec and model "
                         "(build it with jaxft.peft.init or load_adapter)")
    if expected is not None:
        _check_shape(node[name], expected, ".".join((*path, name)))
    return node[name]


def _copy_spine(tree: dict, path: tuple[str, ...]) -> None:
    """Make every dict on `path` a fresh copy, so that assignments below never touch the caller's tree."""
    node = tree
    for k in path[:-1]:
        node[k] = dict(node[k])
        node = node[k]


def bind(params: dict, spec: Any, adapter: dict, *, train: bool = False, rng: jax.Array | None = None) -> dict:
    """The base tree with composite leaves (`Lora`, `Dora`, `IA3`, `Houlsby`) where the adapter applies and the
    adapter's copies in place of BitFit biases and `modules_to_save` weights. A pure tree transform: no
    arithmetic, the base arrays are shared, not copied.

    `train=True` with `rng` turns on LoRA/DoRA dropout (one key per module and layer). Prompt and prefix tuning do
    not change the tree (their inputs come from `jaxft.peft.prompt_inputs`): `params` is returned as is.
    """
    if isinstance(spec, _PROMPT):
        return params
    where = type(spec).__name__
    use_dropout = train and isinstance(spec, (LoraSpec, DoraSpec)) and spec.dropout > 0.0
    if use_dropout and rng is None:
        raise ValueError(f"bind: {where} has dropout={spec.dropout} and train=True, so it needs rng=a PRNG key")
    out = dict(params)
    for idx, mp in enumerate(plan(spec, params, where)):
        path = (*mp.module.path, "kernel")
        _copy_spine(out, path)
        node = get_path(out, mp.module.path)
        base = node["kernel"]
        scale = jnp.asarray(_squeeze(mp, mp.scale), jnp.float32)
        active = jnp.asarray(_squeeze(mp, mp.active))
        n_in, n_out = mp.module.d_in, mp.module.d_out
        if isinstance(spec, (LoraSpec, DoraSpec)):
            r = mp.max_rank
            a = _leaf(adapter, path, "lora_a", _stack_shape(mp, n_in, r))
            b = _leaf(adapter, path, "lora_b", _stack_shape(mp, r, n_out))
            key = None
            if use_dropout:
                key = jax.random.fold_in(rng, idx)
                key = jax.random.split(key, len(mp.active)) if mp.module.stacked else key
            if isinstance(spec, LoraSpec):
                node["kernel"] = Lora(base, a, b, scale, key, spec.dropout if use_dropout else 0.0)
            else:
                mag = _leaf(adapter, path, "magnitude", _stack_shape(mp, n_out))
                node["kernel"] = Dora(base, a, b, mag, scale, active, key, spec.dropout if use_dropout else 0.0)
        elif isinstance(spec, IA3Spec):
            dim = n_in if mp.feedforward else n_out
            vec = _leaf(adapter, path, "ia3_l", _stack_shape(mp, dim))
            node["kernel"] = IA3(base, vec, active, mp.feedforward)
        elif isinstance(spec, HoulsbySpec):
            m = spec.bottleneck
            node["kernel"] = Houlsby(base, _leaf(adapter, path, "down", _stack_shape(mp, n_out, m)),
                                     _leaf(adapter, path, "down_bias", _stack_shape(mp, m)),
                                     _leaf(adapter, path, "up", _stack_shape(mp, m, n_out)),
                                     _leaf(adapter, path, "up_bias", _stack_shape(mp, n_out)), spec.activation)
        elif isinstance(spec, BitFitSpec):
            node["bias"] = _leaf(adapter, mp.module.path, "bias", tuple(node["bias"].shape))
    for path in _saved_paths(spec, params, where):
        _copy_spine(out, path)
        leaf = get_path(adapter, path)
        if leaf is None:
            raise ValueError(f"adapter is missing {'.'.join(path)} (listed in modules_to_save)")
        _check_shape(leaf, tuple(get_path(params, path).shape), ".".join(path))
        get_path(out, path[:-1])[path[-1]] = leaf
    return out


def trainable_mask(spec: Any, params: dict, adapter: dict) -> dict:
    """A tree like `adapter` of bool arrays: True where an entry trains, False for the zero padding of smaller
    ranks and for layers the spec does not transform. Use it to keep weight decay off those entries
    (`mask_updates`)."""
    masks = jax.tree.map(lambda v: np.ones(v.shape, bool), adapter)
    if not isinstance(spec, (LoraSpec, DoraSpec, IA3Spec)):
        return masks
    for mp in plan(spec, params):
        node = get_path(masks, (*mp.module.path, "kernel"))
        act = mp.active if mp.module.stacked else mp.active[0]
        if isinstance(spec, IA3Spec):
            node["ia3_l"] = np.broadcast_to(np.reshape(act, np.shape(act) + (1,)), node["ia3_l"].shape).copy()
            continue
        rank = _rank_mask(mp) if mp.module.stacked else _rank_mask(mp)[0]
        node["lora_a"] = np.broadcast_to(rank[..., None, :], node["lora_a"].shape).copy()
        node["lora_b"] = np.broadcast_to(rank[..., :, None], node["lora_b"].shape).copy()
        if "magnitude" in node:
            node["magnitude"] = np.broadcast_to(np.reshape(act, np.shape(act) + (1,)),
                                                node["magnitude"].shape).copy()
    return masks


def mask_updates(mask: dict) -> optax.GradientTransformation:
    """An optax transformation that zeroes updates where `mask` is False (chain it last, after the optimizer, so
    weight decay cannot move frozen entries either)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, mask), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
