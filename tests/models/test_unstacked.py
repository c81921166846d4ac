"""The model over unstacked layers (`unstack_layers`: a Python loop, no per-layer slice) equals the scanned stack,
and the tied head contracted as stored equals the transposed product, with and without a KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.models.llama import init_cache, unstack_layers
from hf_models import rel_err

# Measured over 4 seeds, tied and untied: stacked vs unstacked logits at most 1.09e-6 relative (fp32 reassociation
# of the unrolled loop); bound 5e-6 (4.6x).
TOL = 5e-6


def _config(tied: bool):
    return jaxft.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                             tie_word_embeddings=tied, initializer_range=0.2)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_unstacked_layers_equal_the_scanned_stack(tied, seed):
    config = _config(tied)
    params = jaxft.init_params(config, jax.random.key(seed))
    flat = unstack_layers(params)
    assert isinstance(flat["model"]["layers"], list) and len(flat["model"]["layers"]) == 3
    assert unstack_layers(flat) is flat
    ids = jax.random.randint(jax.random.key(seed + 10), (2, 12), 0, 97)
    ref = jaxft.forward(config, params, ids)
    assert rel_err(jaxft.forward(config, flat, ids), ref) < TOL
    # cached: prefill 8 tokens, then one step, against the uncached logits of the same positions
    cache = init_cache(config, 2, 16)
    seg = jnp.ones((2, 8), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    logits, cache = jaxft.models.llama.forward_cached(config, flat, ids[:, :8], cache, positions=pos,
                                                      segment_ids=seg)
    assert rel_err(logits, ref[:, :8]) < TOL
    step, cache = jaxft.models.llama.forward_cached(config, flat, ids[:, 8:9], cache, positions=pos[:, :1] + 8,
                                                    segment_ids=seg[:, :1])
    assert rel_err(step[:, 0], ref[:, 8]) < TOL
    assert np.asarray(cache.index).tolist() == [9, 9]
