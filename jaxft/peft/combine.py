"""Combining LoRA adapters as peft 0.21's `LoraModel.add_weighted_adapter` does, and merging dense deltas.

Layout: one target module's LoRA is `a[..., in, r]` (peft `lora_A.weight.T`), `b[..., r, out]` (peft
`lora_B.weight.T`) and a python float `scale` (`alpha / r`, or `alpha / sqrt(r)` for rsLoRA); its delta is
`scale * a @ b` in jaxft's `[in, out]` layout. Leading `...` axes are independent modules (stacked layers): pruning,
top-k and SVD act per `[in, r]` / `[r, out]` / `[in, out]` slice.

peft's combination types (`combine_lora`), bit-for-bit in fp32 for the factor types and `cat` (eager call on CPU,
tested against peft 0.21.2), to ~1e-6 relative for the svd types (torch's MKL SVD vs jaxlib's LAPACK):

- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` merge the A factors with each other and the B
  factors with each other, each weighted by `sqrt(|w_i * scale_i|)` (the sign of `w_i * scale_i` goes to A only).
  So peft's `linear` is NOT the weighted sum of deltas: its delta is `(sum_i c_i a_i) @ (sum_j c_j b_j)`, cross terms
  `a_i @ b_j` included; it is exact only for one adapter. TIES/DARE/magnitude pruning then act on factor entries,
  whose size and sign have no meaning of their own (`a @ b` is unchanged by `a M, M^-1 b`). All adapters must share
  one rank.
- `cat` stacks the factors: `a = [w_1 s_1 a_1 | w_2 s_2 a_2 | ...]`, `b = [b_1; b_2; ...]`, rank `sum r_i`; its delta
  is exactly `sum_i w_i * delta_i`.
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` merge the deltas (`task_arithmetic`,
  `ties_deltas`, `dare_deltas`, `magnitude_prune_deltas` below), then truncate by SVD to `svd_rank` (default: the
  largest input rank). Singular vector signs are fixed by jaxft's convention (see `jaxft.peft.svd`).
- With one adapter peft switches any combination type to `linear`; so does `combine_lora`.

The combined adapter carries every scale inside its factors: peft writes it with `r = lora_alpha = new rank`, so its
scaling is 1, except that it copies `use_rslora` from the first adapter, and then its scaling is
`r / sqrt(r) = sqrt(r)`: peft's rsLoRA combination is wrong by a factor `sqrt(r)`. `combine_lora` returns the
intended `scale = 1` (with `alpha = sqrt(r)` so that an rsLoRA config reproduces it) unless asked for peft's value.

peft's merge primitives (`peft.utils.merge_utils`) are followed literally: TIES elects the sign from the UNweighted
trimmed tensors, then averages the weighted agreeing entries (`sum_i w_i t_i [agree] / #agree`); DARE rescales by
`1 / density`; `density >= 1` means no pruning at all (no rescaling, no random draw).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.peft.svd import svd_factors

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*FACTOR_TYPES, "cat", *SVD_TYPES)
_MERGE_OF = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear", "dare_ties_svd": "dare_ties",
             "magnitude_prune_svd": "magnitude_prune"}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["a", "b"], meta_fields=["scale", "alpha", "rslora"])
@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: `a[..., in, r]`, `b[..., r, out]`, delta `scale * a @ b` (`[..., in, out]`).

    `alpha` and `rslora` say how to write it as a peft config (`r = a.shape[-1]`, `lora_alpha = alpha`,
    `use_rslora = rslora`, which gives `scale = alpha / r` or `alpha / sqrt(r)`); `alpha=None` when unknown.
    """

    a: jax.Array
    b: jax.Array
    scale: float
    alpha: float | None = None
    rslora: bool = False

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def delta(self) -> jax.Array:
        """`scale * a @ b`, `[..., in, out]`, fp32."""
        return jnp.einsum("...ir,...ro->...io", self.a.astype(jnp.float32), self.b.astype(jnp.float32)) * self.scale


# ---------------------------------------------------------------------------------------------------------------
# Merge primitives on stacked task tensors t[n, ..., x, y] (peft.utils.merge_utils, per [x, y] slice).


