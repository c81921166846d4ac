"""NF4 kernels vs bf16 `jnp.dot` for Llama-3.1-8B layer shapes (jaxft's `[in, out]` weights).

On a GPU/TPU it times, per shape `[K, N]` and M in {1, 16, 256, 4096}: the fused dequantize-matmul `x @ W` against
`x @ W_bf16`, the forward plus input gradient (`x @ W` and `g @ W^T`) against the same two bf16 products, and the
dequantize kernel's bandwidth (bytes read + written per second) against a bf16 copy of the weight. Goals (issue
15): M <= 16 at least 2.5x faster than bf16; M >= 4096 forward + input gradient within 1.1x of bf16; dequantize at
>= 75% of the copy bandwidth. On CPU (no kernel runs natively) it checks correctness only: every kernel in
interpret mode against the plain-XLA reference on small shapes. `--record` writes the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_here, os.path.dirname(_here)]
from common import record, timeit  # noqa: E402

from jaxft.quant import nf4  # noqa: E402
from jaxft.quant.kernels import dispatch  # noqa: E402

LLAMA_8B = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (4096, 1024), "gate/up": (4096, 14336),
            "down": (14336, 4096)}
MS = (1, 16, 256, 4096)


def _block(f, *args):
    return lambda: jax.block_until_ready(f(*args))


def check_correctness() -> list[str]:
    """Interpret-mode kernels (TPU and Triton bodies) vs the XLA reference; returns report lines, raises on error."""
    lines = []
    for m, k, n in [(1, 512, 128), (37, 1024, 256)]:
        kw, kx, kg = jax.random.split(jax.random.PRNGKey(m), 3)
        t = nf4.quantize(jax.random.normal(kw, (k, n), jnp.float32) * 0.02)
        a = t.absmax_f32()
        w = dispatch.xla_dequantize(t.codes, a, jnp.float32)
        x, g = jax.random.normal(kx, (m, k)), jax.random.normal(kg, (m, n))
        for plat in ("tpu", "triton"):
            y = dispatch.run("matmul", x, t.codes, a, plat=plat, interpret=True)
            gx = dispatch.run("matmul_t", g, t.codes, a, plat=plat, interpret=True)
            err = max(float(jnp.max(jnp.abs(y - x @ w)) / jnp.max(jnp.abs(x @ w))),
                      float(jnp.max(jnp.abs(gx - g @ w.T)) / jnp.max(jnp.abs(g @ w.T))))
            if err > 3e-6:
                raise SystemExit(f"{plat} kernel M={m} K={k} N={n}: relative error {err:.2e} > 3e-6")
            lines.append(f"| {plat} (interpret) | {m} | {k} | {n} | {err:.1e} |")
    return ["| kernel | M | K | N | max rel. error vs XLA |", "|---|---|---|---|---|", *lines]


def time_device(repeat: int) -> list[str]:
    lines = ["| layer [K, N] | M | fwd NF4 ms | fwd bf16 ms | fwd speedup | fwd+dX NF4 ms | fwd+dX bf16 ms | "
             "fwd+dX speedup |", "|---|---|---|---|---|---|---|---|"]
    deq = ["| layer [K, N] | dequantize GB/s | bf16 copy GB/s | fraction |", "|---|---|---|---|"]
    for name, (k, n) in LLAMA_8B.items():
        w = (jax.random.normal(jax.random.PRNGKey(0), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        t = nf4.quantize(w, double_quant=False)
        codes, a = t.codes, t.absmax_f32()
        for m in MS:
            x = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.bfloat16)
            g = jax.random.normal(jax.random.PRNGKey(2), (m, n), jnp.bfloat16)
            f_q = jax.jit(lambda x_, c_, a_: dispatch.run("matmul", x_, c_, a_))
            f_d = jax.jit(lambda x_, w_: x_ @ w_)
            b_q = jax.jit(lambda x_, g_, c_, a_: (dispatch.run("matmul", x_, c_, a_),
                                                   dispatch.run("matmul_t", g_, c_, a_)))
            b_d = jax.jit(lambda x_, g_, w_: (x_ @ w_, g_ @ w_.T))
            tq, td = timeit(_block(f_q, x, codes, a), repeat=repeat), timeit(_block(f_d, x, w), repeat=repeat)
            bq, bd = timeit(_block(b_q, x, g, codes, a), repeat=repeat), timeit(_block(b_d, x, g, w), repeat=repeat)
            lines.append(f"| {name} [{k}, {n}] | {m} | {tq * 1e3:.3f} | {td * 1e3:.3f} | {td / tq:.2f}x | "
                         f"{bq * 1e3:.3f} | {bd * 1e3:.3f} | {bd / bq:.2f}x |")
        f_deq = jax.jit(lambda c_, a_: dispatch.run("dequantize", None, c_, a_, dtype=jnp.bfloat16))
        f_copy = jax.jit(lambda w_: w_ + jnp.bfloat16(0))
        tdq, tc = timeit(_block(f_deq, codes, a), repeat=repeat), timeit(_block(f_copy, w), repeat=repeat)
        moved_q = codes.size + a.size * 4 + w.size * 2
        moved_c = 2 * w.size * 2
        gq, gc = moved_q / tdq / 1e9, moved_c / tc / 1e9
        deq.append(f"| {name} [{k}, {n}] | {gq:.0f} | {gc:.0f} | {gq / gc:.2f} |")
    return lines + [""] + deq


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--record", action="store_true", help="write the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    plat = dispatch.platform()
    lines = check_correctness()
    if plat == "cpu":
        lines = ["CPU: correctness only (Pallas kernels run natively only on GPU/TPU).", "", *lines]
    else:
        lines = [f"Device: {jax.devices()[0].device_kind} ({plat}), jax {jax.__version__}.", "", *lines, "",
                 *time_device(args.repeat)]
    print("\n".join(lines))
    if args.record:
        record("nf4_matmul", lines)


if __name__ == "__main__":
    main()
