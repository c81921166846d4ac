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
from jaxft.models.llama import ModelOptions
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
    # gradients through remat equal gradients without it
    loss = lambda p, o: jnp.sum(jaxft.forward(config, p, ids, options=o)[..., :5] ** 2)
    g0 = jax.grad(loss)(params, ModelOptions())
    g1 = jax.grad(loss)(params, ModelOptions(remat="full", scan_layers=False))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert rel_err(b, a) <= 1e-5


def test_bf16_compute_close_to_fp32(pair):
    _, _, config, params = pair
    ids = jnp.asarray(np.random.RandomState(5).randint(0, config.vocab_size, (2, 6)))
    ref = jaxft.forward(config, params, ids)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    out = jaxft.forward(config, p16, ids, options=ModelOptions(dtype=jnp.bfloat16))
    assert out.dtype == jnp.float32
    # bf16 has 8 bits of mantissa: measured up to 6.2e-2 over every variant and model seeds 0-2 (the former bound,
    # 5e-2, held only for seed 0), so 2e-1 (3.2x); and above fp32 rounding, so bf16 is in effect.
    assert 1e-4 < rel_err(out, ref) <= 2e-1


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
    rng = np.random.RandomState(7)
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
    assert rel_err(stepped[0, 3:], full[0, 3:]) <= 1e-5
    assert rel_err(stepped[1], full[1]) <= 1e-5
