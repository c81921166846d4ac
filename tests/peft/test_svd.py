"""to_lora / svd_factors against numpy's float64 SVD (an independent LAPACK path), fp32.

Tolerances: a full-rank extraction reconstructs the delta to 2e-6 relative (fp32 SVD of a 24x40 matrix); the reported
error below full rank equals the Eckart-Young optimum sqrt(sum_{k>r} s_k^2 / sum_k s_k^2), from numpy's float64
singular values, to 1e-5 relative.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.peft.svd import relative_error, svd_factors, to_lora

SHAPE = (2, 3, 24, 40)  # two leading axes (e.g. layers x experts), in=24, out=40


def _delta(seed=0, shape=SHAPE, spectrum=None):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal(shape)
    if spectrum is not None:  # impose singular values, to make the truncation error non-trivial and known
        u, _, vh = np.linalg.svd(d, full_matrices=False)
        d = (u * spectrum) @ vh
    return d.astype(np.float32)


def _eckart_young(delta: np.ndarray, rank: int) -> np.ndarray:
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    return np.sqrt(np.sum(s[..., rank:] ** 2, axis=-1) / np.sum(s**2, axis=-1))


def test_full_rank_is_exact():
    delta = _delta()
    a, b, scale, err = to_lora(jnp.asarray(delta), 24)
    assert a.shape == (2, 3, 24, 24) and b.shape == (2, 3, 24, 40) and scale == 1.0 and err.shape == (2, 3)
    recon = np.einsum("...ir,...ro->...io", np.asarray(a, np.float64), np.asarray(b, np.float64))
    independent = np.linalg.norm(recon - delta, axis=(-2, -1)) / np.linalg.norm(delta, axis=(-2, -1))
    assert np.all(independent < 2e-6) and np.all(np.asarray(err) < 2e-6)


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_low_rank_error_is_eckart_young(rank):
    spectrum = 0.8 ** np.arange(24)
    delta = _delta(seed=rank, spectrum=spectrum)
    a, b, scale, err = to_lora(jnp.asarray(delta), rank)
    want = _eckart_young(delta, rank)
    assert want.min() > 1e-3  # the truncation does lose something
    np.testing.assert_allclose(np.asarray(err), want, rtol=1e-5)
    # a has orthonormal columns; b holds the singular values (peft's convention): row norms = top singular values
    eye = np.einsum("...ir,...is->...rs", np.asarray(a), np.asarray(a))
    np.testing.assert_allclose(eye, np.broadcast_to(np.eye(rank), eye.shape), atol=2e-6)
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)[..., :rank]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(b), axis=-1), s, rtol=2e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_alpha_sets_scale(rslora):
    delta = _delta(seed=7)
    a, b, scale, err = to_lora(jnp.asarray(delta), 6, alpha=16.0, rslora=rslora)
    assert scale == (16.0 / math.sqrt(6) if rslora else 16.0 / 6)
    a1, b1, _, err1 = to_lora(jnp.asarray(delta), 6)
    np.testing.assert_allclose(np.asarray(b) * scale, np.asarray(b1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(err), np.asarray(err1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(err), _eckart_young(delta, 6), rtol=1e-5)


def test_signs_are_fixed_and_match_numpy_up_to_sign():
    delta = _delta(seed=11)
    a, b = svd_factors(jnp.asarray(delta), 8)
    a = np.asarray(a)
    pivot = np.take_along_axis(a, np.abs(a).argmax(axis=-2)[..., None, :], axis=-2)
    assert np.all(pivot > 0)
    _, _, vh = np.linalg.svd(np.swapaxes(delta, -1, -2).astype(np.float64))  # peft's [out, in] orientation
    ref = np.swapaxes(vh[..., :8, :], -1, -2)
    np.testing.assert_allclose(np.abs(np.sum(a * ref, axis=-2)), 1.0, atol=1e-5)  # same singular vectors


def test_zero_delta_and_relative_error():
    zero = jnp.zeros((3, 5))
    a, b, _, err = to_lora(zero, 2)
    assert float(err) == 0.0 and not np.any(np.asarray(a) @ np.asarray(b))
    d = _delta(seed=2, shape=(4, 6))
    half = relative_error(jnp.asarray(d), jnp.asarray(d), jnp.eye(6), 0.5)
    assert float(half) == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("rank", [0, 25, 2.0, True])
def test_bad_rank_refused(rank):
    with pytest.raises(ValueError, match="rank must be an int") as err:
        to_lora(jnp.zeros((24, 40)), rank)
    assert "\n" not in str(err.value)


def test_bad_alpha_and_shape_refused():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        to_lora(jnp.zeros((4, 4)), 2, alpha=0.0)
    with pytest.raises(ValueError, match=r"\[..., in, out\]"):
        to_lora(jnp.zeros((4,)), 1)
    with pytest.raises(ValueError, match="clamp"):
        svd_factors(jnp.zeros((4, 4)), 2, clamp=1.5)
