"""`run(cfg)`: supervised fine-tuning end to end — validate, prepare data, load, train, evaluate, export.

Everything that can be checked without compute is checked first (config, output directory, sequence length,
data), so a mistake costs seconds, not a compiled model.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxft.schema import ConfigError
from jaxft.train.config import TrainConfig, method_spec, resolved_dict

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "jaxft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    return None if a == b else f"{path} ({a!r} there, {b!r} now)"


def check_output_dir(cfg: TrainConfig) -> bool:
    """True when `output_dir` holds this very run (resume); raise if it holds anything else."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir {out}: exists and is a file; choose a directory path")
    if not os.path.exists(out) or not os.listdir(out):
        return False
    saved = os.path.join(out, "config.yaml")
    if not os.path.exists(saved):
        raise ConfigError(f"output_dir {out}: exists and holds files that are not a jaxft run; choose another "
                          "output_dir (nothing there is overwritten)")
    with open(saved) as f:
        before = yaml.safe_load(f)
    now = json.loads(json.dumps(resolved_dict(cfg)))
    diff = _first_difference(before, now)
    if diff:
        raise ConfigError(f"output_dir {out}: holds another run (config differs at {diff}); choose another "
                          "output_dir, or restore that config to resume it")
    return True


def _count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _stack(batches: list[dict]) -> dict:
    return {k: jnp.asarray(np.stack([b[k] for b in batches])) for k in batches[0]}


def _exact_match(model, trainable, frozen, tokenizer, prepared, cfg: TrainConfig) -> float | None:
    """Exact-match accuracy of greedy generations on the first `eval.generate` eval examples."""
    from jaxft.generate.greedy import greedy_generate
    from jaxft.train.step import bound_params, is_prompt_method

    items = prepared.eval_generation[: cfg.eval.generate]
    if not items:
        return None
    params = bound_params(model, trainable, frozen)
    extra = {}
    if is_prompt_method(model.spec):
        if "prompt_embeddings" in trainable:
            extra["virtual_tokens"] = trainable["prompt_embeddings"]
        else:
            extra["prefix"] = (trainable["prefix_keys"], trainable["prefix_values"])
    eos = {tokenizer.eos_token_id}
    eid = model.config.eos_token_id
    eos |= set(eid) if isinstance(eid, tuple) else ({eid} if eid is not None else set())
    outs = greedy_generate(model.config, params, [list(p) for p, _ in items], max_new_tokens=cfg.eval.max_new_tokens,
                           eos_token_ids=sorted(eos), batch_size=cfg.eval.batch_size, options=model.options,
                           **extra)
    hits = sum(tokenizer.decode(o, skip_special_tokens=True).strip() == ref.strip() for o, (_, ref) in zip(outs, items))
    return hits / len(items)


