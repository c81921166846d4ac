"""`cache_attention` (new tokens over a cache read block by block) against `jaxft.ops.attention.attention` over the
same keys laid out flat with an explicit mask, and a check that blocks past the bound are never read.

Tolerance: relative 1e-6 of the largest output; measured at most 2.0e-7 over the cases here and seeds 0-4 (5x)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import rel_err
from jaxft.ops.attention import attention
from jaxft.ops.cache_attention import cache_attention

TOL = 1e-6
B, T, H, K, HD, L, S, BLOCK = 3, 3, 4, 2, 8, 2, 32, 8


def _case(seed, prefix=False):
    r = np.random.RandomState(seed)
    f = lambda *s: jnp.asarray(r.randn(*s), jnp.float32)  # noqa: E731
    q, k, v = f(B, T, H, HD), f(B, T, K, HD), f(B, T, K, HD)
    cache_k, cache_v = f(L, B, K, S, HD), f(L, B, K, S, HD)  # the cache's layout [L, B, K, S, hd]
    cache_len = jnp.asarray([5, 17, 0], jnp.int32)
    cache_seg = (jnp.arange(S)[None] < cache_len[:, None]).astype(jnp.int32)
    cache_seg = cache_seg.at[1, :2].set(0)  # row 1: two slots of left padding
    q_seg = jnp.asarray([[1, 1, 1], [1, 1, 0], [1, 0, 0]], jnp.int32)  # right padding in this call
    pk = pv = None
    if prefix:
        pk, pv = f(B, 2, K, HD), f(B, 2, K, HD)
    return q, k, v, cache_k, cache_v, cache_len, cache_seg, q_seg, pk, pv


def _reference(q, k, v, cache_k, cache_v, cache_len, cache_seg, q_seg, pk, pv, layer, window):
    """The cache's layer and the new keys as one row of S + T slots; slot order = position order."""
    keys = jnp.concatenate([cache_k[layer].transpose(0, 2, 1, 3), k], axis=1)
    vals = jnp.concatenate([cache_v[layer].transpose(0, 2, 1, 3), v], axis=1)
    q_slot = cache_len[:, None] + jnp.arange(T)                                   # [B, T]
    j = jnp.arange(S)
    cache_vis = (j[None, None] < cache_len[:, None, None]) & (cache_seg[:, None] == q_seg[:, :, None]) & (
        cache_seg[:, None] != 0)
    new_vis = (jnp.arange(T)[None, None, :] <= jnp.arange(T)[None, :, None]) & (
        q_seg[:, None, :] == q_seg[:, :, None]) & (q_seg[:, None, :] != 0)
    if window is not None:
        cache_vis &= q_slot[:, :, None] - j[None, None] < window
        new_vis &= (jnp.arange(T)[None, :, None] - jnp.arange(T)[None, None, :]) < window
    mask = jnp.concatenate([cache_vis, new_vis], axis=2)
    return attention(q, keys, vals, mask, pk, pv, q_seg).reshape(B, T, H * HD), new_vis


@pytest.mark.parametrize("window,prefix", [(None, False), (6, False), (None, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_flat_attention(seed, window, prefix):
    q, k, v, ck, cv, cl, cs, qs, pk, pv = _case(seed, prefix)
    want, new_vis = _reference(q, k, v, ck, cv, cl, cs, qs, pk, pv, 1, window)
    got = cache_attention(q, k, v, new_vis, qs, ck, cv, jnp.int32(1), cs, cl, jnp.max(cl), window, pk, pv,
                          block=BLOCK)
    real = np.asarray(qs != 0)  # padding queries' outputs mean nothing
    assert rel_err(np.asarray(got)[real], np.asarray(want)[real]) <= TOL


def test_blocks_past_the_bound_are_not_read():
    """Values past the longest filled row's last block are NaN: reading them would poison the output (0 * NaN).
    With the loop running over every block of the cache instead, this test fails."""
    q, k, v, ck, cv, cl, cs, qs, pk, pv = _case(3)
    want, new_vis = _reference(q, k, v, ck, cv, cl, cs, qs, pk, pv, 0, None)
    bound = int(jnp.max(cl))
    first_unread = -(-bound // BLOCK) * BLOCK
    cv = cv.at[:, :, :, first_unread:].set(jnp.nan)
    ck = ck.at[:, :, :, first_unread:].set(jnp.nan)
    got = jax.jit(cache_attention, static_argnames=("block",))(
        q, k, v, new_vis, qs, ck, cv, jnp.int32(0), cs, cl, jnp.int32(bound), None, None, None, block=BLOCK)
    real = np.asarray(qs != 0)
    assert np.isfinite(np.asarray(got)[real]).all()
    assert rel_err(np.asarray(got)[real], np.asarray(want)[real]) <= TOL


def test_blocks_before_every_rows_window_are_not_read():
    """With a sliding window of 6 and every row filled past 18 slots, the first block (slots 0-7) lies before every
    query's window: its values are NaN and the output stays finite and equal to the flat reference. With the loop
    starting at block 0 as before, this test fails."""
    q, k, v, ck, cv, _, _, qs, pk, pv = _case(4)
    cl = jnp.asarray([20, 26, 18], jnp.int32)
    cs = (jnp.arange(S)[None] < cl[:, None]).astype(jnp.int32)
    want, new_vis = _reference(q, k, v, ck, cv, cl, cs, qs, pk, pv, 1, 6)
    cv = cv.at[:, :, :, :BLOCK].set(jnp.nan)
    ck = ck.at[:, :, :, :BLOCK].set(jnp.nan)
    got = jax.jit(cache_attention, static_argnames=("block",))(
        q, k, v, new_vis, qs, ck, cv, jnp.int32(1), cs, cl, jnp.max(cl), 6, None, None, block=BLOCK)
    real = np.asarray(qs != 0)
    assert np.isfinite(np.asarray(got)[real]).all()
    assert rel_err(np.asarray(got)[real], np.asarray(want)[real]) <= TOL
