"""The optimizer from a typed config: AdamW (torch's math), warm-up + cosine/linear schedule, clipping,
a weight-decay mask, LoRA+ and layer-wise learning-rate decay."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.models.params import path_str
from jaxft.schema import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """lr: peak learning rate. schedule: after warm-up, `cosine` or `linear` decay to lr * min_lr_ratio, or
    `constant`. warmup_steps (or warmup_ratio of the total steps): linear warm-up from 0. weight_decay: decoupled
    (AdamW), never applied to norms, biases or 1-D leaves. max_grad_norm: global-norm clipping (null = off).
    loraplus_lr_ratio: LoRA+ — the B factors learn at lr * ratio. layer_lr_decay: layer-wise decay for full
    fine-tuning — depth d (embeddings 0, layers 1..L, head and final norm L+1) learns at lr * decay**(L+1-d)."""

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
        if not self.lr > 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("optim: warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("optim: set warmup_steps or warmup_ratio, not both")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ConfigError("optim: b1 and b2 must be in [0, 1)")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError("optim.max_grad_norm: must be > 0 (or null to turn clipping off)")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            raise ConfigError("optim.loraplus_lr_ratio: must be > 0")
        if self.layer_lr_decay is not None and not 0 < self.layer_lr_decay <= 1:
            raise ConfigError("optim.layer_lr_decay: must be in (0, 1]")


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr(step) with step counted from 0, as transformers' get_{cosine,linear}_schedule_with_warmup (with a floor
    of lr * min_lr_ratio)."""
    warm = warmup_steps(cfg, total_steps)
    floor = cfg.min_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        w = jnp.where(warm > 0, step / max(warm, 1), 1.0)
        progress = jnp.clip((step - warm) / max(total_steps - warm, 1), 0.0, 1.0)
        if cfg.schedule == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif cfg.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = jnp.ones_like(progress)
        decay = floor + (1.0 - floor) * decay
        return cfg.lr * jnp.where(step < warm, w, decay)

    return schedule


def decay_mask(tree: Any) -> Any:
    """True where weight decay applies: not on norms, biases, or any 1-D leaf (a stacked [L, D] norm counts as 1-D
    per layer)."""

    def f(path, x):
        p = path_str(path)
        per_layer = x.ndim - (1 if ".layers." in f".{p}." else 0)
        return not ("norm" in p or p.endswith("bias") or per_layer <= 1)

    return jax.tree_util.tree_map_with_path(f, tree)


def lr_scales(cfg: OptimConfig, tree: Any) -> Any:
    """Per-leaf learning-rate multipliers (arrays broadcastable to each leaf): LoRA+ and layer-wise decay."""

    def f(path, x):
        p = path_str(path)
        scale = np.ones((), np.float32)
        if cfg.loraplus_lr_ratio is not None and p.endswith("lora_b"):
            scale = scale * np.float32(cfg.loraplus_lr_ratio)
        if cfg.layer_lr_decay is not None:
            d = cfg.layer_lr_decay
            if p.startswith("model.layers."):
                n = x.shape[0]
                per = np.asarray([d ** (n - i) for i in range(n)], np.float32)  # layer i has depth i + 1
                scale = scale * per.reshape((n,) + (1,) * (x.ndim - 1))
            elif p.startswith("model.embed_tokens"):
                n_layers = _num_layers(tree)
                scale = scale * np.float32(d ** (n_layers + 1))
        return jnp.asarray(scale)

    return jax.tree_util.tree_map_with_path(f, tree)


def _num_layers(tree: Any) -> int:
    try:
        return jax.tree.leaves(tree["model"]["layers"])[0].shape[0]
    except (KeyError, IndexError, TypeError):
        return 0


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, trainable: Any, total_steps: int) -> optax.GradientTransformation:
    """clip -> Adam moments -> decoupled weight decay (masked) -> per-leaf lr scales -> -lr(step)."""
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(trainable)))
    if cfg.loraplus_lr_ratio is not None or cfg.layer_lr_decay is not None:
        parts.append(_scale_by_tree(lr_scales(cfg, trainable)))
    parts.append(optax.scale_by_learning_rate(lr_schedule(cfg, total_steps)))
    return optax.chain(*parts)
