"""jaxft's Llama family against transformers' PyTorch models (fp32, eager attention), on tiny random configs.

Tolerance: max|diff| / max|ref| <= 1e-5 on the logits (float32 rounding; measured over every variant and model
seeds 0-2: at most 1.5e-6, a 6.7x margin).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.models import llama
from jaxft.models.llama import ModelOptions
from jaxft.ops.attention import attention_mask
from jaxft.ops.norms import rms_norm
from jaxft.ops.rope import rope_tables
from jaxft.ops.linear import Weight
from hf_models import VARIANTS, hf_tiny, rel_err
from optional_import import optional  # torch-free CI leg: tests/conftest.py

torch = optional("torch")

TOL = 1e-5


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    model = hf_tiny(request.param)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    config, params = jaxft.load_pretrained(str(d))
    return request.param, model, config, params


def test_logits_match_transformers(pair):
    _, model, config, params = pair
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 13))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    out = jax.jit(lambda p, i: jaxft.forward(config, p, i))(params, jnp.asarray(ids))
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert rel_err(out, ref) <= TOL


def test_right_padding_matches_unpadded(pair):
    """A right-padded row gives the same logits on its real tokens as the row alone in transformers."""
    _, model, config, params = pair
    ids = np.random.RandomState(1).randint(0, config.vocab_size, (1, 9))
    padded = np.concatenate([ids, np.zeros((1, 4), ids.dtype)], axis=1)
    seg = np.array([[1] * 9 + [0] * 4])
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    out = jaxft.forward(config, params, jnp.asarray(padded), segment_ids=jnp.asarray(seg))
    assert rel_err(out[:, :9], ref) <= TOL
    assert np.all(np.isfinite(np.asarray(out)))


def test_packed_batch_equals_separate_passes(pair):
    """Three examples packed in one row (segment ids, per-segment positions) equal three separate forwards."""
    _, model, config, params = pair
    rng = np.random.RandomState(2)
    lens = [5, 7, 3]
    examples = [rng.randint(0, config.vocab_size, n) for n in lens]
    row = np.concatenate(examples + [np.zeros(2, np.int64)])[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)] + [np.zeros(2, np.int64)])[None]
    pos = np.concatenate([np.arange(n) for n in lens] + [np.zeros(2, np.int64)])[None]
    packed = np.asarray(jaxft.forward(config, params, jnp.asarray(row), positions=jnp.asarray(pos),
                                      segment_ids=jnp.asarray(seg)))
    start = 0
    for ex in examples:
        with torch.no_grad():
            ref = model(torch.tensor(ex[None])).logits.numpy()
        assert rel_err(packed[:, start:start + len(ex)], ref) <= TOL
        start += len(ex)


def test_positions_default_to_segment_offsets(pair):
    """Without explicit positions, each segment restarts at 0 (same as passing them)."""
    _, _, config, params = pair
    ids = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (1, 8)))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]])
    pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0]])
    a = jaxft.forward(config, params, ids, segment_ids=seg)
    b = jaxft.forward(config, params, ids, segment_ids=seg, positions=pos)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scan_unrolled_and_remat_agree(pair):
    _, _, config, params = pair
    ids = jnp.asarray(np.random.RandomState(4).randint(0, config.vocab_size, (2, 6)))
    ref = jaxft.forward(config, params, ids)
    for opts in (ModelOptions(scan_layers=False), ModelOptions(remat="full"), ModelOptions(remat="dots")):
        out = jax.jit(lambda p, i: jaxft.forward(config, p, i, options=opts))(params, ids)
        assert rel_err(out, ref) <= 3e-6  # measured <= 8.4e-7 (variants x seeds 0-2): 3.6x
    assert remat_gradient_error(config, params) <= 1e-5  # measured <= 1.9e-6, variants x model seeds 0-4 (5.2x)


def remat_gradient_error(config, params, seed: int = 4) -> float:
    """Gradients through remat (unrolled) against gradients without it (scanned): the largest relative error over
    the parameter leaves."""
    ids = jnp.asarray(np.random.RandomState(seed).randint(0, config.vocab_size, (2, 6)))
    loss = lambda p, o: jnp.sum(jaxft.forward(config, p, ids, options=o)[..., :5] ** 2)
    g0 = jax.grad(loss)(params, ModelOptions())
    g1 = jax.grad(loss)(params, ModelOptions(remat="full", scan_layers=False))
    return max(rel_err(b, a) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))


def bf16_logits_error(config, params, seed: int = 5) -> float:
    """Logits with bf16 weights and compute against the float32 model's."""
    ids = jnp.asarray(np.random.RandomState(seed).randint(0, config.vocab_size, (2, 6)))
    ref = jaxft.forward(config, params, ids)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    out = jaxft.forward(config, p16, ids, options=ModelOptions(dtype=jnp.bfloat16))
    assert out.dtype == jnp.float32
    return rel_err(out, ref)


