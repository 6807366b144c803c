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
from lora_jax.errors import LoraError

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
      LoraError: the filter selects no leaf (e.g. no LoRA weight in the tree).
    """
    t, f = _paths.split(params, trainable)
    if not jax.tree.leaves(t):
        raise LoraError(
            "no trainable leaf: the params hold no LoRA weight. Call lora_jax.lora.init(key, params, rules) "
            "first, or pass trainable=lora_jax.paths.everything for full fine-tuning."
        )
    # The step donates the trainable buffers; copy them so the caller's arrays stay valid.
    t = jax.tree.map(jnp.copy, t)
    return TrainState(jnp.zeros((), jnp.int32), t, f, tx.init(t), key)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, donate: bool = True,
                    shardings: TrainState | None = None):
    """Build a pure ``train_step(state, batch) -> (state, metrics)``.

    The step is an ordinary JAX function: call it as it is (its update is
    jit-compiled once per argument signature), or put it under ``jax.jit``,
    ``jax.vmap`` (e.g. several adapter sets on one frozen base) or
    ``lax.scan`` (several steps in one program).

    Args:
      loss_fn: ``(params, batch) -> (loss, aux_dict)``.
      tx: the optax transformation (its state lives in ``state.opt_state``).
      donate: let XLA reuse the buffers of the old trainable params and
        optimizer state for the new ones (when called outside other
        transformations; inside them XLA decides).

    Returns:
      ``train_step``, with ``train_step.jitted``, the ``jax.jit`` of its
      update ``(trainable, opt_state, frozen, key, step, batch) -> (trainable,
      opt_state, step, metrics)`` for inspection (``.lower(...).cost_analysis()``),
      and ``train_step.cache_size()``, the number of argument signatures it
      was traced for. :func:`ahead_of_time` wraps it for long runs.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> params = lj.lora.init(jax.random.key(0), {"w": {"kernel": jnp.ones((4, 3))}},
      ...                       [lj.LoraRule(pattern=".*kernel", rank=2)])
      >>> loss = lambda p, b: (jnp.mean((b @ p["w"]["kernel"]) ** 2), {})
      >>> tx = optax.sgd(0.1)
      >>> step = lj.train.make_train_step(loss, tx)
      >>> state = lj.train.init_state(params, tx, jax.random.key(1))
      >>> batches = jnp.ones((3, 2, 4))
      >>> state, metrics = jax.lax.scan(step, state, batches)   # three steps in one program
      >>> int(state.step), metrics["loss"].shape
      (3, (3,))
    """
    traces = []

    def update(trainable, opt_state, frozen, key, step, batch):
        step_key = jax.random.fold_in(key, step)

        def objective(t):
            params = _lora.with_dropout_keys(_paths.combine(t, frozen), step_key)
            return loss_fn(params, batch)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        if shardings is not None:
            trainable = jax.lax.with_sharding_constraint(trainable, shardings.trainable)
            opt_state = jax.lax.with_sharding_constraint(opt_state, shardings.opt_state)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
        return trainable, opt_state, step + 1, metrics

    def traced(*args):
        traces.append(None)  # runs once per trace of the jitted update, not per call (ahead_of_time's own don't count)
        return update(*args)

    traced.__name__ = traced.__qualname__ = "train_step"
    jitted = jax.jit(traced, donate_argnums=(0, 1) if donate else ())

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        trainable, opt_state, step, metrics = jitted(
            state.trainable, state.opt_state, state.frozen, state.key, state.step, batch
        )
        return state._replace(step=step, trainable=trainable, opt_state=opt_state), metrics

    train_step.jitted = jitted
    train_step.update = update
    train_step.donate = donate
    train_step.cache_size = lambda: len(traces)
    return train_step


def ahead_of_time(train_step):
    """Wrap a step from :func:`make_train_step` to compile ahead of time and keep only executables.

    ``jax.jit`` keeps the traced program and its lowered StableHLO beside each
    executable for as long as the function lives (the lowered SmolLM2-135M
    step alone holds 40-50 MB). The wrapper compiles a fresh trace per
    argument signature (pytree structure, shapes, dtypes, placement), keeps
    the executable only, and hands compilation's freed host memory back
    before the first step runs. It is a plain Python function: use it for the
    outermost loop, not under ``jax.jit``/``vmap``/``scan``.
    ``wrapped.cache_size()`` counts the executables.
    """
    update, donate = train_step.update, train_step.donate
    executables = {}

    def wrapped(state: TrainState, batch) -> tuple[TrainState, dict]:
        args = (state.trainable, state.opt_state, state.frozen, state.key, state.step, batch)
        leaves, treedef = jax.tree.flatten(args)
        signature = (treedef, *map(_signature, leaves))
        exe = executables.get(signature)
        if exe is None:
            exe = executables[signature] = _compile(update, (0, 1) if donate else (), args)
        trainable, opt_state, step, metrics = exe(*args)
        return state._replace(step=step, trainable=trainable, opt_state=opt_state), metrics

    wrapped.cache_size = lambda: len(executables)
    return wrapped


def _signature(x) -> tuple:
    """What a compiled step is specialised to: shape, dtype, weak type and placement of one leaf."""
    return np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "weak_type", False), getattr(x, "sharding", None)


def _compile(update, donate_argnums, args):
    """Compile ``update`` for ``args`` through a fresh wrapper, so jax's tracing caches go with it."""

    def step_fn(*a):
        return update(*a)

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
