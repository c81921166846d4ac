"""Run one real SmolLM2 LoRA training step in a fresh process and print, as JSON, the planner's predicted step
memory beside the measured growth of this process's peak resident memory over the step.

    python tests/plan/rss_child.py CONFIG [overrides...]

Predicted: the planner's compiled temporaries + outputs - donated aliases (the memory a step adds to its
arguments). Measured: Linux's peak RSS (VmHWM) after the step minus the RSS before it, the peak reset just before
the step (`/proc/self/clear_refs` = 5), with the weights loaded, the step compiled and one batch on the device.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxft  # noqa: E402
from jaxft import peft  # noqa: E402
from jaxft.plan import abstract_run, plan_memory  # noqa: E402
from jaxft.train.config import load_config  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    config = jaxft.load_config(cfg.model.path)
    plan = plan_memory(cfg, config)
    predicted = plan.compiled["temp"] + plan.compiled["output"] - plan.compiled["alias"]
    run = abstract_run(cfg, config)
    _, params = jaxft.load_pretrained(cfg.model.path, dtype=cfg.model.param_dtype)
    spec = run.model.spec
    trainable = peft.init(spec, config, params, jax.random.key(0))
    rng = np.random.default_rng(0)
    shape = run.batches["input_ids"].shape
    batches = {"input_ids": rng.integers(0, config.vocab_size, shape, dtype=np.int32),
               "segment_ids": np.ones(shape, np.int32),
               "positions": np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape).copy(),
               "loss_mask": np.ones(shape, bool)}
    batches = jax.device_put(batches)
    key = jax.random.key(1)
    state = run.optimizer.init(trainable)  # the trainer's optimizer (make_optimizer + mask), as abstract_run built it
    compiled = run.step.lower(trainable, state, params, batches, key).compile()  # the trainer's own compile options
    real = compiled.memory_analysis()
    jax.block_until_ready((trainable, state, params, batches))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status("VmRSS")
    out = compiled(trainable, state, params, batches, key)
    jax.block_until_ready(out)
    peak = _status("VmHWM")
    print(json.dumps({"predicted": predicted, "measured": peak - before, "rss_before": before,
                      "trainer_compile_temp": int(real.temp_size_in_bytes), "planner": plan.compiled,
                      "loss": float(out[2]["loss"])}))


if __name__ == "__main__":
    main()
