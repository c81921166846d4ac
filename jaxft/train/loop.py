"""A run as named stages a researcher can call one by one; `run(cfg)` calls them in order:

    prep = prepare(cfg)                 # checks, tokenizer, data, model config; writes nothing
    session = build(prep)               # weights, trainable tree, optimizer
    restore(prep, session)              # the latest checkpoint, when output_dir holds this run
    result = train(prep, session)       # claims output_dir, then steps, evaluations and checkpoints
    metrics = evaluate(prep, session)   # eval loss and exact match of the current weights
    export(prep, session, summary)      # adapter / merged directories, each checked against transformers

Everything that can be checked without compute is checked in `prepare`, so a mistake costs seconds, not a compiled
model. A run claims its output_dir (config.yaml) only when training starts, so a refused run leaves it usable.
A finished run run again says so and writes only the exports it lacks.
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
from jaxft import parallel, peft, quant, runtime
from jaxft.data import Batches
from jaxft.io.hf import is_bnb_checkpoint
from jaxft.models.params import abstract_params, logical_axes
from jaxft.parallel import distributed
from jaxft.parallel.rules import shard_counts
from jaxft.train.checkpoint import Checkpointer
from jaxft.train.config import TrainConfig, check_quantize
from jaxft.train.scoring import eval_loss, exact_match, generation_prompts
from jaxft.train.exports import export_all, requested_exports
from jaxft.train.optim import lr_schedule, make_optimizer, warmup_steps
from jaxft.train.preflight import Prepared, check_output_dir, prepare, saved_config
from jaxft.train.report import MetricsWriter, format_summary, plot_curves
from jaxft.train.sharded import Placement, check_run, place_session_trees, placement, put_replicated, run_mesh
from jaxft.train.signals import StopSignal
from jaxft.train.step import StaticModel, count_params, make_eval_step, make_train_step

__all__ = ["Session", "TrainResult", "build", "check_output_dir", "claim", "evaluate", "export", "prepare", "restore",
           "run", "train"]

SUMMARY = "summary.json"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "optax", "orbax-checkpoint", "transformers", "jaxft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _next_batches(batches: Batches, accum: int, sharding: Any = None) -> dict:
    """The next `accum` micro-batches stacked `[accum, rows, time]`. On a mesh each process builds only the rows
    its devices hold (`distributed.process_rows`) and the global arrays are assembled from every process's share
    (`jax.make_array_from_process_local_data`); all processes advance the same global position."""
    if sharding is None:
        micro = [next(batches) for _ in range(accum)]
        return {k: jnp.asarray(np.stack([b[k] for b in micro])) for k in micro[0]}
    shape = (accum, batches.batch_size, batches.seq_len)
    share = distributed.process_rows(sharding, shape, axis=1)
    micro = [batches.next_share(share) for _ in range(accum)]
    return distributed.global_batch({k: np.stack([b[k] for b in micro]) for k in micro[0]}, sharding, shape)


def _new_progress() -> dict[str, Any]:
    """The whole run's figures, carried across sessions in each checkpoint's `extra`: seconds in the train loop
    (`train_s`), in first steps incl. compilation (`compile_s`), in the other steps (`step_s`) and their tokens
    (`tokens`), in evaluations during training (`eval_s`); the steps where sessions resumed; the base model's scores
    (`before`); the best eval loss so far and the evaluations since it (early stopping)."""
    return {"train_s": 0.0, "compile_s": 0.0, "step_s": 0.0, "tokens": 0.0, "eval_s": 0.0, "resumed_at": [],
            "before": {}, "best_eval": None, "evals_since_best": 0}


@dataclasses.dataclass
class Session:
    """The arrays and the mutable state of a run: `model` (static), `trainable` (what the optimizer updates),
    `frozen` (the base weights of a PEFT method; None for full fine-tuning), the optimizer and its state, the PRNG key,
    the train batch iterator, the step reached and the run's figures so far (`progress`). `ckpt` and `writer` exist
    once the run has claimed its output_dir (`claim`). `placement`: the trees' shardings on a device mesh (None on
    one device; see `jaxft.train.sharded`). `load_host_kib`: each process's peak host memory growth while the
    weights loaded (None where the OS cannot say)."""

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
    progress: dict[str, Any] = dataclasses.field(default_factory=_new_progress)
    ckpt: Checkpointer | None = None
    writer: MetricsWriter | None = None
    placement: Placement | None = None
    load_host_kib: list[int] | None = None
    _train_step: Any = None
    _eval_step: Any = None

    @property
    def train_step(self):
        if self._train_step is None:
            self._train_step = make_train_step(self.model, self.optimizer, self.placement)
        return self._train_step

    @property
    def eval_step(self):
        if self._eval_step is None:
            self._eval_step = make_eval_step(self.model, self.placement)
        return self._eval_step

    def state(self) -> dict:
        """The checkpointed state."""
        return {"trainable": self.trainable, "opt_state": self.opt_state, "rng": self.rng}

    def extra(self) -> dict:
        """The checkpointed JSON beside it: the step, the data position, the run's figures. Multi-host: each
        process's position too (gathered: Orbax writes this JSON from process 0; every process must call it)."""
        out = {"step": self.step, "data": self.batches.state(), "progress": self.progress}
        if jax.process_count() > 1:
            got = distributed.gather_ints([self.batches.epoch, self.batches.position])
            out["data_by_process"] = [{"epoch": int(e), "position": int(p)} for e, p in got]
        return out


