"""A run as named stages a researcher can call one by one; `run(cfg)` calls them in order:

    prep = prepare(cfg)                 # checks, tokenizer, data, model config; writes nothing
    session = build(prep)               # weights, trainable tree, optimizer
    restore(prep, session)              # the latest checkpoint, when output_dir holds this run
    claim(prep, session)                # config.yaml, run.json, checkpoints, metrics: the directory is this run's
    result = train(prep, session)       # the optimizer steps, evaluations and checkpoints
    metrics = evaluate(prep, session)   # eval loss and exact match of the current weights
    export(prep, session, summary)      # adapter / merged directories, each checked against transformers

Everything that can be checked without compute is checked in `prepare`, so a mistake costs seconds, not a compiled
model, and a refused run leaves its output_dir as it found it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import math
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm.auto import tqdm

import jaxft
from jaxft import peft
from jaxft.data import Batches
from jaxft.models.llama import ModelOptions
from jaxft.train.checkpoint import Checkpointer
from jaxft.train.config import TrainConfig
from jaxft.train.evaluate import eval_loss, exact_match, generation_prompts
from jaxft.train.export import export_all
from jaxft.train.optim import lr_schedule, make_optimizer, warmup_steps
from jaxft.train.prepare import Prepared, check_output_dir, prepare, saved_config
from jaxft.train.report import MetricsWriter, format_summary, plot_curves
from jaxft.train.signals import StopSignal
from jaxft.train.step import StaticModel, count_params, make_eval_step, make_train_step

__all__ = ["Session", "TrainResult", "build", "check_output_dir", "claim", "evaluate", "export", "prepare", "restore",
           "run", "train"]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "jaxft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _stack(batches: list[dict]) -> dict:
    return {k: jnp.asarray(np.stack([b[k] for b in batches])) for k in batches[0]}


@dataclasses.dataclass
class Session:
    """The arrays and the mutable state of a run: `model` (static), `trainable` (what the optimizer updates),
    `frozen` (the base weights of a PEFT method; None for full fine-tuning), the optimizer and its state, the PRNG key,
    the train batch iterator and the step reached. `ckpt` and `writer` exist once the run has claimed its
    output_dir (`claim`)."""

    model: StaticModel
    trainable: Any
    frozen: Any
    optimizer: optax.GradientTransformation
    opt_state: Any
    rng: jax.Array
    batches: Batches
    trainable_parameters: int
    total_parameters: int
    step: int = 0
    restored_from: int | None = None
    ckpt: Checkpointer | None = None
    writer: MetricsWriter | None = None
    _train_step: Any = None
    _eval_step: Any = None

    @property
    def train_step(self):
        if self._train_step is None:
            self._train_step = make_train_step(self.model, self.optimizer)
        return self._train_step

    @property
    def eval_step(self):
        if self._eval_step is None:
            self._eval_step = make_eval_step(self.model)
        return self._eval_step

    def state(self) -> dict:
        """The checkpointed state."""
        return {"trainable": self.trainable, "opt_state": self.opt_state, "rng": self.rng}


def build(prep: Prepared) -> Session:
    """Load the weights and build the trainable tree (a fresh adapter, the one of `method.init_from`, or a float32
    copy of the weights for full fine-tuning), the optimizer and its state."""
    cfg, spec = prep.cfg, prep.spec
    options = ModelOptions(dtype=jnp.dtype(cfg.model.compute_dtype), remat=cfg.model.remat,
                           scan_layers=cfg.model.scan_layers)
    config, params = jaxft.load_pretrained(cfg.model.path, dtype=cfg.model.param_dtype)
    init_key, rng = jax.random.split(jax.random.key(cfg.train.seed))
    if spec is None:
        trainable, frozen = jax.tree.map(lambda a: a.astype(jnp.float32), params), None
    elif cfg.method.get("init_from"):
        spec, trainable = peft.load_adapter(cfg.method["init_from"], config)
        frozen = params
    else:
        trainable = peft.init(spec, config, params, init_key, tokenizer=prep.tokenizer)
        frozen = params
    optimizer = make_optimizer(cfg.optim, trainable, prep.total_steps)
    if spec is not None:
        optimizer = optax.chain(optimizer, peft.mask_updates(peft.trainable_mask(spec, frozen, trainable)))
    n_trainable = count_params(trainable)
    n_total = count_params(params) + (0 if spec is None else n_trainable)
    return Session(StaticModel(config, spec, options), trainable, frozen, optimizer, optimizer.init(trainable), rng,
                   prep.data.train_batches(cfg.train.batch_size, cfg.train.seed), n_trainable, n_total)


def _checkpointer(cfg: TrainConfig) -> Checkpointer:
    return Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), keep_last=cfg.train.keep_last,
                        keep_best=cfg.train.keep_best)


def restore(prep: Prepared, session: Session) -> int:
    """Continue from the latest checkpoint when `output_dir` holds this run; returns the step reached (0: none)."""
    if not prep.resuming:
        return session.step
    ckpt = session.ckpt or _checkpointer(prep.cfg)
    session.ckpt = ckpt
    if ckpt.latest_step() is None:
        return session.step
    state, extra = ckpt.restore(session.state())
    session.trainable, session.opt_state, session.rng = state["trainable"], state["opt_state"], state["rng"]
    session.batches.restore(extra["data"])
    session.step = session.restored_from = int(extra["step"])
    print(f"resuming {prep.cfg.output_dir} from step {session.step}")
    return session.step


def claim(prep: Prepared, session: Session) -> None:
    """Make `output_dir` this run's: write config.yaml and run.json, open the checkpoints and the metrics log."""
    cfg = prep.cfg
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(saved_config(cfg), f, sort_keys=False)
    run_info = {"seed": cfg.train.seed, "trainable_parameters": session.trainable_parameters,
                "total_parameters": session.total_parameters, "total_steps": prep.total_steps,
                "versions": _versions()}
    with open(os.path.join(cfg.output_dir, "run.json"), "w") as f:
        json.dump(run_info, f, indent=2)
    if session.ckpt is None:
        session.ckpt = _checkpointer(cfg)
    if session.writer is None:
        session.writer = MetricsWriter(cfg.output_dir)


