"""A tiny random model shared by the adapter-tree tests: config, params, ids, and helpers to build a loss and to
perturb an adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxft
from jaxft import peft as jpeft

CONFIG = jaxft.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                           initializer_range=0.2)
PARAMS = jaxft.init_params(CONFIG, jax.random.key(0))
IDS = jax.random.randint(jax.random.key(1), (2, 9), 0, CONFIG.vocab_size)
LINEAR = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def make_loss(spec, params=PARAMS, options=jaxft.ModelOptions(), **bind_kw):
    def loss(adapter):
        logits = jaxft.forward(CONFIG, jpeft.bind(params, spec, adapter, **bind_kw), IDS[:, :-1], options=options)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, IDS[:, 1:, None], axis=-1))

    return loss


def noisy(tree, key=3, scale=0.2):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