def build(prep: Prepared) -> Session:
    """Load the weights and build the trainable tree (a fresh adapter, the one of `method.init_from`, or a float32
    copy of the weights for full fine-tuning), the optimizer and its state. With more than one device, the mesh of
    `parallel` is checked against the model and the batch before any weight is read, the shardings are derived from
    the abstract trees, and each process reads only the slabs of the weights its devices hold (multi-host: no
    process holds the whole model)."""
    cfg, spec = prep.cfg, prep.spec
    options = cfg.model.options()  # after jax.distributed: it asks the platform (compute_dtype auto)
    mesh = run_mesh(cfg.parallel)
    if mesh is not None:
        check_run(prep.model_config, spec, cfg.parallel, mesh, cfg.train.batch_size)
    t, rss_before = time.perf_counter(), runtime.reset_peak_rss()
    check_quantize(cfg.quantization(), prep.model_config)
    quantize = None if cfg.quantization() is None else quant.QuantPlan.from_section(cfg.quantize)
    config = prep.model_config
    init_key, rng = jax.random.split(jax.random.key(cfg.train.seed))
    adapter = None
    if spec is not None and cfg.method.get("init_from"):
        spec, adapter = peft.load_adapter(cfg.method["init_from"], config)

    def make_trainable(params):
        if spec is None:
            return jax.tree.map(lambda a: a.astype(jnp.float32), params)
        if adapter is not None:
            return adapter
        return peft.init(spec, config, params, init_key, tokenizer=prep.tokenizer)

    def make_opt(trainable, frozen):
        optimizer = make_optimizer(cfg.optim, trainable, prep.total_steps)
        if spec is not None:
            optimizer = optax.chain(optimizer, peft.mask_updates(peft.trainable_mask(spec, frozen, trainable)))
        return optimizer

    where = None
    if mesh is None or is_bnb_checkpoint(cfg.model.path):
        # One device: the base read (and quantised, for qlora) a tensor at a time. A bitsandbytes checkpoint (its
        # NF4 layout known only once read; a quarter of the dense bytes) is read whole, then placed.
        config, params = jaxft.load_pretrained(cfg.model.path, dtype=cfg.model.param_dtype, quantize=quantize)
        trainable = make_trainable(params)
        frozen = None if spec is None else params
        quant.refuse_trainable(trainable, "trainable parameters")
        optimizer = make_opt(trainable, frozen)
        opt_state = optimizer.init(trainable)
        if mesh is not None:
            where = _quantized_frozen(placement(mesh, cfg.parallel.rules, config, spec, trainable, frozen,
                                                opt_state), cfg, config, frozen)
            trainable, frozen, opt_state = place_session_trees(where, trainable, frozen, opt_state)
            rng = put_replicated(rng, where)
    else:
        # shardings first, from shapes alone; then each process reads its slabs straight onto its devices (a
        # quantised base: each process quantises a matrix at a time and keeps its part of the NF4 fields)
        base = abstract_params(config, jnp.dtype(cfg.model.param_dtype))
        if quantize is not None:
            base = quant.abstract_quantized(base, quantize)
        abstract = jax.eval_shape(make_trainable, base)
        quant.refuse_trainable(abstract, "trainable parameters")
        optimizer = make_opt(abstract, None if spec is None else base)
        where = _quantized_frozen(placement(mesh, cfg.parallel.rules, config, spec, abstract,
                                            None if spec is None else base, jax.eval_shape(optimizer.init, abstract)),
                                  cfg, config, None if spec is None else base)
        _, params = jaxft.load_pretrained(cfg.model.path, dtype=cfg.model.param_dtype, quantize=quantize,
                                          shardings=where.trainable if spec is None else where.frozen)
        frozen = None if spec is None else params
        trainable = make_trainable(params)
        trainable, frozen, opt_state = place_session_trees(where, trainable, frozen, optimizer.init(trainable))
        rng = put_replicated(rng, where)
    n_trainable = count_params(trainable)
    n_total = count_params(params) + (0 if spec is None else n_trainable)
    del params
    # each process's peak host memory while loading, above what it held before (KiB; all processes gather it)
    grown = None if rss_before is None else max(0, (runtime.peak_rss() or rss_before) - rss_before) // 1024
    load_kib = [int(v) for v in distributed.gather_ints([-1 if grown is None else grown])[:, 0]]
    load_kib = None if min(load_kib) < 0 else load_kib
    mem = "" if grown is None else f"; host memory peak +{grown / 1024:.0f} MB"
    print(f"model: {cfg.model.path} loaded, {n_trainable:,} of {n_total:,} parameters trainable "
          f"({time.perf_counter() - t:.0f} s{mem})", flush=True)
    if mesh is not None:
        print(f"mesh: {dict(mesh.shape)} over {mesh.size} devices, rules {cfg.parallel.rules}", flush=True)
    return Session(StaticModel(config, spec, options), trainable, frozen, optimizer, opt_state, rng,
                   prep.data.train_batches(cfg.train.batch_size, cfg.train.seed), n_trainable, n_total,
                   placement=where, load_host_kib=load_kib)


