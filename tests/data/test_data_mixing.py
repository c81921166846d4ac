"""Mixing: probabilities, largest-remainder counts, the draw, against the formulas in `jaxft.data.mixing`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from jaxft.data.mixing import draw_indices, mix, mixture_counts, mixture_probabilities


def test_probabilities():
    # float64 formulas on both sides: they differ by rounding only (0 measured here for these inputs, at most a few ulp = 1e-16), so
    # 1e-12 is a >1000x margin, and a wrong formula (sizes**(1/t), unnormalised weights) is off by > 1e-2
    np.testing.assert_allclose(mixture_probabilities([10, 90], [1, 3], "weight"), [0.25, 0.75], rtol=0, atol=1e-12)
    sizes = np.array([100.0, 900.0])
    for t in (1.0, 0.5, 0.01):
        expected = sizes**t / (sizes**t).sum()
        np.testing.assert_allclose(mixture_probabilities(sizes, [1, 1], "temperature", t), expected, rtol=1e-12)
    np.testing.assert_allclose(mixture_probabilities([100, 900], [1, 1], "temperature", 1.0), [0.1, 0.9], atol=1e-12)


def test_largest_remainder_counts():
    # 7 * (1/3, 1/3, 1/3) = 2.33 each: floors 2, 2, 2 and the 1 leftover to the lowest index on a tie
    assert mixture_counts([3, 2, 2], np.full(3, 1 / 3)) == [3, 2, 2]
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(1, 500, rng.integers(1, 6)).tolist()
        p = rng.random(len(sizes))
        p /= p.sum()
        counts = mixture_counts(sizes, p)
        assert sum(counts) == sum(sizes)
        assert all(abs(c - q * sum(sizes)) < 1 for c, q in zip(counts, p))


def test_draw_passes_then_partial_permutation():
    idx = draw_indices(10, 25, seed=0, source=1)
    c = Counter(idx.tolist())
    assert len(idx) == 25 and set(c) == set(range(10))
    assert sorted(c.values()) == [2] * 5 + [3] * 5  # two full passes + 5 distinct extras
    assert np.array_equal(idx, draw_indices(10, 25, seed=0, source=1))
    assert not np.array_equal(draw_indices(10, 5, seed=0, source=1), draw_indices(10, 5, seed=1, source=1))
    assert len(set(draw_indices(10, 7, 0, 0).tolist())) == 7  # a downsample has no repeats


def test_mix_by_weight_and_single_source_identity():
    a = [f"a{i}" for i in range(30)]
    b = [f"b{i}" for i in range(70)]
    out, counts = mix([a, b], [3.0, 1.0], "weight", 1.0, seed=5)
    assert counts == [75, 25] and len(out) == 100
    got = Counter(s[0] for s in out)
    assert got == {"a": 75, "b": 25}
    assert Counter(out)["a0"] in (2, 3) and len(set(x for x in out if x[0] == "b")) == 25
    same, _ = mix([a, b], [3.0, 1.0], "weight", 1.0, seed=5)
    assert same == out
    one, counts = mix([b], [1.0], "weight", 1.0, seed=9)
    assert sorted(one) == sorted(b) and counts == [70]  # a single source: every example exactly once


def test_mix_temperature():
    a, b = list(range(100)), list(range(900))
    _, counts = mix([a, b], [1, 1], "temperature", 0.5, seed=0)
    p = np.sqrt([100, 900]) / np.sqrt([100, 900]).sum()
    assert counts == [250, 750] and counts == pytest.approx(p * 1000)
