"""LoRA training-step tokens/s: jaxft vs transformers + peft (torch eager), SmolLM2-135M, CPU fp32.

LoRA r16 alpha 32 on all linear layers, batch 4 x 512 tokens, loss on every token, AdamW; each side at its
fastest setting (jaxft: jit, no remat; torch: eager, sdpa attention, no gradient checkpointing). Each side runs in
its own process, as its users run it: jaxft with freed host memory kept mapped, as `python -m jaxft.train` sets
it; torch with the C library's defaults, and once more with jaxft's setting to show what that alone gives torch.
The sides take turns step by step, so drift in the machine's speed hits all alike; prints the ratio of the median
step times last (> 1 means jaxft is faster). Goal: >= 1.2x over eager. torch.compile's figure is reported if it
runs (--compile).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import numpy as np

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_here, os.path.dirname(_here)]
from common import report, torch_smollm  # noqa: E402


def jax_side(ids: np.ndarray):
    """One blocking train step of jaxft (jit, no remat; the first call compiles)."""
    import jax
    import jax.numpy as jnp

    import jaxft
    from jaxft import peft
    from jaxft.models.llama import ModelOptions
    from jaxft.train.optim import OptimConfig, make_optimizer
    from jaxft.train.step import Model, make_train_step

    config, params = jaxft.load_pretrained("smollm2-135m-instruct")
    spec = peft.LoraSpec(r=16, alpha=32, target_modules="all-linear")
    adapter = peft.init(spec, config, params, jax.random.key(0))
    model = Model(config, spec, ModelOptions())
    opt = make_optimizer(OptimConfig(lr=1e-4), adapter, 100)
    state = opt.init(adapter)
    step = make_train_step(model, opt)
    b, t = ids.shape
    batch = {"input_ids": jnp.asarray(ids)[None], "segment_ids": jnp.ones((1, b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t), (1, b, t)).astype(jnp.int32),
             "loss_mask": jnp.ones((1, b, t), bool)}
    rng = jax.random.key(1)
    holder = {"a": adapter, "s": state}

    def run():
        holder["a"], holder["s"], m = step(holder["a"], holder["s"], params, batch, rng)
        m["loss"].block_until_ready()

    return run


def torch_side(ids: np.ndarray, compile_model: bool):
    """One blocking train step of transformers + peft (forward, backward, AdamW)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = torch_smollm("sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    fwd = torch.compile(model) if compile_model else model
    ids_t = torch.tensor(ids)

    def run():
        out = fwd(input_ids=ids_t, labels=ids_t)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def _worker(side: str, keep_memory: bool, ids: np.ndarray, conn) -> None:
    """A side in its own process: build it, report the first step's time, then run one step per message."""
    if keep_memory:
        from jaxft.runtime import keep_freed_host_memory

        keep_freed_host_memory()
    try:
        if side == "jaxft":
            run = jax_side(ids)
        else:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            run = torch_side(ids, side == "torch.compile")
        t0 = time.perf_counter()
        run()
        first_s = time.perf_counter() - t0
    except Exception as e:  # report, do not hide: torch.compile support varies by platform
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send(first_s)
    while conn.recv():
        t0 = time.perf_counter()
        run()
        conn.send(time.perf_counter() - t0)


def alternate(sides: dict, ids: np.ndarray, repeat: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each side, each side in its own process (its own allocator settings, no shared heap),
    the sides taking turns step by step after one warm-up step each, so a machine whose speed drifts during the
    run slows both alike instead of biasing the ratio. Sides are built one at a time (no contention in the first
    step's time). Returns the step times and each side's first step (compile + one step)."""
    ctx = mp.get_context("spawn")
    procs, conns, first = {}, {}, {}
    try:
        for name, (side, keep_memory) in sides.items():
            conns[name], child = ctx.Pipe()
            procs[name] = ctx.Process(target=_worker, args=(side, keep_memory, ids, child), daemon=True)
            procs[name].start()
            first[name] = conns[name].recv()
            if isinstance(first[name], str):
                if side in ("jaxft", "torch"):
                    raise RuntimeError(f"{name} failed: {first[name]}")
                print(f"{name} failed, left out: {first[name]}")
                del conns[name], first[name]
        for conn in conns.values():  # warm-up
            conn.send(True)
            conn.recv()
        times: dict[str, list[float]] = {name: [] for name in conns}
        for _ in range(repeat):
            for name, conn in conns.items():
                conn.send(True)
                times[name].append(conn.recv())
        return times, first
    finally:
        for name, conn in conns.items():
            try:
                conn.send(False)
            except OSError:
                pass
        for proc in procs.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


JAX = "jaxft (jit)"
EAGER = "transformers + peft (eager, sdpa)"
EAGER_KEPT = "transformers + peft (eager, sdpa), freed memory kept mapped"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=7, help="steps timed per side, taking turns")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--jax-only", action="store_true", help="time jaxft alone (no record)")
    args = ap.parse_args(argv)
    ids = np.random.RandomState(0).randint(0, 49152, (args.batch, args.seq))
    tokens = args.batch * args.seq
    sides = {JAX: ("jaxft", True)}
    if not args.jax_only:
        sides[EAGER] = ("torch", False)
        sides[EAGER_KEPT] = ("torch", True)
        if args.compile:
            sides["transformers + peft (torch.compile)"] = ("torch.compile", False)
    times, first = alternate(sides, ids, args.repeat)
    med = {name: float(np.median(t)) for name, t in times.items()}
    if args.jax_only:
        print(f"jaxft {tokens / med[JAX]:.0f} tokens/s (first step {first[JAX]:.1f} s)")
        return
    lines = ["| side | tokens/s (median) | range |", "|---|---|---|"]
    lines += [f"| {name} | {tokens / med[name]:.0f} | {tokens / max(t):.0f}-{tokens / min(t):.0f} |"
              for name, t in times.items()]
    per_round = sorted(b / a for a, b in zip(times[JAX], times[EAGER]))
    ratio = med[EAGER] / med[JAX]
    lines += ["", f"LoRA r16 all-linear, batch {args.batch} x {args.seq}, fp32; each side in its own process, "
              f"{args.repeat} steps per side taking turns; jaxft first step (compile) {first[JAX]:.1f} s. "
              f"jaxft runs as `python -m jaxft.train` does, with freed host memory kept mapped "
              f"(`jaxft.runtime.keep_freed_host_memory`); the torch row with the same setting shows what it "
              f"gives torch. Ratio per round vs eager {per_round[0]:.2f}-{per_round[-1]:.2f}x, median "
              f"{float(np.median(per_round)):.2f}x; "
              f"vs eager with freed memory kept mapped {med[EAGER_KEPT] / med[JAX]:.2f}x.", "",
              f"**ratio jaxft / transformers+peft eager (medians): {ratio:.2f}x** (goal >= 1.2x)"]
    report("train_step", lines, ratio, record_it=not args.no_record)


if __name__ == "__main__":
    main()