def _quantized_frozen(where: Placement, cfg: TrainConfig, config: Any, frozen: Any) -> Placement:
    """`where` with the frozen base's NF4 leaves (if any) sharded by their fields' axes (codes, absmax,
    double-quantisation tables: `jaxft.quant.tree_axes`)."""
    if frozen is None or not quant.nf4_leaves(frozen):
        return where
    axes = quant.tree_axes(logical_axes(config), frozen, shard_counts(cfg.parallel.rules, where.mesh))
    return dataclasses.replace(where, frozen=parallel.param_shardings(axes, cfg.parallel.rules, where.mesh))


def _checkpointer(cfg: TrainConfig) -> Checkpointer:
    return Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), keep_last=cfg.train.keep_last,
                        keep_best=cfg.train.keep_best)


def restore(prep: Prepared, session: Session, step: int | None = None) -> int:
    """Continue from the latest checkpoint (or checkpoint `step`) when `output_dir` holds this run; returns the step
    reached (0: nothing to restore)."""
    if not prep.resuming:
        return session.step
    if session.ckpt is None:
        session.ckpt = _checkpointer(prep.cfg)
    if session.ckpt.latest_step() is None:
        return session.step
    state, extra = session.ckpt.restore(session.state(), step)
    session.trainable, session.opt_state, session.rng = state["trainable"], state["opt_state"], state["rng"]
    session.batches.restore(extra["data"])
    session.step = session.restored_from = int(extra["step"])
    session.progress = dict(_new_progress(), **extra.get("progress", {}))
    if step is None:
        print(f"resuming {prep.cfg.output_dir} from step {session.step}", flush=True)
    return session.step


def claim(prep: Prepared, session: Session) -> None:
    """Make `output_dir` this run's: write config.yaml and run.json, open the checkpoints and the metrics log (cut
    back to the restored step on a resume)."""
    cfg = prep.cfg
    os.makedirs(cfg.output_dir, exist_ok=True)
    if distributed.is_primary():  # multi-host: process 0 writes what a run writes once
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(saved_config(cfg), f, sort_keys=False)
        run_info = {"seed": cfg.train.seed, "trainable_parameters": session.trainable_parameters,
                    "total_parameters": session.total_parameters, "total_steps": prep.total_steps,
                    "processes": jax.process_count(), "versions": _versions()}
        with open(os.path.join(cfg.output_dir, "run.json"), "w") as f:
            json.dump(run_info, f, indent=2)
    if session.ckpt is None:
        session.ckpt = _checkpointer(cfg)
    if session.writer is None:
        if session.restored_from is not None and session.restored_from not in session.progress["resumed_at"]:
            session.progress["resumed_at"].append(session.restored_from)
        session.writer = MetricsWriter(cfg.output_dir, report_to=cfg.train.report_to,
                                       resume_step=session.restored_from, config=saved_config(cfg))


