"""Rules, specs and the start-up check, in this process (one device; meshes are AbstractMeshes, which carry only
axis sizes): presets and tables map logical axes to the PartitionSpecs they say, every PEFT method's leaves get
axes from the method, and bad input is refused in one line before any compute. Also the pieces that must be free on
one device: the row constraint is a no-op without a mesh, the compact masks, the row-chunked loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from jaxft import parallel, peft
from jaxft.errors import ConfigError
from jaxft.models.config import LlamaConfig
from jaxft.models.params import abstract_params, logical_axes
from jaxft.ops.loss import causal_lm_loss
from jaxft.ops.sharding import batch_rows
from jaxft.peft.tree import compact_mask
from jaxft.train.config import parse_config
from jaxft.train.sharded import check_run

# SmolLM2-135M's shape (9 heads, 3 KV heads: the head check must be on counts, 9 * 64 = 576 is even)
SMOL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                   model_type="llama")
TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, model_type="llama")


def mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def section(**kw):
    rules = kw.pop("rules", "fsdp")
    return parallel.ParallelSection(mesh=parallel.MeshShape(**kw), rules=rules)


# ---- rules and specs ----

@pytest.mark.parametrize("preset, q, o, embed, norm", [
    ("fsdp", P(None, "fsdp"), P(None, None, "fsdp"), P(None, "fsdp"), P()),
    ("tensor", P(None, None, "tensor"), P(None, "tensor"), P("tensor"), P()),
    ("data", P(), P(), P(), P()),
    ("fsdp+tensor", P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp"), P("tensor", "fsdp"), P()),
])
def test_presets(preset, q, o, embed, norm):
    specs = parallel.partition_specs(logical_axes(SMOL), preset)
    layers = specs["model"]["layers"]
    assert layers["self_attn"]["q_proj"]["kernel"] == q
    assert layers["self_attn"]["o_proj"]["kernel"] == o
    assert specs["model"]["embed_tokens"]["weight"] == embed
    assert layers["input_layernorm"]["weight"] == norm
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(abstract_params(SMOL))


def test_table_rules_with_a_list_and_null():
    rules = {"embed": ["data", "fsdp"], "mlp": "tensor", "vocab": None}
    specs = parallel.partition_specs(logical_axes(SMOL), rules)
    assert specs["model"]["layers"]["mlp"]["up_proj"]["kernel"] == P(None, ("data", "fsdp"), "tensor")
    assert specs["model"]["embed_tokens"]["weight"] == P(None, ("data", "fsdp"))
    assert parallel.logical_to_spec(("layers", "lora_rank"), parallel.resolve_rules(rules)) == P()


@pytest.mark.parametrize("kind, fields, expect", [
    ("lora", {"r": 4, "target_modules": ["q_proj", "down_proj"]},
     {("model", "layers", "self_attn", "q_proj", "kernel", "lora_a"): ("layers", "embed", "lora_rank"),
      ("model", "layers", "self_attn", "q_proj", "kernel", "lora_b"): ("layers", "lora_rank", "q_heads"),
      ("model", "layers", "mlp", "down_proj", "kernel", "lora_b"): ("layers", "lora_rank", "embed")}),
    ("dora", {"r": 4, "target_modules": ["v_proj"]},
     {("model", "layers", "self_attn", "v_proj", "kernel", "magnitude"): ("layers", "kv_heads")}),
    ("ia3", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
     {("model", "layers", "self_attn", "k_proj", "kernel", "ia3_l"): ("layers", "kv_heads"),
      ("model", "layers", "mlp", "down_proj", "kernel", "ia3_l"): ("layers", "mlp")}),
    ("houlsby", {"bottleneck": 4, "target_modules": ["o_proj"]},
     {("model", "layers", "self_attn", "o_proj", "kernel", "down"): ("layers", "embed", "bottleneck")}),
    ("prefix", {"num_virtual_tokens": 3}, {("prefix_keys",): ("layers", "virtual_tokens", "kv_heads", "head_dim")}),
    ("prompt", {"num_virtual_tokens": 3}, {("prompt_embeddings",): ("virtual_tokens", "embed")}),
])
def test_adapter_axes_come_from_the_method(kind, fields, expect):
    """Every adapter leaf has logical axes, one per dimension, from the method (A: the kernel's input axis, B: its
    output axis); the shapes follow and the specs under fsdp+tensor exist for every leaf."""
    spec = peft.spec_from_dict(kind, fields)
    adapter = jax.eval_shape(lambda p: peft.init(spec, TINY, p, jax.random.key(0)), abstract_params(TINY))
    axes = peft.logical_axes(spec, TINY, adapter)
    for path, axes_leaf, shape in parallel.logical_axes_with_shapes(axes, adapter):
        assert axes_leaf is not None and len(axes_leaf) == len(shape), (path, axes_leaf, shape)
    flat = {tuple(str(k.key) for k in p): a for p, a in
            jax.tree_util.tree_flatten_with_path(axes, is_leaf=parallel.rules.is_axes)[0]}
    for path, want in expect.items():
        assert flat[path] == want
    parallel.partition_specs(axes, "fsdp+tensor")


# ---- bad input: one line, raised before compute ----

def test_two_dims_of_one_array_on_one_mesh_axis():
    with pytest.raises(ConfigError, match=r"'embed' and 'mlp' of model\.layers\.mlp\.down_proj\.kernel both map to "
                                          r"mesh axis 'fsdp'|'mlp' and 'embed' of model\.layers\.mlp"):
        parallel.partition_specs(logical_axes(SMOL), {"embed": "fsdp", "mlp": "fsdp"})


@pytest.mark.parametrize("raw, message", [
    ({"rules": "fsdpp"}, r"parallel\.rules: unknown preset 'fsdpp'.*did you mean 'fsdp'"),
    ({"rules": {"heads": "tensor"}}, r"parallel\.rules\.heads: unknown logical axis"),
    ({"rules": {"embed": "model"}}, r"parallel\.rules\.embed: 'model' is not a mesh axis"),
    ({"mesh": {"data": -1, "fsdp": -1}}, r"parallel\.mesh: only one axis may be -1"),
    ({"mesh": {"tensor": 0}}, r"parallel\.mesh\.tensor: must be a positive number"),
    ({"distributed": {"num_processes": 2, "process_id": 2}}, r"parallel\.distributed\.process_id"),
])
def test_bad_parallel_section(raw, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_config({"output_dir": "x", "data": {"train": ["t.jsonl"]}, "parallel": raw})
    assert "\n" not in str(e.value)


def test_mesh_product_must_equal_the_device_count():
    dev = jax.devices()[:1]
    with pytest.raises(ConfigError, match=r"parallel\.mesh: data=2, fsdp=1, tensor=1 has 2 devices, but there are 1"):
        parallel.make_mesh(section(data=2, fsdp=1), dev)
    with pytest.raises(ConfigError, match=r"no whole number for the -1 axis over 1 devices"):
        parallel.make_mesh(section(data=2, fsdp=-1), dev)
    m = parallel.make_mesh(None, dev)
    assert dict(m.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert all(t == AxisType.Auto for t in m.axis_types)


def test_mesh_shape_with_dcn():
    s = parallel.ParallelSection(mesh=parallel.MeshShape(data=1, fsdp=-1, tensor=2),
                                 dcn=parallel.DcnShape(data=2, fsdp=1, tensor=1))
    assert parallel.mesh_shape(s, 16, n_slices=2) == {"data": 2, "fsdp": 4, "tensor": 2}
    with pytest.raises(ConfigError, match=r"parallel\.dcn: data=2, fsdp=1, tensor=1 has 2 slices, but there are 4"):
        parallel.mesh_shape(s, 16, n_slices=4)


def test_heads_split_off_their_boundaries():
    """SmolLM2's 9 heads over tensor=2: the array dimension (576) divides, the heads do not."""
    with pytest.raises(ConfigError, match=r"q_heads on mesh axis tensor=2 would split the model's 9 attention heads "
                                          r"off their boundaries \(9 is not a multiple of 2\)"):
        parallel.check_mesh(SMOL, mesh(fsdp=4, tensor=2), "fsdp+tensor", 8)
    eight = SMOL.replace(num_attention_heads=8, num_key_value_heads=2, head_dim=72)
    with pytest.raises(ConfigError, match=r"kv_heads on mesh axis tensor=4 would split the model's 2 key/value "
                                          r"heads off their boundaries \(2 is not a multiple of 4\)"):
        parallel.check_mesh(eight, mesh(fsdp=2, tensor=4), "fsdp+tensor", 8)
    parallel.check_mesh(SMOL, mesh(fsdp=8, tensor=3), "fsdp+tensor", 8)  # 9 and 3 heads split 3 ways: fine


