"""What a run shows a person: metrics (JSONL, TensorBoard, W&B), the curves as a PNG, and the end summary."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

from matplotlib.figure import Figure
from tensorboardX import SummaryWriter


class MetricsWriter:
    """`metrics.jsonl` (the record) plus the trackers of `report_to` ("tensorboard": events under `<run>/tb`).

    resume_step: the step a resumed run restored. Rows logged after it by the interrupted process (steps it took after
    its last checkpoint, which the resumed run takes again) are cut from `metrics.jsonl`, TensorBoard is told to drop
    its events from step `resume_step + 1` on (`purge_step`), and a `{"kind": "resume"}` row marks the point.
    None: the run starts at step 0 (the log of an interrupted run that never checkpointed starts over).
    """

    def __init__(self, run_dir: str, *, report_to: Sequence[str] = ("tensorboard",), resume_step: int | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        had_log = os.path.exists(self.path)
        if resume_step is not None:
            kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept + [{"step": resume_step, "kind": "resume"}])
        elif had_log:
            os.remove(self.path)
        self._tb = None
        if "tensorboard" in report_to:
            # TensorBoard hides earlier events at steps >= purge_step: the replayed ones (all, when starting over)
            purge = resume_step + 1 if resume_step is not None else (0 if had_log else None)
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        row = {"step": step, "kind": kind, **{k: float(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self._tb.add_scalar(f"{kind}/{k}", float(v), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(run_dir: str) -> str | None:
    """`<run>/curves.png`: training loss per step and held-out loss at each evaluation."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval" and "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#3b6ea8", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d1603d")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary as aligned lines."""
    lines = ["", "== jaxft run summary =="]
    width = max(len(k) for k in summary) + 2
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        lines.append(f"{k:<{width}}{v}")
    return "\n".join(lines)