def test_bf16_compute_close_to_fp32(pair):
    _, _, config, params = pair
    err = bf16_logits_error(config, params)
    # bf16 has 8 bits of mantissa: measured up to 6.2e-2 over every variant and model seeds 0-2 (the former bound,
    # 5e-2, held only for seed 0; model seeds 0-4 with input seeds 5-9: 3.2e-2), so 2e-1 (3.2x); and above fp32
    # rounding, so bf16 is in effect. This end-to-end bound cannot see a 1% error (bf16 noise is as large):
    # test_bf16_blocks_match_transformers can.
    assert 1e-4 < err <= 2e-1


# bf16 per block (attention with its norm, MLP with its norm), against transformers in fp32 on the same
# bf16-rounded weights and inputs. Elementwise bf16 rounding is noise of ~1% per element, so a 1% scale error is
# invisible in a max or Frobenius error (and in the logits above); the fitted scale <out, ref> / <ref, ref> averages
# the noise out (B * T * D = 8192 entries) while a scale error moves it by its full size. Measured over every
# variant, model seeds 0-4 and both layers (scripts/measure_model_tolerances.py --only bf16): |scale - 1| <= 1.05e-3
# (bound 3.5e-3, 3.3x), Frobenius <= 8.2e-3 (bound 2.5e-2, 3.0x); a 1% scale on one layer's o_proj, v_proj, input
# norm, up_proj, down_proj or post-attention norm moves the scale by >= 7.8e-3 (bf16 rounds 1.01 x w to 1.008 x w
# or so), 2.2x the bound.
BF16_SCALE_TOL, BF16_FRO_TOL = 3.5e-3, 2.5e-2


