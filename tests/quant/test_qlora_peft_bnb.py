"""QLoRA against the reference stack: peft's LoRA on a transformers Llama quantised by bitsandbytes (NF4, double
quantisation, fp32 compute, CPU) vs jaxft importing that model's bitsandbytes checkpoint with the same adapter (saved
by peft, read by `jaxft.peft.load_adapter`): logits and every LoRA gradient, in float32. Both sides multiply by the
same NF4 weights: jaxft's own quantiser equals bitsandbytes' given its double-quantisation offset (tests/quant/
test_nf4.py), but that offset is a float32 mean torch sums in a CPU-dependent order, and an offset one ulp away
flips the odd 8-bit absmax code (on an AVX-512 Xeon: logits 1.2e-5 apart, 20x the fp32 agreement below)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxft
from jaxft import peft as jpeft
from jaxft import quant
from hf_models import bnb_fp32
from optional_import import optional

torch = optional("torch")
transformers = optional("transformers")
peft = optional("peft")

# Measured over the 2 seeds (untied tiny Llama, all-linear r4, B non-zero, jax 0.10.2): logits 5.7e-7 relative to
# their largest magnitude, LoRA gradients 2.2e-6 (fp32 orders of summation; the double-quantisation offset is a
# mean torch and XLA may sum in different orders); bounds 3.5x and 3.2x.
LOGITS_RTOL, GRAD_RTOL = 2e-6, 7e-6

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _reference(tmp_path, seed: int):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    base_dir, adapter_dir = str(tmp_path / f"base{seed}"), str(tmp_path / f"adapter{seed}")
    transformers.LlamaForCausalLM(cfg).save_pretrained(base_dir)
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, quantization_config=bnb, dtype=torch.float32,
                                                          device_map="cpu")
    bnb_fp32(model).save_pretrained(str(tmp_path / f"bnb{seed}"))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(adapter_dir)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    logits = pm(ids).logits
    logits.pow(2).mean().backward()
    grads = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None}
    return str(tmp_path / f"bnb{seed}"), adapter_dir, ids.numpy(), logits.detach().numpy(), grads


def test_qlora_matches_peft_on_bitsandbytes(tmp_path):
    for seed in (0, 1):
        bnb_dir, adapter_dir, ids, want_logits, want_grads = _reference(tmp_path, seed)
        config, params = jaxft.load_pretrained(bnb_dir)
        assert isinstance(params["model"]["layers"]["mlp"]["down_proj"]["kernel"], quant.NF4Tensor)
        spec, adapter = jpeft.load_adapter(adapter_dir, config)

        def loss(adapter):
            logits = jaxft.forward(config, jpeft.bind(params, spec, adapter), jnp.asarray(ids))
            return jnp.mean(logits ** 2), logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(adapter)
        assert _rel(logits, want_logits) < LOGITS_RTOL
        checked = 0
        for name, group in MODULES.items():
            entry = grads["model"]["layers"][group][name]["kernel"]
            for i in range(config.num_hidden_layers):
                prefix = f"base_model.model.model.layers.{i}.{group}.{name}"
                for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                    want = want_grads[f"{prefix}.{theirs}.default.weight"]
                    assert _rel(np.asarray(entry[ours][i]).T, want) < GRAD_RTOL, (prefix, theirs)
                    checked += 1
        assert checked == 2 * 7 * 2
