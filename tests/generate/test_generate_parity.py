"""Greedy generation against transformers' `generate` and peft's: identical tokens.

SmolLM2-135M-Instruct (the embedded model): 10 chat prompts x 32 new tokens, all 10 decoded in one batch by
`greedy_generate` (rows of different lengths, no alignment), each against `generate` on its own. A LoRA adapter
(random non-zero weights on every linear layer) against `PeftModel.generate`: on a tiny random Llama (fast) and on
SmolLM2 (slow-marked)."""

import os

import pytest

import jaxft
from hf_models import hf_tiny
from jaxft import peft as jpeft
from jaxft.generate import greedy_generate
from optional_import import optional

torch = optional("torch")
peft = optional("peft")
GenerationConfig = optional("transformers", "GenerationConfig")
AutoModelForCausalLM = optional("transformers", "AutoModelForCausalLM")

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
             "Name three prime numbers.", "Explain gravity to a child.", "What is 12 times 7?",
             "Translate 'good morning' into Spanish.", "Give me a tip for learning to code.",
             "Why is the sky blue?", "What does a fine-tuned language model do?"]


def _hf_greedy(model, prompt, n, eos=None):
    gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=gen)
    return out[0, len(prompt):].tolist()


def _randomize(pm, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.slow
def test_smollm2_chat_prompts_equal_transformers_generate(smollm_jax, smollm_hf, smollm_tokenizer):
    config, params = smollm_jax
    tok = smollm_tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 5  # rows of many lengths in one batch
    ours = greedy_generate(config, params, prompts, max_new_tokens=32, eos_token_ids=[tok.eos_token_id],
                           batch_size=10)
    for prompt, got in zip(prompts, ours):
        assert got == _hf_greedy(smollm_hf, prompt, 32, tok.eos_token_id)


def _lora_pair(model, d):
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _randomize(pm)
    pm.eval()
    pm.save_pretrained(str(d))
    return pm


def test_lora_generation_equals_peft_on_a_tiny_model(tmp_path):
    model = hf_tiny("llama_gqa_tied")
    model.save_pretrained(tmp_path / "base")
    config, params = jaxft.load_pretrained(str(tmp_path / "base"))
    pm = _lora_pair(model, tmp_path / "adapter")
    spec, adapter = jpeft.load_adapter(str(tmp_path / "adapter"), config)
    prompts = [[5, 9, 3, 44, 2, 70], [7, 1, 2, 8, 4, 6, 11, 60, 33, 12, 90], [13]]
    ours = greedy_generate(config, jpeft.bind(params, spec, adapter), prompts, max_new_tokens=20, eos_token_ids=[-1],
                           batch_size=3)
    plain = greedy_generate(config, params, prompts, max_new_tokens=20, eos_token_ids=[-1], batch_size=3)
    assert ours != plain  # the adapter changes what is generated
    for prompt, got in zip(prompts, ours):
        assert got == _hf_greedy(pm, prompt, 20)


@pytest.mark.slow
def test_lora_generation_equals_peft_on_smollm2(smollm_jax, smollm_dir, smollm_tokenizer, tmp_path):
    config, params = smollm_jax
    d, name = os.path.split(smollm_dir)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    _randomize(pm, scale=0.05)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    spec, adapter = jpeft.load_adapter(str(tmp_path / "adapter"), config)
    tok = smollm_tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for q in QUESTIONS[:2]]
    ours = greedy_generate(config, jpeft.bind(params, spec, adapter), prompts, max_new_tokens=16,
                           eos_token_ids=[tok.eos_token_id], batch_size=2)
    for prompt, got in zip(prompts, ours):
        assert got == _hf_greedy(pm, prompt, 16, tok.eos_token_id)
