"""Pure, jit-compiled train and eval steps.

The loss is differentiated with respect to the ``trainable`` half of the
parameters only (see :func:`lora_jax.split`), so no gradient is ever formed
for a frozen weight. The frozen half (possibly quantized) is an argument of
the compiled step, never a closed-over constant. Full fine-tuning is the same
code with every leaf trainable (``trainable=lora_jax.paths.everything``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_jax import lora as _lora
from lora_jax import paths as _paths

PyTree = Any
LossFn = Callable[[PyTree, Any], tuple[jax.Array, dict]]


class TrainState(NamedTuple):
    """Everything a step reads and writes. ``frozen`` is carried, never updated."""

    step: jax.Array
    trainable: PyTree
    frozen: PyTree
    opt_state: PyTree
    key: jax.Array

    @property
    def params(self) -> PyTree:
        return _paths.combine(self.trainable, self.frozen)


def init_state(
    params: PyTree,
    tx: optax.GradientTransformation,
    key: jax.Array,
    trainable: _paths.Filter = _paths.is_trainable_leaf,
) -> TrainState:
    """Split ``params`` and initialise the optimizer on the trainable half.

    Raises:
      ValueError: the filter selects no leaf (e.g. no LoRA weight in the tree).
    """
    t, f = _paths.split(params, trainable)
    if not jax.tree.leaves(t):
        raise ValueError(
            "no trainable leaf: the params hold no LoRA weight. Call lora_jax.lora.init(key, params, rules) "
            "first, or pass trainable=lora_jax.paths.everything for full fine-tuning."
        )
    # The step donates the trainable buffers; copy them so the caller's arrays stay valid.
    t = jax.tree.map(jnp.copy, t)
    return TrainState(jnp.zeros((), jnp.int32), t, f, tx.init(t), key)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, donate: bool = True):
    """Build ``train_step(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(params, batch) -> (loss, aux_dict)``.
      tx: the optax transformation (its state lives in ``state.opt_state``).
      donate: let XLA reuse the buffers of the old trainable params and
        optimizer state for the new ones.

    The compiled core takes ``(trainable, opt_state, frozen, key, batch)``; the
    returned function is a thin wrapper that rebuilds the state, so the frozen
    weights are neither copied nor returned. A second call with the same shapes
    does not recompile.
    """

    def core(trainable, opt_state, frozen, key, step, batch):
        step_key = jax.random.fold_in(key, step)

        def objective(t):
            params = _lora.with_dropout_keys(_paths.combine(t, frozen), step_key)
            return loss_fn(params, batch)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
        return trainable, opt_state, metrics

    compiled = jax.jit(core, donate_argnums=(0, 1) if donate else ())

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        trainable, opt_state, metrics = compiled(
            state.trainable, state.opt_state, state.frozen, state.key, state.step, batch
        )
        return state._replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    train_step.compiled = compiled  # for inspection: cost analysis, cache size
    return train_step


def make_eval_step(loss_fn: LossFn):
    """Build a jit-compiled ``eval_step(trainable, frozen, batch) -> metrics`` (no dropout)."""

    @jax.jit
    def eval_step(trainable, frozen, batch):
        loss, aux = loss_fn(_paths.combine(trainable, frozen), batch)
        return {"loss": loss, **aux}

    return eval_step