def evaluate(prep: Prepared, session: Session, *, loss: bool = True, generate: bool = True) -> dict[str, float]:
    """`{"eval_loss": ..., "exact_match": ...}` of the current weights (each present when measured)."""
    cfg, out = prep.cfg, {}
    if loss:
        el = eval_loss(session.eval_step, session.trainable, session.frozen, prep.data, cfg.eval.batch_size)
        if el is not None:
            out["eval_loss"] = el
    if generate and cfg.eval.generate:
        acc = exact_match(session.model, session.trainable, session.frozen, prep.tokenizer,
                          generation_prompts(prep.data, cfg.eval.generate), max_new_tokens=cfg.eval.max_new_tokens,
                          batch_size=cfg.eval.batch_size)
        if acc is not None:
            out["exact_match"] = acc
    return out


@dataclasses.dataclass
class TrainResult:
    """How `train` ended: `stopped` ("completed", a signal, or the divergence message), the last logged train
    metrics, and the time taken."""

    stopped: str
    last: dict[str, float]
    train_s: float
    tokens: float
    compile_s: float | None

    @property
    def finished(self) -> bool:
        return self.stopped == "completed"


def train(prep: Prepared, session: Session) -> TrainResult:
    """Take optimizer steps from `session.step` to the run's total: log, evaluate and checkpoint on schedule; stop
    on SIGTERM/SIGINT (checkpoint saved) or on a diverging loss (the failed update dropped)."""
    if session.ckpt is None or session.writer is None:
        claim(prep, session)
    cfg, total_steps, ckpt, writer = prep.cfg, prep.total_steps, session.ckpt, session.writer
    lr_at = lr_schedule(cfg.optim, total_steps)
    stop_reason, smooth_loss, lowest, last = "completed", None, math.inf, {}
    t_train, tokens_seen, compile_s = time.perf_counter(), 0.0, None
    settle = max(10, warmup_steps(cfg.optim, total_steps))  # divergence is judged after warm-up
    bar = tqdm(total=total_steps, initial=session.step, desc="train", unit="step", dynamic_ncols=True)
    with StopSignal() as stop:
        while session.step < total_steps:
            step = session.step
            micro = [next(session.batches) for _ in range(cfg.train.grad_accum)]
            t = time.perf_counter()
            new_trainable, new_opt, m = session.train_step(session.trainable, session.opt_state, session.frozen,
                                                           _stack(micro), jax.random.fold_in(session.rng, step))
            loss = float(m["loss"])
            if compile_s is None:
                compile_s = time.perf_counter() - t
            # diverging: the running average of the loss has risen far above its lowest value (by a factor and by
            # at least one nat, so one noisy batch of a nearly-learned task, 0.02 -> 0.2, does not count)
            smooth = loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss
            lowest = min(lowest, smooth)
            diverging = (step > settle and smooth > cfg.train.divergence_factor * lowest and smooth > lowest + 1.0)
            if not math.isfinite(loss) or diverging:
                # the failed update is dropped: the last good checkpoint stays the one a resume takes
                stop_reason = (f"loss {loss:.4g} at step {step + 1} is "
                               f"{'not finite' if not math.isfinite(loss) else 'diverging'}; stopped without "
                               f"saving it (last good checkpoint: step {ckpt.latest_step()}); lower optim.lr or "
                               "raise optim.warmup_steps")
                break
            session.trainable, session.opt_state, session.step = new_trainable, new_opt, step + 1
            step = session.step
            smooth_loss = smooth
            tokens_seen += float(m["tokens"])
            lr = float(lr_at(step - 1))
            last = {"loss": loss, "lr": lr, "grad_norm": float(m["grad_norm"])}
            elapsed = time.perf_counter() - t_train - (compile_s or 0)
            tps = tokens_seen / elapsed if elapsed > 0 else 0.0
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if cfg.train.log_every and (step % cfg.train.log_every == 0 or step == 1):
                writer.write(step, "train", dict(last, tokens_per_s=tps))
            metrics = None
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                el = evaluate(prep, session, generate=False).get("eval_loss")
                if el is not None:
                    metrics = {"eval_loss": el}
                    writer.write(step, "eval", {"eval_loss": el, "perplexity": math.exp(min(el, 50))})
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or metrics:
                ckpt.save(step, session.state(), extra={"step": step, "data": session.batches.state()},
                          metrics=metrics)
            if stop.requested:
                stop_reason = f"{stop.signal_name} received: checkpoint saved at step {step}"
                break
    bar.close()
    return TrainResult(stop_reason, last, time.perf_counter() - t_train, tokens_seen, compile_s)