def _check_density(density, where: str) -> None:
    if not isinstance(density, numbers.Real) or isinstance(density, bool):
        raise ValueError(f"{where}: density must be a float in [0, 1] (fraction of entries kept), got {density!r}")
    if density < 0:
        raise ValueError(f"{where}: density must be >= 0, got {density}")
    if density >= 1:
        warnings.warn(f"{where}: density {density} >= 1, no pruning will be performed", stacklevel=3)


def _check_sign_method(method, where: str) -> None:
    if method not in ("total", "frequency"):
        raise ValueError(f"{where}: majority_sign_method must be 'total' or 'frequency', got {method!r}")


def _magnitude_prune(t: jax.Array, density: float) -> jax.Array:
    """Keep the `int(density * x * y)` largest-magnitude entries of each `[x, y]` slice of `t[..., x, y]`."""
    if density >= 1:
        return t
    n = t.shape[-2] * t.shape[-1]
    k = int(density * n)  # peft: int(density * tensor.numel()), per module
    flat = t.reshape(-1, n)
    mask = jnp.zeros_like(flat)
    if k > 0:
        _, idx = jax.lax.top_k(jnp.abs(flat), k)
        mask = mask.at[jnp.arange(flat.shape[0])[:, None], idx].set(1)
    return (flat * mask).reshape(t.shape)


def _random_prune(t: jax.Array, drop: jax.Array, density: float, rescale: bool) -> jax.Array:
    """DARE: zero the entries where `drop` is True, then divide by `density` (peft divides, it does not multiply)."""
    if density >= 1:
        return t
    kept = t * jnp.logical_not(drop).astype(t.dtype)
    if not rescale:
        return kept
    # XLA on CPU turns a division by a broadcast scalar into a multiplication by its reciprocal (1 ulp off in a
    # quarter of the entries); dividing by a materialised array keeps the IEEE division torch does.
    return kept / jax.lax.optimization_barrier(jnp.full(kept.shape, density, kept.dtype))


def _expand(w: jax.Array, t: jax.Array) -> jax.Array:
    return w.reshape(-1, *([1] * (t.ndim - 1)))


def _agree(t: jax.Array, method: str) -> jax.Array:
    """TIES sign election on the unweighted `t[n, ...]`: True where `t_i`'s sign is the elected one."""
    sign = jnp.sign(t)
    votes = t.sum(axis=0) if method == "total" else sign.sum(axis=0)
    return sign == jnp.where(votes >= 0, 1.0, -1.0)


@functools.partial(jax.jit, static_argnames=("kind", "density", "method", "rescale"))
def _terms(kind: str, tensors: list[jax.Array], w: jax.Array, density, method, drops, rescale: bool = True):
    """The summands `[n, ...]` of peft's merge (pruned, weighted, sign-masked) and the TIES divisor (or None).

    One jitted program per signature (eager top-k and scatter compile op by op: seconds on a small CPU). The sum is
    left out of it on purpose: fused into the products, XLA contracts `a*w + b*v` to FMAs, 1 ulp off torch.
    """
    drops = [None] * len(tensors) if drops is None else drops
    if kind in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(t, d, density, rescale) for t, d in zip(tensors, drops)]
    t = jnp.stack(tensors, axis=0)
    weighted = t * _expand(w, t)
    if kind not in ("ties", "dare_ties"):
        return weighted, None
    agree = _agree(t, method)  # elected before weighting, as peft does
    return weighted * agree, jnp.maximum(agree.sum(axis=0), 1).astype(t.dtype)


def _merge(kind: str, tensors: list[jax.Array], w: jax.Array, density, method, drops, rescale: bool = True):
    """peft's `task_arithmetic` / `ties` / `dare_linear` / `dare_ties` / `magnitude_prune` on a list of tensors."""
    terms, count = _terms(kind, tensors, w, density, method, drops, rescale)
    total = jnp.sum(terms, axis=0)
    return total if count is None else total / count


def _weights32(weights: Sequence[float], n: int, where: str) -> jax.Array:
    if len(weights) != n:
        raise ValueError(f"{where}: got {n} tensors but {len(weights)} weights; pass one weight per tensor")
    return jnp.asarray(np.asarray([float(x) for x in weights], dtype=np.float32))  # torch.tensor(list) is fp32


def _check_deltas(deltas: Sequence[jax.Array], where: str) -> list[jax.Array]:
    if len(deltas) == 0:
        raise ValueError(f"{where}: got no deltas; pass at least one [..., in, out] array")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) != 1 or len(next(iter(shapes))) < 2:
        raise ValueError(f"{where}: deltas must share one [..., in, out] shape, got {sorted(shapes)}")
    return [jnp.asarray(d, dtype=jnp.float32) for d in deltas]


