"""Batch iterators over packed rows: shuffled, resumable train batches and ordered, padded eval batches.

A batch is a dict of numpy arrays [batch_size, seq_len]: `input_ids` int32, `segment_ids` int32 (0 = padding),
`positions` int32, `loss_mask` bool (True where token t is a trained target predicted from position t-1); see
`jaxft.data.packing.build_rows`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from jaxft.data.packing import build_rows
from jaxft.errors import ConfigError


class Batches:
    """Endless train batches of `batch_size` rows, in an order fixed by (seed, epoch).

    Epoch e visits every row once, in the order `numpy.random.default_rng([seed, e]).permutation(num_rows)`. Batches
    run on across epoch ends: the batch that finishes epoch e takes its remaining rows from the start of epoch e + 1,
    so no row is ever left out. `state()` is {"epoch", "position" (rows of that epoch already served), "num_rows"};
    `restore(state)` continues exactly where that state was taken, so a resumed run sees the same batches.
    """

    def __init__(self, examples: Sequence, rows: Sequence[tuple[int, ...]], batch_size: int, seq_len: int, pad_id: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not rows:
            raise ConfigError("no train rows to batch; check the data statistics (everything was dropped?)")
        self.examples, self.rows = examples, list(rows)
        self.batch_size, self.seq_len, self.pad_id, self.seed = batch_size, seq_len, pad_id, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def steps_per_epoch(self) -> float:
        """Batches per epoch (fractional when batch_size does not divide the number of rows)."""
        return self.num_rows / self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def state(self) -> dict[str, int]:
        """JSON-serializable position of the iterator."""
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`; ConfigError if it belongs to data with a different number of rows."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if "num_rows" in state and int(state["num_rows"]) != self.num_rows:
            raise ConfigError(
                f"batch state is for {state['num_rows']} rows but the data now packs into {self.num_rows}; resume with the same data config"
            )
        if not 0 <= position <= self.num_rows or epoch < 0:
            raise ConfigError(f"batch state epoch={epoch} position={position} is out of range for {self.num_rows} rows")
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_share(slice(None))

    def next_share(self, share: slice) -> dict[str, np.ndarray]:
        """This process's rows `share` of the next global batch (all of them: `next`). Every process advances the
        same global position, so the state is the same everywhere and a resume under another process count or
        mesh sees the same global batches; only the rows of `share` are built (a multi-host process feeds its
        devices' rows to `jax.make_array_from_process_local_data`)."""
        picked: list[tuple[int, ...]] = []
        while len(picked) < self.batch_size:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(picked), self.num_rows - self.position)
            picked += [self.rows[r] for r in self._order[self.position : self.position + take]]
            self.position += take
        return build_rows(self.examples, picked[share], self.seq_len, self.pad_id)


def eval_batches(examples: Sequence, rows: Sequence[tuple[int, ...]], batch_size: int, seq_len: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """The rows in order, `batch_size` at a time; the last batch is filled with padding rows (all-zero masks)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start : start + batch_size])
        chunk += [()] * (batch_size - len(chunk))
        yield build_rows(examples, chunk, seq_len, pad_id)