def test_dimension_not_divisible():
    with pytest.raises(ConfigError, match=r"parameter model\.embed_tokens\.weight has embed=576, which mesh axis "
                                          r"fsdp=5 does not divide"):
        parallel.check_mesh(SMOL, mesh(fsdp=5), "fsdp", 5)


def test_adapter_dimension_not_divisible():
    spec = peft.LoraSpec(r=3, target_modules=("q_proj",))
    s = section(fsdp=2, rules={"lora_rank": "fsdp"})
    with pytest.raises(ConfigError, match=r"adapter leaf model\.layers\.self_attn\.q_proj\.kernel\.lora_a has "
                                          r"lora_rank=3, which mesh axis fsdp=2 does not divide"):
        check_run(SMOL, spec, s, mesh(fsdp=2), 8)


def test_global_batch_must_divide_over_data_parallel_devices():
    with pytest.raises(ConfigError, match=r"train\.batch_size: 12 rows do not split over the 8 data-parallel devices "
                                          r"\(data=2 x fsdp=4\)"):
        parallel.check_mesh(SMOL, mesh(data=2, fsdp=4), "fsdp", 12)
    parallel.check_mesh(SMOL, mesh(data=2, fsdp=4, tensor=3), "fsdp+tensor", 16)


# ---- free on one device ----

