"""The training step: loss of a (possibly PEFT-bound) model, gradient accumulation, optimizer update.

`trainable` is what the optimizer sees: the full params for full fine-tuning, the adapter tree for a PEFT method.
`frozen` is the base tree (None for full fine-tuning); it gets no gradient and no optimizer state. The loss of a
step is the sum of token losses of all its micro-batches divided by their total number of loss tokens (not a mean
of micro-batch means).

On a device mesh (`placement`, see `jaxft.train.sharded`) the step is jitted with the trees' shardings as its input
and output shardings, traced under `jax.set_mesh` (so the model's row constraints apply), and the gradients are
constrained to the trainable tree's shardings (the accumulator of `grad_accum` micro-batches included: it would
otherwise be replicated, a full copy of the gradients per device).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxft import peft
from jaxft.models.config import LlamaConfig
from jaxft.models.llama import ModelOptions, hidden_states, loss_head
from jaxft.ops.loss import causal_lm_loss


@dataclasses.dataclass(frozen=True)
class StaticModel:
    """The static (hashable, non-array) half of a model being trained: architecture, PEFT spec (None = full
    fine-tuning), run options. The arrays travel apart, as `trainable` and `frozen` trees."""

    config: LlamaConfig
    spec: Any
    options: ModelOptions


def bound_params(model: StaticModel, trainable: Any, frozen: Any, *, train: bool = False, rng: jax.Array | None = None):
    """The parameter tree the forward pass uses (composite leaves for PEFT methods)."""
    if model.spec is None:
        return trainable
    return peft.bind(frozen, model.spec, trainable, train=train, rng=rng)


def adds_inputs(spec: Any) -> bool:
    """True for methods that give the model inputs instead of (only) changing weights (prompt and prefix tuning)."""
    return spec is not None and peft.adds_inputs(spec)


def final_hidden(model: StaticModel, trainable: Any, frozen: Any, batch: dict, *, train: bool = False,
                 rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Final hidden states `[B, T, D]` for the batch's real tokens, and the bound params (for the head)."""
    params = bound_params(model, trainable, frozen, train=train, rng=rng)
    ids, seg = batch["input_ids"], batch["segment_ids"]
    if adds_inputs(model.spec):
        kwargs, n_virtual = peft.prompt_inputs(model.spec, trainable, ids, segment_ids=seg, config=model.config,
                                               params=params, dtype=model.options.dtype)
        h = hidden_states(model.config, params, kwargs.pop("input_ids"), options=model.options, **kwargs)
        return h[:, n_virtual:], params
    h = hidden_states(model.config, params, ids, positions=batch["positions"], segment_ids=seg,
                      options=model.options)
    return h, params


def loss_sum(model: StaticModel, trainable: Any, frozen: Any, batch: dict, *, train: bool = False,
             rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`(sum of token losses, number of loss tokens)` of one micro-batch, both float32."""
    h, params = final_hidden(model, trainable, frozen, batch, train=train, rng=rng)
    head, transposed = loss_head(model.config, params)
    return causal_lm_loss(h, head, batch["input_ids"], batch["loss_mask"], batch["segment_ids"], transposed=transposed)


class MeshStep:
    """A jitted step on a mesh: calls and `lower`s it under `jax.set_mesh(mesh)`, after putting each argument on its
    sharding (a no-op for arrays already there; batches and keys made on one device move to the mesh)."""

    def __init__(self, fn, mesh, in_shardings, out_shardings, donate_argnums=()):
        self.jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                              donate_argnums=donate_argnums)
        self.mesh, self.in_shardings = mesh, in_shardings

    def _put(self, args):
        return tuple(a if s is None else jax.device_put(a, s) for a, s in zip(args, self.in_shardings))

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*self._put(args))

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def make_train_step(model: StaticModel, optimizer: optax.GradientTransformation, placement: Any = None):
    """A jitted `step(trainable, opt_state, frozen, batches, rng) -> (trainable, opt_state, metrics)`.

    `batches` holds arrays `[A, B, T]`: A micro-batches accumulated into one update. `placement`
    (`jaxft.train.sharded.Placement`, or None on one device) puts the step on a mesh.
    """
    grads_like = (lambda g: g) if placement is None else (
        lambda g: jax.lax.with_sharding_constraint(g, placement.trainable))

    def step(trainable, opt_state, frozen, batches, rng):
        def micro(carry, xs):
            total_l, total_n, total_g = carry
            batch, i = xs
            key = jax.random.fold_in(rng, i)
            f = lambda tr: loss_sum(model, tr, frozen, batch, train=True, rng=key)
            (ls, n), grads = jax.value_and_grad(f, has_aux=True)(trainable)
            return (total_l + ls, total_n + n, grads_like(jax.tree.map(jnp.add, total_g, grads_like(grads)))), None

        accum = batches["input_ids"].shape[0]
        init = (jnp.float32(0), jnp.float32(0), grads_like(jax.tree.map(jnp.zeros_like, trainable)))
        (ls, n, grads), _ = jax.lax.scan(micro, init, (batches, jnp.arange(accum)))
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": ls / denom, "loss_tokens": n, "tokens": jnp.sum(batches["segment_ids"] != 0),
                   "grad_norm": optax.global_norm(grads)}
        return trainable, opt_state, metrics

    if placement is None:
        return jax.jit(step, donate_argnums=(0, 1))
    p = placement
    return MeshStep(step, p.mesh, (p.trainable, p.opt_state, p.frozen, p.batch, p.replicated),
                    (p.trainable, p.opt_state, p.replicated), donate_argnums=(0, 1))


def make_eval_step(model: StaticModel, placement: Any = None):
    """A jitted `eval(trainable, frozen, batch) -> (loss_sum, n)` without dropout (on the mesh of `placement`:
    the batch `[B, T]` rows split when they divide over the data-parallel devices, else replicated)."""

    def ev(trainable, frozen, batch):
        return loss_sum(model, trainable, frozen, batch, train=False)

    if placement is None:
        return jax.jit(ev)
    p = placement
    return MeshStep(ev, p.mesh, (p.trainable, p.frozen, None), p.replicated)


def count_params(tree: Any) -> int:
    """The number of scalars in a tree of arrays (or of anything with a `.shape`, e.g. `ParamSpec`s)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))))
