"""The one abstract description of a model's parameters: shape, logical axes and initializer per leaf.

Initialisation, sharding (logical axes -> mesh axes) and the HF checkpoint layout are all derived from
`param_specs(config)`; nothing else lists the parameters.

Tree layout (nested dicts keyed like the HF module paths; layers stacked on a leading axis of size L):

    model.embed_tokens.weight                       [V, D]          (vocab, embed)
    model.layers.self_attn.{q,k,v,o}_proj.kernel    [L, in, out]    (layers, embed, heads) ...
    model.layers.self_attn.{q,k,v}_proj.bias        [L, out]        Qwen2 / attention_bias
    model.layers.mlp.{gate,up,down}_proj.kernel     [L, in, out]
    model.layers.{input,post_attention}_layernorm.weight [L, D]
    model.norm.weight                               [D]
    lm_head.kernel                                  [D, V]          absent when embeddings are tied

Linear weights are `kernel[in, out]` (the transpose of HF's `weight[out, in]`) so that `x @ kernel` is the product.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import jax.numpy as jnp

from jaxft.models.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, logical axis names and initializer of one parameter."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str  # "normal" (std = initializer_range), "ones" or "zeros"

    def initialize(self, key: jax.Array, dtype, std: float) -> jax.Array:
        if self.init == "normal":
            return (std * jax.random.normal(key, self.shape, jnp.float32)).astype(dtype)
        if self.init == "ones":
            return jnp.ones(self.shape, dtype)
        return jnp.zeros(self.shape, dtype)


def _linear(d_in: int, d_out: int, in_axis: str, out_axis: str, bias: bool) -> dict[str, ParamSpec]:
    out = {"kernel": ParamSpec((d_in, d_out), (in_axis, out_axis), "normal")}
    if bias:
        out["bias"] = ParamSpec((d_out,), (out_axis,), "zeros")
    return out


def layer_specs(c: LlamaConfig) -> dict[str, Any]:
    """Specs of ONE decoder layer (no leading layer axis)."""
    d, hd = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    return {
        "self_attn": {
            "q_proj": _linear(d, q, "embed", "q_heads", c.qkv_bias),
            "k_proj": _linear(d, kv, "embed", "kv_heads", c.qkv_bias),
            "v_proj": _linear(d, kv, "embed", "kv_heads", c.qkv_bias),
            "o_proj": _linear(q, d, "q_heads", "embed", c.o_bias),
        },
        "mlp": {
            "gate_proj": _linear(d, c.intermediate_size, "embed", "mlp", c.mlp_bias),
            "up_proj": _linear(d, c.intermediate_size, "embed", "mlp", c.mlp_bias),
            "down_proj": _linear(c.intermediate_size, d, "mlp", "embed", c.mlp_bias),
        },
        "input_layernorm": {"weight": ParamSpec((d,), ("norm",), "ones")},
        "post_attention_layernorm": {"weight": ParamSpec((d,), ("norm",), "ones")},
    }


def _stack(spec: ParamSpec, n: int) -> ParamSpec:
    return ParamSpec((n, *spec.shape), ("layers", *spec.axes), spec.init)


def param_specs(c: LlamaConfig) -> dict[str, Any]:
    """Specs of the whole model, layers stacked on a leading `layers` axis."""
    layers = jax.tree.map(lambda s: _stack(s, c.num_hidden_layers), layer_specs(c), is_leaf=is_spec)
    tree: dict[str, Any] = {
        "model": {
            "embed_tokens": {"weight": ParamSpec((c.vocab_size, c.hidden_size), ("vocab", "embed"), "normal")},
            "layers": layers,
            "norm": {"weight": ParamSpec((c.hidden_size,), ("norm",), "ones")},
        }
    }
    if not c.tie_word_embeddings:
        tree["lm_head"] = {"kernel": ParamSpec((c.hidden_size, c.vocab_size), ("embed", "vocab"), "normal")}
    return tree


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def logical_axes(c: LlamaConfig) -> dict[str, Any]:
    """The tree of logical axis-name tuples, one per parameter (same structure as the params)."""
    return jax.tree.map(lambda s: s.axes, param_specs(c), is_leaf=is_spec)


def abstract_params(c: LlamaConfig, dtype=jnp.float32) -> dict[str, Any]:
    """`jax.ShapeDtypeStruct` per parameter: plan memory or lower a step with no weights in memory."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(c), is_leaf=is_spec)


def init_params(c: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, Any]:
    """Random parameters as transformers initialises them: normal(0, initializer_range) weights, unit norms, zero
    biases."""
    specs = param_specs(c)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    values = [s.initialize(k, dtype, c.initializer_range) for s, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, values)


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, is_leaf=None) -> Any:
    """`tree_map` with the dotted path ("model.layers.mlp.up_proj.kernel") as first argument."""

    def visit(path, x):
        return fn(path_str(path), x)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_leaf)


def path_str(path) -> str:
    """Dotted string of a jax key path."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return ".".join(parts)


def unstack_layers(params: dict) -> dict:
    """`params` with `model.layers` as a tuple of per-layer trees instead of one tree stacked on a leading layer
    axis. Every array in the layers must carry that axis (plain kernels, bound adapters, NF4 fields all do).
    `decoder` runs such a tree unrolled, each layer's weights their own buffers: what XLA:CPU needs to read a
    decode step's weights at full speed (it copies the slice a `scan` takes of a stacked weight). On CPU a layer's
    arrays alias the stacked buffers (no copy; a buffer that cannot be aliased is copied); on other platforms they
    are copies. Already unstacked: returned as is."""
    layers = params["model"]["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]

    def layer(a: jax.Array, i: int) -> jax.Array:
        devices = a.devices() if isinstance(a, jax.Array) else set()
        if len(devices) == 1 and next(iter(devices)).platform == "cpu":
            return jax.device_put(np.asarray(a)[i], next(iter(devices)), may_alias=True)
        return a[i]

    out = dict(params)
    out["model"] = dict(params["model"], layers=tuple(jax.tree.map(lambda a: layer(a, i), layers)
                                                       for i in range(n)))
    return out
