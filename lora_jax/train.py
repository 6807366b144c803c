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
import numpy as np
import optax

from lora_jax import hostmem as _hostmem
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

    The compiled core takes ``(trainable, opt_state, frozen, key, step, batch)``;
    the returned function is a thin wrapper that rebuilds the state, so the
    frozen weights are neither copied nor returned. It compiles the core ahead
    of time once per argument signature (pytree structure, shapes, dtypes,
    placement) and keeps only the executables: a second call with the same
    shapes does not recompile (``train_step.cache_size()`` counts them), and
    jax's tracing caches for the step do not stay resident beside it.
    ``train_step.compiled`` is the ``jax.jit`` of the core, for inspection
    (``.lower(...).cost_analysis()``).
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

    donate_argnums = (0, 1) if donate else ()
    compiled = jax.jit(core, donate_argnums=donate_argnums)
    executables = {}

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        args = (state.trainable, state.opt_state, state.frozen, state.key, state.step, batch)
        leaves, treedef = jax.tree.flatten(args)
        signature = (treedef, *map(_signature, leaves))
        exe = executables.get(signature)
        if exe is None:
            exe = executables[signature] = _compile(core, donate_argnums, args)
        trainable, opt_state, metrics = exe(*args)
        return state._replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    train_step.compiled = compiled  # for inspection: lower(...).cost_analysis(), memory_analysis()
    train_step.cache_size = lambda: len(executables)
    return train_step


def _signature(x) -> tuple:
    """What a compiled step is specialised to: shape, dtype, weak type and placement of one leaf."""
    return np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "weak_type", False), getattr(x, "sharding", None)


def _compile(core, donate_argnums, args):
    """Compile ``core`` ahead of time for ``args`` and keep only the executable.

    ``jax.jit`` caches the traced program and its lowered StableHLO beside
    the executable for as long as the traced function lives (the lowered
    SmolLM2-135M step alone holds 40-50 MB). Tracing a fresh wrapper lets
    those caches go with it; the executable is all a train step needs.
    """

    def step_fn(*a):
        return core(*a)

    step_fn.__name__ = step_fn.__qualname__ = "train_step"
    exe = jax.jit(step_fn, donate_argnums=donate_argnums).lower(*args).compile()
    _hostmem.release()  # hand compilation's freed memory back before the first step allocates its own
    return exe


def make_eval_step(loss_fn: LossFn):
    """Build a jit-compiled ``eval_step(trainable, frozen, batch) -> metrics`` (no dropout)."""

    @jax.jit
    def eval_step(trainable, frozen, batch):
        loss, aux = loss_fn(_paths.combine(trainable, frozen), batch)
        return {"loss": loss, **aux}

    return eval_step
