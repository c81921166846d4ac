"""The accelerator attention paths lower for their platforms on this CPU (`jax.export`), inside the whole train step.

A TPU or GPU is not needed to check that the step a user runs there contains the fused kernel and that the kernel's
block shapes pass the platform's lowering: `jax.export.export(..., platforms=[...])` runs jax's Mosaic TPU and
Triton lowerings here. The target is named by an abstract mesh whose abstract device is a TPU or an H200 (what
`jaxft.ops.attention.attention_platform` reads; jax 0.12's Triton lowering wants it too); the Triton custom call
must be allowed explicitly since exported Triton kernels are not guaranteed stable across jax versions.
What only the hardware checks (Mosaic's layout passes in libtpu, PTX compilation) is left to the GPU script.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from jaxft import peft
from jaxft.models.config import LlamaConfig
from jaxft.models.llama import ModelOptions
from jaxft.models.llama import forward
from jaxft.models.params import init_params
from jaxft.ops.attention import attention_platform, blocked_causal_attention, choose_implementation
from jaxft.train.config import ModelSection
from jaxft.train.step import StaticModel, make_train_step

# The model's logits with `attention: flash` (interpret mode) vs the XLA path on real tokens, max |diff| / max |logit|:
# measured 6.4e-7 at most over 4 seeds (float32); 2e-6 is a 3.1x margin.
MODEL_TOL = 2e-6
TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
TARGETS = {
    "tpu": (AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"), "tpu_custom_call", []),
    "cuda": (AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu"), "__gpu$xla.gpu.triton",
             [TRITON]),
}


def _target(platform: str) -> AbstractMesh:
    device = TARGETS[platform][0]
    return AbstractMesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                        abstract_device=device)


def _tiny(window: int | None) -> LlamaConfig:
    return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=window)


def _export_step(platform: str, config: LlamaConfig, t: int, options: ModelOptions | None = None):
    """Export a LoRA (all-linear) train step of `config` on `[1, 2, t]` batches for `platform` (default options:
    bf16, full remat, attention auto): MLIR text."""
    options = ModelOptions(dtype=jnp.bfloat16, remat="full") if options is None else options
    model = StaticModel(config, peft.LoraSpec(r=8, alpha=16, target_modules="all-linear"), options)
    frozen = jax.eval_shape(lambda: init_params(config, jax.random.key(0), jnp.bfloat16))
    trainable = jax.eval_shape(lambda p: peft.init(model.spec, config, p, jax.random.key(1)), frozen)
    optimizer = optax.adamw(1e-4)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    ints = jax.ShapeDtypeStruct((1, 2, t), jnp.int32)
    batches = {"input_ids": ints, "segment_ids": ints, "positions": ints, "loss_mask": ints}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    mesh = _target(platform)
    with jax.sharding.use_abstract_mesh(mesh):
        assert attention_platform() == ("tpu" if platform == "tpu" else "gpu")
        exported = jax.export.export(make_train_step(model, optimizer), platforms=[platform],
                                     disabled_checks=TARGETS[platform][2])(trainable, opt_state, frozen, batches, rng)
    return exported.mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("window", [None, 96])
def test_train_step_lowers_with_fused_attention(platform, window):
    """The whole LoRA train step (scan over layers, full remat, bf16) lowers for the platform with its kernel: one
    forward, one dq and one dk/dv kernel (splash: its forward, dq and dkv kernels; flash: the three Triton kernels)
    in the layer scan; the recomputation under remat is the same forward kernel, deduplicated in the module."""
    text = _export_step(platform, _tiny(window), 256)
    marker = TARGETS[platform][1]
    assert text.count(marker) >= 3, text.count(marker)


@pytest.mark.parametrize("platform,attention", [("tpu", "splash"), ("cuda", "flash")])
def test_config_attention_reaches_the_train_step(platform, attention):
    """`model.attention: splash` (`flash`) with `compute_dtype: auto` in a run's config: the options the trainer
    builds (`ModelSection.options`) are bf16 on the target, and the whole LoRA train step through the model lowers
    for it with the named kernel in the layer scan."""
    section = ModelSection(attention=attention, remat="full")
    options = section.options(platform="tpu" if platform == "tpu" else "gpu")
    assert options.dtype == jnp.bfloat16 and options.attention == attention
    text = _export_step(platform, _tiny(96), 256, options)
    assert text.count(TARGETS[platform][1]) >= 3, text.count(TARGETS[platform][1])


def _packed_batch(t: int, vocab: int):
    """`[2, t]` ids and segment ids: row 0 two packed segments then right padding, row 1 left padding then one."""
    ids = jax.random.randint(jax.random.key(7), (2, t), 1, vocab)
    seg = jnp.array([[1] * 50 + [2] * 60 + [0] * (t - 110), [0] * 20 + [1] * (t - 20)], jnp.int32)
    return ids, seg


def test_cpu_model_defaults_to_xla_and_a_named_kernel_reaches_the_model():
    """On this CPU the trainer's default options are float32 with the blocked XLA attention (no Pallas kernel in
    the model's program); `attention: flash` puts the kernel in the model (Pallas interpret mode here) and its
    logits on packed and padded rows equal the XLA path's on every real token."""
    options = ModelSection().options()
    assert options.dtype == jnp.float32 and options.attention == "auto"
    config = _tiny(None)
    params = init_params(config, jax.random.key(0), jnp.float32)
    ids, seg = _packed_batch(128, config.vocab_size)

    def logits(attention):
        opts = ModelOptions(attention=attention, scan_layers=False)
        return jax.jit(lambda p, i, s: forward(config, p, i, segment_ids=s, options=opts))

    assert "pallas_call" not in str(jax.make_jaxpr(logits("auto"))(params, ids, seg))
    assert "pallas_call" in str(jax.make_jaxpr(logits("flash"))(params, ids, seg))
    want, got = logits("xla")(params, ids, seg), logits("flash")(params, ids, seg)
    real = (seg != 0)[:, :, None]
    err = float(jnp.max(jnp.where(real, jnp.abs(got - want), 0)) / jnp.max(jnp.abs(want)))
    assert err <= MODEL_TOL, err


