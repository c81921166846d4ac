"""A slot-level generation engine: prefill a request into a free slot, decode every active slot, free a slot.

    engine = Engine(config, params, slots=8, max_len=1024, eos_token_ids=[tok.eos_token_id])
    first = engine.add(prompt_ids, SamplingParams(temperature=0.7, top_p=0.9), max_new_tokens=64)  # an Event
    while engine.active_slots():
        for event in engine.step(8):        # up to 8 tokens per active slot, one device call
            print(event.slot, event.tokens, event.finish)
    engine.free(first.slot)                 # the slot may now take another request

The device state (`Slots`) is one pytree: the KV cache `[L, B, K, S, hd]` (or one buffer per layer) with a write
index per row, each row's
last token, sampling parameters, PRNG key, token budget, stop token sequences and finish reason. `add` (prefill)
and `step` (decode) are jitted functions that take it donated and return it updated, so the cache is allocated
once and written in place across requests and chat turns. Rows are independent: each has its own length (prompts
are padded on the right, never aligned), its own sampling parameters (one batch mixes greedy and sampled
requests) and its own key; a row that finishes stops writing while the others go on, and its slot takes a new
request without touching them. Decode attends only to the filled part of the cache, in blocks
(`jaxft.ops.cache_attention`).

A slot keeps the tokens it holds (`history`) after it finishes, until it is freed or reused: `add(..., slot=s)`
to a slot whose history starts like the new prompt prefills only the rest (the chat helper passes the whole
conversation each turn and pays only for the new messages). Stop strings need the tokenizer and are checked on
the host by the caller (`jaxft.generate.StopScanner`); EOS ids and stop token sequences are checked on the device
inside the decode loop.

Prompt tuning (`virtual_tokens[P, D]`) and prefix tuning (`prefix=(k, v)`, `[L, P, K, hd]` each) are inputs of
the engine, like `jaxft.peft.generation_inputs` gives them; LoRA, DoRA, IA3 and NF4 are leaves of `params` and
need nothing. `Engine.params` may be replaced between calls (same tree structure and shapes: no recompilation).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import ConfigError
from jaxft.generate.sampling import GREEDY, SamplingParams, sample
from jaxft.models.config import LlamaConfig
from jaxft.models.llama import KVCache, ModelOptions, embed, forward_cached, init_cache
from jaxft.models.params import unstack_layers

# Finish codes on the device and their names on the host (OpenAI's `finish_reason`: EOS and stop sequences are
# "stop", the token budget or the cache's end "length").
RUNNING, EOS, STOP_TOKENS, LENGTH = 0, 1, 2, 3
FINISH_NAMES = {EOS: "stop", STOP_TOKENS: "stop", LENGTH: "length"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """The engine's device state, `B` rows (slots).

    cache: the KV cache; `cache.index[b]` is row b's filled length. tokens[B]: each row's last emitted token, not
    yet in the cache (the next decode step feeds it). active[B]: still generating. keys[B]: PRNG keys.
    temperature, top_p, min_p[B] (float32), top_k[B] (int32): sampling parameters. remaining[B]: tokens the row may
    still emit. stop_seqs[B, N, M]: stop token sequences, right-aligned, -1 padded. recent[B, M]: the last M
    emitted tokens (-2 before any). finish[B]: RUNNING, EOS, STOP_TOKENS or LENGTH. adapter_ids[B]: each row's
    adapter in a multi-adapter stack, None without one (passed to the model as `adapter_ids`).
    """

    cache: KVCache
    tokens: jax.Array
    active: jax.Array
    keys: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    remaining: jax.Array
    stop_seqs: jax.Array
    recent: jax.Array
    finish: jax.Array
    adapter_ids: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    """What one slot produced in one `add` or `step` call.

    tokens: the new token ids. logprobs: each token's log-probability under the model (the raw logits' softmax,
    before temperature and filters, as vLLM reports it) when the engine's `num_logprobs >= 0`, else None.
    top_logprobs: per token, the `num_logprobs` most likely `(token id, logprob)` pairs when `num_logprobs > 0`. finish: None while the slot goes on, else "stop"
    (EOS or a stop token sequence) or "length" (the token budget or the cache's end).
    """

    slot: int
    tokens: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish: str | None = None


@dataclasses.dataclass
class Counters:
    """What an engine has computed, counted on the host. prefill_calls: prefill passes (one per `add` /
    `add_many`); prefill_rows: requests prefilled; prefill_tokens: prompt tokens run through the model (the part
    of a prompt a slot already held is not counted: it is not computed); decode_calls: `step` calls."""

    prefill_calls: int = 0
    prefill_rows: int = 0
    prefill_tokens: int = 0
    decode_calls: int = 0


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the compiled functions specialise on."""

    config: LlamaConfig
    options: ModelOptions
    num_logprobs: int            # -1: none; 0: the chosen token's; k > 0: also the top k
    n_virtual: int               # prompt tuning's virtual tokens (0 without)
    n_prefix: int                # prefix tuning's positions (0 without)


def _model_kwargs(st: _Static, extras: dict, rows: int, adapter_ids) -> dict:
    kw = {}
    if st.n_prefix:
        kw["prefix_kv"] = tuple(jnp.broadcast_to(a[:, None], (a.shape[0], rows, *a.shape[1:])).astype(st.options.dtype)
                                for a in extras["prefix"])
    if adapter_ids is not None:
        kw["adapter_ids"] = adapter_ids
    return kw


def _choose(st: _Static, logits, keys, temperature, top_k, top_p, min_p, recent, stop_seqs, remaining, eos, live):
    """Pick each row's next token from `logits[B, V]` and update what decides when it stops. Rows with `live` False
    are left as they were. Returns (token, keys, recent, remaining, finish, logprob info)."""
    split = jax.vmap(jax.random.split)(keys)
    keys_next, sub = split[:, 0], split[:, 1]
    tok = sample(logits, sub, temperature, top_k, top_p, min_p)
    recent_next = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
    seq_used = stop_seqs != -1
    hit = jnp.any(jnp.all(~seq_used | (stop_seqs == recent_next[:, None, :]), axis=-1) & jnp.any(seq_used, axis=-1),
                  axis=-1)
    remaining_next = remaining - 1
    finish = jnp.where(jnp.isin(tok, eos), EOS, jnp.where(hit, STOP_TOKENS,
                                                          jnp.where(remaining_next <= 0, LENGTH, RUNNING)))
    info = ()
    if st.num_logprobs >= 0:
        logp = jax.nn.log_softmax(logits, axis=-1)
        info = (jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0],)
        if st.num_logprobs > 0:
            top_lp, top_ids = jax.lax.top_k(logp, st.num_logprobs)
            info += (top_ids.astype(jnp.int32), top_lp)
    keep = lambda new, old: jnp.where(live.reshape(live.shape + (1,) * (new.ndim - 1)), new, old)
    return (tok, jax.random.wrap_key_data(keep(jax.random.key_data(keys_next), jax.random.key_data(keys))),
            keep(recent_next, recent), keep(remaining_next, remaining), jnp.where(live, finish, RUNNING), info)


