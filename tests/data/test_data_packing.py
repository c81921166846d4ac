"""Packing (best-fit decreasing vs a plain quadratic reference), row arrays, train/eval batch iterators."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxft.data.batches import Batches, eval_batches
from jaxft.data.packing import build_rows, efficiency, one_per_row, pack_bfd
from jaxft.data.render import Example


def _reference_bfd(lengths, seq_len):
    """Textbook best-fit decreasing: scan every open bin for the fullest one that still fits."""
    bins: list[int] = []  # room left
    for n in sorted(lengths, reverse=True):
        fits = [(room, b) for b, room in enumerate(bins) if room >= n]
        if fits:
            _, b = min(fits)
            bins[b] -= n
        else:
            bins.append(seq_len - n)
    return sorted(seq_len - room for room in bins)


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(lengths):
        mask = rng.random(n) < 0.5
        mask[0] = False
        out.append(Example(rng.integers(3, 1000, n).astype(np.int32), mask, 1, -1, None, 0, k + 1))
    return out


@pytest.mark.parametrize("seed, seq_len", [(0, 64), (1, 128), (2, 512), (3, 37)])
def test_bfd_matches_reference_and_places_every_example_once(seed, seq_len):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq_len + 1, 400).tolist() + [seq_len, 1, 1]
    rows = pack_bfd(lengths, seq_len)
    assert sorted(k for row in rows for k in row) == list(range(len(lengths)))
    assert all(sum(lengths[k] for k in row) <= seq_len for row in rows)
    # equal-room bins are interchangeable, so the fill of every row matches the reference whatever the tie-breaking
    assert sorted(sum(lengths[k] for k in row) for row in rows) == _reference_bfd(lengths, seq_len)
    eff = efficiency(lengths, rows, seq_len)
    assert eff == pytest.approx(sum(lengths) / (len(rows) * seq_len))
    assert len(rows) >= -(-sum(lengths) // seq_len)  # never fewer rows than the volume bound


def test_bfd_rejects_overlong():
    with pytest.raises(ValueError, match="truncate"):
        pack_bfd([5, 9], 8)


def test_build_rows_segments_positions_and_masks():
    lengths = [5, 3, 7, 2, 6]
    ex = _examples(lengths)
    seq_len = 10
    rows = pack_bfd(lengths, seq_len)
    b = build_rows(ex, rows + [()], seq_len, pad_id=2)
    assert {k: v.dtype for k, v in b.items()} == {
        "input_ids": np.int32, "segment_ids": np.int32, "positions": np.int32, "loss_mask": np.bool_
    }
    assert all(v.shape == (len(rows) + 1, seq_len) for v in b.values())
    for r, row in enumerate(rows):
        t = 0
        for s, k in enumerate(row, 1):
            n = lengths[k]
            np.testing.assert_array_equal(b["input_ids"][r, t : t + n], ex[k].ids)
            np.testing.assert_array_equal(b["positions"][r, t : t + n], np.arange(n))
            assert (b["segment_ids"][r, t : t + n] == s).all()
            np.testing.assert_array_equal(b["loss_mask"][r, t : t + n], ex[k].mask)
            assert not b["loss_mask"][r, t]
            t += n
        assert (b["segment_ids"][r, t:] == 0).all() and (b["input_ids"][r, t:] == 2).all()
        assert not b["loss_mask"][r, t:].any() and (b["positions"][r, t:] == 0).all()
    assert not b["segment_ids"][-1].any() and not b["loss_mask"][-1].any()  # the empty row is all padding


def test_one_per_row():
    assert one_per_row(3) == [(0,), (1,), (2,)]


def _batches(n_rows=11, batch_size=4, seed=3):
    ex = _examples([3 + k % 5 for k in range(n_rows)])
    return Batches(ex, one_per_row(n_rows), batch_size, 8, 0, seed), ex


def _row_ids(batch, ex):
    """Which example each row of a batch holds (its first token's identity via the stored ids)."""
    return [next(k for k, e in enumerate(ex) if np.array_equal(row[: len(e)], e.ids)) for row in batch["input_ids"]]


def test_batches_epochs_cover_all_rows_and_reshuffle():
    b, ex = _batches()
    seen = [k for _ in range(11) for k in _row_ids(next(b), ex)]  # 44 rows = 4 epochs of 11
    epochs = [seen[i : i + 11] for i in range(0, 44, 11)]
    assert all(sorted(e) == list(range(11)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4
    assert b.state() == {"epoch": 3, "position": 11, "num_rows": 11}
    assert b.steps_per_epoch == pytest.approx(11 / 4)


def test_batches_state_restore_replays_exactly():
    b, _ = _batches()
    for _ in range(5):
        next(b)
    state = json.loads(json.dumps(b.state()))
    expected = [next(b) for _ in range(6)]
    fresh, _ = _batches()
    fresh.restore(state)
    for e in expected:
        got = next(fresh)
        for k in e:
            np.testing.assert_array_equal(got[k], e[k])
    other, _ = _batches(n_rows=12)
    with pytest.raises(ValueError, match="same data"):
        other.restore(state)


def test_batches_seed_changes_order():
    a, ex = _batches(seed=1)
    c, _ = _batches(seed=2)
    assert [_row_ids(next(a), ex) for _ in range(3)] != [_row_ids(next(c), ex) for _ in range(3)]


def test_eval_batches_in_order_with_padded_last_batch():
    ex = _examples([4, 5, 6, 7, 3])
    rows = one_per_row(5)
    out = list(eval_batches(ex, rows, 2, 8, 0))
    assert len(out) == 3
    order = [k for batch in out[:2] for k in _row_ids(batch, ex)] + _row_ids({"input_ids": out[2]["input_ids"][:1]}, ex)
    assert order == [0, 1, 2, 3, 4]
    assert not out[2]["loss_mask"][1].any() and not out[2]["segment_ids"][1].any()
