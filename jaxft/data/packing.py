"""Packing examples into fixed-length rows, and building the row arrays.

A row is a tuple of example indices. `pack_bfd` fills rows of `seq_len` tokens by best-fit decreasing: examples in
decreasing length (ties by index), each into the open row with the least room that still fits it, or a new row. The
row with the least room is found in O(log seq_len) with a segment tree over the remaining capacity, so packing 10^5
examples takes about a second.

`build_rows` turns rows into the arrays the model consumes (for one row, shapes [T]):
  input_ids  int32  the examples' tokens one after the other, then `pad_id`
  segment_ids int32 1..k for the k examples of the row, 0 on padding (attention never crosses segments)
  positions  int32  0, 1, ... restarting at each segment; 0 on padding
  loss_mask  bool   the examples' masks (True where the token is a trained target); never True at a segment's
                    first token nor on padding
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class _Capacities:
    """Multiset of integers in [0, size) supporting 'smallest element >= x' in O(log size)."""

    def __init__(self, size: int):
        self.n = 1 << max(1, (size - 1).bit_length())
        self.count = [0] * (2 * self.n)

    def add(self, value: int, delta: int) -> None:
        i = value + self.n
        while i:
            self.count[i] += delta
            i >>= 1

    def smallest_at_least(self, x: int) -> int:
        """The smallest value >= x present, or -1."""
        count, i = self.count, x + self.n
        while not count[i]:
            while i & 1:  # a right child: its right neighbours are beyond its parent's range
                i >>= 1
                if i <= 1:
                    return -1
            i += 1  # the right sibling (or the next subtree to the right)
        while i < self.n:
            i = 2 * i if count[2 * i] else 2 * i + 1
        return i - self.n


def pack_bfd(lengths: Sequence[int], seq_len: int) -> list[tuple[int, ...]]:
    """Best-fit-decreasing rows of example indices; every index appears once; each row's lengths sum to <= seq_len.

    Within a row the examples keep the order they were placed in (longest first).
    """
    if any(n > seq_len or n < 1 for n in lengths):
        raise ValueError(f"pack_bfd: example lengths must be in [1, {seq_len}]; truncate before packing")
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    caps = _Capacities(seq_len + 1)
    by_cap: dict[int, list[int]] = {}  # remaining capacity -> open rows with that much room
    rows: list[list[int]] = []
    room: list[int] = []
    for k in order:
        n = lengths[k]
        c = caps.smallest_at_least(n)
        if c < 0:
            r = len(rows)
            rows.append([k])
            room.append(seq_len - n)
        else:
            r = by_cap[c].pop()
            caps.add(c, -1)
            rows[r].append(k)
            room[r] -= n
        if room[r] > 0:
            by_cap.setdefault(room[r], []).append(r)
            caps.add(room[r], 1)
    return [tuple(row) for row in rows]


def one_per_row(n: int) -> list[tuple[int, ...]]:
    """`packing: false`: example k alone in row k."""
    return [(k,) for k in range(n)]


def efficiency(lengths: Sequence[int], rows: Sequence[tuple[int, ...]], seq_len: int) -> float:
    """Real tokens / (rows * seq_len), in [0, 1]."""
    return float(sum(lengths[k] for row in rows for k in row)) / max(1, len(rows) * seq_len)


def build_rows(examples: Sequence, rows: Sequence[tuple[int, ...]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Arrays [len(rows), seq_len] for these rows (see the module docstring); an empty row () is all padding."""
    b = len(rows)
    input_ids = np.full((b, seq_len), pad_id, np.int32)
    segment_ids = np.zeros((b, seq_len), np.int32)
    positions = np.zeros((b, seq_len), np.int32)
    loss_mask = np.zeros((b, seq_len), bool)
    for r, row in enumerate(rows):
        t = 0
        for s, k in enumerate(row, 1):
            ex = examples[k]
            n = len(ex.ids)
            input_ids[r, t : t + n] = ex.ids
            segment_ids[r, t : t + n] = s
            positions[r, t : t + n] = np.arange(n, dtype=np.int32)
            loss_mask[r, t : t + n] = ex.mask
            loss_mask[r, t] = False  # the first token of a segment is predicted from nothing of its own
            t += n
    return {"input_ids": input_ids, "segment_ids": segment_ids, "positions": positions, "loss_mask": loss_mask}
