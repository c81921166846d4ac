"""SwiGLU, `silu(gate) * up`, with a backward pass that keeps only its two inputs.

Autodiff of `silu(gate) * up` keeps `sigmoid(gate)`, `silu(gate)` and friends for the backward pass: under a `scan`
over layers each is a `[layers, tokens, intermediate]` stack written in the forward pass and read in the backward
one, the largest activations of the model. This VJP keeps `gate` and `up` and recomputes the sigmoid.
"""

from __future__ import annotations

import jax


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`silu(gate) * up` elementwise (transformers' LlamaMLP activation), computed in the inputs' dtype."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    s = jax.nn.sigmoid(gate)
    silu = gate * s
    # d silu / d gate = s + gate * s * (1 - s) = s * (1 + gate * (1 - s))
    d_gate = g * up * s * (1 + gate * (1 - s))
    return d_gate.astype(gate.dtype), (g * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
