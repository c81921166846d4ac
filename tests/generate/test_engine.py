"""The slot-level engine on a tiny random model (no torch): rows prefilled at different times, of different lengths,
continued from their cache, mixed greedy and sampled, with stop conditions, logprobs, every weight type (LoRA, DoRA,
IA3, merged, NF4, LoRA on NF4), and bad input; each with the layers stacked and held per layer. The reference is
`jaxft.forward` run naively (the full sequence every step, no cache), itself tested against transformers
(tests/models). Greedy tokens must be identical."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import peft
from jaxft.errors import ConfigError
from jaxft.generate import Engine, SamplingParams
from jaxft.quant import nf4

# hidden and intermediate multiples of 64 so that NF4 can quantise every kernel
CONFIG = jaxft.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           tie_word_embeddings=True, initializer_range=0.2)
PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4, 6, 11, 60, 33], [13]]


@pytest.fixture(params=["stacked", "per_layer"])
def layers(request):
    """Every test runs the layer stack both ways: a scan over stacked weights and cache, and unrolled over one
    buffer per layer (`Engine(layers=...)`)."""
    return request.param


@pytest.fixture(scope="module")
def params():
    p = jaxft.init_params(CONFIG, jax.random.key(0))
    # random norms so every parameter matters
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.1 * jax.random.normal(jax.random.key(len(path)), a.shape)
        if "norm" in jax.tree_util.keystr(path) else a, p)


WIDTH = 32  # the naive reference runs every sequence right-padded to this width: one compilation per tree


def _forward(params):
    """`fwd(seq)` -> logits `[len(seq), V]` of one full forward pass over the sequence (no cache)."""
    f = jax.jit(lambda ids, seg: jaxft.forward(CONFIG, params, ids, segment_ids=seg))

    def fwd(seq):
        ids, seg = np.zeros((1, WIDTH), np.int32), np.zeros((1, WIDTH), np.int32)
        ids[0, :len(seq)], seg[0, :len(seq)] = seq, 1
        return np.asarray(f(jnp.asarray(ids), jnp.asarray(seg)))[0, :len(seq)]
    return fwd


def naive(fwd, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(fwd(seq)[-1])))
    return seq[len(prompt):]


def drain(engine, events, n=4):
    out = {e.slot: list(e.tokens) for e in events}
    finish = {e.slot: e.finish for e in events}
    while engine.active_slots():
        for e in engine.step(n):
            out.setdefault(e.slot, []).extend(e.tokens)
            finish[e.slot] = e.finish
    return out, finish


def test_rows_added_at_different_times_equal_naive(params, layers):
    fwd = _forward(params)
    eng = Engine(CONFIG, params, slots=3, max_len=32, layers=layers)
    a = eng.add(PROMPTS[0], max_new_tokens=3)
    got = {a.slot: list(a.tokens)}
    got[a.slot] += [t for e in eng.step(1) for t in e.tokens]                  # row A one step ahead
    b = eng.add(PROMPTS[1], max_new_tokens=8)                                  # B joins mid-flight
    got[b.slot] = list(b.tokens)
    for e in eng.step(4):                                                       # A finishes inside this call
        got[e.slot] += e.tokens
    assert a.slot not in eng.active_slots() and b.slot in eng.active_slots()
    eng.free(a.slot)
    c = eng.add(PROMPTS[2], max_new_tokens=6, slot=a.slot)                     # C reuses A's slot
    rest, _ = drain(eng, [c])
    got[b.slot] += rest[b.slot]
    assert got[a.slot] == naive(fwd, PROMPTS[0], 3)
    assert got[b.slot] == naive(fwd, PROMPTS[1], 8)
    assert rest[c.slot] == naive(fwd, PROMPTS[2], 6)


def test_continuation_reuses_the_cache(params, layers):
    """A slot asked to continue its own history computes only the new tokens and gives the tokens a fresh
    prefill of the whole sequence gives."""
    fwd = _forward(params)
    eng = Engine(CONFIG, params, slots=3, max_len=32, layers=layers)
    first, _ = drain(eng, [eng.add(PROMPTS[1], max_new_tokens=5, slot=1)])
    follow = PROMPTS[1] + first[1] + [21, 22, 23]
    assert eng.shared_prefix(1, follow) == len(PROMPTS[1]) + 5 - 1  # all but the last token, never fed back
    second, _ = drain(eng, [eng.add(follow, max_new_tokens=6, slot=1)])
    assert second[1] == naive(fwd, follow, 6)
    # a prompt that departs from the history early rewinds the slot to the common part
    other = PROMPTS[1][:4] + [50, 51]
    assert eng.shared_prefix(1, other) == 4
    third, _ = drain(eng, [eng.add(other, max_new_tokens=4, slot=1)])
    assert third[1] == naive(fwd, other, 4)


def test_logprobs_equal_the_full_forward(params, layers):
    """Each emitted token's logprob and the top 3 against log_softmax of the naive forward at that position.
    Tolerance 1e-5 absolute (logprobs of order 1-5); measured 9.5e-7 (10x)."""
    fwd = _forward(params)
    eng = Engine(CONFIG, params, slots=3, max_len=32, layers=layers, num_logprobs=3)
    evs = eng.add_many(PROMPTS[:2], max_new_tokens=[5, 5])
    out = {e.slot: [e] for e in evs}
    while eng.active_slots():
        for e in eng.step(4):
            out[e.slot].append(e)
    for e0, prompt in zip(evs, PROMPTS[:2]):
        toks = [t for e in out[e0.slot] for t in e.tokens]
        lps = [x for e in out[e0.slot] for x in e.logprobs]
        tops = [x for e in out[e0.slot] for x in e.top_logprobs]
        ref = np.asarray(jax.nn.log_softmax(fwd(prompt + toks), axis=-1))
        for i, (t, lp, top) in enumerate(zip(toks, lps, tops)):
            row = ref[len(prompt) - 1 + i]
            assert abs(lp - row[t]) <= 1e-5
            assert [j for j, _ in top] == list(np.argsort(-row)[:3])
            assert np.allclose([p for _, p in top], np.sort(row)[::-1][:3], atol=1e-5)


def test_eos_stop_token_sequences_and_length(params, layers):
    eng = Engine(CONFIG, params, slots=3, max_len=32, layers=layers)
    ref = drain(eng, [eng.add(PROMPTS[1], max_new_tokens=12, slot=0)])[0][0]
    _, fin = drain(eng, [eng.add(PROMPTS[0], max_new_tokens=2, slot=0)])
    assert fin[0] == "length"
    eos = ref[3]
    cut = ref.index(eos) + 1
    eng = Engine(CONFIG, params, slots=3, max_len=32, layers=layers, eos_token_ids=[eos])
    out, fin = drain(eng, [eng.add(PROMPTS[1], max_new_tokens=12)])
    assert out[0] == ref[:cut] and fin[0] == "stop"
    seq = ref[5:7]
    end = next(i + 2 for i in range(len(ref) - 1) if ref[i:i + 2] == seq)
    eng = Engine(CONFIG, params, slots=3, max_len=32, layers=layers)
    out, fin = drain(eng, [eng.add(PROMPTS[1], max_new_tokens=12, stop_token_ids=[[96, 95, 94], seq])])
    assert out[0] == ref[:end] and fin[0] == "stop"


def test_mixed_sampling_rows_are_independent(params, layers):
    """A greedy row beside sampled rows decodes as it does alone; a sampled row with a seed draws the same tokens
    alone, beside others, or in another slot."""
    fwd = _forward(params)
    hot = SamplingParams(temperature=1.5, top_k=20, top_p=0.95, min_p=0.01, seed=7)
    eng = Engine(CONFIG, params, slots=3, max_len=32, layers=layers)
    evs = eng.add_many([PROMPTS[0], PROMPTS[1], PROMPTS[1]], [hot, SamplingParams(), SamplingParams(temperature=2.0)],
                       max_new_tokens=[8, 8, 8])
    out, _ = drain(eng, evs)
    assert out[evs[1].slot] == naive(fwd, PROMPTS[1], 8)
    alone = Engine(CONFIG, params, slots=3, max_len=32, layers=layers)
    again, _ = drain(alone, [alone.add(PROMPTS[0], hot, max_new_tokens=8, slot=2)])
    assert again[2] == out[evs[0].slot]
    assert out[evs[0].slot] != naive(fwd, PROMPTS[0], 8)  # the sampler does sample


def _with_random(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _quantized(params):
    """Every layer kernel as NF4 (embeddings and norms stay dense)."""
    def q(path, a):
        return nf4.quantize(a) if jax.tree_util.keystr(path).endswith("['kernel']") and a.ndim == 3 else a
    return jax.tree_util.tree_map_with_path(q, params)


# LoRA in the default run; the other kinds are slow-marked (10-30 s each, mostly compilation; NF4's kernels run
# in Pallas interpret mode on CPU).
@pytest.mark.parametrize("kind", ["lora"] + [pytest.param(k, marks=pytest.mark.slow) for k in (
    "lora_on_nf4", "dora", "ia3", "merged_lora", "nf4")])
def test_weight_types_decode_as_their_forward(params, kind, layers):
    base = _quantized(params) if "nf4" in kind else params
    if kind == "nf4":
        tree = base
    else:
        spec = {"lora": peft.LoraSpec(r=4, alpha=8, target_modules="all-linear"),
                "merged_lora": peft.LoraSpec(r=4, alpha=8, target_modules="all-linear"),
                "lora_on_nf4": peft.LoraSpec(r=4, alpha=8, target_modules="all-linear"),
                "dora": peft.DoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                "ia3": peft.IA3Spec(target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"])}[kind]
        adapter = _with_random(peft.init(spec, CONFIG, base, jax.random.key(1)), 2)
        tree = peft.merge(base, spec, adapter) if kind == "merged_lora" else peft.bind(base, spec, adapter)
    fwd = _forward(tree)
    eng = Engine(CONFIG, tree, slots=3, max_len=32, layers=layers)
    out, _ = drain(eng, eng.add_many(PROMPTS[:2], max_new_tokens=[6, 6]))
    assert [out[0], out[1]] == [naive(fwd, p, 6) for p in PROMPTS[:2]]
    assert [out[0], out[1]] != [naive(_forward(params), p, 6) for p in PROMPTS[:2]]  # the weights matter


def test_bad_requests_raise_and_leave_the_others_running(params, layers):
    fwd = _forward(params)
    eng = Engine(CONFIG, params, slots=3, max_len=32, layers=layers)
    good = eng.add(PROMPTS[1], max_new_tokens=4)
    bad = [dict(prompt=[], max_new_tokens=2), dict(prompt=[1] * 26, max_new_tokens=8),
           dict(prompt=[1], max_new_tokens=0), dict(prompt=[1], max_new_tokens=2, stop_token_ids=[[]]),
           dict(prompt=[1], max_new_tokens=2, slot=good.slot), dict(prompt=[1], max_new_tokens=2, slot=5)]
    messages = []
    for kw in bad:
        with pytest.raises(ConfigError) as e:
            eng.add(kw.pop("prompt"), **kw)
        messages.append(str(e.value))
    assert "empty" in messages[0] and "max_len=32" in messages[1] and "still generating" in messages[4]
    for kw in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(min_p=1.5)):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            SamplingParams(**kw)
    eng.add_many([[2], [4]], max_new_tokens=[2, 2])
    with pytest.raises(ConfigError, match="free slots"):
        eng.add([3], max_new_tokens=2)
    out, _ = drain(eng, [good])
    assert out[good.slot] == naive(fwd, PROMPTS[1], 4)


def test_unstack_layers_aliases_the_stacked_buffers(params):
    """On CPU each layer's arrays are views of the stacked buffers (no copy) where a layer's slice starts on a
    64-byte boundary (XLA:CPU's alignment; others, like NF4's per-layer offset scalars, are copied), equal to the
    slices; bound adapters and NF4 fields unstack like plain kernels."""
    from jaxft.models.params import unstack_layers

    spec = peft.LoraSpec(r=4, alpha=8, target_modules="all-linear")
    tree = peft.bind(_quantized(params), spec, _with_random(peft.init(spec, CONFIG, params, jax.random.key(1)), 2))
    per = unstack_layers(tree)
    assert unstack_layers(per) is per and len(per["model"]["layers"]) == CONFIG.num_hidden_layers
    stacked = jax.tree.leaves(tree["model"]["layers"])
    aliased = total = 0
    for i, layer in enumerate(per["model"]["layers"]):
        for a, b in zip(stacked, jax.tree.leaves(layer)):
            np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))
            total += b.nbytes
            if b.nbytes % 64 == 0:
                assert b.unsafe_buffer_pointer() == a.unsafe_buffer_pointer() + i * b.nbytes
                aliased += b.nbytes
    assert aliased > 0.99 * total, (aliased, total)


@pytest.mark.parametrize("case", ["prefix", "window", "mixed_windows"])
def test_per_layer_equals_stacked_for_prefix_tuning_and_windows(params, case):
    """Held per layer, the per-layer inputs (prefix tuning's keys, each layer's window) reach the right layer: the
    same greedy tokens and logprobs (to fp32 rounding) as the scan over stacked layers."""
    import dataclasses

    config, extra = CONFIG, {}
    if case == "prefix":
        shape = (CONFIG.num_hidden_layers, 3, CONFIG.num_key_value_heads, CONFIG.head_dim)
        extra["prefix"] = (jax.random.normal(jax.random.key(7), shape), jax.random.normal(jax.random.key(8), shape))
    else:
        kinds = ("sliding_attention", "full_attention") if case == "mixed_windows" else None
        config = dataclasses.replace(CONFIG, sliding_window=4, layer_types=kinds)
    out = {}
    for layers in ("stacked", "per_layer"):
        eng = Engine(config, params, slots=3, max_len=32, layers=layers, num_logprobs=0, **extra)
        events = eng.add_many(PROMPTS, max_new_tokens=[8, 8, 8])
        toks, lps = {e.slot: list(e.tokens) for e in events}, {e.slot: list(e.logprobs) for e in events}
        while eng.active_slots():
            for e in eng.step(4):
                toks[e.slot] += e.tokens
                lps[e.slot] += e.logprobs
        out[layers] = (toks, lps)
    assert out["per_layer"][0] == out["stacked"][0]
    for s in out["stacked"][1]:
        # logprobs apart by at most 1.4e-6 (measured, the three cases); bound 1e-5
        np.testing.assert_allclose(out["per_layer"][1][s], out["stacked"][1][s], atol=1e-5)
