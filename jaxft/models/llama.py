"""The Llama family (Llama 2/3.x, Mistral, Qwen2, SmolLM) as plain functions over a nested-dict parameter tree.

`params` is the tree `jaxft.models.params.param_specs` describes: keyed like the HF module paths, the decoder
layers stacked on a leading axis, made by `init_params` or the HF loader. The stack of layers is a `jax.lax.scan`
(or an unrolled loop) over that axis. Every product with a weight goes through `jaxft.ops.linear.linear`, so a leaf
may be a composite weight (LoRA, DoRA, IA3, NF4) and this file never knows.

Why plain functions and not Flax modules: the tree is already defined once, by the specs (init, sharding and the
checkpoint layout come from them), and PEFT is a transform of that tree (`peft.bind`) whose leaves flow through
`linear`. A module system would be a second description of the same parameters that has to agree with the first;
a function `forward(config, params, ids)` is what a JAX user can jit, grad, vmap or shard directly.

Reading order: `ModelOptions` and `KVCache` (what a caller passes), `AttentionInputs` and `LayerInputs` (what each
layer reads besides its weights, built once per call), the layer (`attention_block`, `mlp_block`,
`decoder_layer`), the stack (`decoder`), then the public entry points (`forward`, `forward_cached`,
`hidden_states`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxft.errors import UnsupportedConfigError
from jaxft.models.config import LlamaConfig
from jaxft.ops.activations import swiglu
from jaxft.ops.attention import attention, attention_mask, blocked_causal_attention, causal_block_size
from jaxft.ops.cache_attention import cache_attention
from jaxft.ops.linear import Weight, linear
from jaxft.ops.norms import rms_norm
from jaxft.ops.rope import apply_rope, rope_tables
from jaxft.ops.rows import bind_rows
from jaxft.ops.sharding import batch_rows

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the model runs (not what it is): compute dtype, rematerialisation, layer loop, and the self-attention
    path without a cache (`blocked_causal_attention`'s `implementation`: "auto" takes the platform's fused kernel)."""

    dtype: Any = jnp.float32
    remat: RematPolicy = "none"
    scan_layers: bool = True
    attention: str = "auto"