def evaluate(prep: Prepared, session: Session, *, loss: bool = True, generate: bool = True) -> dict[str, float]:
    """`{"eval_loss": nats, "exact_match": percent}` of the current weights (each present when measured)."""
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


def _generation_line(prep: Prepared, what: str) -> str:
    n = len(generation_prompts(prep.data, prep.cfg.eval.generate))
    return (f"{what}: exact match of greedy generations on {n} eval prompts (up to {prep.cfg.eval.max_new_tokens} "
            "new tokens each)")


@dataclasses.dataclass
class TrainResult:
    """How `train` ended: `stopped` ("completed", "completed (early stopping: ...)", a signal, or the divergence
    message) and the last train metrics logged."""

    stopped: str
    last: dict[str, float]

    @property
    def finished(self) -> bool:
        return self.stopped.startswith("completed")


def _early_stop(cfg: TrainConfig, progress: dict, step: int, el: float) -> str | None:
    """Update the best eval loss; the stop message when `train.early_stopping_patience` evaluations in a row brought
    no new best, else None."""
    best = progress["best_eval"]
    if best is None or el < best[1]:
        progress["best_eval"], progress["evals_since_best"] = [step, el], 0
        return None
    progress["evals_since_best"] += 1
    patience = cfg.train.early_stopping_patience
    if patience and progress["evals_since_best"] >= patience:
        return (f"completed (early stopping: eval loss {el:.4g} at step {step}, no better than {best[1]:.4g} at step "
                f"{best[0]} for {patience} evaluation{'s' if patience > 1 else ''})")
    return None


def train(prep: Prepared, session: Session) -> TrainResult:
    """Take optimizer steps from `session.step` to the run's total: log, evaluate and checkpoint on schedule; stop
    on SIGTERM/SIGINT (checkpoint saved), on a diverging loss (the failed update dropped), or early.

    Timing: the first step of a session (compilation) is counted apart; tokens/s is over the other steps' own time,
    evaluations excluded."""
    if session.ckpt is None or session.writer is None:
        claim(prep, session)
    cfg, total_steps, ckpt, writer, progress = prep.cfg, prep.total_steps, session.ckpt, session.writer, session.progress
    lr_at = lr_schedule(cfg.optim, total_steps)
    stop_reason, smooth_loss, lowest, last, first = "completed", None, math.inf, {}, True
    t_train = time.perf_counter()
    settle = max(10, warmup_steps(cfg.optim, total_steps))  # divergence is judged after warm-up
    bar = tqdm(total=total_steps, initial=session.step, desc="train", unit="step", dynamic_ncols=True)
    bar.set_postfix_str("compiling the train step")
    with StopSignal() as stop:
        while session.step < total_steps:
            step = session.step
            batch = _next_batches(session.batches, cfg.train.grad_accum, session.placement and session.placement.batch)
            t = time.perf_counter()
            new_trainable, new_opt, m = session.train_step(
                session.trainable, session.opt_state, session.frozen, batch, jax.random.fold_in(session.rng, step))
            loss = float(m["loss"])
            dt = time.perf_counter() - t
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
            if first:  # compilation: its time apart, its tokens not in tokens/s
                progress["compile_s"] += dt
                first = False
            else:
                progress["step_s"] += dt
                progress["tokens"] += float(m["tokens"])
            tps = progress["tokens"] / progress["step_s"] if progress["step_s"] > 0 else None
            lr = float(lr_at(step - 1))
            last = {"loss": loss, "lr": lr, "grad_norm": float(m["grad_norm"])}
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", **({"tok_s": f"{tps:.0f}"} if tps else {}))
            bar.update(1)
            if cfg.train.log_every and (step % cfg.train.log_every == 0 or step == 1):
                writer.write(step, "train", dict(last, **({"tokens_per_s": tps} if tps else {})))
            metrics = None
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                t = time.perf_counter()
                el = evaluate(prep, session, generate=False).get("eval_loss")
                progress["eval_s"] += time.perf_counter() - t
                if el is not None:
                    metrics = {"eval_loss": el}
                    writer.write(step, "eval", {"eval_loss": el, "perplexity": math.exp(min(el, 50))})
                    early = _early_stop(cfg, progress, step, el)
                    if early:
                        stop_reason = early
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or metrics:
                progress["train_s"] += time.perf_counter() - t_train
                t_train = time.perf_counter()
                ckpt.save(step, session.state(), extra=session.extra(), metrics=metrics)
            if stop_reason != "completed":
                break
            if stop.poll(step):  # agreed by all processes, so that all stop after this step
                stop_reason = f"{stop.signal_name} received: checkpoint saved at step {step}"
                break
    bar.close()
    progress["train_s"] += time.perf_counter() - t_train
    return TrainResult(stop_reason, last)