def bf16_block_errors(model, config, params, seed: int = 0, bug=None) -> dict[str, tuple[float, float]]:
    """`{"attn L0": (|fitted scale - 1|, Frobenius relative error), ...}` for each layer's attention and MLP block
    (each behind its own RMSNorm) run by jaxft in bf16 against `model`'s fp32 modules. `model`'s weights must be
    bf16 values (the reference then sees the weights jaxft sees); inputs are random bf16. `bug(layer_params, l)`
    may alter jaxft's bf16 layer parameters (injected-bug checks)."""
    b, t, d = 4, 64, config.hidden_size
    rng = np.random.RandomState(100 + seed)
    x16 = jnp.asarray(rng.randn(b, t, d).astype(np.float32), jnp.bfloat16)
    x32 = torch.tensor(np.asarray(x16.astype(jnp.float32)))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    cos, sin = rope_tables(pos, config.head_dim, config.rope_theta, config.rope_scaling)
    inputs = llama.AttentionInputs(attention_mask(seg, seg, pos, jnp.arange(t)), None, seg, None, None)
    causal = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None].expand(b, 1, t, t)
    rope = model.model.rotary_emb(x32, torch.arange(t)[None].expand(b, t))

    @jax.jit
    def blocks(p):
        attn, _ = llama.attention_block(config, p["self_attn"], rms_norm(x16, p["input_layernorm"]["weight"],
                                                                         config.rms_norm_eps),
                                        cos, sin, inputs, llama.LayerInputs())
        mlp = llama.mlp_block(p["mlp"], rms_norm(x16, p["post_attention_layernorm"]["weight"], config.rms_norm_eps))
        return attn.astype(jnp.float32), mlp.astype(jnp.float32)

    def errors(ours, ref):
        ours, ref = np.asarray(ours, np.float64).ravel(), ref.detach().double().numpy().ravel()
        return abs(float(ours @ ref / (ref @ ref)) - 1), float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))

    out = {}
    for l, hf in enumerate(model.model.layers):
        p16 = jax.tree.map(lambda a: a[l].astype(jnp.bfloat16), params["model"]["layers"])
        if bug is not None:
            p16 = bug(p16)
        attn, mlp = blocks(p16)
        with torch.no_grad():
            ref_attn = hf.self_attn(hidden_states=hf.input_layernorm(x32), position_embeddings=rope,
                                    attention_mask=causal)[0]
            ref_mlp = hf.mlp(hf.post_attention_layernorm(x32))
        out[f"attn L{l}"], out[f"mlp L{l}"] = errors(attn, ref_attn), errors(mlp, ref_mlp)
    return out


