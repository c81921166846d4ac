"""What a run shows a person: metrics (JSONL + TensorBoard), the loss curve as a PNG, and the end summary."""

from __future__ import annotations

import json
import math
import os
from typing import Any


class MetricsWriter:
    """Append-only `metrics.jsonl` plus TensorBoard events under `<run>/tb`."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
        except ImportError:  # TensorBoard events are a convenience; the JSONL file is the record
            self._tb = None

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
