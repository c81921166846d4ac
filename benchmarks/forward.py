"""Forward tokens/s of jaxft (jit) vs transformers (torch eager, sdpa attention) on SmolLM2-135M, CPU fp32.

Batch 4 x 256 tokens, in one process; prints the ratio last (> 1 means jaxft is faster). Goal: >= 1.0x.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

_here = __import__("os").path.dirname(__import__("os").path.abspath(__file__))
sys.path[:0] = [_here, __import__("os").path.dirname(_here)]
from common import report, timeit, torch_smollm  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    import jaxft

    ids = np.random.RandomState(0).randint(0, 49152, (args.batch, args.seq))
    tokens = args.batch * args.seq

    config, params = jaxft.load_pretrained("smollm2-135m-instruct")
    fwd = jax.jit(lambda p, i: jaxft.forward(config, p, i))
    ids_j = jnp.asarray(ids)
    t = time.perf_counter()
    fwd(params, ids_j).block_until_ready()
    compile_s = time.perf_counter() - t
    jax_s = timeit(lambda: fwd(params, ids_j).block_until_ready(), repeat=args.repeat)

    model = torch_smollm("sdpa").eval()
    ids_t = torch.tensor(ids)

    def torch_fwd():
        with torch.no_grad():
            model(ids_t).logits

    torch_s = timeit(torch_fwd, repeat=args.repeat)
    ratio = torch_s / jax_s
    lines = [
        f"| side | tokens/s |", "|---|---|",
        f"| jaxft (jit) | {tokens / jax_s:.0f} |",
        f"| transformers (eager, sdpa) | {tokens / torch_s:.0f} |",
        "", f"batch {args.batch} x {args.seq}, fp32; jaxft first call (compile) {compile_s:.1f} s; "
        f"torch threads {torch.get_num_threads()}.", "", f"**ratio jaxft / transformers: {ratio:.2f}x** (goal >= 1.0x)",
    ]
    report("forward", lines, ratio, record_it=not args.no_record)


if __name__ == "__main__":
    main()