def _rows_of(kv, rows):
    """Rows `rows` of a cache's keys or values: `[L, B, ...]` stacked, or a tuple of per-layer `[1, B, ...]`."""
    if isinstance(kv, tuple):
        return tuple(x.at[:, rows].get(mode="clip") for x in kv)
    return kv.at[:, rows].get(mode="clip")


def _set_rows(kv, rows, part):
    """`kv` (as in `_rows_of`) with rows `rows` set to `part` (rows past the end dropped)."""
    if isinstance(kv, tuple):
        return tuple(x.at[:, rows].set(y, mode="drop") for x, y in zip(kv, part))
    return kv.at[:, rows].set(part, mode="drop")


@functools.partial(jax.jit, static_argnames=("st",), donate_argnames=("slots",))
def _prefill(st: _Static, params, extras: dict, slots: Slots, rows, ids, lengths, start, seeds, temperature, top_k,
             top_p, min_p, remaining, stop_seqs, adapter_ids, eos):
    """Write `ids[k, T]` (right-padded to `lengths[k]`) into rows `rows[k]` of the cache from slot `start[k]` and
    choose each row's first token. Rows `>= B` are padding (dropped)."""
    c = slots.cache
    k, t = ids.shape
    sub = KVCache(_rows_of(c.k, rows), _rows_of(c.v, rows), c.segment_ids.at[rows].get(mode="clip"), start)
    segment_ids = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = start[:, None] + jnp.arange(t)[None, :] + st.n_prefix
    x = embed(st.config, params, ids, st.options.dtype)
    if st.n_virtual:  # rows starting at slot 0 carry the virtual tokens in their first P slots
        virtual = jnp.zeros((t, x.shape[-1]), x.dtype).at[:st.n_virtual].set(extras["virtual"].astype(x.dtype))
        fresh = (start == 0)[:, None, None] & (jnp.arange(t) < st.n_virtual)[None, :, None]
        x = jnp.where(fresh, virtual[None], x)
    logits, sub = forward_cached(st.config, params, ids, sub, positions=positions, segment_ids=segment_ids,
                                 options=st.options, embeds=x, logits_at=lengths - 1,
                                 **_model_kwargs(st, extras, k, adapter_ids))
    last = logits[:, 0]
    keys = jax.vmap(jax.random.key)(seeds)
    recent = jnp.full((k, slots.recent.shape[1]), -2, jnp.int32)
    live = jnp.ones((k,), bool)
    tok, keys, recent, remaining, finish, info = _choose(st, last, keys, temperature, top_k, top_p, min_p, recent,
                                                         stop_seqs, remaining, eos, live)
    put = lambda full, part: full.at[rows].set(part, mode="drop")
    cache = KVCache(_set_rows(c.k, rows, sub.k), _set_rows(c.v, rows, sub.v), put(c.segment_ids, sub.segment_ids),
                    put(c.index, sub.index))
    slots = Slots(cache, put(slots.tokens, tok), put(slots.active, finish == RUNNING),
                  jax.random.wrap_key_data(put(jax.random.key_data(slots.keys), jax.random.key_data(keys))),
                  put(slots.temperature, temperature), put(slots.top_k, top_k), put(slots.top_p, top_p),
                  put(slots.min_p, min_p), put(slots.remaining, remaining), put(slots.stop_seqs, stop_seqs),
                  put(slots.recent, recent), put(slots.finish, finish),
                  None if slots.adapter_ids is None else put(slots.adapter_ids, adapter_ids))
    return slots, tok, finish, info


