"""Sampling one token per row from logits, with per-row parameters so one batch can mix requests.

The order follows transformers' logits warpers (`generate`'s defaults): temperature, then top-k, then top-p on the
top-k distribution renormalised, then min-p relative to the most likely token (which neither filter removes, so
min-p is the same before or after them). Temperature 0 means greedy: the argmax of the raw logits.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxft.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    temperature: 0 for greedy (argmax), else the logits are divided by it (> 0). top_k: keep the k most likely
    tokens (0: all). top_p: keep the smallest set of most likely tokens whose probability reaches p (1: all).
    min_p: drop tokens less likely than min_p times the most likely one (0: none). seed: the request's PRNG seed
    (None: the engine's running key).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            problems.append(f"temperature={self.temperature!r} must be a finite number >= 0 (0: greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} must be an integer >= 0 (0: no top-k)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            problems.append(f"top_p={self.top_p!r} must be in (0, 1] (1: no top-p)")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            problems.append(f"min_p={self.min_p!r} must be in [0, 1] (0: no min-p)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            problems.append(f"seed={self.seed!r} must be an integer or None")
        if problems:
            raise ConfigError("sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def filtered_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                    min_p: jax.Array) -> jax.Array:
    """`logits[B, V]` (float32) divided by the temperature, with the tokens top-k, top-p and min-p remove set to
    -inf: a categorical draw from the result samples the renormalised distribution. Per-row `temperature`,
    `top_p`, `min_p` (float32 [B]) and `top_k` (int32 [B]); a greedy row (temperature 0) is returned unscaled.

    Top-k and top-p need the row sorted (one sort of the vocabulary per row); it runs only when some row asks
    for either. Ties at the top-k boundary are broken by token id (the sort is stable), as torch's topk does.
    """
    b, v = logits.shape
    x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]

    def sorted_filter(x):
        order = jnp.argsort(-x, axis=-1, stable=True)                          # [B, V] most likely first
        xs = jnp.take_along_axis(x, order, axis=-1)
        rank = jnp.arange(v)[None, :]
        keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
        probs = jax.nn.softmax(jnp.where(keep, xs, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                             # mass of the more likely tokens
        keep = keep & ((before < top_p[:, None]) | (rank == 0))
        mask = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], order].set(keep)
        return jnp.where(mask, x, -jnp.inf)

    needs_sort = jnp.any((top_k > 0) | (top_p < 1.0))
    x = jax.lax.cond(needs_sort, sorted_filter, lambda x: x, x)
    # min-p: p_i >= min_p * p_max  <=>  x_i - x_max >= log(min_p) (the normaliser cancels)
    floor = jnp.max(x, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
    return jnp.where(x >= floor, x, -jnp.inf)


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           min_p: jax.Array) -> jax.Array:
    """One token per row of `logits[B, V]`: the argmax where `temperature` is 0, else a draw with the row's own
    PRNG key (`keys[B]`) from `filtered_logits`. Returns int32 [B]."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        x = filtered_logits(logits, temperature, top_k, top_p, min_p)
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x).astype(jnp.int32)

    # An all-greedy batch skips the filters and the Gumbel noise over the vocabulary.
    drawn = jax.lax.cond(jnp.any(temperature > 0), draw, lambda logits: greedy, logits)
    return jnp.where(temperature > 0, drawn, greedy)
