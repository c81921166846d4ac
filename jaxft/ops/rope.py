"""Rotary position embeddings from explicit positions, with transformers' `default`, `linear` and `llama3` scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as transformers defines it (`default`, `linear`, `llama3`)."""

    rope_type: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> np.ndarray:
    """`inv_freq[head_dim // 2]` in float32, computed in the order transformers computes it."""
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    rs = scaling
    if rs.rope_type == "linear":
        inv_freq = (inv_freq / np.float32(rs.factor)).astype(np.float32)
    elif rs.rope_type == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(rs.factor), inv_freq).astype(np.float32)
        smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
                  / (rs.high_freq_factor - rs.low_freq_factor)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(rs.factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                scaling: RopeScaling = RopeScaling()) -> tuple[jax.Array, jax.Array]:
    """`cos, sin[B, T, head_dim]` (float32) for integer `positions[B, T]`, base frequency `theta`."""
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta, scaling))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bthd: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x[B, T, H, hd]` by the tables `cos, sin[B, T, hd]` (transformers' rotate-half layout).

    Written as `x * cos + flip(x) * (+-sin)` over the two halves (`x` viewed as `[..., 2, hd / 2]`) instead of
    transformers' slice-and-concatenate `rotate_half`: the same products and sums, so the same float32 numbers,
    but XLA fuses it and its transpose into single elementwise passes, where the transpose of a concatenate
    (slices and pads) is not fused.
    """
    b, t, h, d = x_bthd.shape
    half = d // 2
    pairs = x_bthd.reshape(b, t, h, 2, half)
    cos_h = cos[:, :, None, None, :half].astype(x_bthd.dtype)  # the tables repeat their first half
    sin_h = sin[:, :, None, None, :half].astype(x_bthd.dtype)
    sign = jnp.array([[-1.0], [1.0]], x_bthd.dtype)  # rotate_half: (x1, x2) -> (-x2, x1)
    out = pairs * cos_h + jnp.flip(pairs, axis=-2) * (sin_h * sign)
    return out.reshape(b, t, h, d)