def draw_drop_masks(key: jax.Array, shapes: Sequence[tuple[int, ...]], density: float) -> list[jax.Array]:
    """One DARE drop mask per shape: True (dropped) with probability `1 - density`, independently per entry."""
    return _draw(key, tuple(tuple(s) for s in shapes), float(density))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(key, shapes, density):
    sizes = [math.prod(s) for s in shapes]  # one draw for all masks: each bernoulli call compiles its own threefry
    keep = jax.random.bernoulli(key, density, (sum(sizes),))
    offsets = np.cumsum([0, *sizes])
    return [jnp.logical_not(keep[o:o + n]).reshape(s) for o, n, s in zip(offsets, sizes, shapes)]


def _resolve_drops(shapes, density, key, drop_masks, where: str) -> list[jax.Array]:
    if (key is None) == (drop_masks is None):
        raise ValueError(f"{where}: DARE needs exactly one of key= (draw masks) or drop_masks= (given masks)")
    if drop_masks is None:
        return draw_drop_masks(key, shapes, density)
    if len(drop_masks) != len(shapes) or any(tuple(m.shape) != tuple(s) for m, s in zip(drop_masks, shapes)):
        got = [tuple(m.shape) for m in drop_masks]
        raise ValueError(f"{where}: drop_masks must have shapes {[tuple(s) for s in shapes]}, got {got}")
    return [jnp.asarray(m).astype(bool) for m in drop_masks]


def task_arithmetic(deltas: Sequence[jax.Array], weights: Sequence[float]) -> jax.Array:
    """`sum_i w_i * delta_i` (Ilharco et al.); `deltas[i][..., in, out]` -> `[..., in, out]` fp32."""
    ds = _check_deltas(deltas, "task_arithmetic")
    return _merge("linear", ds, _weights32(weights, len(ds), "task_arithmetic"), None, None, None)


def magnitude_prune_deltas(deltas: Sequence[jax.Array], weights: Sequence[float], density: float) -> jax.Array:
    """Keep the top `density` fraction (by magnitude, per module) of each delta, then `sum_i w_i * delta_i`."""
    ds = _check_deltas(deltas, "magnitude_prune_deltas")
    _check_density(density, "magnitude_prune_deltas")
    return _merge("magnitude_prune", ds, _weights32(weights, len(ds), "magnitude_prune_deltas"), density, None, None)


def ties_deltas(
    deltas: Sequence[jax.Array], weights: Sequence[float], density: float, majority_sign_method: str = "total"
) -> jax.Array:
    """TIES-merging (Yadav et al. 2023) of dense deltas, as peft computes it: trim each delta to its top `density`
    fraction by magnitude (per module), elect each entry's sign from the trimmed deltas (`total`: sign of their sum;
    `frequency`: majority of their signs; ties go to +), then average `w_i * trimmed_i` over the deltas whose sign
    agrees. The sign is elected before weighting, and the mean divides by the count of agreeing deltas, not by the sum
    of their weights. With all weights 1 this is the paper's merge with lambda = 1. `[..., in, out]` fp32.
    """
    ds = _check_deltas(deltas, "ties_deltas")
    _check_density(density, "ties_deltas")
    _check_sign_method(majority_sign_method, "ties_deltas")
    return _merge("ties", ds, _weights32(weights, len(ds), "ties_deltas"), density, majority_sign_method, None)


def dare_deltas(
    deltas: Sequence[jax.Array],
    weights: Sequence[float],
    density: float,
    *,
    key: jax.Array | None = None,
    drop_masks: Sequence[jax.Array] | None = None,
    rescale: bool = True,
    majority_sign_method: str | None = None,
) -> jax.Array:
    """DARE (Yu et al. 2024) on dense deltas: drop each entry with probability `1 - density`, rescale the survivors
    by `1 / density` (`rescale=True`), then `sum_i w_i * delta_i` (peft's `dare_linear`), or, with
    `majority_sign_method` set, the TIES sign election and disjoint mean (peft's `dare_ties`).

    Masks: `drop_masks[i]` (bool, True = dropped, shape of `deltas[i]`) or drawn from `key`. `density >= 1` drops
    nothing and does not rescale (peft). `[..., in, out]` fp32.
    """
    ds = _check_deltas(deltas, "dare_deltas")
    _check_density(density, "dare_deltas")
    if majority_sign_method is not None:
        _check_sign_method(majority_sign_method, "dare_deltas")
    drops = None if density >= 1 else _resolve_drops([d.shape for d in ds], density, key, drop_masks, "dare_deltas")
    kind = "dare_linear" if majority_sign_method is None else "dare_ties"
    w = _weights32(weights, len(ds), "dare_deltas")
    return _merge(kind, ds, w, float(density), majority_sign_method, drops, rescale=bool(rescale))