def test_cpu_keeps_the_xla_path():
    """On this CPU (no abstract device) "auto" is the blocked XLA attention, and the exported CPU step has no
    Pallas kernel: the oracle path is unchanged."""
    assert attention_platform() == "cpu"
    assert choose_implementation("auto", 256, 64, None) == "xla"
    q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 256, 256), jnp.bool_)
    exported = jax.export.export(jax.jit(lambda q, k, v, m: blocked_causal_attention(q, k, v, m, 64)),
                                 platforms=["cpu"])(q, kv, kv, mask)
    assert "custom_call" not in exported.mlir_module()


@pytest.mark.parametrize("platform,expected", [("tpu", "splash"), ("cuda", "flash")])
def test_auto_choice_follows_the_target_and_the_shapes(platform, expected):
    """"auto" takes the kernel where the shapes fit it and the XLA path where not (length not a multiple of 128;
    on TPU a traced per-layer window; on GPU a head_dim that is not a power of two)."""
    traced = jnp.int32(96)  # made outside: jax 0.12 runs no eager op under an abstract-only mesh
    with jax.sharding.use_abstract_mesh(_target(platform)):
        assert choose_implementation("auto", 256, 64, 96) == expected
        assert choose_implementation("auto", 192, 64, None) == "xla"
        assert choose_implementation("auto", 256, 64, traced) == ("xla" if platform == "tpu" else "flash")
        assert choose_implementation("auto", 256, 80, None) == ("splash" if platform == "tpu" else "xla")
        assert choose_implementation("xla", 256, 64, None) == "xla"
