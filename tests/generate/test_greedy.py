"""Batched greedy decoding with the KV cache against a naive loop of full forward passes (one row at a time, no
cache), with and without prompt / prefix tuning. Identical tokens are required."""

import jax
import jax.numpy as jnp
import pytest

import jaxft
from jaxft import peft
from jaxft.generate.greedy import greedy_generate
from hf_models import hf_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("greedy")
    hf_tiny("llama_gqa_tied").save_pretrained(d)
    return jaxft.load_pretrained(str(d))


def _naive(config, params, prompt, n, spec=None, adapter=None):
    seq = list(prompt)
    for _ in range(n):
        ids = jnp.asarray([seq])
        if spec is None:
            logits = jaxft.forward(config, params, ids)
        else:
            kwargs, drop = peft.prompt_inputs(spec, adapter, ids, config=config, params=params)
            logits = jaxft.forward(config, params, kwargs.pop("input_ids"), **kwargs)[:, drop:]
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4, 6, 11], [13]]


@pytest.mark.slow  # 40 s on 2 cores; tests/generate/test_engine.py covers the engine fast
def test_batched_left_padded_greedy_equals_naive_loop(tiny):
    config, params = tiny
    out = greedy_generate(config, params, PROMPTS, max_new_tokens=6, eos_token_ids=[-5], batch_size=2)
    for prompt, got in zip(PROMPTS, out):
        assert got == _naive(config, params, prompt, 6)


@pytest.mark.slow  # 2 x 15-26 s on 2 cores
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_generation_equals_naive_loop(tiny, kind):
    config, params = tiny
    spec = peft.PromptTuningSpec(num_virtual_tokens=3) if kind == "prompt" else peft.PrefixTuningSpec(
        num_virtual_tokens=3)
    adapter = peft.init(spec, config, params, jax.random.key(0))
    adapter = jax.tree.map(lambda a: a + 0.5 * jax.random.normal(jax.random.key(1), a.shape), adapter)
    extra = ({"virtual_tokens": adapter["prompt_embeddings"]} if kind == "prompt"
             else {"prefix": (adapter["prefix_keys"], adapter["prefix_values"])})
    out = greedy_generate(config, params, PROMPTS, max_new_tokens=5, eos_token_ids=[-5], batch_size=3, **extra)
    plain = greedy_generate(config, params, PROMPTS, max_new_tokens=5, eos_token_ids=[-5], batch_size=3)
    assert out != plain  # the virtual tokens change what is generated
    for prompt, got in zip(PROMPTS, out):
        assert got == _naive(config, params, prompt, 5, spec, adapter)


def test_eos_stops_a_row(tiny):
    config, params = tiny
    first = greedy_generate(config, params, PROMPTS[:1], max_new_tokens=4, eos_token_ids=[-5])[0]
    cut = greedy_generate(config, params, PROMPTS[:1], max_new_tokens=4, eos_token_ids=[first[1]])[0]
    assert cut == first[:2]
