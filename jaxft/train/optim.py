"""The optimizer from a typed config: AdamW with torch's math, warm-up + cosine/linear/constant schedule, torch's
global-norm clipping, a weight-decay mask, LoRA+ and layer-wise learning-rate decay.

`make_optimizer(cfg, trainable, total_steps)` chains, per step:

    clip (torch clip_grad_norm_) -> Adam moments -> + wd * param (masked) -> * per-leaf lr scale -> * -lr(step)

The per-leaf scale multiplies the decoupled weight decay as well as the Adam step, as torch param groups with
different `lr` do. Trainable trees are nested dicts; layers are STACKED: every leaf under `model.layers` has a
leading axis of size L (layer index), so a per-layer scale is an array `[L, 1, ...]` broadcast over the leaf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.models.params import path_str
from jaxft.quant import refuse_trainable
from jaxft.schema import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """lr: peak learning rate. schedule: after warm-up, `cosine` or `linear` decay to lr * min_lr_ratio, or
    `constant`. warmup_steps (or warmup_ratio of the total steps, rounded up): linear warm-up from 0.
    weight_decay: decoupled (AdamW), never applied to norms, biases or per-layer 1-D leaves. b1, b2, eps: Adam.
    max_grad_norm: global-norm clipping as torch's clip_grad_norm_ (null = off). loraplus_lr_ratio: LoRA+, the
    `lora_b` factors learn at lr * ratio. layer_lr_decay: layer-wise decay for full fine-tuning, depth d
    (embeddings 0, layer i -> i + 1, final norm and head L + 1) learns at lr * decay**(L + 1 - d).

    min_lr_ratio: the learning rate the decay ends at, as a fraction of lr (0 = decay to zero).
    """

    lr: float = 2e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    loraplus_lr_ratio: float | None = None
    layer_lr_decay: float | None = None

    def __post_init__(self):
        def bad(field: str, rule: str, fix: str = "") -> ConfigError:
            return ConfigError(f"optim.{field}: must be {rule}, got {getattr(self, field)!r}{fix}")

        if not self.lr > 0:
            raise bad("lr", "> 0", " (typical: 1e-5 full, 2e-4 LoRA)")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise bad("schedule", "one of 'cosine', 'linear', 'constant'")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", ">= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "in [0, 1)")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("optim: warmup_steps and warmup_ratio are both set; keep one of them")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "in [0, 1]")
        if self.weight_decay < 0:
            raise bad("weight_decay", ">= 0")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "in [0, 1)")
        if not self.eps > 0:
            raise bad("eps", "> 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise bad("max_grad_norm", "> 0", "; use null to turn clipping off")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise bad("loraplus_lr_ratio", "> 0", " (the LoRA+ paper uses 16); null turns it off")
        if self.layer_lr_decay is not None and not 0 < self.layer_lr_decay <= 1:
            raise bad("layer_lr_decay", "in (0, 1]", " (typical: 0.8-0.95); null turns it off")


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warm-up length in steps: `warmup_steps`, or `ceil(warmup_ratio * total_steps)` as transformers does."""
    return cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """`lr(step)` for step = 0, 1, ... (the update index; step 0 is the first update, lr 0 under warm-up), as
    transformers' get_{cosine,linear,constant}_schedule_with_warmup (cosine with a floor as
    get_cosine_with_min_lr_schedule_with_warmup): `lr * (floor + (1 - floor) * decay(progress))` after warm-up.
    Past `total_steps` the lr stays at the floor (transformers' cosine would rise again)."""
    if total_steps < 1:
        raise ConfigError(f"optim: the number of training steps must be >= 1, got {total_steps}")
    warm = warmup_steps(cfg, total_steps)
    if warm > total_steps:
        raise ConfigError(f"optim.warmup_steps: {warm} warm-up steps for {total_steps} training steps; lower it")
    floor, peak, kind = cfg.min_lr_ratio, cfg.lr, cfg.schedule

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        ramp = step / max(warm, 1)
        progress = jnp.clip((step - warm) / max(total_steps - warm, 1), 0.0, 1.0)
        if kind == "cosine":
            # 0.5 * (1 + cos(pi p)) written as cos(pi p / 2)**2: no float32 cancellation near the end.
            decay = floor + (1.0 - floor) * jnp.cos(0.5 * jnp.pi * progress) ** 2
        elif kind == "linear":
            decay = floor + (1.0 - floor) * (1.0 - progress)
        else:
            decay = jnp.ones_like(progress)
        return peak * jnp.where(step < warm, ramp, decay)

    return schedule


def _is_stacked(p: str) -> bool:
    return p.startswith("model.layers.")