def bf16_pair(variant: str, seed: int, tmp_dir: str):
    """A tiny transformers model whose weights are bf16 values (in fp32), and jaxft's load of it."""
    model = hf_tiny(variant, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(tmp_dir)
    return (model, *jaxft.load_pretrained(tmp_dir))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bf16_blocks_match_transformers(variant, tmp_path):
    model, config, params = bf16_pair(variant, 0, str(tmp_path))
    for block, (scale, fro) in bf16_block_errors(model, config, params).items():
        assert scale <= BF16_SCALE_TOL and fro <= BF16_FRO_TOL, (block, scale, fro)
        assert fro > 1e-4, block  # bf16 is in effect


def one_percent_on(path, factor=1.01):
    """An injected bug for `bf16_block_errors`: the layer's weight at `path` scaled by `factor`, rounded to bf16."""
    def bug(p):
        p = jax.tree.map(lambda a: a, p)
        node = p
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = (node[path[-1]].astype(jnp.float32) * factor).astype(jnp.bfloat16)
        return p
    return bug


BF16_BUGS = {"o_proj": ("self_attn", "o_proj", "kernel"), "v_proj": ("self_attn", "v_proj", "kernel"),
             "input_norm": ("input_layernorm", "weight"), "up_proj": ("mlp", "up_proj", "kernel"),
             "down_proj": ("mlp", "down_proj", "kernel"), "post_norm": ("post_attention_layernorm", "weight")}


@pytest.mark.parametrize("name", sorted(BF16_BUGS))
def test_bf16_blocks_catch_a_one_percent_scale(name, tmp_path):
    """The injected bug: one weight 1% too large in bf16 fails the bf16 block test."""
    model, config, params = bf16_pair("llama_gqa_tied", 0, str(tmp_path))
    block = "attn" if BF16_BUGS[name][0] != "mlp" and "post" not in name else "mlp"
    errors = bf16_block_errors(model, config, params, bug=one_percent_on(BF16_BUGS[name]))
    assert all(errors[f"{block} L{l}"][0] > BF16_SCALE_TOL for l in range(config.num_hidden_layers))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Scaled(Weight):
    """A minimal composite weight: base * s, computed as (x @ base) * s."""

    base: jax.Array
    s: jax.Array

    def apply(self, x, bias):
        y = jaxft.linear(x, self.base, None) * self.s.astype(x.dtype)
        return y if bias is None else y + bias

    def materialize(self):
        return self.base * self.s

    @property
    def shape(self):
        return self.base.shape


def test_composite_leaf_passes_through_scan_jit_and_grad(tmp_path):
    """A composite weight at a kernel leaf flows through the layer functions, lax.scan, jit and grad intact."""
    model = hf_tiny("llama_gqa_tied")
    model.save_pretrained(tmp_path)
    config, params = jaxft.load_pretrained(str(tmp_path))
    L = config.num_hidden_layers
    q = params["model"]["layers"]["self_attn"]["q_proj"]
    s = jnp.full((L, 1), 1.5)
    bound = jax.tree.map(lambda x: x, params)
    bound["model"]["layers"]["self_attn"]["q_proj"] = dict(q, kernel=_Scaled(q["kernel"], s))
    dense = jax.tree.map(lambda x: x, params)
    dense["model"]["layers"]["self_attn"]["q_proj"] = dict(q, kernel=q["kernel"] * s[:, None])
    ids = jnp.asarray(np.random.RandomState(6).randint(0, config.vocab_size, (2, 7)))
    out = jax.jit(lambda p: jaxft.forward(config, p, ids))(bound)
    assert rel_err(out, jaxft.forward(config, dense, ids)) <= 1e-6
    g = jax.grad(lambda s_: jnp.sum(jaxft.forward(config, _rebind(bound, s_), ids) ** 2))(s)
    g_ref = jax.grad(lambda s_: jnp.sum(jaxft.forward(config, _rebind_dense(params, s_), ids) ** 2))(s)
    assert g.shape == (L, 1) and rel_err(g, g_ref) <= 1e-5


def _rebind(bound, s):
    out = jax.tree.map(lambda x: x, bound, is_leaf=lambda x: isinstance(x, _Scaled))
    k = out["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    out["model"]["layers"]["self_attn"]["q_proj"] = dict(out["model"]["layers"]["self_attn"]["q_proj"],
                                                          kernel=_Scaled(k.base, s))
    return out


def _rebind_dense(params, s):
    out = jax.tree.map(lambda x: x, params)
    q = out["model"]["layers"]["self_attn"]["q_proj"]
    out["model"]["layers"]["self_attn"]["q_proj"] = dict(q, kernel=q["kernel"] * s[:, None])
    return out


def test_kv_cache_decoding_matches_full_forward(pair):
    """Prefill + token-by-token decoding with the cache (left padding) equals the full forward's logits."""
    _, _, config, params = pair
    assert kv_cache_error(config, params) <= 1e-5  # measured <= 1.3e-6, variants x model seeds 0-4 (7.8x)


def kv_cache_error(config, params, seed: int = 7) -> float:
    """Prefill of 6 tokens, then 4 single-token steps, against one full forward; row 0 left-padded by 3."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, config.vocab_size, (2, 10))
    ids[0, :3] = 0
    seg = np.ones((2, 10), np.int32)
    seg[0, :3] = 0
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0)
    full = np.asarray(jaxft.forward(config, params, jnp.asarray(ids), positions=jnp.asarray(pos),
                                    segment_ids=jnp.asarray(seg)))
    cache = jaxft.init_cache(config, 2, 16)
    logits, cache = jaxft.forward_cached(config, params, jnp.asarray(ids[:, :6]), cache,
                                         positions=jnp.asarray(pos[:, :6]), segment_ids=jnp.asarray(seg[:, :6]))
    outs = [np.asarray(logits)]
    for t in range(6, 10):
        logits, cache = jaxft.forward_cached(config, params, jnp.asarray(ids[:, t:t + 1]), cache,
                                             positions=jnp.asarray(pos[:, t:t + 1]),
                                             segment_ids=jnp.asarray(seg[:, t:t + 1]))
        outs.append(np.asarray(logits))
    stepped = np.concatenate(outs, axis=1)
    return max(rel_err(stepped[0, 3:], full[0, 3:]), rel_err(stepped[1], full[1]))
