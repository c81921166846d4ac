"""Training checkpoints on Orbax: asynchronous saves, the last N kept for resume, the best K by an eval metric.

One Orbax `CheckpointManager` per directory. Each step folder `<dir>/<step>/` holds two items:

- `state`: the trainable state pytree (params or adapter, optax state, PRNG key data), written with
  `StandardSave` and read back into an abstract target, so restored leaves take the target's dtype and sharding;
- `extra`: a JSON dict (data position, config hash, anything the loop needs to resume).

Retention is one Orbax preservation policy, "latest N or best K": `LatestN(keep_last)` or-ed with
`BestN(keep_best)` over the checkpoints that carry the metric. Orbax's own `max_to_keep` with `best_fn` keeps only the
best, so a new checkpoint worse than those is deleted as soon as it is written and the resume point is lost (measured
with orbax-checkpoint 0.12.8: max_to_keep=2, losses 1, 2, 3 keep steps 1 and 2). The or-ed policy keeps the resume
point and the best ones with one write per save, where two managers would write every best checkpoint twice.

Multi-host: every process calls `save` and `restore` with its global arrays; Orbax writes each process's shards and
the JSON item from process 0. A checkpoint restores into any target sharding (another mesh, another process count):
the target's shardings decide what each process reads.

A step folder appears under its final name only once all of it is on disk (Orbax writes into
`<step>.orbax-checkpoint-tmp*` and renames it), so a process killed mid-write leaves at most a temporary folder, which
the next `Checkpointer` on that directory deletes and never lists.

    with Checkpointer("runs/a/ckpt", keep_last=2, keep_best=1) as ckpt:
        if ckpt.latest_step() is not None:
            state, extra = ckpt.restore(state)
        ...
        ckpt.save(step, state, extra={"epoch": 1, "position": 37}, metrics={"eval_loss": 1.9})
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

PyTree = Any


class _QuietMissingMetrics(logging.Filter):
    """Drops Orbax's warning for each save without metrics: most checkpoints have no eval metric, by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Requested `tracked_metric`")


logging.getLogger("absl").addFilter(_QuietMissingMetrics())