# What `ModelOptions.remat` saves of each layer for the backward pass (the rest is recomputed).
_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys/values of every layer for generation: `k, v[L, B, K, S, hd]` (a head's slots contiguous, so a decode
    step's scores and weighted sum read them as stored), or tuples of L one-layer stacks `[1, B, K, S, hd]` (one
    buffer per layer, for parameters held per layer: see `decoder`), `segment_ids[B, S]` (0 = empty slot or padding), `index[B]`:
    each row's next slot to write (int32), so rows fill to different lengths."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32, per_layer: bool = False
               ) -> KVCache:
    """An empty cache of `max_len` slots per row; `per_layer`: one buffer per layer (for parameters held per layer,
    `jaxft.models.params.unstack_layers`)."""
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
    if per_layer:
        k = tuple(jnp.zeros((1, *shape[1:]), dtype) for _ in range(shape[0]))
        v = tuple(jnp.zeros((1, *shape[1:]), dtype) for _ in range(shape[0]))
    else:
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return KVCache(k, v, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What every layer's attention reads besides its weights, built once per call by `decoder`.

    mask[B, T, T]: causal, same segment, not padding, among this call's tokens (the cached slots, when there is a
    cache, are masked block by block by `cache_attention`).
    window_mask[B, T, T]: `mask` within the sliding window (None when no layer has a window).
    q_segment_ids[B, T]: the queries' segment ids (prefix keys are visible to non-zero ones).
    cache: the KV cache read by every layer (None without one); its `index[B]` is each row's filled length.
    cache_bound: int32 scalar, the cache slots to read (the longest filled length among rows with new tokens).
    block (static): the query block size of `blocked_causal_attention`, None for the plain path.
    window (static): the sliding window of a model whose layers all use it (blocked attention then skips the key
    blocks it hides); None when no layer, or only some layers, have one.
    attention (static): `ModelOptions.attention`, the implementation of the blocked path.
    write_slots[B, T]: with a one-layer cache of the layer's own buffers (parameters held per layer), the slots this
    call's keys/values are written to before the attention reads the cache (in place); None: `decoder` writes
    the stacked cache after the layers.
    """

    mask: jax.Array
    window_mask: jax.Array | None
    q_segment_ids: jax.Array
    cache: KVCache | None
    cache_bound: jax.Array | None
    block: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    attention: str = dataclasses.field(default="auto", metadata=dict(static=True))
    write_slots: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """Per-layer inputs, stacked on the layer axis like the parameters and sliced by the scan (fields may be None).

    layer_index[]: int32, this layer's index into the KV cache (None without a cache). prefix_k, prefix_v[B, P, K,
    hd]: prefix tuning's learned keys/values. window[]: int32, this layer's window for a model whose layers differ
    (a large number for a full layer), else None.
    """

    layer_index: jax.Array | None = None
    prefix_k: jax.Array | None = None
    prefix_v: jax.Array | None = None
    window: jax.Array | None = None


# The window of a full-attention layer in a model whose layers differ: beyond any sequence length.
_NO_WINDOW = 2 ** 30


def _swiglu_down(gate: jax.Array, up: jax.Array, w: Any, bias: jax.Array | None) -> jax.Array:
    return linear(swiglu(gate, up), w, bias)


# The MLP's down projection of swiglu(gate, up): the backward pass recomputes swiglu from `gate` and `up` (kept
# anyway) rather than keep a third [tokens, intermediate] array; products stay saved (DoRA with dropout needs x @ W).
swiglu_down = jax.checkpoint(_swiglu_down, policy=jax.checkpoint_policies.checkpoint_dots, prevent_cse=False)


def _proj(p: dict, x: jax.Array) -> jax.Array:
    return linear(x, p["kernel"], p.get("bias"))


def attention_block(c: LlamaConfig, p: dict, x_btd: jax.Array, cos: jax.Array, sin: jax.Array,
                    inputs: AttentionInputs, layer: LayerInputs) -> tuple[jax.Array, tuple | None]:
    """Self-attention of one layer (`p` = its `self_attn` subtree) on normed `x[B, T, D]` -> `([B, T, D], new_kv)`;
    with a cache, `new_kv = (k, v)[B, T, K, hd]`, this call's keys/values for `decoder` to write into it."""
    b, t, _ = x_btd.shape
    q = apply_rope(_proj(p["q_proj"], x_btd).reshape(b, t, c.num_attention_heads, c.head_dim), cos, sin)
    k = apply_rope(_proj(p["k_proj"], x_btd).reshape(b, t, c.num_key_value_heads, c.head_dim), cos, sin)
    v = _proj(p["v_proj"], x_btd).reshape(b, t, c.num_key_value_heads, c.head_dim)
    new_kv = None
    if inputs.cache is not None:
        # The cache's filled blocks and this call's own keys (`inputs.mask`) in one online softmax; the cache is
        # written after the layer stack (in place when donated), so it is only read here.
        cache, window = inputs.cache, inputs.window if layer.window is None else layer.window
        mask = inputs.mask if window is None else inputs.window_mask
        if layer.window is not None:  # layers differ: this one's mask by its window
            mask = jnp.where(layer.window < _NO_WINDOW, inputs.window_mask, inputs.mask)
        cache_k, cache_v, new_kv = cache.k, cache.v, (k, v)
        if inputs.write_slots is not None:  # this layer's own buffers: written first (the slots the attention
            # reads are below each row's index, these at or above it), then read: in place, nothing copied
            rows = jnp.arange(b)[:, None]
            cache_k = cache_k.at[0, rows, :, inputs.write_slots].set(k.astype(cache_k.dtype), mode="drop")
            cache_v = cache_v.at[0, rows, :, inputs.write_slots].set(v.astype(cache_v.dtype), mode="drop")
            new_kv = (cache_k, cache_v)
        out = cache_attention(q, k, v, mask, inputs.q_segment_ids, cache_k, cache_v, layer.layer_index,
                              cache.segment_ids, cache.index, inputs.cache_bound, window, layer.prefix_k,
                              layer.prefix_v)
        return _proj(p["o_proj"], out), new_kv
    if inputs.block and layer.prefix_k is None:
        window = inputs.window if layer.window is None else layer.window
        out = blocked_causal_attention(q, k, v, inputs.mask, inputs.block, merge_heads=True, window=window,
                                       segment_ids=inputs.q_segment_ids, implementation=inputs.attention)
    else:
        mask = inputs.mask
        if layer.window is not None:  # layers differ: this one's mask by its window
            mask = jnp.where(layer.window < _NO_WINDOW, inputs.window_mask, inputs.mask)
        elif inputs.window_mask is not None:
            mask = inputs.window_mask
        out = attention(q, k, v, mask, layer.prefix_k, layer.prefix_v, inputs.q_segment_ids).reshape(b, t, -1)
    return _proj(p["o_proj"], out), new_kv