def decay_mask(tree: Any) -> Any:
    """Bool tree, True where weight decay applies: not on leaves whose path contains 'norm' or ends in 'bias', nor
    on 1-D leaves (a stacked `[L, D]` leaf under model.layers is 1-D per layer)."""

    def f(path, x):
        p = path_str(path)
        per_layer_ndim = x.ndim - (1 if _is_stacked(p) else 0)
        return not ("norm" in p or p.endswith("bias") or per_layer_ndim <= 1)

    return jax.tree_util.tree_map_with_path(f, tree)


def num_layers(tree: Any) -> int:
    """L, the leading size shared by every leaf under model.layers (0 when there is none)."""
    sizes = {path_str(path): x.shape[0] for path, x in jax.tree_util.tree_leaves_with_path(tree)
             if _is_stacked(path_str(path))}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"optim.layer_lr_decay: leaves under model.layers have different leading sizes "
                          f"{sorted(set(sizes.values()))}; layer-wise decay needs every layer stacked")
    return next(iter(sizes.values()), 0)


def lr_scales(cfg: OptimConfig, tree: Any) -> Any:
    """Per-leaf lr multipliers as numpy arrays broadcastable to each leaf: `loraplus_lr_ratio` on leaves whose last
    key is 'lora_b'; with `layer_lr_decay = g` and L layers: embeddings g**(L+1), layer i (slice i of a stacked
    leaf) g**(L-i) as an `[L, 1, ...]` array, everything else (final norm, lm_head) 1."""
    n_layers = num_layers(tree) if cfg.layer_lr_decay is not None else 0
    if cfg.layer_lr_decay is not None and n_layers == 0:
        raise ConfigError("optim.layer_lr_decay: the trainable tree has no model.layers stack; "
                          "use it for full fine-tuning, or set it to null")

    def f(path, x):
        p = path_str(path)
        scale = np.ones((), np.float32)
        if cfg.loraplus_lr_ratio is not None and p.split(".")[-1] == "lora_b":
            scale = scale * np.float32(cfg.loraplus_lr_ratio)
        if cfg.layer_lr_decay is not None:
            g = cfg.layer_lr_decay
            if _is_stacked(p):
                depth = np.arange(1, n_layers + 1)  # slice i is layer i, at depth i + 1
                scale = scale * (g ** (n_layers + 1 - depth)).astype(np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
            elif p.startswith("model.embed_tokens."):
                scale = scale * np.float32(g ** (n_layers + 1))
        return scale

    return jax.tree_util.tree_map_with_path(f, tree)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g|| + 1e-6)) (optax's version has no 1e-6)."""

    def update(updates, state, params=None):
        del params
        coef = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_adam_torch(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's direction `(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)` in torch.optim.AdamW's order of operations.

    The bias corrections `bc = 1 - b**t` are computed as `-expm1(t * log1p(-(1 - b)))`: optax's float32
    `1 - b2**t` loses ~1e-5 of relative accuracy to cancellation at b2 = 0.999, t = 1 (torch uses float64), which
    moves early updates by that much. The state is optax's ScaleByAdamState(count, mu, nu).
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=jax.tree.map(jnp.copy, zeros))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: m + (1 - b1) * (g - m), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        bc1 = -jnp.expm1(t * jnp.log1p(jnp.float32(-(1 - b1))))
        sqrt_bc2 = jnp.sqrt(-jnp.expm1(t * jnp.log1p(jnp.float32(-(1 - b2)))))
        step = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v) / sqrt_bc2 + eps), mu, nu)
        return step, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update leaf by its (numpy, broadcastable) scale; all-ones scales are skipped."""

    def update(updates, state, params=None):
        del params
        mul = lambda u, s: u if np.all(s == 1) else u * jnp.asarray(s, u.dtype)  # noqa: E731
        return jax.tree.map(mul, updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, trainable: Any, total_steps: int) -> optax.GradientTransformation:
    """AdamW for the pytree `trainable` (its structure, paths and shapes define the mask and the lr scales):
    clip -> Adam moments -> + weight_decay * param (masked) -> per-leaf lr scales -> * -lr(step).
    A quantised (NF4) leaf in `trainable` is refused: a quantised base is frozen."""
    refuse_trainable(trainable, "optimizer")
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(clip_by_global_norm_torch(cfg.max_grad_norm))
    parts.append(scale_by_adam_torch(cfg.b1, cfg.b2, cfg.eps))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(trainable)))
    if cfg.loraplus_lr_ratio is not None or cfg.layer_lr_decay is not None:
        parts.append(_scale_by_tree(lr_scales(cfg, trainable)))
    parts.append(optax.scale_by_learning_rate(lr_schedule(cfg, total_steps)))
    return optax.chain(*parts)
