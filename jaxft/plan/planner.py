"""`plan_config(path, overrides)`: will this run fit, and if not, what will? The library behind `python -m jaxft.plan`.

    report = plan_config("configs/llama3.1-8b-full.yaml", ["model.path=configs/models/llama-3.1-8b"],
                         device_memory=parse_bytes("80GiB"))
    report.plan.total, report.plan.fits, report.recommendation.overrides
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax

import jaxft
from jaxft.errors import ConfigError
from jaxft.plan.memory import GiB, MemoryPlan, plan_memory, rule_of_thumb
from jaxft.plan.recommend import Recommendation, recommend
from jaxft.train.config import TrainConfig, load_config
from jaxft.train.step import count_params
from jaxft.parallel import mesh_shape
from jaxft.models.params import abstract_params


@dataclasses.dataclass(frozen=True)
class Report:
    """The plan of the config as given, and the recommendation (overrides that fit, or why nothing does)."""

    path: str
    overrides: tuple[str, ...]
    cfg: TrainConfig
    plan: MemoryPlan
    recommendation: Recommendation
    seconds: float

    def as_json(self) -> dict[str, Any]:
        """`{"per_device_bytes": {...}, "device_memory_bytes", "fits", "recommendation": {"overrides", "why"}}` plus
        the rule of thumb, the mesh, the parameter counts and XLA's raw figures."""
        p, r = self.plan, self.recommendation
        return {"per_device_bytes": p.per_device(), "device_memory_bytes": p.device_memory, "fits": p.fits,
                "recommendation": {"overrides": list(r.overrides), "why": r.why,
                                   **({"per_device_bytes": r.plan.per_device()} if r.plan is not None and r.overrides
                                      else {})},
                "rule_of_thumb": {"bytes": p.estimate.bytes, "formula": p.estimate.formula},
                "mesh": p.mesh, "parameters": p.n_params, "trainable_parameters": p.n_trainable,
                "compiled_bytes": p.compiled, "compile_s": round(p.compile_s, 1)}


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def format_report(report: Report) -> str:
    """The human-readable plan (what `python -m jaxft.plan` prints without --json)."""
    p, r, cfg = report.plan, report.recommendation, report.cfg
    mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
    lines = [
        f"{report.path}: {cfg.method_type} on {cfg.model.path}, {p.n_params:,} parameters ({p.n_trainable:,} "
        f"trainable), seq {cfg.data.seq_len} x batch {cfg.train.batch_size} x accum {cfg.train.grad_accum}, remat "
        f"{cfg.model.remat}, mesh {mesh}",
        "per device (compiled step):",
        f"  parameters            {_gib(p.params)}",
        f"  optimizer state       {_gib(p.optimizer)}",
        f"  gradients             {_gib(p.gradients)}",
        f"  activations + temps   {_gib(p.activations)}",
        f"  total                 {_gib(p.total)}  of {p.device_memory / GiB:.2f} GiB: "
        + ("fits" if p.fits else "DOES NOT FIT"),
        f"rule of thumb           {_gib(p.estimate.bytes)}  ({p.estimate.formula})",
    ]
    if r.overrides:
        lines.append(f"recommendation: {r.why}")
        lines.append("  overrides: " + " ".join(r.overrides))
    else:
        lines.append(f"recommendation: {r.why}")
    return "\n".join(lines)


def _states(cfg: TrainConfig, n_devices: int) -> int:
    """Rule-of-thumb bytes of weights, gradients and optimizer state per device (no activations, no compile)."""
    config = jaxft.load_config(cfg.model.path)
    n = count_params(abstract_params(config))
    est = rule_of_thumb(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat="none")), config,
                        mesh_shape(cfg.parallel, n_devices), n, 0)
    return est.bytes


def plan_config(path: str, overrides: Sequence[str] = (), *, devices: int | None = None,
                device_memory: int | None = None, recommend_fix: bool = True,
                progress: Callable[[str], None] = lambda s: None) -> Report:
    """Plan the run of config `path` with `overrides` over the first `devices` devices of this process (default:
    all) with `device_memory` bytes each (default: the device's own). No weights are read: the model's config.json
    (or GGUF header) is enough. Raises a one-line `ConfigError` on a bad config, mesh or device count."""
    t = time.perf_counter()
    available = jax.devices()
    if devices is not None and devices > len(available):
        raise ConfigError(f"--devices {devices}: this process has {len(available)} {available[0].platform} "
                          f"device(s); run `python -m jaxft.plan ... --devices {devices}` (it fakes CPU devices) or "
                          f"set XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax starts")
    used = available[: devices or len(available)]
    overrides = tuple(overrides)
    cfg = load_config(path, overrides)
    config = jaxft.load_config(cfg.model.path)

    def plan(c: TrainConfig) -> MemoryPlan:
        return plan_memory(c, jaxft.load_config(c.model.path), used, device_memory, progress)

    first = plan_memory(cfg, config, used, device_memory, progress)
    progress(f"compiled in {first.compile_s:.0f} s: {first.total / GiB:.2f} GiB per device "
             f"({'fits' if first.fits else 'does not fit'} in {first.device_memory / GiB:.2f} GiB)")
    if recommend_fix:
        if not first.fits:
            progress("searching for overrides that fit (each candidate is compiled)")
        rec = recommend(first, cfg, lambda extra: load_config(path, (*overrides, *extra)), plan,
                        lambda c: _states(c, len(used)), len(used))
        if rec.overrides:
            rec = dataclasses.replace(rec, overrides=tuple(rec.overrides))
    else:
        rec = Recommendation((), "fits" if first.fits else "does not fit (recommendation not searched)", None)
    return Report(path, overrides, cfg, first, rec, time.perf_counter() - t)


def refuse_unless_fits(report: Report) -> Report:
    """`report`, or a one-line `ConfigError` with the planner's answer (the overrides that fit, or why nothing does)
    when its run does not fit."""
    if not report.plan.fits:
        r = report.recommendation
        fix = f"; try: {' '.join(r.overrides)} ({r.why})" if r.overrides else f"; {r.why}"
        raise ConfigError(f"{report.path}: the step needs {report.plan.total / GiB:.2f} GiB per device, the device "
                          f"has {report.plan.device_memory / GiB:.2f} GiB{fix}")
    return report


def check_fits(cfg_path: str, overrides: Sequence[str] = (), **kw) -> Report:
    """`plan_config` then `refuse_unless_fits`: for a trainer to call before it reads any weight."""
    return refuse_unless_fits(plan_config(cfg_path, overrides, **kw))
