"""LoRA training-step tokens/s: jaxft vs transformers + peft (torch), SmolLM2-135M, CPU fp32.

    python benchmarks/train_step.py [--repeat 7] [--no-compile] [--no-record]
    python benchmarks/train_step.py --ab REV [--repeat 8]    # jaxft of this checkout against jaxft at git REV
    python benchmarks/train_step.py --quick [--ab REV]       # sanity check: 1 x 32 tokens, 2 rounds, no record

LoRA r16 alpha 32 on all linear layers, batch 4 x 512 tokens, loss on every token, AdamW. Each side runs in its
own process, as its users run it: jaxft jitted, with freed host memory kept mapped as `python -m jaxft.train` sets
it; torch in the three settings its users run: eager (sdpa attention, no gradient checkpointing) with the C
library's defaults, eager with jaxft's allocator setting, and torch.compile. The headline ratio is jaxft against
the fastest of those three (by median step time), and says which one that was; the ratio against plain eager is
printed beside it. The sides take turns step by step (the order reversed every other round), so drift in the
machine's speed hits all alike. > 1 means jaxft is faster. Goal: >= 1.2x.

`--ab REV` times jaxft's train step only: this checkout's (with any uncommitted changes) against git revision REV's
(`git archive` into a temporary directory), each in its own process, taking turns round by round. Each side builds
its step with its own revision's `jax_side` (this file at that revision), so a change of the benchmark itself
shows: the two sources are compared and a difference is printed. Ratio > 1 means this checkout is faster.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
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
    from jaxft.train.step import StaticModel, make_train_step

    config, params = jaxft.load_pretrained("smollm2-135m-instruct")
    spec = peft.LoraSpec(r=16, alpha=32, target_modules="all-linear")
    adapter = peft.init(spec, config, params, jax.random.key(0))
    model = StaticModel(config, spec, ModelOptions())
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


def _load_jax_side(root: str):
    """`jax_side` of the benchmark script in checkout `root`, importing that checkout's jaxft."""
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("train_step_at_rev", os.path.join(root, "benchmarks", "train_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.jax_side


def _worker(side: str, keep_memory: bool, ids: np.ndarray, root: str | None, conn) -> None:
    """A side in its own process: build it, report the first step's time (and where its jaxft came from), then
    run one step per message. `root`: another checkout whose jaxft and `jax_side` to use (A/B)."""
    if root is not None:
        sys.path.insert(0, root)  # before anything imports jaxft
    if keep_memory:
        from jaxft.runtime import keep_freed_host_memory

        keep_freed_host_memory()
    try:
        if side == "jaxft":
            run = (jax_side if root is None else _load_jax_side(root))(ids)
            import jaxft

            origin = os.path.dirname(os.path.dirname(os.path.abspath(jaxft.__file__)))
        else:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            run = torch_side(ids, side == "torch.compile")
            origin = f"torch {torch.__version__}"
        t0 = time.perf_counter()
        run()
        first_s = time.perf_counter() - t0
    except Exception as e:  # report, do not hide: torch.compile support varies by platform
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send((first_s, origin))
    while conn.recv():
        t0 = time.perf_counter()
        run()
        conn.send(time.perf_counter() - t0)


def alternate(sides: dict, ids: np.ndarray, repeat: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each side, each side in its own process (its own allocator settings, no shared heap),
    the sides taking turns step by step after one warm-up step each, in reversed order every other round, so a
    machine whose speed drifts during the run slows all alike instead of biasing the ratio. Sides are built one at
    a time (no contention in the first step's time). `sides`: name -> (kind, keep_memory, checkout root or None).
    Returns the step times and each side's first step (compile + one step)."""
    ctx = mp.get_context("spawn")
    procs, conns, first = {}, {}, {}
    try:
        for name, (side, keep_memory, root) in sides.items():
            conns[name], child = ctx.Pipe()
            procs[name] = ctx.Process(target=_worker, args=(side, keep_memory, ids, root, child), daemon=True)
            procs[name].start()
            got = conns[name].recv()
            if isinstance(got, str):
                if side in ("jaxft", "torch"):
                    raise RuntimeError(f"{name} failed: {got}")
                print(f"{name} failed, left out: {got}")
                del conns[name]
                continue
            first[name], origin = got
            print(f"{name}: {origin}, first step {first[name]:.1f} s", flush=True)
        for conn in conns.values():  # warm-up
            conn.send(True)
            conn.recv()
        times: dict[str, list[float]] = {name: [] for name in conns}
        for i in range(repeat):
            for name in (list(conns) if i % 2 == 0 else list(conns)[::-1]):
                conns[name].send(True)
                times[name].append(conns[name].recv())
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
COMPILED = "transformers + peft (torch.compile)"
SHORT = {EAGER: "torch eager", EAGER_KEPT: "torch eager with freed memory kept mapped", COMPILED: "torch.compile"}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=os.path.dirname(_here), check=True, capture_output=True,
                          text=True).stdout.strip()


def _shape(args) -> str:
    return f"LoRA r16 all-linear, batch {args.batch} x {args.seq}, fp32"


def versus_torch(args, ids: np.ndarray) -> None:
    tokens = args.batch * args.seq
    sides = {JAX: ("jaxft", True, None), EAGER: ("torch", False, None), EAGER_KEPT: ("torch", True, None)}
    if not args.no_compile:
        sides[COMPILED] = ("torch.compile", False, None)
    times, first = alternate(sides, ids, args.repeat)
    med = {name: float(np.median(t)) for name, t in times.items()}
    torch_sides = [name for name in times if name != JAX]
    fastest = min(torch_sides, key=med.get)  # the setting a user would pick: the shortest median step
    lines = ["| side | tokens/s (median) | range |", "|---|---|---|"]
    lines += [f"| {name} | {tokens / med[name]:.0f} | {tokens / max(t):.0f}-{tokens / min(t):.0f} |"
              for name, t in times.items()]
    per_round = sorted(b / a for a, b in zip(times[JAX], times[fastest]))
    ratio = med[fastest] / med[JAX]
    left_out = [name for name in (EAGER, EAGER_KEPT, COMPILED) if name not in times]
    lines += ["", f"{_shape(args)}; each side in its own process, {args.repeat} steps per side taking turns; "
              f"jaxft first step (compile) {first[JAX]:.1f} s. jaxft runs as `python -m jaxft.train` does, with freed "
              f"host memory kept mapped (`jaxft.runtime.keep_freed_host_memory`); torch runs eager with the C "
              f"library's defaults, eager with the same setting as jaxft, and under torch.compile"
              + (f" ({', '.join(SHORT[n] for n in left_out)}: not run)" if left_out else "") + f". The fastest "
              f"torch side here: {SHORT[fastest]}. Ratio per round vs it {per_round[0]:.2f}-{per_round[-1]:.2f}x, median "
              f"{float(np.median(per_round)):.2f}x; vs plain eager (the headline before 2026-11-30) "
              f"{med[EAGER] / med[JAX]:.2f}x.", "",
              f"**ratio jaxft / fastest torch ({SHORT[fastest]}), medians: {ratio:.2f}x** (goal >= 1.2x)"]
    report("train_step", lines, ratio, record_it=not args.no_record)


def ab(args, ids: np.ndarray) -> None:
    tokens = args.batch * args.seq
    rev = _git("rev-parse", "--verify", f"{args.ab}^{{commit}}")
    head = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    here = f"this checkout ({head[:10]}{' + uncommitted changes' if dirty else ''})"
    there = f"revision {rev[:10]}"
    with tempfile.TemporaryDirectory(prefix="jaxft-ab-") as root:
        archive = subprocess.run(["git", "archive", rev], cwd=os.path.dirname(_here), check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
        theirs = open(os.path.join(root, "benchmarks", "train_step.py")).read()
        theirs_src = theirs[theirs.find("def jax_side("):theirs.find("\ndef ", theirs.find("def jax_side(") + 1)]
        if theirs_src.strip() != inspect.getsource(jax_side).strip():
            print(f"note: jax_side differs between {here} and {there}; each side builds the step its own way")
        sides = {here: ("jaxft", True, None), there: ("jaxft", True, root)}
        times, first = alternate(sides, ids, args.repeat)
    med = {name: float(np.median(t)) for name, t in times.items()}
    per_round = sorted(b / a for a, b in zip(times[here], times[there]))
    ratio = med[there] / med[here]
    lines = ["| jaxft | tokens/s (median) | range | first step (s) |", "|---|---|---|---|"]
    lines += [f"| {name} | {tokens / med[name]:.0f} | {tokens / max(t):.0f}-{tokens / min(t):.0f} | "
              f"{first[name]:.1f} |" for name, t in times.items()]
    lines += ["", f"{_shape(args)}; jaxft only, each revision in its own process with freed host memory kept "
              f"mapped, {args.repeat} rounds taking turns (order reversed every other round). Per-round ratio "
              f"{per_round[0]:.3f}-{per_round[-1]:.3f}x, median {float(np.median(per_round)):.3f}x, "
              f"{sum(r > 1 for r in per_round)} of {len(per_round)} rounds above 1.", "",
              f"**A/B: this checkout / {rev[:10]} (medians): {ratio:.3f}x** (> 1: this checkout is faster)"]
    report("train_step_ab", lines, ratio, record_it=not args.no_record,
           command=f"python benchmarks/train_step.py --ab {args.ab}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=None, help="steps timed per side, taking turns (7; 8 with --ab)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile side")
    ap.add_argument("--ab", metavar="REV", help="time jaxft of this checkout against jaxft at git revision REV")
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="sanity check: batch 1 x 32, 2 rounds, nothing recorded")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeat, args.no_record = 1, 32, 2, True
    if args.repeat is None:
        args.repeat = 8 if args.ab else 7
    ids = np.random.RandomState(0).randint(0, 49152, (args.batch, args.seq))
    (ab if args.ab else versus_torch)(args, ids)


if __name__ == "__main__":
    main()