def mlp_block(p: dict, x: jax.Array) -> jax.Array:
    """SwiGLU MLP of one layer (`p` = its `mlp` subtree): `down(silu(gate(x)) * up(x))`."""
    gate, up, down = p["gate_proj"], p["up_proj"], p["down_proj"]
    return swiglu_down(_proj(gate, x), _proj(up, x), down["kernel"], down.get("bias"))


def decoder_layer(c: LlamaConfig, p: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, inputs: AttentionInputs,
                  layer: LayerInputs) -> tuple[jax.Array, tuple | None]:
    """One pre-norm transformer block, `p` one layer's subtree: x + attn(norm(x)); x + mlp(norm(x))."""
    normed = rms_norm(x, p["input_layernorm"]["weight"], c.rms_norm_eps)
    h, new_kv = attention_block(c, p["self_attn"], normed, cos, sin, inputs, layer)
    x = x + h
    x = x + mlp_block(p["mlp"], rms_norm(x, p["post_attention_layernorm"]["weight"], c.rms_norm_eps))
    return x, new_kv



def embed(config: LlamaConfig, params: dict, input_ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Token embeddings `[B, T, D]` in `dtype`."""
    table = params["model"]["embed_tokens"]["weight"]
    # Under a mesh the gather would otherwise follow the table's (FSDP) sharding and replicate the rows.
    return batch_rows(jnp.take(table, input_ids, axis=0).astype(dtype))


def head_weight(config: LlamaConfig, params: dict) -> Any:
    """The output projection `[D, V]`: `lm_head.kernel`, or the transposed embedding when tied."""
    if config.tie_word_embeddings:
        return params["model"]["embed_tokens"]["weight"].T
    return params["lm_head"]["kernel"]


def logits_of(config: LlamaConfig, params: dict, h: jax.Array) -> jax.Array:
    """Logits `[..., V]` (float32) of hidden states `h[..., D]`. A tied plain embedding table `[V, D]` is
    contracted as stored: `h @ table.T` written as a transpose makes XLA:CPU copy the whole table every call
    (113 MB for SmolLM2, more than a decode step's layers read)."""
    w, transposed = loss_head(config, params)
    if transposed:
        return jnp.einsum("...d,vd->...v", h, w.astype(h.dtype)).astype(jnp.float32)
    return linear(h, w).astype(jnp.float32)


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
    c = config
    windows = c.layer_windows
    if prefix_kv is not None and any(w is not None for w in windows):
        raise UnsupportedConfigError("prefix tuning on a sliding-window model is not implemented (where the window "
                                     "leaves the prefix is not defined by jaxft); use LoRA or prompt tuning")
    b, t, _ = x_btd.shape
    cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, c.rope_scaling)
    uniform = len(set(windows)) == 1
    window = c.sliding_window  # the one window size; layers differ only in whether they use it
    q_index, kv_index = jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.arange(t)
    # With a cache, `mask` covers this call's tokens among themselves; the cached slots are masked block by block.
    block, bound, advance = (causal_block_size(t), None, None) if cache is None else (None, *_cache_extent(
        cache, segment_ids))
    mask = attention_mask(segment_ids, segment_ids, q_index, kv_index)
    window_mask = None if window is None else attention_mask(segment_ids, segment_ids, q_index, kv_index, window)
    inputs = AttentionInputs(mask, window_mask, segment_ids, cache, bound, block, window if uniform else None,
                             options.attention)
    per_layer = LayerInputs(
        layer_index=None if cache is None else jnp.arange(c.num_hidden_layers, dtype=jnp.int32),
        prefix_k=None if prefix_kv is None else prefix_kv[0], prefix_v=None if prefix_kv is None else prefix_kv[1],
        window=None if uniform else jnp.asarray([_NO_WINDOW if w is None else w for w in windows], jnp.int32))

    def body(h, xs, layer_inputs=None):
        layer_params, layer = xs
        h, new_kv = decoder_layer(c, layer_params, batch_rows(h), cos, sin,
                                  inputs if layer_inputs is None else layer_inputs, layer)
        return batch_rows(h.astype(x_btd.dtype)), new_kv

    if options.remat != "none":
        body = jax.checkpoint(body, policy=_POLICIES[options.remat], prevent_cse=not options.scan_layers)

    layers = params["model"]["layers"]
    if isinstance(layers, (list, tuple)):
        h, cache = _per_layer(body, layers, x_btd, per_layer, inputs, segment_ids, advance)
        h = rms_norm(h, params["model"]["norm"]["weight"], c.rms_norm_eps)
        return h, cache
    xs = (layers, per_layer)
    if options.scan_layers:
        h, new_kv = jax.lax.scan(body, x_btd, xs)
    else:
        h, outs = x_btd, []
        for i in range(c.num_hidden_layers):
            h, kv = body(h, jax.tree.map(lambda a: a[i], xs))
            outs.append(kv)
        new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    h = rms_norm(h, params["model"]["norm"]["weight"], c.rms_norm_eps)
    new_cache = None if cache is None else _write_cache(cache, new_kv, segment_ids, advance)
    return h, new_cache


def _per_layer(body, layers, x_btd, per_layer: LayerInputs, inputs: AttentionInputs, segment_ids, advance):
    """The layer stack over parameters held per layer (a tuple of layer trees, `unstack_layers`), unrolled: each
    layer's weights are their own buffers, where the scan's slice of a stacked weight is a copy on XLA:CPU (a
    batch-1 decode step read its weights at 14 GB/s through the scan, 25 GB/s from separate buffers). The cache,
    if any, is per layer too, each layer writing this call's keys into its own buffers before reading them
    (`AttentionInputs.write_slots`): a stacked cache written after an unrolled stack was copied whole, several
    times, every step. Each layer's buffer is a one-layer stack `[1, B, K, S, hd]`: updated and then viewed as
    `[B, K, S, hd]`, XLA:CPU did not update it in place (a copy of every layer's cache per step: 1 slot x 2048
    cache slots 68.4 ms a step instead of 31.7)."""
    cache = inputs.cache
    if cache is not None and not isinstance(cache.k, (list, tuple)):
        raise UnsupportedConfigError("parameters held per layer need a per-layer cache: init_cache(..., "
                                     "per_layer=True)")
    slots = None if cache is None else _slots(cache, segment_ids, advance)
    h, new_k, new_v = x_btd, [], []
    for i, layer_params in enumerate(layers):
        layer = jax.tree.map(lambda a: a[i], per_layer)
        if cache is None:
            h, _ = body(h, (layer_params, layer))
            continue
        one = KVCache(cache.k[i], cache.v[i], cache.segment_ids, cache.index)  # a one-layer stack
        layer = dataclasses.replace(layer, layer_index=jnp.int32(0))
        h, (k, v) = body(h, (layer_params, layer), dataclasses.replace(inputs, cache=one, write_slots=slots))
        new_k.append(k)
        new_v.append(v)
    if cache is None:
        return h, None
    seg = cache.segment_ids.at[jnp.arange(h.shape[0])[:, None], slots].set(segment_ids, mode="drop")
    return h, KVCache(tuple(new_k), tuple(new_v), seg, cache.index + advance)


def _slots(cache: KVCache, segment_ids: jax.Array, advance: jax.Array) -> jax.Array:
    """`[B, T]`: the slot each of this call's tokens is written to (past the end for idle rows: dropped)."""
    t = segment_ids.shape[1]
    return jnp.where(advance[:, None] > 0, cache.index[:, None] + jnp.arange(t), cache.segment_ids.shape[1])


def _cache_extent(cache: KVCache, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(bound, advance[B])` of a cached call: the slots the attention reads (the longest filled length among rows
    with a real token in this call) and how far each row's index moves (through its last real token: left padding
    is kept, masked; trailing padding is not, so right-padded rows of different lengths need no alignment; a row of
    all padding is idle: nothing is written and its index stays)."""
    t = segment_ids.shape[1]
    advance = jnp.max(jnp.where(segment_ids != 0, jnp.arange(1, t + 1), 0), axis=1).astype(jnp.int32)
    return jnp.max(jnp.where(advance > 0, cache.index, 0)), advance


def _write_cache(cache: KVCache, new_kv: tuple, segment_ids: jax.Array, advance: jax.Array) -> KVCache:
    """`cache` with this call's keys/values `[L, B, T, K, hd]` written at each row's slots `index..index+T`
    (slots past the end and idle rows' are dropped), and each index moved by `advance`."""
    slots = _slots(cache, segment_ids, advance)
    rows = jnp.arange(segment_ids.shape[0])[:, None]
    # `[:, rows, :, slots]` puts the indexed axes first: the update is [B, T, L, K, hd]
    k = cache.k.at[:, rows, :, slots].set(new_kv[0].transpose(1, 2, 0, 3, 4).astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, rows, :, slots].set(new_kv[1].transpose(1, 2, 0, 3, 4).astype(cache.v.dtype), mode="drop")
    seg = cache.segment_ids.at[rows, slots].set(segment_ids, mode="drop")
    return KVCache(k, v, seg, cache.index + advance)


def _inputs(input_ids, positions, segment_ids):
    if segment_ids is None:
        segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    return positions, segment_ids


def hidden_states(config: LlamaConfig, params: dict, input_ids: jax.Array, *, positions=None, segment_ids=None,
                  options: ModelOptions = ModelOptions(), embeds: jax.Array | None = None,
                  prefix_kv: tuple | None = None, adapter_ids: jax.Array | None = None) -> jax.Array:
    """Final hidden states `[B, T, D]` (after the last norm), in `options.dtype`. `embeds[B, T, D]` replaces the
    token embedding lookup (prompt tuning). `adapter_ids[B]`: each row's adapter in a multi-adapter stack
    (`jaxft.ops.rows`)."""
    params = bind_rows(params, adapter_ids)
    positions, segment_ids = _inputs(input_ids, positions, segment_ids)
    x = embed(config, params, input_ids, options.dtype) if embeds is None else batch_rows(embeds.astype(options.dtype))
    h, _ = decoder(config, params, x, positions=positions, segment_ids=segment_ids, options=options,
                   prefix_kv=prefix_kv)
    return h


def forward(config: LlamaConfig, params: dict, input_ids: jax.Array, *, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, options: ModelOptions = ModelOptions(),
            embeds: jax.Array | None = None, prefix_kv: tuple | None = None,
            adapter_ids: jax.Array | None = None) -> jax.Array:
    """Logits `[B, T, V]` (float32) for `input_ids[B, T]`.

    positions[B, T]: RoPE positions (default: 0.. within each segment). segment_ids[B, T]: packing ids, a token
    attends only inside its own segment; 0 marks padding (default: all ones). Pad on the right for training, on the
    left for generation. adapter_ids[B]: each row's adapter in a multi-adapter stack (`jaxft.peft.multi`).
    """
    params = bind_rows(params, adapter_ids)
    h = hidden_states(config, params, input_ids, positions=positions, segment_ids=segment_ids, options=options,
                      embeds=embeds, prefix_kv=prefix_kv)
    return logits_of(config, params, h)


def forward_cached(config: LlamaConfig, params: dict, input_ids: jax.Array, cache: KVCache, *, positions: jax.Array,
                   segment_ids: jax.Array, options: ModelOptions = ModelOptions(), embeds: jax.Array | None = None,
                   prefix_kv: tuple | None = None, adapter_ids: jax.Array | None = None,
                   logits_at: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Logits `[B, T, V]` for `input_ids[B, T]` written at each row's slots `cache.index[b]..+T`, and the updated
    cache. A row's index moves through its last non-padding token (`segment_ids` 0 = padding): pad prompts on the
    right (or on the left, as before); a row of all padding is idle and its cache untouched. Attention reads the
    cache in blocks up to the longest filled length among the non-idle rows. `embeds`, `prefix_kv` and
    `adapter_ids` as in `forward`. `logits_at[B]`: only the logits at that index of each row, `[B, 1, V]` (a
    prefill needs the last prompt token's: the head over every prompt position was about a fifth of SmolLM2's
    prefill FLOPs)."""
    params = bind_rows(params, adapter_ids)
    x = embed(config, params, input_ids, options.dtype) if embeds is None else embeds.astype(options.dtype)
    h, cache = decoder(config, params, x, positions=positions, segment_ids=segment_ids, options=options, cache=cache,
                       prefix_kv=prefix_kv)
    if logits_at is not None:
        h = jnp.take_along_axis(h, logits_at.astype(jnp.int32)[:, None, None], axis=1)
    return logits_of(config, params, h), cache