def _path_name(path: tuple) -> str:
    """'opt.0.mu.w' for a jax key path: dict keys, sequence indices and attribute names joined by dots."""
    parts = []
    for entry in path:
        for field in ("key", "idx", "name"):
            if hasattr(entry, field):
                parts.append(str(getattr(entry, field)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    """The restore target of one leaf: its shape and dtype, with its sharding (when it has none: one device of this
    process; `jax.devices()[0]` belongs to process 0 in a multi-host run)."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    if not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _scalar(value: Any) -> float | None:
    """float(value) for a real number or 0-d numeric array, else None."""
    try:
        array = np.asarray(value)
    except Exception:  # a value numpy cannot hold is not a metric
        return None
    return float(array) if array.ndim == 0 and array.dtype.kind in "biuf" else None


def _stored_shape(leaf: jax.ShapeDtypeStruct) -> tuple[int, ...]:
    """The shape Orbax writes for a leaf: typed PRNG keys are stored as their uint32 key data."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


class Checkpointer:
    """Saves and restores `(state, extra)` at training steps in `directory`.

    keep_last: how many of the newest checkpoints to keep (>= 1; the newest is never deleted).
    keep_best: how many checkpoints to keep besides those, the best by `metrics[best_metric]` (0: none).
    best_mode: "min" (losses) or "max" (accuracies).
    async_save: `save` returns once the arrays are copied off the device; the write goes on in a background thread.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int = 3,
        keep_best: int = 0,
        best_metric: str = "eval_loss",
        best_mode: str = "min",
        async_save: bool = True,
    ):
        if keep_last < 1:
            raise ValueError(f"Checkpointer: keep_last={keep_last} must be >= 1, or no resume point would be kept")
        if keep_best < 0:
            raise ValueError(f"Checkpointer: keep_best={keep_best} must be >= 0")
        if best_mode not in ("min", "max"):
            raise ValueError(f"Checkpointer: best_mode={best_mode!r} must be 'min' or 'max'")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode

        def metric(metrics: dict) -> float:
            return float(metrics[best_metric])

        policies = [ocp_policies.LatestN(n=keep_last)]
        if keep_best:
            policies.append(
                ocp_policies.BestN(
                    get_metric_fn=metric,
                    reverse=best_mode == "min",  # BestN keeps the tail of the sorted list
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=metric if keep_best else None,  # only so that Orbax writes metrics; retention is the policy
            best_mode=best_mode,
            preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._scores = {}  # step -> metric value, for the steps saved with a finite metric
        for step in self._manager.all_steps():
            self._remember(step, self._manager.metrics(step))

    def _remember(self, step: int, metrics: dict | None) -> None:
        value = None if metrics is None else _scalar(metrics.get(self.best_metric))
        if value is not None and math.isfinite(value):
            self._scores[step] = value

    def save(self, step: int, state: PyTree, *, extra: dict, metrics: dict | None = None, force: bool = False) -> bool:
        """Starts saving `state` and `extra` as checkpoint `step`; returns False if that step is already saved.

        metrics: scalars of this step; the checkpoint competes for `keep_best` only if it has a finite
        `metrics[best_metric]`. force: replace an existing checkpoint of this same step.
        With `async_save`, the arrays are copied before returning, so `state` may be donated or changed right after.
        """
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"Checkpointer.save: extra must be a JSON dict ({e}); put arrays in the state tree") from e
        steps = self._manager.all_steps()
        latest = max(steps, default=None)
        if latest is not None and step < latest:
            raise ValueError(
                f"Checkpointer.save: step {step} is before the latest checkpoint {latest} in {self.directory}; "
                "restore the latest step to continue, or save this run into a new directory"
            )
        if step in steps:
            if not force:
                return False
            self._manager.wait_until_finished()
            self._manager.delete(step)
            self._scores.pop(step, None)
        saved_metrics = None
        if metrics is not None:
            self._remember(step, metrics)
            if step in self._scores:
                saved_metrics = {k: _scalar(v) for k, v in metrics.items() if _scalar(v) is not None}
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
            metrics=saved_metrics,
            force=True,  # the step policy is ours (above), not Orbax's save-interval policy
        )
        kept = set(self._manager.all_steps())
        self._scores = {s: v for s, v in self._scores.items() if s in kept}
        return True

    def latest_step(self) -> int | None:
        """The newest checkpoint step (one still being written by this process included), None if there is none."""
        return self._manager.latest_step()

    def best_steps(self) -> list[int]:
        """The kept steps ranked by `best_metric`, best first, at most `keep_best` of them."""
        ranked = sorted(self._scores, key=self._scores.get, reverse=self.best_mode == "max")
        return ranked[: self.keep_best]

    def score(self, step: int) -> float | None:
        """The `best_metric` value checkpoint `step` was saved with (None: none, or not kept)."""
        return self._scores.get(step)

    def restore(self, state_like: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Reads checkpoint `step` (the latest if None) into the structure, dtypes and shardings of `state_like`.

        state_like: a pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape` of the init function).
        Returns `(state, extra)`.
        """
        self.wait()
        steps = self._manager.all_steps()
        if step is None:
            step = max(steps, default=None)
            if step is None:
                raise FileNotFoundError(f"Checkpointer.restore: no checkpoint in {self.directory}")
        elif step not in steps:
            raise FileNotFoundError(
                f"Checkpointer.restore: no checkpoint of step {step} in {self.directory}; saved steps: {sorted(steps)}"
            )
        target = jax.tree.map(_abstract, state_like)
        self._check_matches(step, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["extra"])

    def restore_best(self, state_like: PyTree) -> tuple[PyTree, dict]:
        """Restores the best checkpoint by `best_metric` (see `restore`)."""
        best = self.best_steps()
        if not best:
            raise FileNotFoundError(
                f"Checkpointer.restore_best: no checkpoint in {self.directory} has a {self.best_metric!r} metric "
                f"(keep_best={self.keep_best})"
            )
        return self.restore(state_like, best[0])

    def _check_matches(self, step: int, target: PyTree) -> None:
        """Raises a one-line error at the first leaf whose path or shape differs between checkpoint and target."""
        saved_tree = self._manager.item_metadata(step)["state"].tree
        is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
        saved = {_path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved_tree, is_meta)}
        wanted = {_path_name(p): _stored_shape(t) for p, t in jax.tree_util.tree_leaves_with_path(target)}
        for name in list(wanted) + [n for n in saved if n not in wanted]:
            got, want = saved.get(name, "no such leaf"), wanted.get(name, "no such leaf")
            if got != want:
                raise ValueError(
                    f"Checkpointer.restore: step {step} in {self.directory} does not fit the target at leaf "
                    f"'{name}': saved {got}, target {want}; restore into a state built from the same config"
                )

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the pending save and releases Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
