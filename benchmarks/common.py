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
    """The CPU by name, its widest vector extensions and core count: timings (and torch's oneDNN paths) differ
    between an AVX2 AMD EPYC and an AVX-512/AMX Xeon, both of which run these benchmarks."""
    name, flags = platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == platform.machine():
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = [x for x in ("avx2", "avx512f", "amx_tile") if x in flags]
    return f"{name} ({', '.join(isa) or platform.machine()}) x{os.cpu_count()}"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- recorded: {name} -->", f"<!-- end recorded: {name} -->"


def record(name: str, lines: list[str], command: str | None = None) -> None:
    """Write `lines` (dated, with the command that produced them) as the recorded block of section `name` of
    benchmarks/RESULTS.md, between the section's `<!-- recorded: name -->` markers. Text outside the markers (the
    analysis and history written by hand) stays; the block it replaces stays too, just below the new one, as the
    previous recorded run, so no recorded figure is lost. A section not there yet is added at the end."""
    path = os.path.join(os.path.dirname(__file__), "RESULTS.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    begin, end = _markers(name)
    stamp = datetime.date.today().isoformat()
    command = command or f"python benchmarks/{name}.py"
    block = "\n".join([begin, f"Measured {stamp} on {machine()} by `{command}`.", "", *lines, end])
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        old, tail = rest.split(end, 1)
        previous = "\n".join(["", "", "**Previous recorded run** (replaced by the block above):", "", old.strip("\n")])
        text = head + block + previous + tail
    else:
        text = text.rstrip("\n") + f"\n\n## {name}\n\n{block}\n"
    with open(path, "w") as f:
        f.write(text)


def report(name: str, lines: list[str], ratio: float, *, record_it: bool, command: str | None = None) -> None:
    """Print a benchmark's table, write it to RESULTS.md unless told not to, and print the ratio last."""
    print("\n".join(lines))
    if record_it:
        record(name, lines, command)
    print(f"ratio {ratio:.2f}x")
