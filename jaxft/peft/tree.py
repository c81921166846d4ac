"""`init` an adapter tree for a spec, `bind` it to the base tree (composite leaves), and mask what must not train.

The adapter tree mirrors the base tree only where a target matched; each method's module
(`jaxft/peft/methods/`) documents its entries. For example, LoRA on a stacked module at `path`
(e.g. `model.layers.self_attn.q_proj`) holds `adapter[path]['kernel'] = {'lora_a': [L, in, R], 'lora_b': [L, R,
out]}`; `modules_to_save` copies sit at the base tree's path (`jaxft.peft.saved`); prompt and prefix tuning hold
their embeddings at the top (`{'prompt_embeddings': [P, D]}`, `{'prefix_keys', 'prefix_values': [L, P, K, hd]}`).

Entries the stacked layout needs but the method does not use (rank padding, untransformed layers) neither change the
output nor receive gradient; `trainable_mask` marks them for the optimizer (weight decay would move them).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.models.config import LlamaConfig
from jaxft.peft.registry import method_for


def init(spec: Any, config: LlamaConfig, params: dict, rng: jax.Array, *, tokenizer=None,
         dtype=jnp.float32) -> dict:
    """A fresh adapter tree for `spec` on `params`, in `dtype`.

    `tokenizer` (an HF tokenizer) is needed only for `PromptTuningSpec(init='text')`. Raises `ConfigError` when a
    target matches no module (listing the modules that exist) or the method does not fit the model.
    """
    return method_for(spec).init(spec, config, params, rng, tokenizer=tokenizer, dtype=dtype)


def bind(params: dict, spec: Any, adapter: dict, *, train: bool = False, rng: jax.Array | None = None) -> dict:
    """The base tree with composite leaves (`Lora`, `Dora`, `IA3`, `Houlsby`) where the adapter applies and the
    adapter's copies in place of BitFit biases and `modules_to_save` weights. A pure tree transform: no
    arithmetic, the base arrays are shared, not copied.

    `train=True` with `rng` turns on LoRA/DoRA dropout (one key per module and layer). Prompt and prefix tuning do
    not change the tree (their inputs come from `jaxft.peft.prompt_inputs`): `params` is returned as is.
    """
    return method_for(spec).bind(spec, params, adapter, train=train, rng=rng)


def trainable_mask(spec: Any, params: dict, adapter: dict) -> dict:
    """A tree like `adapter` of bool arrays: True where an entry trains, False for the zero padding of smaller
    ranks and for layers the spec does not transform. Use it to keep weight decay off those entries
    (`mask_updates`)."""
    return method_for(spec).trainable_mask(spec, params, adapter)


def logical_axes(spec: Any, config: LlamaConfig, adapter: dict) -> dict:
    """A tree like `adapter` of logical axis-name tuples: the base kernel's axes where an entry shares them
    (`embed`, `q_heads`, `mlp`, ...; `layers` first when stacked), and `lora_rank`, `bottleneck`,
    `virtual_tokens` for the method's own dimensions. Sharding rules map them to mesh axes."""
    return method_for(spec).logical_axes(spec, config, adapter)


def compact_mask(mask: Any) -> bool | np.ndarray:
    """One leaf of a trainable mask in its smallest form: `True` (trains whole), `False` (frozen whole), or a bool
    array with size 1 on every axis along which the mask does not change (LoRA's rank padding of `[L, in, R]` is
    `[L, 1, R]`), which broadcasts against the leaf. A step then holds no full-size mask constant (a Llama-8B LoRA
    mask would be ~42M entries)."""
    if isinstance(mask, (bool, np.bool_)):
        return bool(mask)
    m = np.asarray(mask, bool)
    m = m[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in m.strides)]  # broadcast views: free
    if m.all():
        return True
    if not m.any():
        return False
    for axis in range(m.ndim):
        if m.shape[axis] > 1:
            first = np.take(m, [0], axis=axis)
            if np.array_equal(m, np.broadcast_to(first, m.shape)):
                m = first
    return np.ascontiguousarray(m)


def mask_updates(mask: dict) -> optax.GradientTransformation:
    """An optax transformation that zeroes updates where `mask` is False (chain it last, after the optimizer, so
    weight decay cannot move frozen entries either). Leaves may be bool arrays, broadcastable bool arrays or
    plain bools; each is reduced by `compact_mask`, and a leaf that trains whole costs nothing."""
    compact = jax.tree.map(compact_mask, mask)

    def apply(u, m):
        if m is True:
            return u
        if m is False:
            return jnp.zeros_like(u)
        return jnp.where(m, u, jnp.zeros_like(u))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(apply, updates, compact), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