@functools.partial(jax.jit, static_argnames=("st", "n_steps"), donate_argnames=("slots",))
def _decode(st: _Static, params, extras: dict, slots: Slots, eos, n_steps: int):
    """Up to `n_steps` decode steps of every active row, stopping early when none is left. Returns the state,
    `tokens[B, n_steps]` (-1 where a row emitted nothing) and the logprob outputs of the steps."""
    b = slots.tokens.shape[0]
    s = slots.cache.segment_ids.shape[1]
    kw = _model_kwargs(st, extras, b, slots.adapter_ids)
    out = jnp.full((b, n_steps), -1, jnp.int32)
    info = ()
    if st.num_logprobs >= 0:
        info = (jnp.zeros((b, n_steps), jnp.float32),)
        if st.num_logprobs > 0:
            info += (jnp.zeros((b, n_steps, st.num_logprobs), jnp.int32),
                     jnp.zeros((b, n_steps, st.num_logprobs), jnp.float32))

    def cond(carry):
        i, slots, _, _ = carry
        return (i < n_steps) & jnp.any(slots.active)

    def body(carry):
        i, sl, out, info = carry
        live = sl.active
        c = sl.cache
        logits, cache = forward_cached(st.config, params, sl.tokens[:, None], c,
                                       positions=(c.index + st.n_prefix)[:, None],
                                       segment_ids=live.astype(jnp.int32)[:, None], options=st.options, **kw)
        tok, keys, recent, remaining, finish, new_info = _choose(
            st, logits[:, 0], sl.keys, sl.temperature, sl.top_k, sl.top_p, sl.min_p, sl.recent, sl.stop_seqs,
            sl.remaining, eos, live)
        finish = jnp.where(live & (finish == RUNNING) & (cache.index >= s), LENGTH, finish)  # the cache is full
        out = out.at[:, i].set(jnp.where(live, tok, -1))
        info = tuple(a.at[:, i].set(x) for a, x in zip(info, new_info))
        sl = dataclasses.replace(sl, cache=cache, tokens=jnp.where(live, tok, sl.tokens),
                                 active=live & (finish == RUNNING), keys=keys, recent=recent, remaining=remaining,
                                 finish=jnp.where(live, finish, sl.finish))
        return i + 1, sl, out, info

    _, slots, out, info = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, out, info))
    return slots, out, info


