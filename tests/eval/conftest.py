"""A tiny random Llama with SmolLM2's vocabulary and chat template (weights large enough that its next-token
distributions are far from uniform), written once per session, and transformers' copy of it for references."""

import pytest

from optional_import import optional

torch = optional("torch")
transformers = optional("transformers")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    import jaxft

    d = str(tmp_path_factory.mktemp("eval_tiny"))
    tok = jaxft.load_tokenizer("smollm2-135m-instruct")
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_hf(tiny_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_base(tiny_dir):
    from jaxft.eval import load_base

    return load_base(tiny_dir)
