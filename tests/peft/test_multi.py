"""Multi-adapter batches (`jaxft.peft.multi`): rows of one pass, each with its own LoRA adapter (or none), against the
real peft library per adapter (torch CPU fp32, tiny random Llama / Qwen2), and the stack's slot bookkeeping: adding
and removing adapters does not recompile.

Three adapters of different ranks (2, 4, 8, padded to 8), targets (q/v; all-linear; k/o/down on layer 1 only with a
rank_pattern), scalings (alpha/r, rsLoRA alpha/sqrt(r), alpha_pattern) share one batch with a base row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft

from hf_models import rel_err
from jaxft import peft as jpeft
from jaxft.errors import ConfigError
from jaxft.peft.multi import AdapterStack, bind_stack
from optional_import import optional  # torch-free CI leg: tests/conftest.py
from peft_ref import randomize, tiny_pair, torch_logits
from tiny_tree import CONFIG, PARAMS

peft = optional("peft")

# Logits relative to the largest entry. Measured over 3 seeds of model, adapters and tokens: at most 6.3e-6 against
# peft per row in the one-pass forward (Llama tied and Qwen2) and 5.1e-6 in the cached decode; 0 between a slot
# written, removed and rewritten. 2e-5 keeps 3.2x; a row given another adapter's id is off by > 100x TOL.
TOL = 2e-5

CONFIGS = {
    "qv": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_rs": lambda: peft.LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    "partial": lambda: peft.LoraConfig(r=2, lora_alpha=16, target_modules=["k_proj", "o_proj", "down_proj"],
                                       layers_to_transform=[1], rank_pattern={"down_proj": 4},
                                       alpha_pattern={"o_proj": 3}),
}
ROWS = ["qv", None, "all_rs", "partial", "qv", "all_rs"]  # one batch: every adapter, the base, repeats
SEEDS = (0, 1, 2)


def _tokens(seed: int, n: int, t: int = 9, vocab: int = 97) -> np.ndarray:
    return np.random.default_rng(100 + seed).integers(0, vocab, (n, t))


def _peft_models(variant: str, tmp_path, seed: int):
    """{name: (peft model, jaxft spec, jaxft adapter)} of random non-zero adapters, saved by peft, loaded by jaxft."""
    out = {}
    for i, (name, make) in enumerate(CONFIGS.items()):
        model, config, params = tiny_pair(variant, tmp_path, seed)
        pm = peft.get_peft_model(model, make())
        randomize(pm, seed=10 * seed + i)
        pm.eval()
        d = tmp_path / f"peft_{variant}_{seed}_{name}"
        pm.save_pretrained(str(d))
        spec, adapter = jpeft.load_adapter(str(d), config)
        out[name] = (pm, spec, adapter)
    return out, config, params


def _multi_forward(config):
    return jax.jit(lambda p, arrays, ids, t: jaxft.forward(config, bind_stack(p, arrays), t, adapter_ids=ids))


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2"])
def test_multi_adapter_batch_matches_peft_per_adapter(variant, tmp_path):
    models, config, params = _peft_models(variant, tmp_path, seed=0)
    stack = AdapterStack.from_adapters(params, [(n, s, a) for n, (_, s, a) in models.items()], capacity=4)
    assert stack.max_rank == 8 and stack.slots == ["qv", "all_rs", "partial", None]
    toks = _tokens(0, len(ROWS))
    got = np.asarray(_multi_forward(config)(params, stack.arrays, stack.ids(ROWS), jnp.asarray(toks, jnp.int32)))
    base, _, _ = tiny_pair(variant, tmp_path, 0)
    for i, name in enumerate(ROWS):
        want = torch_logits(base if name is None else models[name][0], toks[i:i + 1])[0]
        assert rel_err(got[i], want) <= TOL, (i, name)
    # the rows really differ by adapter: one row given another adapter's id is far off
    wrong = list(ROWS)
    wrong[0] = "all_rs"
    bad = np.asarray(_multi_forward(config)(params, stack.arrays, stack.ids(wrong), jnp.asarray(toks, jnp.int32)))
    assert rel_err(bad[0], torch_logits(models["qv"][0], toks[:1])[0]) > 100 * TOL


def test_multi_adapter_cached_decode_matches_peft(tmp_path):
    """Prefill 6 tokens per row into a KV cache, then decode 3 one at a time, rows on different adapters: each
    step's logits equal peft's on the whole sequence so far."""
    models, config, params = _peft_models("llama_gqa_tied", tmp_path, seed=1)
    stack = AdapterStack.from_adapters(params, [(n, s, a) for n, (_, s, a) in models.items()])
    toks = _tokens(1, len(ROWS))
    ids = jnp.asarray(stack.ids(ROWS))
    bound = bind_stack(params, stack.arrays)
    b = len(ROWS)
    cache = jaxft.init_cache(config, b, toks.shape[1])
    step = jax.jit(lambda p, t, c, pos: jaxft.forward_cached(config, p, t, c, positions=pos, adapter_ids=ids,
                                                             segment_ids=jnp.ones(t.shape, jnp.int32)))
    pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (b, 6))
    logits, cache = step(bound, jnp.asarray(toks[:, :6], jnp.int32), cache, pos)
    outs = [np.asarray(logits[:, -1])]
    for k in range(6, toks.shape[1]):
        logits, cache = step(bound, jnp.asarray(toks[:, k:k + 1], jnp.int32), cache,
                             jnp.full((b, 1), k, jnp.int32))
        outs.append(np.asarray(logits[:, -1]))
    base, _, _ = tiny_pair("llama_gqa_tied", tmp_path, 1)
    for i, name in enumerate(ROWS):
        want = torch_logits(base if name is None else models[name][0], toks[i:i + 1])[0]  # [T, V]
        for j, got in enumerate(outs):
            assert rel_err(got[i], want[5 + j]) <= TOL, (i, name, j)


# ---- torch-free: the stack against jaxft's own single-adapter LoRA (itself tested against peft) ----

SPECS = {
    "a": jpeft.LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
    "b": jpeft.LoraSpec(r=8, alpha=4, use_rslora=True, target_modules="all-linear"),
    "c": jpeft.LoraSpec(r=2, alpha=16, target_modules=("k_proj", "down_proj", "lm_head")),
}


def _adapters(seed: int = 0) -> dict:
    """Random non-zero adapters of SPECS' shapes (every entry is used: no layer filter, one rank per spec); made
    from the abstract init on the host, as eager `init` costs ~20 s here."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, s in SPECS.items():
        shapes = jax.eval_shape(lambda: jpeft.init(s, CONFIG, PARAMS, jax.random.key(0)))
        out[n] = jax.tree.map(lambda v: jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype), shapes)
    return out