def _eval_loss(eval_step, trainable, frozen, prepared, cfg: TrainConfig) -> float | None:
    total, n = 0.0, 0.0
    for batch in prepared.eval_batches(cfg.eval.batch_size):
        ls, k = eval_step(trainable, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
        total, n = total + float(ls), n + float(k)
    return total / n if n else None


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train per `cfg`; returns the summary dict (also written to `<output_dir>/summary.json`)."""
    from tqdm.auto import tqdm

    import jaxft
    from jaxft import peft
    from jaxft.data import prepare
    from jaxft.models.llama import ModelOptions
    from jaxft.train.checkpoint import Checkpointer
    from jaxft.train.optim import make_optimizer
    from jaxft.train.report import MetricsWriter, format_summary, plot_curves
    from jaxft.train.signals import StopSignal
    from jaxft.train.step import Model, is_prompt_method, make_eval_step, make_train_step

    t_start = time.perf_counter()
    # ---- everything checkable before compute ----
    resuming = check_output_dir(cfg)
    spec = method_spec(cfg.method)
    config = jaxft.load_config(cfg.model.path)
    n_virtual = getattr(spec, "num_virtual_tokens", 0) if is_prompt_method(spec) else 0
    config.check_sequence_length(cfg.data.seq_len + n_virtual, "data.seq_len")
    if is_prompt_method(spec) and cfg.data.packing:
        raise ConfigError(f"method.type={cfg.method_type} prepends virtual tokens to whole rows: set data.packing=false")
    tokenizer = jaxft.load_tokenizer(cfg.model.path)
    prepared = prepare(cfg.data, tokenizer)
    print(prepared.stats.summary())
    rows = len(prepared.train_rows)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    total_steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * rows / per_step))

    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(json.loads(json.dumps(resolved_dict(cfg))), f, sort_keys=False)

    # ---- model, trainable tree, optimizer ----
    options = ModelOptions(dtype=_DTYPES[cfg.model.compute_dtype], remat=cfg.model.remat,
                           scan_layers=cfg.model.scan_layers)
    config, params = jaxft.load_pretrained(cfg.model.path, dtype=cfg.model.param_dtype)
    key = jax.random.key(cfg.train.seed)
    init_key, rng = jax.random.split(key)
    if spec is None:
        trainable, frozen = jax.tree.map(lambda a: a.astype(jnp.float32), params), None
    elif cfg.method.get("init_from"):
        spec, trainable = peft.load_adapter(cfg.method["init_from"], config)
        frozen = params
    else:
        trainable = peft.init(spec, config, params, init_key, tokenizer=tokenizer)
        frozen = params
    model = Model(config, spec, options)
    optimizer = make_optimizer(cfg.optim, trainable, total_steps)
    if spec is not None:
        import optax

        optimizer = optax.chain(optimizer, peft.mask_updates(peft.trainable_mask(spec, frozen, trainable)))
    opt_state = optimizer.init(trainable)
    n_trainable, n_total = _count(trainable), _count(params) + (0 if spec is None else _count(trainable))
    batches = prepared.train_batches(cfg.train.batch_size, cfg.train.seed)
    run_info = {"seed": cfg.train.seed, "trainable_parameters": n_trainable, "total_parameters": n_total,
                "total_steps": total_steps, "versions": _versions()}
    with open(os.path.join(cfg.output_dir, "run.json"), "w") as f:
        json.dump(run_info, f, indent=2)

    ckpt = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), keep_last=cfg.train.keep_last,
                        keep_best=cfg.train.keep_best)
    step = 0
    if resuming and ckpt.latest_step() is not None:
        state, extra = ckpt.restore({"trainable": trainable, "opt_state": opt_state, "rng": rng})
        trainable, opt_state, rng = state["trainable"], state["opt_state"], state["rng"]
        batches.restore(extra["data"])
        step = int(extra["step"])
        print(f"resuming {cfg.output_dir} from step {step}")
    writer = MetricsWriter(cfg.output_dir)
    train_step = make_train_step(model, optimizer)
    eval_step = make_eval_step(model)
    summary: dict[str, Any] = {"output_dir": cfg.output_dir, "method": cfg.method_type,
                               "trainable parameters": f"{n_trainable:,} of {n_total:,}"}

    if cfg.eval.base and cfg.eval.generate and step == 0:
        t = time.perf_counter()
        acc = _exact_match(model, trainable, frozen, tokenizer, prepared, cfg)
        if acc is not None:
            summary["exact match before"] = acc
            writer.write(0, "eval", {"exact_match": acc})
            print(f"base model exact match: {acc:.1%} ({time.perf_counter() - t:.0f} s)")

    # ---- training ----
    stop_reason, smooth_loss, lowest, last = "completed", None, math.inf, {}
    t_train, tokens_seen, compile_s = time.perf_counter(), 0.0, None
    from jaxft.train.optim import warmup_steps

    settle = max(10, warmup_steps(cfg.optim, total_steps))  # divergence is judged after warm-up
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    with StopSignal() as stop:
        while step < total_steps:
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            t = time.perf_counter()
            new_trainable, new_opt, m = train_step(trainable, opt_state, frozen, _stack(micro),
                                                   jax.random.fold_in(rng, step))
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
            trainable, opt_state, step = new_trainable, new_opt, step + 1
            smooth_loss = smooth
            tokens_seen += float(m["tokens"])
            lr = float(make_lr(cfg, total_steps)(step - 1))
            last = {"loss": loss, "lr": lr, "grad_norm": float(m["grad_norm"])}
            elapsed = time.perf_counter() - t_train - (compile_s or 0)
            tps = tokens_seen / elapsed if elapsed > 0 else 0.0
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if cfg.train.log_every and (step % cfg.train.log_every == 0 or step == 1):
                writer.write(step, "train", dict(last, tokens_per_s=tps))
            metrics = None
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                el = _eval_loss(eval_step, trainable, frozen, prepared, cfg)
                if el is not None:
                    metrics = {"eval_loss": el}
                    writer.write(step, "eval", {"eval_loss": el, "perplexity": math.exp(min(el, 50))})
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or metrics:
                ckpt.save(step, {"trainable": trainable, "opt_state": opt_state, "rng": rng},
                          extra={"step": step, "data": batches.state()}, metrics=metrics)
            if stop.requested:
                stop_reason = f"{stop.signal_name} received: checkpoint saved at step {step}"
                break
    bar.close()
    train_s = time.perf_counter() - t_train
    final_state = {"trainable": trainable, "opt_state": opt_state, "rng": rng}
    finished = stop_reason == "completed"
    el = None
    if finished or stop_reason.startswith(("SIG", "SIGTERM")):
        if finished:
            el = _eval_loss(eval_step, trainable, frozen, prepared, cfg)
        metrics = {"eval_loss": el} if el is not None else None
        ckpt.save(step, final_state, extra={"step": step, "data": batches.state()}, metrics=metrics)
    ckpt.wait()
    ckpt.close()
    summary.update({"stopped": stop_reason, "steps": step, "train time (s)": train_s,
                    "tokens/s": tokens_seen / max(train_s - (compile_s or 0), 1e-9),
                    "first step incl. compile (s)": compile_s or 0.0})
    if last:
        summary["final train loss"] = last["loss"]
    if el is not None:
        summary["eval loss"] = el
        summary["eval perplexity"] = math.exp(min(el, 50))
        writer.write(step, "eval", {"eval_loss": el, "perplexity": math.exp(min(el, 50))})
    if finished and cfg.eval.generate:
        acc = _exact_match(model, trainable, frozen, tokenizer, prepared, cfg)
        if acc is not None:
            summary["exact match after"] = acc
            writer.write(step, "eval", {"exact_match": acc})
    writer.close()
    plot = plot_curves(cfg.output_dir)
    if plot:
        summary["curves"] = plot
    if finished:
        from jaxft.train.export import export_all

        summary.update(export_all(cfg, model, trainable, frozen, params, tokenizer, prepared, summary))
    summary["wall time (s)"] = time.perf_counter() - t_start
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(format_summary(summary))
    return summary


def make_lr(cfg: TrainConfig, total_steps: int):
    from jaxft.train.optim import lr_schedule

    return lr_schedule(cfg.optim, total_steps)
