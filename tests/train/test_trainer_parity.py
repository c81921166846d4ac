"""Same training as the reference: jaxft's `make_train_step` + `make_optimizer` against a plain torch loop written
with transformers (+ peft for LoRA), on the same tiny random Llama (GQA, tied embeddings) and the same batches.

fp32 on both sides; the loss curve, the pre-clip gradient norm and the learning rate must agree at every step
within 5e-5 relative, and so must the trained weights at the end. Measured over 3 seeds of batches
(scripts/measure_train_tolerances.py): loss 3.8e-7, grad norm 1.6e-6, full fine-tuning weights 7.6e-7, LoRA
weights 5.7e-6 at most: an 8.8x margin; a 1% scale error in the loss or a weight is 200x the bound. Steps use warm-up + cosine with a floor, weight
decay (not on norms) and global-norm clipping that bites, so every part of the optimizer is exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxft
from hf_models import hf_tiny, rel_err
from jaxft import peft
from jaxft.train.optim import OptimConfig, make_optimizer
from jaxft.train.step import StaticModel, make_train_step
from trainer_ref import make_batches, torch_train
from optional_import import optional  # torch-free CI leg: tests/conftest.py

torch = optional("torch")

STEPS, B, T = 20, 2, 16
OPT = dict(lr=3e-3, warmup=3, total=STEPS, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-8,
           max_grad_norm=1.0)
TOL = 5e-5  # measured 5.7e-6 at most (LoRA weights; see the module docstring)


def _optim_config(lr: float) -> OptimConfig:
    return OptimConfig(lr=lr, schedule="cosine", warmup_steps=OPT["warmup"], min_lr_ratio=OPT["min_lr_ratio"],
                       weight_decay=OPT["weight_decay"], b1=OPT["b1"], b2=OPT["b2"], eps=OPT["eps"],
                       max_grad_norm=OPT["max_grad_norm"])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("trainer_parity") / "base")
    hf_tiny("llama_gqa_tied").save_pretrained(d)
    return d


def _jax_train(config, trainable, frozen, spec, batches, lr: float = OPT["lr"], dtype=jnp.float32):
    """jaxft's side, wired as jaxft.train.loop does it; `dtype` is the compute dtype."""
    model = StaticModel(config, spec, jaxft.ModelOptions(dtype=dtype))
    optimizer = make_optimizer(_optim_config(lr), trainable, STEPS)
    if spec is not None:
        optimizer = optax.chain(optimizer, peft.mask_updates(peft.trainable_mask(spec, frozen, trainable)))
    opt_state = optimizer.init(trainable)
    step = make_train_step(model, optimizer)
    rng = jax.random.key(0)
    hist = {"loss": [], "grad_norm": [], "loss_tokens": []}
    for i, b in enumerate(batches):
        trainable, opt_state, m = step(trainable, opt_state, frozen, {k: jnp.asarray(v) for k, v in b.items()},
                                       jax.random.fold_in(rng, i))
        for k in hist:
            hist[k].append(float(m[k]))
    for leaf in jax.tree.leaves((trainable, opt_state)):  # fp32 master weights and optimizer state, bf16 or not
        assert not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.dtype == jnp.float32, leaf.dtype
    return trainable, hist


def _check_curves(ref: dict, got: dict) -> float:
    loss_rel = np.abs(np.array(got["loss"]) - ref["loss"]) / np.abs(ref["loss"])
    gn_rel = np.abs(np.array(got["grad_norm"]) - ref["grad_norm"]) / np.abs(ref["grad_norm"])
    assert loss_rel.max() < TOL, f"loss curves differ: max rel {loss_rel.max():.2e} at step {loss_rel.argmax()}"
    assert gn_rel.max() < TOL, f"grad norms differ: max rel {gn_rel.max():.2e} at step {gn_rel.argmax()}"
    # the run really trained and the clipping really clipped (else the test would not exercise them)
    assert np.mean(ref["loss"][-4:]) < 0.9 * np.mean(ref["loss"][:4]), ref["loss"]
    assert max(ref["grad_norm"]) > OPT["max_grad_norm"], ref["grad_norm"]
    print(f"max rel diff: loss {loss_rel.max():.2e}, grad norm {gn_rel.max():.2e}")
    return float(loss_rel.max())


def _run_full(base_dir, accum: int, batches=None) -> dict:
    batches = batches or make_batches(STEPS, accum, B, T, vocab=97, seed=accum)
    hf = hf_tiny("llama_gqa_tied")
    ref = torch_train(hf, batches, **OPT)
    config, params = jaxft.load_pretrained(base_dir)
    trained, got = _jax_train(config, jax.tree.map(lambda a: a.astype(jnp.float32), params), None, None, batches)
    loss_rel = _check_curves(ref, got)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    w_rel = max(
        rel_err(np.asarray(trained["model"]["embed_tokens"]["weight"]), sd["model.embed_tokens.weight"]),
        rel_err(np.asarray(trained["model"]["layers"]["self_attn"]["q_proj"]["kernel"][1]),
                sd["model.layers.1.self_attn.q_proj.weight"].T),
        rel_err(np.asarray(trained["model"]["layers"]["mlp"]["down_proj"]["kernel"][0]),
                sd["model.layers.0.mlp.down_proj.weight"].T),
        rel_err(np.asarray(trained["model"]["norm"]["weight"]), sd["model.norm.weight"]),
    )
    assert w_rel < TOL, f"trained weights differ: max rel {w_rel:.2e}"
    return got


