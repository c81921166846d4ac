"""What a run shows a person: metrics (JSONL, TensorBoard, W&B), the curves as a PNG, and the end summary."""

from __future__ import annotations

import json
import math
import os
import secrets
from typing import Any, Sequence

from matplotlib.figure import Figure
from tensorboardX import SummaryWriter

from jaxft.parallel.distributed import is_primary


class MetricsWriter:
    """`metrics.jsonl` (the record) plus the trackers of `report_to` ("tensorboard": events under `<run>/tb`).

    resume_step: the step a resumed run restored. Rows logged after it by the interrupted process (steps it took after
    its last checkpoint, which the resumed run takes again) are cut from `metrics.jsonl`, TensorBoard is told to drop
    its events from step `resume_step + 1` on (`purge_step`), and a `{"kind": "resume"}` row marks the point.
    None: the run starts at step 0 (the log of an interrupted run that never checkpointed starts over).
    In a multi-host run only process 0 writes (`enabled` is False elsewhere, and every method does nothing there).
    """

    def __init__(self, run_dir: str, *, report_to: Sequence[str] = ("tensorboard",), resume_step: int | None = None,
                 config: dict | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = is_primary()
        self._tb, self._wandb, self._wandb_step = None, None, 0
        if not self.enabled:
            return
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
        self._wandb, self._wandb_step = None, 0
        if "wandb" in report_to:
            self._wandb = _wandb_run(run_dir, config, resume_step)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, **{k: float(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        finite = {f"{kind}/{k}": float(v) for k, v in values.items() if math.isfinite(float(v))}
        if self._tb is not None:
            for k, v in finite.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None and finite:
            # W&B steps only go forward: a value of an earlier step (exact match of the best checkpoint) is logged
            # at the latest step
            self._wandb_step = max(self._wandb_step, step)
            self._wandb.log(finite, step=self._wandb_step)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Flush and close the trackers; `summary` (the run's summary.json) becomes the W&B run's summary."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            if summary:
                self._wandb.summary.update({k: v for k, v in summary.items()
                                            if isinstance(v, (int, float, str)) and not isinstance(v, bool)})
            self._wandb.finish()
            self._wandb = None


def _wandb_run(run_dir: str, config: dict | None, resume_step: int | None):
    """A W&B run for `run_dir`: its id is kept in `<run>/wandb_id` so a resumed run continues the same W&B run.
    Project: $WANDB_PROJECT or `jaxft`; WANDB_MODE=offline writes the run under `<run>/wandb` without a network."""
    import wandb  # optional dependency: imported only when train.report_to asks for it

    id_file = os.path.join(run_dir, "wandb_id")
    if resume_step is not None and os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(8)  # W&B run ids: lowercase letters and digits
        with open(id_file, "w") as f:
            f.write(run_id)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "jaxft"), name=os.path.basename(os.path.abspath(run_dir)),
                      id=run_id, resume="allow", dir=run_dir, config=config or {})


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(run_dir: str) -> str | None:
    """`<run>/curves.png`: training and eval loss on a log axis (a fine-tuning loss falls by orders of magnitude),
    the learning rate on a second axis, exact match (%) where measured, and dashed lines where a run resumed.
    Drawn by process 0 only (None elsewhere)."""
    if not is_primary():
        return None
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and r.get("loss", 0) > 0]
    lr = [(r["step"], r["lr"]) for r in rows if r["kind"] == "train" and "lr" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval" and r.get("eval_loss", 0) > 0]
    exact = [(r["step"], r["exact_match"]) for r in rows if r["kind"] == "eval" and "exact_match" in r]
    resumes = [r["step"] for r in rows if r["kind"] == "resume"]
    if not train and not evals:
        return None
    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", color="#3b6ea8", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d1603d")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token, log scale)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3, which="both")
    for i, step in enumerate(resumes):
        ax.axvline(step, color="#777777", linestyle="--", linewidth=1, label="resumed" if i == 0 else None)
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax_lr = ax.twinx()
        ax_lr.plot(*zip(*lr), color="#6aa84f", linewidth=1, alpha=0.8, label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        h, lab = ax_lr.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    for step, value in exact:
        ax.annotate(f"exact match {value:.0f}%", (step, ax.get_ylim()[0]), xytext=(2, 6),
                    textcoords="offset points", rotation=90, fontsize=8, color="#8e44ad")
        ax.axvline(step, color="#8e44ad", linewidth=0.8, alpha=0.5)
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path)
    return path


def _format(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if key.endswith("(%)"):
            return f"{value:.1f}%"
        if key.endswith("(s)"):
            return f"{value:.1f}"
        if key == "tokens/s":
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary as aligned lines."""
    lines = ["", "== jaxft run summary =="]
    width = max(len(k) for k in summary) + 2
    for k, v in summary.items():
        lines.append(f"{k:<{width}}{_format(k, v)}")
    return "\n".join(lines)