# ---------------------------------------------------------------------------------------------------------------
# peft's add_weighted_adapter, per module.


def _check_adapters(adapters: Sequence[LoraFactors], weights: Sequence[float], combination_type: str) -> None:
    where = "combine_lora"
    if len(adapters) == 0:
        raise ValueError(f"{where}: got no adapters; pass at least one LoraFactors")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"{where}: invalid combination_type {combination_type!r}; use one of {COMBINATION_TYPES}")
    if len(weights) != len(adapters):
        raise ValueError(f"{where}: got {len(adapters)} adapters but {len(weights)} weights; pass one weight each")
    outer = None
    for i, ad in enumerate(adapters):
        a, b = ad.a, ad.b
        if a.ndim < 2 or b.ndim != a.ndim or a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:
            raise ValueError(f"{where}: adapter {i} has a{tuple(a.shape)}, b{tuple(b.shape)}; "
                             "expected a[..., in, r] and b[..., r, out]")
        here = (tuple(a.shape[:-1]), b.shape[-1])
        if outer is not None and here != outer:
            raise ValueError(f"{where}: adapter {i} has [..., in]={here[0]}, out={here[1]} but adapter 0 has "
                             f"{outer[0]}, {outer[1]}; combine adapters of one module only")
        outer = here


def _new_rank(kind: str, ranks: list[int], svd_rank: int | None, in_out: tuple[int, int]) -> int:
    """peft's `_check_add_weighted_adapter` rank rules (per module here, per config in peft)."""
    if kind in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(f"combine_lora: all adapters must have the same rank for {kind!r}, got ranks {ranks}; "
                             "use 'cat' or an svd type")
        return ranks[0]
    if kind == "cat":
        return sum(ranks)
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 0):
        raise ValueError(f"combine_lora: svd_rank must be a non-negative int or None, got {svd_rank!r}")
    rank = svd_rank or max(ranks)  # peft: svd_rank or max(ranks), so svd_rank=0 means the default too
    if rank > min(in_out):
        # peft crashes in U @ diag(S) or writes factors whose shapes do not chain; refuse before computing.
        raise ValueError(f"combine_lora: svd rank {rank} exceeds min(in, out)={min(in_out)} of this module; "
                         "pass a smaller svd_rank")
    return rank