def export(prep: Prepared, session: Session, summary: dict[str, Any], kinds: list[str] | None = None) -> dict:
    """Write and check the exports the config asks for (or only `kinds`); returns their summary entries."""
    return export_all(prep.cfg, session.model, session.trainable, session.frozen, prep.tokenizer, prep.data, summary,
                      kinds=kinds)


def _base_evaluation(prep: Prepared, session: Session) -> None:
    cfg = prep.cfg
    if not (cfg.eval.base and cfg.eval.generate and session.step == 0 and prep.data.eval_generation):
        return
    print(_generation_line(prep, "base model") + " ...", flush=True)
    t = time.perf_counter()
    acc = evaluate(prep, session, loss=False)["exact_match"]
    session.progress["before"] = {"exact_match": acc}
    print(f"base model: exact match {acc:.1f}% ({time.perf_counter() - t:.0f} s)", flush=True)


def _select_export_step(prep: Prepared, session: Session) -> tuple[int, str]:
    """Restore the weights `export.checkpoint` asks for; returns (step, why)."""
    cfg = prep.cfg
    if cfg.export.checkpoint == "last":
        return session.step, "export.checkpoint: last (the final step)"
    scores = session.ckpt.best_steps()
    if not scores:
        return session.step, "export.checkpoint: best, but no checkpoint has an eval loss; the final step"
    best = scores[0]
    if best != session.step:
        state, _ = session.ckpt.restore(session.state(), best)
        session.trainable = state["trainable"]
    value = session.ckpt.score(best)
    return best, (f"export.checkpoint: best, the lowest {cfg.export.best_metric} ({value:.4g}) of the kept "
                  "checkpoints (lower is better)")


def _summary(prep: Prepared, session: Session, result: TrainResult, final: dict[str, float]) -> dict[str, Any]:
    """summary.json: numbers as numbers (seconds, percent, nats); `format_summary` formats them for a person."""
    p = session.progress
    s: dict[str, Any] = {"output_dir": prep.cfg.output_dir, "method": prep.cfg.method_type,
                         "stopped": result.stopped, "complete": result.finished, "steps": session.step,
                         "trainable parameters": session.trainable_parameters,
                         "total parameters": session.total_parameters}
    if "exact_match" in p["before"]:
        s["exact match before (%)"] = p["before"]["exact_match"]
    if "exact_match" in final:
        s["exact match after (%)"] = final["exact_match"]
    if result.last:
        s["final train loss"] = result.last["loss"]
    if "eval_loss" in final:
        s["eval loss"] = final["eval_loss"]
        s["eval perplexity"] = math.exp(min(final["eval_loss"], 50))
    s.update({"train time (s)": p["train_s"], "first steps incl. compile (s)": p["compile_s"],
              "step time (s)": p["step_s"], "eval time in training (s)": p["eval_s"],
              "tokens/s": p["tokens"] / p["step_s"] if p["step_s"] > 0 else None})
    if p["resumed_at"]:
        s["resumed at steps"] = list(p["resumed_at"])
    if session.load_host_kib is not None:  # one figure per process
        mb = [round(k / 1024, 1) for k in session.load_host_kib]
        s["host memory while loading (MB)"] = mb[0] if len(mb) == 1 else mb
    return s


