"""The Llama family (Llama 2/3.x, Mistral, Qwen2, SmolLM) in Flax, with a functional face.

The decoder layer is a Flax linen module whose parameters are named like the HF modules; the stack of layers is a
`jax.lax.scan` (or an unrolled loop) over parameters stacked on a leading axis. Every product with a weight goes
through `jaxft.ops.linear.linear`, so a leaf of the parameter tree may be a composite weight (LoRA, DoRA, IA3, NF4)
and this file never knows.

Public functions take `(config, params, ...)` where `params` is the nested dict described in `jaxft.models.params`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft.models.config import LlamaConfig
from jaxft.models.params import ParamSpec, layer_specs
from jaxft.ops.activations import swiglu
from jaxft.ops.attention import attention, attention_mask, blocked_causal_attention, causal_block_size
from jaxft.ops.linear import Weight, linear
from jaxft.ops.norms import rms_norm
from jaxft.ops.rope import apply_rope, rope_tables

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the model runs (not what it is): compute dtype, rematerialisation, layer loop."""

    dtype: Any = jnp.float32
    remat: RematPolicy = "none"
    scan_layers: bool = True


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys/values of every layer for generation: `k, v[L, B, S, K, hd]`, `segment_ids[B, S]` (0 = empty slot or
    padding), `index`: the next slot to write (a scalar int32 array)."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of `max_len` slots."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), jnp.int32),
                   jnp.zeros((), jnp.int32))


class Linear(nn.Module):
    """A projection whose `kernel[in, out]` may be any weight leaf (see `jaxft.ops.linear`)."""

    spec: dict
    std: float

    def weights(self):
        kspec: ParamSpec = self.spec["kernel"]
        kernel = self.param("kernel", lambda key: kspec.initialize(key, jnp.float32, self.std))
        bias = None
        if "bias" in self.spec:
            bias = self.param("bias", lambda key: self.spec["bias"].initialize(key, jnp.float32, self.std))
        return kernel, bias

    @nn.compact
    def __call__(self, x):
        return linear(x, *self.weights())


class SwigluLinear(Linear):
    """`Linear` applied to `swiglu(gate, up)`, the MLP's down projection. Under `nn.remat` the activation is
    recomputed in the backward pass from `gate` and `up`, which are kept anyway."""

    @nn.compact
    def __call__(self, gate, up):
        return linear(swiglu(gate, up), *self.weights())


# The backward pass recomputes swiglu(gate, up) rather than keep a third [tokens, intermediate] array; products
# stay saved (DoRA with dropout needs x @ W).
_RematSwigluLinear = nn.remat(SwigluLinear, prevent_cse=False, policy=jax.checkpoint_policies.checkpoint_dots)


class RMSNorm(nn.Module):
    dim: int
    eps: float

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", lambda key: jnp.ones((self.dim,), jnp.float32))
        return rms_norm(x, weight, self.eps)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_btd, cos, sin, ctx):
        c = self.config
        specs = layer_specs(c)["self_attn"]
        b, t, _ = x_btd.shape
        q = Linear(specs["q_proj"], c.initializer_range, name="q_proj")(x_btd)
        k = Linear(specs["k_proj"], c.initializer_range, name="k_proj")(x_btd)
        v = Linear(specs["v_proj"], c.initializer_range, name="v_proj")(x_btd)
        q = apply_rope(q.reshape(b, t, c.num_attention_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, c.num_key_value_heads, c.head_dim), cos, sin)
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        new_kv = None
        if ctx.get("cache_k") is not None:
            # Write this step's keys/values into the cache at `index`, then attend over the whole cache.
            at = (0, ctx["index"], 0, 0)
            k_all = jax.lax.dynamic_update_slice(ctx["cache_k"], k.astype(ctx["cache_k"].dtype), at)
            v_all = jax.lax.dynamic_update_slice(ctx["cache_v"], v.astype(ctx["cache_v"].dtype), at)
            new_kv = (k_all, v_all)
            k, v = k_all.astype(x_btd.dtype), v_all.astype(x_btd.dtype)
        if ctx.get("block") and ctx.get("cache_k") is None and ctx.get("prefix_k") is None:
            out = blocked_causal_attention(q, k, v, ctx["mask"], ctx["block"], merge_heads=True)
        else:
            out = attention(q, k, v, ctx["mask"], ctx.get("prefix_k"), ctx.get("prefix_v"),
                            ctx["q_segment_ids"]).reshape(b, t, -1)
        out = Linear(specs["o_proj"], c.initializer_range, name="o_proj")(out)
        return out, new_kv


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        specs = layer_specs(c)["mlp"]
        gate = Linear(specs["gate_proj"], c.initializer_range, name="gate_proj")(x)
        up = Linear(specs["up_proj"], c.initializer_range, name="up_proj")(x)
        return _RematSwigluLinear(specs["down_proj"], c.initializer_range, name="down_proj")(gate, up)


class DecoderLayer(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, ctx):
        c = self.config
        h, new_kv = Attention(c, name="self_attn")(RMSNorm(c.hidden_size, c.rms_norm_eps, name="input_layernorm")(x),
                                                   cos, sin, ctx)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c.hidden_size, c.rms_norm_eps, name="post_attention_layernorm")(x))
        return x, new_kv