def test_row_constraint_is_a_no_op_without_a_mesh():
    jaxpr = jax.make_jaxpr(lambda x: batch_rows(x) * 2)(jnp.ones((8, 4)))
    assert "sharding_constraint" not in str(jaxpr)


def test_compact_masks_equal_the_full_masks():
    """`mask_updates` reduces each mask leaf (True, False, or size 1 on axes where it is constant) and zeroes the
    same entries as the full-size mask."""
    spec = peft.LoraSpec(r=4, target_modules=("q_proj", "down_proj"), rank_pattern={"down_proj": 2},
                         layers_to_transform=(1,))
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract_params(TINY))
    adapter = peft.init(spec, TINY, params, jax.random.key(0))
    mask = peft.trainable_mask(spec, params, adapter)
    compact = jax.tree.map(compact_mask, mask)
    for full, small in zip(jax.tree.leaves(mask), jax.tree.leaves(compact)):
        np.testing.assert_array_equal(np.broadcast_to(small, np.shape(full)), full)
        assert np.size(small) < np.size(full)
    updates = jax.tree.map(lambda x: jnp.ones_like(x), adapter)
    got, _ = peft.mask_updates(mask).update(updates, optax.EmptyState())
    for g, m in zip(jax.tree.leaves(got), jax.tree.leaves(mask)):
        np.testing.assert_array_equal(np.asarray(g), np.where(m, 1.0, 0.0))
    assert compact_mask(np.broadcast_to(np.True_, (1000, 1000))) is True


@pytest.mark.parametrize("chunk_size", [1, 7, 20, 4096])
@pytest.mark.parametrize("transposed", [False, True])
def test_row_chunked_loss_equals_full_logits(chunk_size, transposed):
    """Chunks along each row's sequence (padding T when the chunk does not divide it) give the loss and the
    gradients of full logits: fp32, max relative error measured 2e-7 (loss), 4e-7 (gradients); bound 2e-6."""
    b, t, d, v = 3, 10, 8, 33
    k = jax.random.split(jax.random.key(chunk_size), 4)
    h = jax.random.normal(k[0], (b, t, d))
    w = jax.random.normal(k[1], (v, d) if transposed else (d, v)) * 0.3
    ids = jax.random.randint(k[2], (b, t), 0, v)
    mask = jax.random.uniform(k[3], (b, t)) < 0.8
    seg = jnp.ones((b, t), jnp.int32).at[0, 7:].set(0)

    def chunked(h, w):
        ls, n = causal_lm_loss(h, w, ids, mask, seg, chunk_size=chunk_size, transposed=transposed)
        return ls

    def full(h, w):
        logits = h @ (w.T if transposed else w)
        lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        keep = mask[:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
        return jnp.sum(nll * keep)

    (l1, g1), (l2, g2) = (jax.value_and_grad(f, argnums=(0, 1))(h, w) for f in (chunked, full))
    assert float(l1) == pytest.approx(float(l2), rel=2e-6)
    for a, b_ in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=2e-6, atol=2e-6 * float(jnp.max(jnp.abs(b_))))
