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


def bnb_dequantize(weight):
    """bitsandbytes' dense value of a 4-bit `Params4bit` by its device-independent formula (its `default` backend:
    `code[nibble] * absmax` over the flattened tensor, what its CUDA kernel computes). Its native CPU kernel in
    0.50.2 on AVX-512 disagrees with its own quantiser where a block of 64 crosses a row for some shapes: a
    [128, 160] weight round-trips with error 2.2 against 0.50 by this formula."""
    import torch
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    qs = weight.quant_state
    assert not getattr(qs, "packing_format_for_cpu", False), "repacked for the CPU: call bnb_fp32 first"
    absmax = qs.absmax
    if qs.nested:
        import bitsandbytes.functional as bnbf

        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return _dequantize_4bit_compute(weight.data.view(-1).view(torch.uint8), absmax.float(), qs.code,
                                    qs.blocksize, qs.shape, qs.dtype)


def bnb_fp32(model):
    """`model` (transformers with bitsandbytes 4-bit linears) multiplying by bitsandbytes' dense weights in its
    compute dtype on every CPU, as it does on machines without AVX-512: bitsandbytes 0.50 on a CPU with AVX512-BF16
    (Sapphire Rapids and newer Xeons) repacks each `Linear4bit`'s weight at its first no-grad eval forward into a
    CPU-only layout (absmax cast to bf16) and multiplies in bf16 (logits 1.6e-2 off fp32 on a tiny Llama); that is
    switched off here. A linear whose native CPU dequantisation disagrees with `bnb_dequantize` (see there) multiplies
    by the latter. Fails loudly if bitsandbytes renames its switch, so a reference never silently changes."""
    import types

    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch

    def generic_forward(self, x):
        w = bnb_dequantize(self.weight).to(self.compute_dtype or x.dtype)
        bias = None if self.bias is None else self.bias.to(w.dtype)
        return torch.nn.functional.linear(x.to(w.dtype), w, bias).to(x.dtype)

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no bitsandbytes Linear4bit in the model"
    for m in layers:
        assert hasattr(m, "support_avx512bf16_for_cpu"), "bitsandbytes moved its AVX512-BF16 CPU switch"
        m.support_avx512bf16_for_cpu = False
        native = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
        if not torch.equal(native.view(torch.int32), bnb_dequantize(m.weight).view(torch.int32)):
            m.forward = types.MethodType(generic_forward, m)
    return model