def test_full_finetune_matches_torch(base_dir):
    _run_full(base_dir, accum=1)


def test_grad_accumulation_matches_torch_token_sum(base_dir):
    """A=2 micro-batches with different loss-token counts: the step's loss is the token sum of both over the total
    token count (a mean of micro-batch means would differ, and is checked to differ)."""
    batches = make_batches(STEPS, 2, B, T, vocab=97, seed=2)
    counts = [[int((b["loss_mask"][a][:, 1:] * b["segment_ids"][a][:, :-1]).sum()) for a in range(2)] for b in batches]
    assert any(c[0] != c[1] for c in counts), counts
    got = _run_full(base_dir, accum=2, batches=batches)

    # the normalisation itself, on step 0 before any update: token-weighted, not a mean of means
    from trainer_ref import token_loss_sum

    hf = hf_tiny("llama_gqa_tied")
    b = batches[0]
    with torch.no_grad():
        parts = [token_loss_sum(hf, b["input_ids"][a], b["segment_ids"][a], b["loss_mask"][a]) for a in range(2)]
    token_mean = float(sum(p[0] for p in parts)) / sum(p[1] for p in parts)
    mean_of_means = float(np.mean([float(p[0]) / p[1] for p in parts]))
    assert abs(got["loss"][0] - token_mean) / token_mean < 1e-5  # measured 1.0e-7 at most over 3 seeds
    assert got["loss_tokens"][0] == sum(p[1] for p in parts)
    assert abs(mean_of_means - token_mean) / token_mean > 1e-4  # the batches do tell the two apart


def _lora_pair(base_dir):
    """(peft model, config, params, spec, adapter): LoRA r4 on every linear layer, peft's initialisation (kaiming A,
    zero B) copied into jaxft's stacked layout."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear"
    hf = get_peft_model(hf_tiny("llama_gqa_tied"),
                        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    config, params = jaxft.load_pretrained(base_dir)
    spec = peft.LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=targets)
    adapter = peft.init(spec, config, params, jax.random.key(1))
    # A [r, in] -> [L, in, r]
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items() if "lora_" in k}
    copied = 0
    for group in ("self_attn", "mlp"):
        for name, node in adapter["model"]["layers"].get(group, {}).items():
            a = np.stack([sd[f"base_model.model.model.layers.{i}.{group}.{name}.lora_A.default.weight"].T
                          for i in range(config.num_hidden_layers)])
            b = np.stack([sd[f"base_model.model.model.layers.{i}.{group}.{name}.lora_B.default.weight"].T
                          for i in range(config.num_hidden_layers)])
            assert node["kernel"]["lora_a"].shape == a.shape and node["kernel"]["lora_b"].shape == b.shape
            node["kernel"]["lora_a"], node["kernel"]["lora_b"] = jnp.asarray(a), jnp.asarray(b)
            copied += 2 * config.num_hidden_layers
    assert copied == len(sd), (copied, sorted(sd))
    return hf, config, params, spec, adapter


def test_lora_matches_peft(base_dir):
    """LoRA on every linear layer, two micro-batches per step; peft's adapter initialisation copied to jaxft."""
    lr = 1e-2
    batches = make_batches(STEPS, 2, B, T, vocab=97, seed=3)
    hf, config, params, spec, adapter = _lora_pair(base_dir)
    ref = torch_train(hf, batches, **dict(OPT, lr=lr))
    trained, got = _jax_train(config, adapter, params, spec, batches, lr=lr)
    _check_curves(ref, got)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items() if "lora_" in k}
    for i in range(config.num_hidden_layers):
        b_ref = sd[f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_B.default.weight"].T
        a_ref = sd[f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_A.default.weight"].T
        assert rel_err(np.asarray(trained["model"]["layers"]["self_attn"]["v_proj"]["kernel"]["lora_b"][i]),
                       b_ref) < TOL
        assert rel_err(np.asarray(trained["model"]["layers"]["self_attn"]["v_proj"]["kernel"]["lora_a"][i]),
                       a_ref) < TOL


def test_lora_bf16_compute_tracks_the_fp32_reference(base_dir):
    """The LoRA run above with bf16 activations and matmuls: master weights and optimizer state stay fp32 (checked in
    `_jax_train`), and the loss follows peft's fp32 run within bf16 precision (2e-2 relative at every step, while
    the loss falls by more than a tenth, as in the fp32 test)."""
    lr = 1e-2
    batches = make_batches(STEPS, 2, B, T, vocab=97, seed=3)
    hf, config, params, spec, adapter = _lora_pair(base_dir)
    ref = torch_train(hf, batches, **dict(OPT, lr=lr))
    _, got = _jax_train(config, adapter, params, spec, batches, lr=lr, dtype=jnp.bfloat16)
    loss_rel = np.abs(np.array(got["loss"]) - ref["loss"]) / np.abs(ref["loss"])
    print(f"bf16 vs fp32 reference: max rel loss diff {loss_rel.max():.2e}")
    # measured 2.3e-3 at most over 3 seeds (8.7x under 2e-2); fp32 stays under 3.8e-7 (26x under 1e-5): the run
    # did compute in bf16
    assert 1e-5 < loss_rel.max() < 2e-2, loss_rel
    assert np.mean(got["loss"][-4:]) < 0.9 * np.mean(got["loss"][:4]), got["loss"]
