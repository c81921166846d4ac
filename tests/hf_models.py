"""Test helpers shared by the suite: tiny random transformers models of every supported variant, and the relative
error used by the parity tests. Needs torch and transformers (the `dev` extra)."""

from __future__ import annotations

import json
import os

import numpy as np

# Tiny configs covering the Llama family as transformers defines it.
VARIANTS = {
    "llama_mha_untied": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "llama_gqa_tied": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama_mqa_bias": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=1, attention_bias=True,
                           mlp_bias=True),
    "llama3_rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                        rope_theta=500000.0),
    "llama_linear_rope_headdim": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def hf_tiny(variant: str, seed: int = 0):
    """A tiny random transformers model (fp32, eager attention) of `variant`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(VARIANTS[variant])
    model_type = kw.pop("model_type")
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128,
                rms_norm_eps=1e-5, initializer_range=0.2)
    base.update(kw)
    config = AutoConfig.for_model(model_type, **base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_arithmetic_chats(path: str, rows: int, mod: int) -> None:
    """A chat JSONL of `rows` sums ("What is i plus i % mod?" -> the answer), the tiny trainer runs' data."""
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i % mod}?"},
                                             {"role": "assistant", "content": str(i + i % mod)}]}) + "\n")


def write_tiny_smollm_vocab_model(d: str, hidden: int = 32, intermediate: int = 64) -> None:
    """A random tiny Llama (2 layers, 4 heads, 2 KV heads, tied) whose vocabulary is SmolLM2's, with that tokenizer
    saved beside it: a model directory the trainer runs end to end in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import jaxft

    tok = jaxft.load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d)
    tok.save_pretrained(d)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def train_losses(run_dir: str) -> dict[int, float]:
    """`{step: loss}` of the training records in a run directory's `metrics.jsonl`."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train":
                out[r["step"]] = r["loss"]
    return out
