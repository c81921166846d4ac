"""What would fit: config overrides found by planning the candidates of the usual decision framework in order.

Each step adds overrides to the ones before it, and the first accumulated set whose compiled plan fits is the
answer (it is planned, so it is known to fit). The order:

1. knobs that leave the training math as it is: full remat (recompute each layer in the backward pass), a
   micro-batch of one row per data-parallel group with `grad_accum` raised to keep the global batch, FSDP over all
   devices (parameters, gradients and optimizer state sharded);
2. the method: full fine-tuning only where it fits, else LoRA r16 on all linear layers with a bfloat16 base, else
   QLoRA (the same adapter over an NF4 base: codes, absmax and double-quantisation tables counted from the tree);
3. a smaller LoRA rank (r > 16 -> 16);
4. a shorter sequence (halved, down to 512 tokens): this changes what is trained on, so it comes last.

Candidates whose weights and optimizer state alone (the rule of thumb without activations) exceed the device's
memory are skipped without compiling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax

from jaxft.parallel import mesh_shape
from jaxft.plan.memory import GiB, MemoryPlan
from jaxft.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """`overrides` (dotted `key=value`, for `python -m jaxft.train CONFIG ...` and the planner) and `why`;
    `plan` is the compiled plan with them applied (None when nothing tried fits or nothing was needed)."""

    overrides: tuple[str, ...]
    why: str
    plan: MemoryPlan | None = None


Step = Callable[[TrainConfig, int], "tuple[list[str], str] | None"]


def _remat(cfg: TrainConfig, n: int):
    if cfg.model.remat == "full":
        return None
    return ["model.remat=full"], "full remat (each layer recomputed in the backward pass: ~1/3 more compute, same math)"


def _micro_batch(cfg: TrainConfig, n: int):
    shape = mesh_shape(cfg.parallel, n)
    dp = shape["data"] * shape["fsdp"]
    b = cfg.train.batch_size
    if b <= dp or b % dp:
        return None
    accum = cfg.train.grad_accum * (b // dp)
    return ([f"train.batch_size={dp}", f"train.grad_accum={accum}"],
            f"micro-batch of 1 row per data-parallel group, grad_accum {accum} keeps the global batch of "
            f"{b * cfg.train.grad_accum} rows")


def _fsdp(cfg: TrainConfig, n: int):
    shape = mesh_shape(cfg.parallel, n)
    if n == 1 or (shape["fsdp"] == n and cfg.parallel.rules in ("fsdp", "fsdp+tensor")):
        return None
    return (["parallel.mesh.data=1", "parallel.mesh.fsdp=-1", "parallel.mesh.tensor=1", "parallel.rules=fsdp"],
            f"FSDP over all {n} devices (weights, gradients and optimizer state sharded {n} ways)")


def _lora(cfg: TrainConfig, n: int):
    if cfg.method_type != "full":
        return None
    return (["method.type=lora", "method.r=16", "method.alpha=32", "method.target_modules=all-linear",
             "model.param_dtype=bfloat16", "optim.lr=2.0e-4"],
            "LoRA r16 on all linear layers over a bfloat16 base instead of full fine-tuning (full fine-tuning only "
            "where memory is to spare)")


def _base_bf16(cfg: TrainConfig, n: int):
    if cfg.method_type == "full" or cfg.model.param_dtype == "bfloat16":
        return None
    return ["model.param_dtype=bfloat16"], "a bfloat16 frozen base (half the base's bytes)"


def _qlora(cfg: TrainConfig, n: int):
    if cfg.method_type != "lora":
        return None
    return (["method.type=qlora", "model.param_dtype=bfloat16"],
            "QLoRA: the same adapter over an NF4 base (about 0.56 bytes per base weight with double quantisation)")


def _rank(cfg: TrainConfig, n: int):
    r = cfg.method.get("r")
    if not isinstance(r, int) or r <= 16:
        return None
    return ["method.r=16", f"method.alpha={2 * 16}"], f"LoRA rank {r} -> 16"


def _halve_seq(cfg: TrainConfig, n: int):
    t = cfg.data.seq_len
    if t <= 512:
        return None
    return [f"data.seq_len={t // 2}"], f"sequence length {t} -> {t // 2} (changes the rows trained on: last resort)"


STEPS: tuple[Step, ...] = (_remat, _micro_batch, _fsdp, _lora, _base_bf16, _qlora, _rank, _halve_seq, _halve_seq,
                           _halve_seq)


def _merge(overrides: list[str], new: list[str]) -> list[str]:
    keys = {o.split("=", 1)[0] for o in new}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + new


def recommend(first: MemoryPlan, cfg: TrainConfig, load: Callable[[Sequence[str]], TrainConfig],
              plan: Callable[[TrainConfig], MemoryPlan], states: Callable[[TrainConfig], int], n_devices: int,
              max_compiles: int = 4) -> Recommendation:
    """The recommendation for a run whose plan is `first`: `load(overrides)` builds the config with extra
    overrides, `plan(cfg)` compiles its plan, `states(cfg)` is its rule-of-thumb bytes without activations."""
    memory = first.device_memory
    if first.fits:
        spare = memory - first.total
        why = f"fits: {spare / GiB:.2f} GiB of {memory / GiB:.2f} GiB to spare"
        if cfg.method_type == "full" and spare < 0.1 * memory:
            why += ("; full fine-tuning with under 10% spare: activations of longer rows or another compiler's "
                    "buffers may not fit, LoRA (method.type=lora) leaves room")
        return Recommendation((), why, first)
    overrides: list[str] = []
    reasons: list[str] = []
    compiles, last = 0, first
    for step in STEPS:
        got = step(cfg, n_devices)
        if got is None:
            continue
        overrides = _merge(overrides, got[0])
        reasons.append(got[1])
        cfg = load(overrides)
        if states(cfg) > memory or compiles >= max_compiles:
            continue
        last = plan(cfg)
        compiles += 1
        if last.fits:
            return Recommendation(tuple(overrides), f"{'; then '.join(reasons)}: {last.total / GiB:.2f} GiB of "
                                  f"{memory / GiB:.2f} GiB per device (planned)", last)
    need = math.ceil(states(cfg) / (0.8 * memory)) if states(cfg) else 0
    why = (f"nothing tried fits ({'; '.join(reasons) or 'no knob left'}; smallest planned total "
           f"{min(first.total, last.total) / GiB:.2f} GiB per device vs {memory / GiB:.2f} GiB). Use devices with "
           "more memory, or more devices with FSDP"
           + (f" (weights and optimizer state alone need about {need} of these devices)" if need > n_devices else ""))
    return Recommendation((), why, None)
