"""RoPE against transformers' `apply_rotary_pos_emb` and its torch autograd: values and gradients (fp32, 1e-6
relative), on positions that restart mid-row (packing) and with llama3 frequency scaling. Measured over input seeds 0-4,
both scalings (scripts/measure_model_tolerances.py --only ops): bit-equal on this CPU; the bound leaves room for a
fused multiply-add on another."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.ops.rope import RopeScaling, apply_rope, rope_tables
from hf_models import rel_err
from optional_import import optional  # torch-free CI leg: tests/conftest.py

torch = optional("torch")
apply_rotary_pos_emb = optional("transformers.models.llama.modeling_llama", "apply_rotary_pos_emb")

ROPE_TOL = 1e-6


@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                                                                high_freq_factor=4.0,
                                                                original_max_position_embeddings=64)])
def test_rope_matches_transformers(scaling):
    assert rope_error(scaling) <= ROPE_TOL


def rope_error(scaling: RopeScaling, seed: int = 0) -> float:
    """Largest error of the rotated q, k and their gradients against transformers, relative to each one's largest
    entry."""
    rng = np.random.RandomState(seed)
    b, t = 2, 11
    positions = np.concatenate([np.arange(6), np.arange(5) + 100])[None].repeat(b, 0).astype(np.int32)
    q = rng.randn(b, t, 3, 32).astype(np.float32)
    k = rng.randn(b, t, 1, 32).astype(np.float32)
    gq, gk = rng.randn(*q.shape).astype(np.float32), rng.randn(*k.shape).astype(np.float32)
    cos, sin = rope_tables(jnp.asarray(positions), 32, 10000.0, scaling)

    (oq, ok), vjp = jax.vjp(lambda a, c: (apply_rope(a, cos, sin), apply_rope(c, cos, sin)), jnp.asarray(q),
                            jnp.asarray(k))
    dq, dk = vjp((jnp.asarray(gq), jnp.asarray(gk)))

    # transformers works on [B, H, T, hd] with cos/sin [B, T, hd] (unsqueezed at dim 1).
    tq, tk = (torch.tensor(a.transpose(0, 2, 1, 3).copy(), requires_grad=True) for a in (q, k))
    rq, rk = apply_rotary_pos_emb(tq, tk, torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)))
    (rq * torch.tensor(gq.transpose(0, 2, 1, 3))).sum().add((rk * torch.tensor(gk.transpose(0, 2, 1, 3))).sum()) \
        .backward()
    pairs = ((oq, rq.detach()), (ok, rk.detach()), (dq, tq.grad), (dk, tk.grad))
    return max(rel_err(ours, ref.numpy().transpose(0, 2, 1, 3)) for ours, ref in pairs)