_FORWARD = jax.jit(lambda p, t: jaxft.forward(CONFIG, p, t))


def _single(names, toks, adapters):
    out = []
    for i, n in enumerate(names):
        p = PARAMS if n is None else jpeft.bind(PARAMS, SPECS[n], adapters[n])
        out.append(np.asarray(_FORWARD(p, toks[i:i + 1]))[0])
    return np.stack(out)


def test_adding_and_removing_adapters_does_not_recompile():
    ads = _adapters()
    stack = AdapterStack.create(PARAMS, capacity=2, max_rank=8, targets=("self_attn.q_proj", "k_proj", "v_proj",
                                                                          "o_proj", "gate_proj", "up_proj",
                                                                          "down_proj", "lm_head"))
    f = _multi_forward(CONFIG)
    toks = jnp.asarray(_tokens(3, 4, vocab=CONFIG.vocab_size), jnp.int32)
    stack.add("a", SPECS["a"], ads["a"], PARAMS)
    stack.add("b", SPECS["b"], ads["b"], PARAMS)
    rows = ["a", "b", None, "a"]
    got = np.asarray(f(PARAMS, stack.arrays, stack.ids(rows), toks))
    assert rel_err(got, _single(rows, toks, ads)) <= TOL
    first_slot_of_a = stack.slot("a")
    stack.remove("a")
    stale = np.asarray(f(PARAMS, stack.arrays, np.full(4, first_slot_of_a, np.int32), toks))  # numpy, as ids()
    assert rel_err(stale, _single([None] * 4, toks, ads)) <= TOL  # a removed slot computes the base
    stack.add("c", SPECS["c"], ads["c"], PARAMS)  # another rank and other targets, into the freed slot
    assert stack.slot("c") == first_slot_of_a
    rows = ["c", "b", "c", None]
    got = np.asarray(f(PARAMS, stack.arrays, stack.ids(rows), toks))
    assert rel_err(got, _single(rows, toks, ads)) <= TOL
    assert f._cache_size() == 1  # one compilation for every mix, add and remove (ids always numpy int32)


def test_stack_refuses_what_it_cannot_hold():
    ads = _adapters()
    stack = AdapterStack.create(PARAMS, capacity=1, max_rank=4)
    with pytest.raises(ConfigError, match="rank 8 .* exceeds the stack's max rank 4; raise --max-lora-rank"):
        stack.add("b", SPECS["b"], ads["b"], PARAMS)
    with pytest.raises(ConfigError, match="targets lm_head, which this stack does not hold"):
        stack.add("c", SPECS["c"], ads["c"], PARAMS)
    assert stack.slots == [None]  # nothing written by a refused add
    stack.add("a", SPECS["a"], ads["a"], PARAMS)
    with pytest.raises(ConfigError, match="already loaded"):
        stack.add("a", SPECS["a"], ads["a"], PARAMS)
    with pytest.raises(ConfigError, match="all 1 slots are in use .*--max-loras"):
        stack.add("a2", SPECS["a"], ads["a"], PARAMS)
    with pytest.raises(ConfigError, match=r"adapter 'x' is not loaded \(loaded: a\)"):
        stack.ids(["a", "x"])
    dora = jpeft.DoraSpec(r=4, alpha=8, target_modules=("q_proj",))
    with pytest.raises(ConfigError, match="DoraSpec cannot share a multi-adapter batch"):
        AdapterStack.from_adapters(PARAMS, [("d", dora, jpeft.init(dora, CONFIG, PARAMS, jax.random.key(0)))])
    saved = jpeft.LoraSpec(r=4, target_modules=("q_proj",), modules_to_save=("lm_head",))
    with pytest.raises(ConfigError, match="modules_to_save"):
        AdapterStack.from_adapters(PARAMS, [("s", saved, {})])
    bound = bind_stack(PARAMS, stack.arrays)
    with pytest.raises(ValueError, match="pass adapter_ids"):
        jaxft.forward(CONFIG, bound, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="adapter_ids has 3 rows, the batch has 2"):
        jaxft.forward(CONFIG, bound, jnp.zeros((2, 3), jnp.int32), adapter_ids=jnp.zeros(3, jnp.int32))
