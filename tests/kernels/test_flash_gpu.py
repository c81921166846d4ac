"""jaxft's Triton flash attention (run in Pallas interpret mode on this CPU) against the blocked XLA attention:
packed ragged segments with left and right padding, causal, sliding windows (static and traced), grouped KV heads;
forward and gradients, float32, fresh random inputs per case. That the same kernels lower to Triton for CUDA is
tests/ops/test_attention_accel_export.py; speed is benchmarks/train_step_gpu.py on a GPU."""

import jax.numpy as jnp
import pytest

from accel_cases import errors, make_case
from jaxft.errors import UnsupportedConfigError
from jaxft.kernels import FlashBlocks, flash_attention

BLOCKS = FlashBlocks(q=16, kv=16, q_bwd=16, kv_bwd=16)
# Measured over 3 shapes x 4 windows (None, 1, 17, traced 17), seed 0: forward <= 3.0e-7, gradients <= 5.6e-7
# (scaled errors, see accel_cases.errors); 2e-6 is a 3.5x margin.
TOL = 2e-6


def _flash(q, k, v, seg, window):
    return flash_attention(q, k, v, seg, window=window, blocks=BLOCKS, interpret=True)


@pytest.mark.parametrize("shape,window,seed", [
    ((2, 64, 4, 2, 16), None, 11),           # GQA 2:1, two rows (one left-, one right-padded)
    ((1, 64, 3, 1, 32), 17, 12),             # MQA, static window not a multiple of the block
    ((1, 128, 4, 2, 16), "traced", 13),      # a per-layer traced window (masks only)
    ((1, 64, 4, 4, 16), 1, 14),              # each token sees only itself
])
def test_flash_matches_blocked_attention(shape, window, seed):
    win = jnp.int32(17) if window == "traced" else window
    fwd, grad = errors(_flash, *make_case(seed, *shape), win)
    assert fwd <= TOL and grad <= TOL, (fwd, grad)


def test_flash_window_changes_the_result():
    """The window is applied (a kernel ignoring it fails the oracle comparison by orders of magnitude)."""
    case = make_case(5, 1, 64, 2, 1, 16)
    fwd, _ = errors(lambda q, k, v, s, w: _flash(q, k, v, s, None), *case, 9)
    assert fwd > 1e3 * TOL


def test_flash_refuses_shapes_it_cannot_tile():
    q = jnp.zeros((1, 40, 2, 16))
    with pytest.raises(UnsupportedConfigError, match="multiple of 16"):
        flash_attention(q, q, q, jnp.ones((1, 40), jnp.int32), blocks=BLOCKS, interpret=True)
    q = jnp.zeros((1, 64, 2, 24))
    with pytest.raises(UnsupportedConfigError, match="power of two"):
        flash_attention(q, q, q, jnp.ones((1, 64), jnp.int32), blocks=BLOCKS, interpret=True)
