"""Mixing several train sources into one list of examples, deterministically from a seed.

Exactly what is drawn. Let N_i be the number of usable examples of source i (after malformed records, duplicates,
decontamination, the eval carve and truncation) and M = sum_i N_i. The mixture has M examples in total:

- probabilities: `weight` mixing p_i = w_i / sum_j w_j; `temperature` mixing p_i = N_i**T / sum_j N_j**T
  (T = 1: proportional to size, the plain concatenation; T -> 0: uniform over sources).
- counts: n_i = p_i * M rounded by largest remainder (floor everything, then give the leftover units to the largest
  fractional parts, ties to the lower source index), so sum_i n_i = M exactly.
- draw: source i contributes floor(n_i / N_i) full passes over its examples plus the first n_i mod N_i examples of a
  random permutation (without replacement), from `numpy.random.default_rng([seed, i])`. So an example is repeated
  at most ceil(n_i / N_i) times, and with one source (or `weight` mixing with w_i proportional to N_i) every example
  appears exactly once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def mixture_probabilities(sizes: Sequence[int], weights: Sequence[float], mode: str, temperature: float = 1.0) -> np.ndarray:
    """p_i of each source (float64 [S], sums to 1): `weight` -> w_i / sum w; `temperature` -> N_i**T / sum N**T."""
    sizes_f = np.asarray(sizes, np.float64)
    if mode == "weight":
        raw = np.asarray(weights, np.float64)
    elif mode == "temperature":
        raw = sizes_f**temperature
    else:
        raise ValueError(f"mixing {mode!r}: use weight or temperature")
    return raw / raw.sum()


def mixture_counts(sizes: Sequence[int], probabilities: np.ndarray) -> list[int]:
    """n_i = p_i * sum(N) by largest remainder; the counts sum to sum(N) exactly."""
    total = int(sum(sizes))
    exact = np.asarray(probabilities, np.float64) * total
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    # Stable sort on the negated fractional parts: the largest fractions first, ties to the lower index.
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:leftover]] += 1
    return [int(c) for c in counts]


def draw_indices(size: int, count: int, seed: int, source: int) -> np.ndarray:
    """The indices (int64 [count]) drawn from a source of `size` examples: full passes, then a random partial one."""
    if size == 0 or count == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, source])
    passes, rest = divmod(count, size)
    parts = [np.arange(size) for _ in range(passes)]
    if rest:
        parts.append(np.sort(rng.permutation(size)[:rest]))
    return np.concatenate(parts)


def mix(per_source: Sequence[Sequence], weights: Sequence[float], mode: str, temperature: float, seed: int) -> tuple[list, list[int]]:
    """Concatenate the drawn examples of every source (source order, then index order); also return the counts n_i.

    The order is irrelevant to training (packing sorts by length, `Batches` shuffles rows); it is kept readable.
    """
    sizes = [len(s) for s in per_source]
    counts = mixture_counts(sizes, mixture_probabilities(sizes, weights, mode, temperature))
    out: list = []
    for i, (examples, n) in enumerate(zip(per_source, counts)):
        out += [examples[k] for k in draw_indices(len(examples), n, seed, i)]
    return out, counts