def _write_summary(cfg: TrainConfig, summary: dict[str, Any]) -> None:
    if not distributed.is_primary():
        return
    with open(os.path.join(cfg.output_dir, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2)


def _completed(prep: Prepared) -> dict[str, Any] | None:
    """The summary of a finished run in output_dir (None when the run there has not finished)."""
    path = os.path.join(prep.cfg.output_dir, SUMMARY)
    if not prep.resuming or not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary if summary.get("complete") else None


def _export_missing(prep: Prepared, summary: dict[str, Any]) -> dict[str, Any]:
    """A finished run run again: write the exports it asks for that are not there (from the step exported first),
    and leave everything else, its figures included, as it was."""
    cfg = prep.cfg
    missing = [k for k in requested_exports(cfg, prep.spec) if not os.path.isdir(os.path.join(cfg.output_dir, k))]
    step = summary.get("exported step", summary.get("steps"))
    if not missing:
        print(f"{cfg.output_dir}: this run is complete (step {summary.get('steps')}) and holds every export asked "
              "for; nothing to do", flush=True)
        return summary
    print(f"{cfg.output_dir}: this run is complete (step {summary.get('steps')}); exporting what is missing: "
          f"{', '.join(missing)} (weights of step {step})", flush=True)
    session = build(prep)
    restore(prep, session, step)
    summary = dict(summary)
    summary.update(export(prep, session, summary, missing))
    session.ckpt.close()
    if "export failed" in summary:
        summary["stopped"] = f"export check failed: {summary['export failed']}"
    if distributed.is_primary():  # the export section now written
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(saved_config(cfg), f, sort_keys=False)
    _write_summary(cfg, summary)
    print(format_summary(summary))
    return summary


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train per `cfg`; returns the summary dict (also written to `<output_dir>/summary.json`)."""
    t_start = time.perf_counter()
    distributed.initialize(cfg.parallel.distributed)  # multi-host: before anything touches a device
    prep = prepare(cfg)
    distributed.sync("jaxft-prepared")  # every process judged output_dir before process 0 claims it
    # the data line counts the prompts that will be scored, not all that could be
    scored = len(generation_prompts(prep.data, cfg.eval.generate)) if cfg.eval.generate else 0
    print(dataclasses.replace(prep.data.stats, eval_generation=scored).summary())
    done = _completed(prep)
    if done is not None:
        return _export_missing(prep, done)
    session = build(prep)
    restore(prep, session)
    _base_evaluation(prep, session)
    claim(prep, session)
    if session.step == 0 and session.progress["before"]:
        session.writer.write(0, "eval", session.progress["before"])

    result = train(prep, session)
    final: dict[str, float] = {}
    if result.finished or result.stopped.startswith("SIG"):
        if result.finished:
            print("final evaluation: eval loss ...", flush=True)
            t = time.perf_counter()
            final = evaluate(prep, session, generate=False)
            if final:
                print(f"final evaluation: eval loss {final['eval_loss']:.4g} ({time.perf_counter() - t:.0f} s)")
        metrics = {"eval_loss": final["eval_loss"]} if final else None
        # re-saved when the loop saved this step already, so that its eval loss ranks it among the best
        session.ckpt.save(session.step, session.state(), extra=session.extra(), metrics=metrics,
                          force=metrics is not None)
    session.ckpt.wait()
    if "eval_loss" in final:
        session.writer.write(session.step, "eval", {"eval_loss": final["eval_loss"],
                                                    "perplexity": math.exp(min(final["eval_loss"], 50))})
    exported = None
    if result.finished:
        exported, why = _select_export_step(prep, session)
        if cfg.eval.generate and prep.data.eval_generation:
            print(_generation_line(prep, f"after training (step {exported})") + " ...", flush=True)
            t = time.perf_counter()
            final.update(evaluate(prep, session, loss=False))
            print(f"after training: exact match {final['exact_match']:.1f}% ({time.perf_counter() - t:.0f} s)")
            session.writer.write(exported, "eval", {"exact_match": final["exact_match"]})
    session.ckpt.close()
    summary = _summary(prep, session, result, final)
    plot = plot_curves(cfg.output_dir)
    if plot:
        summary["curves"] = plot
    if result.finished:
        summary["exported step"] = exported
        summary["exported because"] = why
        summary.update(export(prep, session, summary))
        if "export failed" in summary:
            summary["stopped"] = f"export check failed: {summary['export failed']}"
    summary["wall time (s)"] = time.perf_counter() - t_start
    _write_summary(cfg, summary)
    session.writer.close(summary)
    print(format_summary(summary))
    return summary
