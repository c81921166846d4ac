"""Shared helpers for the benchmarks: timing, the embedded model in both frameworks, and RESULTS.md rows."""

from __future__ import annotations

import datetime
import os
import platform
import time


def timeit(fn, *, warmup: int = 1, repeat: int = 5) -> float:
    """Median seconds of `fn()` over `repeat` runs after `warmup` runs (fn must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def torch_smollm(attn: str = "sdpa"):
    """transformers' SmolLM2-135M-Instruct (fp32) from the embedded GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxft.io.default import embedded_model_path

    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32, attn_implementation=attn)


def machine() -> str:
    return f"{platform.machine()} CPU x{os.cpu_count()}"


def record(name: str, lines: list[str]) -> None:
    """Replace the section `name` of benchmarks/RESULTS.md with `lines` (dated)."""
    path = os.path.join(os.path.dirname(__file__), "RESULTS.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    header = f"## {name}"
    stamp = datetime.date.today().isoformat()
    block = "\n".join([header, "", f"Measured {stamp} on {machine()} by `python benchmarks/{name}.py`.", "", *lines, ""])
    parts = text.split("\n## ")
    kept = [parts[0].rstrip("\n")] + ["## " + p.rstrip("\n") for p in parts[1:] if not p.startswith(name + "\n")]
    with open(path, "w") as f:
        f.write("\n\n".join(kept + [block.rstrip("\n")]) + "\n")


def report(name: str, lines: list[str], ratio: float, *, record_it: bool) -> None:
    """Print a benchmark's table, write it to RESULTS.md unless told not to, and print the ratio last."""
    print("\n".join(lines))
    if record_it:
        record(name, lines)
    print(f"ratio {ratio:.2f}x")