def length_bucket(n: int, least: int = 16) -> int:
    """The next power of two >= n (at least `least`): few compilations for prompts of any length."""
    return max(least, 1 << (max(n, 1) - 1).bit_length())


class Engine:
    """Slot-level generation over one model: see the module docstring.

    config, params: the model (any leaves `linear` accepts: plain, merged, LoRA/DoRA/IA3, NF4). slots: rows of the
    batch (concurrent requests). max_len: cache slots per row (prompt + generated tokens, prompt tuning's
    virtual tokens included). eos_token_ids: tokens that end a request (emitted, then the row stops).
    num_logprobs: -1 (default) computes no logprobs; 0 each chosen token's logprob; k > 0 also the top k.
    max_stop_sequences, max_stop_length: capacity of the per-row stop token sequences. virtual_tokens[P, D]
    (prompt tuning) / prefix (prefix tuning's `(k, v)`, `[L, P, K, hd]`): as `peft.generation_inputs` gives them.
    seed: the engine's PRNG seed for requests that bring none. multi_adapter: keep a per-row adapter id
    (`add(..., adapter_id=)`) passed to the model as `adapter_ids` (a multi-adapter stack in `params`).
    `counters` (a `Counters`) counts the prefill passes, rows and tokens and the decode calls. layers: "stacked"
    runs the layer stack as a scan over stacked weights, "per_layer" unrolled over one buffer per layer (weights
    and cache; XLA:CPU copies each weight slice a scan takes, so batch-1 decoding reads its weights about twice);
    "auto" (default): per layer on CPU, stacked elsewhere. SmolLM2-135M, fp32, 2 Xeon cores, ms per decode step
    stacked vs per layer: 1 slot, 128 cache slots 43.0 vs 29.6, 2048 slots 45.9 vs 31.7; 4 slots x 256 51.5 vs
    50.4; 16 slots x 256 88.3 vs 92.3, x 2048 104.8 vs 97.3. Held per layer, the first call compiles about 5 s
    longer (30 layers unrolled).
    """

    def __init__(self, config: LlamaConfig, params: Any, *, slots: int = 8, max_len: int = 2048,
                 eos_token_ids: Sequence[int] = (), options: ModelOptions = ModelOptions(), num_logprobs: int = -1,
                 max_stop_sequences: int = 4, max_stop_length: int = 8, virtual_tokens: jax.Array | None = None,
                 prefix: tuple | None = None, seed: int = 0, multi_adapter: bool = False, layers: str = "auto"):
        if slots < 1 or max_len < 2:
            raise ConfigError(f"Engine: slots={slots} must be >= 1 and max_len={max_len} >= 2")
        config.check_sequence_length(max_len + (0 if prefix is None else prefix[0].shape[1]), "Engine max_len")
        if layers not in ("auto", "stacked", "per_layer"):
            raise ConfigError(f"Engine: layers='{layers}'; expected 'auto', 'stacked' or 'per_layer'")
        if layers == "auto":  # per layer where the scan's weight slices are copies: XLA:CPU (see the class doc)
            first = jax.tree.leaves(params)[0]
            cpu = isinstance(first, jax.Array) and {d.platform for d in first.devices()} == {"cpu"}
            layers = "per_layer" if cpu else "stacked"
        self.per_layer = layers == "per_layer"
        self.config, self.max_len, self.slots = config, max_len, slots
        self.params = params
        n_virtual = 0 if virtual_tokens is None else int(virtual_tokens.shape[0])
        n_prefix = 0 if prefix is None else int(prefix[0].shape[1])
        self._st = _Static(config, options, int(num_logprobs), n_virtual, n_prefix)
        self._extras = {}
        if virtual_tokens is not None:
            self._extras["virtual"] = jnp.asarray(virtual_tokens)
        if prefix is not None:
            self._extras["prefix"] = tuple(jnp.asarray(a) for a in prefix)
        self._eos = jnp.asarray(sorted({int(e) for e in eos_token_ids if e is not None}) or [-1], jnp.int32)
        self._rng = np.random.default_rng(seed)
        b, n, m = slots, max_stop_sequences, max_stop_length
        self.state = Slots(
            init_cache(config, b, max_len, options.dtype, self.per_layer), jnp.zeros((b,), jnp.int32),
            jnp.zeros((b,), bool),
            jax.vmap(jax.random.key)(jnp.arange(b, dtype=jnp.uint32)), jnp.zeros((b,), jnp.float32),
            jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.float32), jnp.zeros((b,), jnp.float32),
            jnp.zeros((b,), jnp.int32), jnp.full((b, n, m), -1, jnp.int32), jnp.full((b, m), -2, jnp.int32),
            jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32) if multi_adapter else None)
        self.history: list[list[int]] = [[] for _ in range(b)]   # tokens each slot holds (+ its pending last one)
        self.counters = Counters()
        self._history_adapter: list[int | None] = [None] * b  # the adapter id each slot's history was computed with
        self._busy = [False] * b
        self._active = [False] * b

    @property
    def params(self) -> Any:
        """The model's parameters as the engine runs them (per layer: `jaxft.models.params.unstack_layers`). May be
        replaced between calls by a tree of the same structure and shapes (stacked or not): no recompilation."""
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        self._params = unstack_layers(params) if self.per_layer else params

    # -- slots --------------------------------------------------------------------------------------------------

    def free_slots(self) -> list[int]:
        """Slots that can take a request."""
        return [s for s in range(self.slots) if not self._busy[s]]

    def active_slots(self) -> list[int]:
        """Slots still generating."""
        return [s for s in range(self.slots) if self._active[s]]

    def free(self, slot: int) -> None:
        """Release `slot` (finished or not): it stops generating and may take another request. Its cache is kept
        until then, so `add(..., slot=slot)` with a prompt that extends its history still reuses it."""
        self._check_slot(slot)
        self.stop(slot)
        self._busy[slot] = False

    def stop(self, slot: int) -> None:
        """Stop `slot` generating but keep it reserved (a chat between turns, a request cut by a stop string)."""
        self._check_slot(slot)
        if self._active[slot]:
            self.state = dataclasses.replace(self.state, active=self.state.active.at[slot].set(False))
        self._active[slot] = False

    def shared_prefix(self, slot: int, prompt: Sequence[int], adapter_id: int | None = None) -> int:
        """How many leading tokens of `prompt` `slot` already holds in its cache (what `add` would not recompute)
        for a request on `adapter_id` (keys and values computed under another adapter are not reused)."""
        if self._history_adapter[slot] != self._row_adapter(adapter_id):
            return 0
        hist, full = self.history[slot], [-1] * self._st.n_virtual + [int(t) for t in prompt]
        keep = max(0, min(_common(hist, full), len(hist) - 1, len(full) - 1))
        return 0 if keep < self._st.n_virtual else keep

    def forget(self, adapter_id: int | None = None) -> None:
        """Drop what the free slots hold, so no later request reuses it: those computed on `adapter_id` (call it
        when a multi-adapter stack's slot gets another adapter), or all of them (None: after replacing `params`)."""
        for s in range(self.slots):
            if not self._busy[s] and (adapter_id is None or self._history_adapter[s] == self._row_adapter(adapter_id)):
                self.history[s] = []

    def _row_adapter(self, adapter_id: int | None) -> int | None:
        """The id a row on `adapter_id` carries: None without a multi-adapter stack, -1 (the base) for None."""
        if self.state.adapter_ids is None:
            return None
        return -1 if adapter_id is None else int(adapter_id)

    def _check_slot(self, slot: int) -> None:
        if not (isinstance(slot, (int, np.integer)) and not isinstance(slot, bool) and 0 <= slot < self.slots):
            raise ConfigError(f"slot {slot!r} is not a slot of this engine (0..{self.slots - 1})")

    # -- prefill ------------------------------------------------------------------------------------------------

    def add(self, prompt: Sequence[int], sampling: SamplingParams = GREEDY, *, max_new_tokens: int,
            stop_token_ids: Sequence[Sequence[int]] = (), slot: int | None = None,
            adapter_id: int | None = None) -> Event:
        """Prefill `prompt` (token ids) into `slot` (default: a free one, preferring the free slot whose history
        shares the longest prefix with the prompt) and choose its first token; returns that token's Event.
        The part of the prompt the slot already holds is not computed again. Raises ConfigError for an empty
        prompt, a prompt plus `max_new_tokens` beyond the cache, bad sampling parameters or no free slot."""
        return self.add_many([prompt], [sampling], max_new_tokens=[max_new_tokens], stop_token_ids=[stop_token_ids],
                             slots=None if slot is None else [slot],
                             adapter_ids=None if adapter_id is None else [adapter_id])[0]

    def add_many(self, prompts: Sequence[Sequence[int]], samplings: Sequence[SamplingParams] | None = None, *,
                 max_new_tokens: Sequence[int], stop_token_ids: Sequence[Sequence[Sequence[int]]] | None = None,
                 slots: Sequence[int] | None = None, adapter_ids: Sequence[int] | None = None) -> list[Event]:
        """`add` for several requests in one prefill call (one compiled shape per (rows, length) bucket)."""
        k = len(prompts)
        samplings = list(samplings) if samplings is not None else [GREEDY] * k
        stop_token_ids = list(stop_token_ids) if stop_token_ids is not None else [()] * k
        if not (len(samplings) == len(max_new_tokens) == len(stop_token_ids) == k):
            raise ConfigError("add_many: prompts, samplings, max_new_tokens and stop_token_ids differ in length")
        if adapter_ids is not None and self.state.adapter_ids is None:
            raise ConfigError("adapter_id given but the engine was made without multi_adapter=True")
        for i, prompt in enumerate(prompts):
            self.check_request(prompt, samplings[i], max_new_tokens[i], stop_token_ids[i], where=f"request {i}")
            if adapter_ids is not None and not isinstance(adapter_ids[i], (int, np.integer)):
                raise ConfigError(f"request {i}: adapter_id={adapter_ids[i]!r} must be an integer")
        if self.state.adapter_ids is not None:
            adapter_ids = [self._row_adapter(None if adapter_ids is None else adapter_ids[i]) for i in range(k)]
        chosen = self._choose_slots(prompts, slots, adapter_ids)
        rows_starts, pieces = [], []
        for i, (prompt, s) in enumerate(zip(prompts, chosen)):
            full = [-1] * self._st.n_virtual + [int(t) for t in prompt]  # -1: the virtual tokens in the history
            keep = self.shared_prefix(s, prompt, None if adapter_ids is None else adapter_ids[i])  # never the pending last token; at least one token to compute
            rows_starts.append((s, keep))
            pieces.append((full, [list(map(int, q)) for q in stop_token_ids[i]]))
        events = self._prefill(chosen, rows_starts, pieces, samplings, max_new_tokens, adapter_ids)
        return events

    def check_request(self, prompt: Sequence[int], sampling: SamplingParams = GREEDY, max_new_tokens: int = 1,
                      stop_token_ids: Sequence[Sequence[int]] = (), *, where: str = "request") -> None:
        """Raise ConfigError (one line starting with `where`) when `add` would refuse the request: an empty prompt,
        a token id outside the vocabulary, sampling that is not a SamplingParams, `max_new_tokens` not an integer
        >= 1, prompt + max_new_tokens beyond the cache, or stop token sequences beyond the engine's capacity.
        Callers that queue requests (`text.run`, the server) check them all before computing any."""
        prompt = list(prompt)
        if not prompt:
            raise ConfigError(f"{where}: the prompt is empty; give at least one token")
        vocab = self.config.vocab_size
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"{where}: prompt token {bad[0]!r} is not a token id of this model (0..{vocab - 1})")
        if not isinstance(sampling, SamplingParams):
            raise ConfigError(f"{where}: sampling must be a jaxft.generate.SamplingParams")
        if isinstance(max_new_tokens, bool) or not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise ConfigError(f"{where}: max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        p_virtual = self._st.n_virtual
        need = p_virtual + len(prompt) + max_new_tokens - 1  # the last token is emitted, never written
        if need > self.max_len:
            raise ConfigError(f"{where}: {len(prompt)} prompt tokens + max_new_tokens={max_new_tokens}"
                              f"{f' + {p_virtual} virtual tokens' if p_virtual else ''} need {need} cache "
                              f"slots; the engine has max_len={self.max_len}: shorten the prompt or "
                              f"max_new_tokens, or make the engine with a larger max_len")
        n_stop, m_stop = self.state.stop_seqs.shape[1:]
        seqs = [list(q) for q in stop_token_ids]
        if len(seqs) > n_stop or any(len(q) == 0 or len(q) > m_stop for q in seqs):
            raise ConfigError(f"{where}: stop token sequences must be at most {n_stop} non-empty sequences "
                              f"of at most {m_stop} tokens (the engine's max_stop_sequences / max_stop_length)")

    def _choose_slots(self, prompts, slots, adapter_ids) -> list[int]:
        if slots is not None:
            for s in slots:
                self._check_slot(s)
                if self._active[s]:
                    raise ConfigError(f"slot {s} is still generating; free it first")
            if len(set(slots)) != len(slots) or len(slots) != len(prompts):
                raise ConfigError("add_many: give one distinct slot per prompt")
            return list(slots)
        free = self.free_slots()
        if len(free) < len(prompts):
            raise ConfigError(f"{len(prompts)} requests but {len(free)} free slots (of {self.slots}); wait for a "
                              f"request to finish and free its slot, or make the engine with more slots")
        chosen = []
        for i, prompt in enumerate(prompts):  # the free slot sharing the longest prefix (chat turns, few-shot)
            aid = None if adapter_ids is None else adapter_ids[i]
            best = max(free, key=lambda s: self.shared_prefix(s, prompt, aid))
            free.remove(best)
            chosen.append(best)
        return chosen

    def _prefill(self, chosen, rows_starts, pieces, samplings, max_new_tokens, adapter_ids) -> list[Event]:
        k = len(chosen)
        kb = length_bucket(k, 1)
        t = length_bucket(max(len(full) - keep for (_, keep), (full, _) in zip(rows_starts, pieces)))
        n_stop, m_stop = self.state.stop_seqs.shape[1:]
        rows = np.full(kb, self.slots, np.int32)          # padding rows point past the batch: dropped
        ids = np.zeros((kb, t), np.int32)
        lengths = np.ones(kb, np.int32)
        start = np.zeros(kb, np.int32)
        seeds = np.zeros(kb, np.uint32)
        temp, topk, topp, minp = np.zeros(kb, np.float32), np.zeros(kb, np.int32), np.ones(kb, np.float32), \
            np.zeros(kb, np.float32)
        remaining = np.ones(kb, np.int32)
        stops = np.full((kb, n_stop, m_stop), -1, np.int32)
        adapters = np.zeros(kb, np.int32)
        for i, ((s, keep), (full, seqs)) in enumerate(zip(rows_starts, pieces)):
            new = [max(x, 0) for x in full[keep:]]  # virtual placeholders become token 0 (their embeds replace it)
            rows[i], start[i], lengths[i] = s, keep, len(new)
            ids[i, :len(new)] = new
            sp = samplings[i]
            seeds[i] = sp.seed % 2 ** 32 if sp.seed is not None else self._rng.integers(2 ** 32)
            temp[i], topk[i], topp[i], minp[i] = sp.temperature, sp.top_k, sp.top_p, sp.min_p
            remaining[i] = max_new_tokens[i]
            for j, q in enumerate(seqs):
                stops[i, j, m_stop - len(q):] = q
            if adapter_ids is not None:
                adapters[i] = adapter_ids[i]
        self.counters.prefill_calls += 1
        self.counters.prefill_rows += k
        self.counters.prefill_tokens += int(lengths[:k].sum())
        self.state, tok, finish, info = _prefill(
            self._st, self.params, self._extras, self.state, jnp.asarray(rows), jnp.asarray(ids),
            jnp.asarray(lengths), jnp.asarray(start), jnp.asarray(seeds), jnp.asarray(temp), jnp.asarray(topk),
            jnp.asarray(topp), jnp.asarray(minp), jnp.asarray(remaining), jnp.asarray(stops),
            None if adapter_ids is None else jnp.asarray(adapters), self._eos)
        tok, finish = np.asarray(tok), np.asarray(finish)
        info = [np.asarray(a) for a in info]
        events = []
        for i, ((s, keep), (full, _)) in enumerate(zip(rows_starts, pieces)):
            self.history[s] = full + [int(tok[i])]
            self._history_adapter[s] = None if adapter_ids is None else int(adapter_ids[i])
            self._busy[s] = True
            self._active[s] = finish[i] == RUNNING
            events.append(self._event(s, [int(tok[i])], [a[i:i + 1] for a in info], int(finish[i])))
        return events

    # -- decode -------------------------------------------------------------------------------------------------

    def step(self, n: int = 1) -> list[Event]:
        """Up to `n` decode steps of every active slot in one device call (fewer when all finish): one Event per
        slot that was active. Larger `n` costs fewer host round trips; smaller streams sooner."""
        if not any(self._active):
            return []
        before = list(self._active)
        self.counters.decode_calls += 1
        self.state, out, info = _decode(self._st, self.params, self._extras, self.state, self._eos, int(n))
        out = np.asarray(out)
        finish = np.asarray(self.state.finish)
        active = np.asarray(self.state.active)
        info = [np.asarray(a) for a in info]
        events = []
        for s in range(self.slots):
            if not before[s]:
                continue
            toks = [int(x) for x in out[s] if x >= 0]
            self.history[s].extend(toks)
            self._active[s] = bool(active[s])
            events.append(self._event(s, toks, [a[s, :len(toks)] for a in info],
                                      RUNNING if active[s] else int(finish[s])))
        return events

    def _event(self, slot: int, toks: list[int], info: list[np.ndarray], finish: int) -> Event:
        logprobs = top = None
        if info:
            logprobs = [float(x) for x in info[0]]
        if len(info) == 3:
            top = [[(int(i), float(p)) for i, p in zip(ids, lps)] for ids, lps in zip(info[1], info[2])]
        return Event(slot, toks, logprobs, top, FINISH_NAMES.get(finish))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of `a` and `b`."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