_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def embed(config: LlamaConfig, params: dict, input_ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Token embeddings `[B, T, D]` in `dtype`."""
    table = params["model"]["embed_tokens"]["weight"]
    return jnp.take(table, input_ids, axis=0).astype(dtype)


def head_weight(config: LlamaConfig, params: dict) -> Any:
    """The output projection `[D, V]`: `lm_head.kernel`, or the transposed embedding when tied."""
    if config.tie_word_embeddings:
        return params["model"]["embed_tokens"]["weight"].T
    return params["lm_head"]["kernel"]


def loss_head(config: LlamaConfig, params: dict) -> tuple[Any, bool]:
    """`(weight, transposed)` for `jaxft.ops.loss`: a tied plain embedding table as stored, `[V, D]` with
    `transposed=True` (the loss contracts it in place instead of copying its transpose), else `head_weight`."""
    table = params["model"]["embed_tokens"]["weight"]
    if config.tie_word_embeddings and not isinstance(table, Weight):
        return table, True
    return head_weight(config, params), False


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions restarting at 0 in every segment (right or left padding both give real tokens 0..n-1)."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - start_idx).astype(jnp.int32)


def decoder(config: LlamaConfig, params: dict, x_btd: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
            options: ModelOptions = ModelOptions(), cache: KVCache | None = None, prefix_kv: tuple | None = None):
    """Run the stack of decoder layers and the final norm on embeddings `x[B, T, D]`.

    Returns `(hidden[B, T, D], new_cache)`. `prefix_kv = (k, v)` with `k, v[L, B, P, K, hd]` prepends learned
    keys/values in every layer (prefix tuning).
    """
    b, t, _ = x_btd.shape
    cos, sin = rope_tables(config, positions)
    ctx: dict[str, Any] = {"q_segment_ids": segment_ids}
    if cache is None:
        row = jnp.broadcast_to(jnp.arange(t), (b, t))
        ctx["mask"] = attention_mask(segment_ids, segment_ids, row, jnp.arange(t))
        ctx["block"] = causal_block_size(t)
    else:
        s = cache.segment_ids.shape[1]
        kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))
        q_index = jnp.broadcast_to(cache.index + jnp.arange(t), (b, t))
        ctx["mask"] = attention_mask(segment_ids, kv_segments, q_index, jnp.arange(s))
        ctx["index"] = cache.index

    layer = DecoderLayer(config)

    def body(h, xs):
        layer_params, extra = xs
        layer_ctx = dict(ctx, **extra)
        h, new_kv = layer.apply({"params": layer_params}, h, cos, sin, layer_ctx)
        return h.astype(x_btd.dtype), new_kv

    if options.remat != "none":
        body = jax.checkpoint(body, policy=_POLICIES[options.remat], prevent_cse=not options.scan_layers)

    extra: dict[str, Any] = {}
    if cache is not None:
        extra["cache_k"], extra["cache_v"] = cache.k, cache.v
    if prefix_kv is not None:
        extra["prefix_k"], extra["prefix_v"] = prefix_kv
    xs = (params["model"]["layers"], extra)
    if options.scan_layers:
        h, new_kv = jax.lax.scan(body, x_btd, xs)
    else:
        h, outs = x_btd, []
        for i in range(config.num_hidden_layers):
            h, kv = body(h, jax.tree.map(lambda a: a[i], xs))
            outs.append(kv)
        new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    h = rms_norm(h, params["model"]["norm"]["weight"], config.rms_norm_eps)
    new_cache = None
    if cache is not None:
        new_cache = KVCache(new_kv[0], new_kv[1], kv_segments, cache.index + t)
    return h, new_cache


def _inputs(input_ids, positions, segment_ids):
    if segment_ids is None:
        segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    return positions, segment_ids


def hidden_states(config: LlamaConfig, params: dict, input_ids: jax.Array, *, positions=None, segment_ids=None,
                  options: ModelOptions = ModelOptions(), embeds: jax.Array | None = None,
                  prefix_kv: tuple | None = None) -> jax.Array:
    """Final hidden states `[B, T, D]` (after the last norm), in `options.dtype`. `embeds[B, T, D]` replaces the
    token embedding lookup (prompt tuning)."""
    positions, segment_ids = _inputs(input_ids, positions, segment_ids)
    x = embed(config, params, input_ids, options.dtype) if embeds is None else embeds.astype(options.dtype)
    h, _ = decoder(config, params, x, positions=positions, segment_ids=segment_ids, options=options,
                   prefix_kv=prefix_kv)
    return h


def forward(config: LlamaConfig, params: dict, input_ids: jax.Array, *, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, options: ModelOptions = ModelOptions(),
            embeds: jax.Array | None = None, prefix_kv: tuple | None = None) -> jax.Array:
    """Logits `[B, T, V]` (float32) for `input_ids[B, T]`.

    positions[B, T]: RoPE positions (default: 0.. within each segment). segment_ids[B, T]: packing ids, a token
    attends only inside its own segment; 0 marks padding (default: all ones). Pad on the right for training, on the
    left for generation.
    """
    h = hidden_states(config, params, input_ids, positions=positions, segment_ids=segment_ids, options=options,
                      embeds=embeds, prefix_kv=prefix_kv)
    return linear(h, head_weight(config, params)).astype(jnp.float32)


def forward_cached(config: LlamaConfig, params: dict, input_ids: jax.Array, cache: KVCache, *, positions: jax.Array,
                   segment_ids: jax.Array, options: ModelOptions = ModelOptions(), embeds: jax.Array | None = None,
                   prefix_kv: tuple | None = None) -> tuple[jax.Array, KVCache]:
    """Logits `[B, T, V]` for `input_ids[B, T]` written at slots `cache.index..+T`, and the updated cache.
    `embeds` and `prefix_kv` as in `forward` (prompt and prefix tuning)."""
    x = embed(config, params, input_ids, options.dtype) if embeds is None else embeds.astype(options.dtype)
    h, cache = decoder(config, params, x, positions=positions, segment_ids=segment_ids, options=options, cache=cache,
                       prefix_kv=prefix_kv)
    return linear(h, head_weight(config, params)).astype(jnp.float32), cache
