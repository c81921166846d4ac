"""Prefix tuning: learned keys and values (`num_virtual_tokens` of them) prepended in every layer (peft's
PREFIX_TUNING without the reparameterisation MLP).

Adapter: `{'prefix_keys', 'prefix_values': [L, P, K, hd]}`, N(0, 1) as peft's `nn.Embedding`. peft's file holds one
`prompt_embeddings [P, L * 2 * K * hd]` (per virtual token: layer, key|value, kv head, dim). Packed rows work: every
segment sees the prefix and starts at position P.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.llama import segment_positions
from jaxft.peft.methods.prompt import VirtualTokens
from jaxft.peft.specs import PrefixTuningSpec


class PrefixMethod(VirtualTokens):
    name = "prefix"
    spec = PrefixTuningSpec
    description = "prefix tuning"
    peft_type = "PREFIX_TUNING"

    def init(self, spec, config, params, rng, *, tokenizer=None, dtype=jnp.float32):
        shape = (config.num_hidden_layers, spec.num_virtual_tokens, config.num_key_value_heads, config.head_dim)
        k1, k2 = jax.random.split(rng)
        return {"prefix_keys": jax.random.normal(k1, shape, jnp.float32).astype(dtype),
                "prefix_values": jax.random.normal(k2, shape, jnp.float32).astype(dtype)}

    def logical_axes(self, spec, config, adapter):
        axes = ("layers", "virtual_tokens", "kv_heads", "head_dim")
        return {"prefix_keys": axes, "prefix_values": axes}

    def config_fields(self, spec, config, params):
        kdim = config.num_key_value_heads * config.head_dim
        return {**self.base_fields(spec, config), "token_dim": kdim,
                "num_attention_heads": config.num_key_value_heads, "encoder_hidden_size": kdim,
                "prefix_projection": False}

    def stored_shape(self, spec, config):
        return (spec.num_virtual_tokens,
                config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim)

    def peft_tensors(self, spec, adapter, config, params):
        k, v = np.asarray(adapter["prefix_keys"]), np.asarray(adapter["prefix_values"])  # [L, P, K, hd]
        kv = np.stack([k, v], axis=1).transpose(2, 0, 1, 3, 4)  # [P, L, 2, K, hd], peft's order per virtual token
        return {"prompt_embeddings": np.ascontiguousarray(kv.reshape(kv.shape[0], -1))}

    def load_tensors(self, spec, tensors, config, params, *, files, dtype):
        value = self.check_tensors(spec, tensors, config, files[1])
        p, L, K, hd = spec.num_virtual_tokens, config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        kv = value.reshape(p, L, 2, K, hd).transpose(1, 2, 0, 3, 4)  # -> [L, 2, P, K, hd]
        return {"prefix_keys": jnp.asarray(kv[:, 0], dtype), "prefix_values": jnp.asarray(kv[:, 1], dtype)}

    def model_inputs(self, spec, adapter):
        return {"prefix": (adapter["prefix_keys"], adapter["prefix_values"])}

    def forward_inputs(self, spec, adapter, input_ids, segment_ids, config, params, dtype):
        p = spec.num_virtual_tokens
        b, _ = input_ids.shape
        keys, values = adapter["prefix_keys"], adapter["prefix_values"]
        if tuple(keys.shape[:2]) != (keys.shape[0], p) or keys.shape != values.shape:
            raise ValueError(f"prefix adapter: prefix_keys {tuple(keys.shape)} / prefix_values "
                             f"{tuple(values.shape)} do not match num_virtual_tokens={p}")
        kv = tuple(jnp.broadcast_to(x[:, None], (x.shape[0], b, *x.shape[1:])).astype(dtype) for x in (keys, values))
        positions = p + segment_positions(segment_ids)
        return {"input_ids": input_ids, "positions": positions, "segment_ids": segment_ids, "prefix_kv": kv}, 0
