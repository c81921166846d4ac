"""Prompt tuning and prefix tuning against the real peft library (torch CPU fp32, tiny random Llama with GQA and
Qwen2): the real tokens' logits agree (relative 1e-5) for adapters saved by peft and loaded by jaxft and the other
way round; text init copies the embeddings peft's PromptEmbedding copies; packing is refused (prompt tuning) or
equals running every segment alone in peft (prefix tuning)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from hf_models import rel_err
from jaxft import peft as jpeft
from optional_import import optional  # torch-free CI leg: tests/conftest.py
from peft_ref import IDS, UNROLLED, randomize, tiny_pair

peft = optional("peft")
torch = optional("torch")

TOL = 1e-5
P = 3
# row 0 full, row 1 right-padded (peft extends the attention mask with ones for the virtual tokens)
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2], np.int64)
CONFIGS = {"prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
           "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)}


def _peft_logits(pm, ids=IDS, mask=MASK):
    with torch.no_grad():
        out = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    return out[:, out.shape[1] - ids.shape[1]:]  # prompt tuning returns the virtual tokens' logits too


def _jax_logits(spec, adapter, config, params, ids=IDS, segment_ids=MASK):
    kw, n_virtual = jpeft.prompt_inputs(spec, adapter, jnp.asarray(ids, jnp.int32),
                                        segment_ids=jnp.asarray(segment_ids, jnp.int32), config=config, params=params)
    return np.asarray(jaxft.forward(config, params, options=UNROLLED, **kw))[:, n_virtual:]


def _real(x, mask=MASK):
    return x[mask.astype(bool)]


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_methods_match_peft_both_ways(method, variant, tmp_path):
    model, config, params = tiny_pair(variant, tmp_path)
    pm = peft.get_peft_model(model, CONFIGS[method]())
    randomize(pm, scale=1.0)
    pm.eval()
    d = tmp_path / "peft"
    pm.save_pretrained(str(d))
    spec, adapter = jpeft.load_adapter(str(d), config)
    assert type(spec) is (jpeft.PromptTuningSpec if method == "prompt" else jpeft.PrefixTuningSpec)
    assert spec.num_virtual_tokens == P
    want = _peft_logits(pm)
    got = _jax_logits(spec, adapter, config, params)
    assert rel_err(_real(got), _real(want)) <= TOL
    assert jpeft.bind(params, spec, adapter) is params  # prompt methods add inputs, not weights

    out = tmp_path / "jaxft"
    with pytest.warns(UserWarning, match="vLLM"):
        reasons = jpeft.save_adapter(spec, adapter, str(out), config)
    assert any("tuning" in r for r in reasons)
    fresh, _, _ = tiny_pair(variant, tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    assert rel_err(_real(_peft_logits(loaded)), _real(got)) <= TOL
    a, b = peft.PeftConfig.from_pretrained(str(d)), peft.PeftConfig.from_pretrained(str(out))
    for f in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
              "num_transformer_submodules"):
        assert getattr(a, f) == getattr(b, f), f


def test_prefix_tuning_packed_rows_equal_each_segment_alone_in_peft(tmp_path):
    model, config, params = tiny_pair("llama_gqa_tied", tmp_path)
    pm = peft.get_peft_model(model, CONFIGS["prefix"]())
    randomize(pm, scale=1.0)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    spec, adapter = jpeft.load_adapter(str(tmp_path / "peft"), config)
    ids = IDS[:1]
    seg = np.array([[1, 1, 1, 2, 2, 2, 2]])
    got = _jax_logits(spec, adapter, config, params, ids, seg)
    for s in (1, 2):
        part = ids[:, seg[0] == s]
        want = _peft_logits(pm, part, np.ones_like(part))
        assert rel_err(got[:, seg[0] == s], want) <= TOL


def test_prompt_tuning_refuses_packed_rows():
    config = jaxft.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    params = jaxft.init_params(config, jax.random.key(0))
    spec = jpeft.PromptTuningSpec(num_virtual_tokens=2)
    adapter = jpeft.init(spec, config, params, jax.random.key(1))
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="row 1 .* packs more than one segment"):
        jpeft.prompt_inputs(spec, adapter, ids, segment_ids=jnp.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 0]]),
                            config=config, params=params)
    kw, n = jpeft.prompt_inputs(spec, adapter, ids, segment_ids=jnp.array([[0, 0, 3, 3, 3], [1, 1, 1, 1, 0]]),
                                config=config, params=params)
    assert n == 2 and kw["embeds"].shape == (2, 7, 16)
    np.testing.assert_array_equal(kw["segment_ids"], [[3, 3, 0, 0, 3, 3, 3], [1, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(kw["positions"][:, :2], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(kw["positions"][0, 4:], [2, 3, 4])  # real tokens start after the virtual ones


def test_text_init_copies_what_peft_copies(tmp_path):
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    tok = jaxft.load_tokenizer("smollm2-135m-instruct")
    tok.save_pretrained(str(tmp_path / "tok"))
    text = "Classify the sentiment of this review"
    n = 11  # longer than the text's tokens: peft repeats them
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path / "tok"),
                                  token_dim=16, num_layers=1, num_attention_heads=2, num_transformer_submodules=1)
    torch.manual_seed(0)
    word = torch.nn.Embedding(len(tok), 16)
    want = PromptEmbedding(cfg, word).embedding.weight.detach().numpy()
    config = jaxft.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    params = {"model": {"embed_tokens": {"weight": jnp.asarray(word.weight.detach().numpy())}}}
    spec = jpeft.PromptTuningSpec(num_virtual_tokens=n, init="text", init_text=text)
    got = jpeft.init(spec, config, params, jax.random.key(0), tokenizer=tok)["prompt_embeddings"]
    np.testing.assert_array_equal(np.asarray(got), want)
    assert len(tok(text)["input_ids"]) < n