def export(prep: Prepared, session: Session, summary: dict[str, Any]) -> dict[str, Any]:
    """Write and check the exports the config asks for; returns their summary entries."""
    return export_all(prep.cfg, session.model, session.trainable, session.frozen, prep.tokenizer, prep.data, summary)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train per `cfg`; returns the summary dict (also written to `<output_dir>/summary.json`)."""
    t_start = time.perf_counter()
    prep = prepare(cfg)
    print(prep.data.stats.summary())
    session = build(prep)
    restore(prep, session)
    claim(prep, session)
    summary: dict[str, Any] = {"output_dir": cfg.output_dir, "method": cfg.method_type,
                               "trainable parameters": f"{session.trainable_parameters:,} of "
                                                       f"{session.total_parameters:,}"}
    if cfg.eval.base and cfg.eval.generate and session.step == 0:
        t = time.perf_counter()
        acc = evaluate(prep, session, loss=False).get("exact_match")
        if acc is not None:
            summary["exact match before"] = acc
            session.writer.write(0, "eval", {"exact_match": acc})
            print(f"base model exact match: {acc:.1%} ({time.perf_counter() - t:.0f} s)")

    result = train(prep, session)
    el = None
    if result.finished or result.stopped.startswith("SIG"):
        if result.finished:
            el = evaluate(prep, session, generate=False).get("eval_loss")
        metrics = {"eval_loss": el} if el is not None else None
        session.ckpt.save(session.step, session.state(), extra={"step": session.step,
                                                                "data": session.batches.state()}, metrics=metrics)
    session.ckpt.wait()
    session.ckpt.close()
    summary.update({"stopped": result.stopped, "steps": session.step, "train time (s)": result.train_s,
                    "tokens/s": result.tokens / max(result.train_s - (result.compile_s or 0), 1e-9),
                    "first step incl. compile (s)": result.compile_s or 0.0})
    if result.last:
        summary["final train loss"] = result.last["loss"]
    if el is not None:
        summary["eval loss"] = el
        summary["eval perplexity"] = math.exp(min(el, 50))
        session.writer.write(session.step, "eval", {"eval_loss": el, "perplexity": math.exp(min(el, 50))})
    if result.finished and cfg.eval.generate:
        acc = evaluate(prep, session, loss=False).get("exact_match")
        if acc is not None:
            summary["exact match after"] = acc
            session.writer.write(session.step, "eval", {"exact_match": acc})
    session.writer.close()
    plot = plot_curves(cfg.output_dir)
    if plot:
        summary["curves"] = plot
    if result.finished:
        summary.update(export(prep, session, summary))
    summary["wall time (s)"] = time.perf_counter() - t_start
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(format_summary(summary))
    return summary