def combine_lora(
    adapters: Sequence[LoraFactors],
    weights: Sequence[float],
    combination_type: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    drop_masks: Sequence | None = None,
    key: jax.Array | None = None,
    match_peft_rslora: bool = False,
) -> LoraFactors:
    """Combine one module's LoRAs as peft's `add_weighted_adapter(adapters, weights, name, combination_type, ...)`.

    `adapters[i]`: `LoraFactors(a[..., in, r_i], b[..., r_i, out], scale_i)`; all share `[..., in]` and `out`.
    Returns `LoraFactors(a[..., in, R], b[..., R, out], scale, alpha, rslora)` whose `a`, `b` are peft's new
    `lora_A.weight.T`, `lora_B.weight.T` (see the module docstring for what each type computes), with
    `R` = the common rank (`linear`, `ties`, `dare_*`, `magnitude_prune`), `sum r_i` (`cat`), or `svd_rank` /
    `max r_i` (the svd types). `rslora` is copied from `adapters[0]` as peft does; `scale = 1` and `alpha = R`
    (`sqrt(R)` under rsLoRA, so the written config reproduces `scale = 1`). `match_peft_rslora=True` returns peft's
    own result instead: `alpha = R` always, hence `scale = sqrt(R)` under rsLoRA (peft's bug, off by `sqrt(R)`).

    DARE types need `drop_masks` (bool, True = dropped) or a jax `key`: for the factor types one pair
    `(drop_a[..., in, r], drop_b[..., r, out])` per adapter, for `dare_*_svd` one `drop[..., in, out]` per adapter
    (peft draws `torch.bernoulli(density)` keep masks in that order: all A's, then all B's, per module).
    `density` is required by every type but `linear`, `cat`, `svd`; `majority_sign_method` is used by `*ties*`.

    Refuses (one-line ValueError) where peft raises: unequal ranks for the factor types, an unknown type, a missing
    or negative density, an unknown sign method. Also refuses where peft silently misbehaves: weights and adapters
    of different lengths (peft zips them), an svd rank above `min(in, out)`, and an unknown type with one adapter
    (peft ignores the type there). Factors come back in `adapters[0].a.dtype` (svd types: fp32).
    """
    where = "combine_lora"
    _check_adapters(adapters, weights, combination_type)
    kind = "linear" if len(adapters) == 1 else combination_type  # peft: one adapter -> linear, whatever was asked
    ranks = [ad.rank for ad in adapters]
    n_in, n_out = adapters[0].a.shape[-2], adapters[0].b.shape[-1]
    rank = _new_rank(kind, ranks, svd_rank, (n_in, n_out))
    merge = _MERGE_OF.get(kind, kind)
    if kind in SVD_TYPES and svd_clamp is not None and not 0.0 <= svd_clamp <= 1.0:
        raise ValueError(f"{where}: svd_clamp is a quantile in [0, 1], got {svd_clamp!r}")  # torch.quantile raises
    if merge in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        _check_density(density, where)
    if merge in ("ties", "dare_ties"):
        _check_sign_method(majority_sign_method, where)
    drops = None
    if merge.startswith("dare") and density < 1:
        n = len(adapters)
        if kind in SVD_TYPES:
            shapes = [(*adapters[0].a.shape[:-1], n_out)] * n
            drops = _resolve_drops(shapes, density, key, drop_masks, where)
        else:
            shapes = [ad.a.shape for ad in adapters] + [ad.b.shape for ad in adapters]
            pairs = None if drop_masks is None else [m for pair in zip(*drop_masks) for m in pair]
            if drop_masks is not None and (len(drop_masks) != n or any(len(p) != 2 for p in drop_masks)):
                raise ValueError(f"{where}: drop_masks for {kind!r} must be one (drop_a, drop_b) pair per adapter")
            drops = _resolve_drops(shapes, density, key, pairs, where)

    dtype = adapters[0].a.dtype
    a32 = [jnp.asarray(ad.a, jnp.float32) for ad in adapters]
    b32 = [jnp.asarray(ad.b, jnp.float32) for ad in adapters]
    if kind == "cat":
        # peft: lora_A * weight * scaling, two roundings in this order; B untouched.
        a = jnp.concatenate([x * float(w) * float(ad.scale) for x, w, ad in zip(a32, weights, adapters)], axis=-1)
        b = jnp.concatenate(b32, axis=-2)
        a, b = a.astype(dtype), b.astype(dtype)
    elif kind in FACTOR_TYPES:
        w_a, w_b = [], []
        for w, ad in zip(weights, adapters):
            ws = float(w) * float(ad.scale)  # python float64, as in peft
            w_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign goes to A only
            w_b.append(math.sqrt(abs(ws)))
        n = len(adapters)
        drops_a, drops_b = (None, None) if drops is None else (drops[:n], drops[n:])
        a = _merge(merge, a32, _weights32(w_a, n, where), density, majority_sign_method, drops_a).astype(dtype)
        b = _merge(merge, b32, _weights32(w_b, n, where), density, majority_sign_method, drops_b).astype(dtype)
    else:
        deltas = [LoraFactors(x, y, float(ad.scale)).delta() for x, y, ad in zip(a32, b32, adapters)]
        merged = _merge(merge, deltas, _weights32(weights, len(deltas), where), density, majority_sign_method, drops)
        a, b = svd_factors(merged, rank, full_matrices=svd_full_matrices, clamp=svd_clamp)

    rslora = bool(adapters[0].rslora)
    if rslora and not match_peft_rslora:
        scale, alpha = 1.0, math.sqrt(rank)
    else:
        alpha = float(rank)
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank  # peft's scaling of the new adapter
    return LoraFactors(a, b, scale, alpha, rslora)
