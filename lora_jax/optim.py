"""Optimizers that keep state for the LoRA factors alone.

Two ways to train only A and B, both with optimizer state for A and B alone:

* optimize the ``trainable`` half of :func:`lora_jax.split` with any optax
  transform (frozen leaves are ``None`` there, so no state exists for them), or
* wrap the transform with :func:`masked` and give it the whole params tree:
  frozen leaves become optax ``MaskedNode`` s (no state) and get zero updates.

:func:`lora_plus` sets B's learning rate to ``ratio`` times A's (LoRA+).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from lora_jax import paths as _paths
from lora_jax.errors import LoraError

PyTree = Any


def trainable_mask(tree: PyTree, trainable: _paths.Filter = _paths.is_trainable_leaf) -> PyTree:
    """A boolean tree: True at the leaves that ``trainable`` selects (default: A, B)."""
    return _paths.map_with_path(lambda p, x: bool(trainable(p, x)), tree)


def masked(
    tx: optax.GradientTransformation,
    trainable: _paths.Filter = _paths.is_trainable_leaf,
) -> optax.GradientTransformation:
    """Apply ``tx`` to the trainable leaves only; every other update is zero.

    Unlike ``optax.masked`` alone (which passes masked-out gradients through
    unchanged), the frozen leaves here receive exact zeros, and unlike
    ``chain(tx, freeze)`` no state is allocated for them.

    Args:
      tx: any optax transformation.
      trainable: ``(path, leaf) -> bool`` filter, default LoRA factors.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_jax import lora
      >>> p = lora.init(jax.random.key(0), {"w": jnp.ones((4, 3))},
      ...               [lora.LoraRule(pattern="w", rank=2)])
      >>> tx = masked(optax.adam(1e-3))
      >>> state = tx.init(p)
      >>> sum(x.size for x in jax.tree.leaves(state[0].inner_state[0].mu))  # A and B only
      14
    """
    return optax.chain(
        optax.masked(tx, lambda t: trainable_mask(t, trainable)),
        optax.masked(optax.set_to_zero(), lambda t: jax.tree.map(lambda m: not m, trainable_mask(t, trainable))),
    )


def _label(path: str, leaf: Any) -> str:
    tail = path.rsplit("/", 1)[-1]
    return {"lora_a": "a", "lora_b": "b"}.get(tail, "b" if tail in _paths.FACTOR_NAMES else "frozen")  # PEFT: 1-D -> B


def lora_plus(
    make_tx: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    ratio: float = 16.0,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al., 2024): B learns ``ratio`` times faster than A.

    Args:
      make_tx: an optax factory taking ``learning_rate`` (e.g. ``optax.adamw``).
      learning_rate: the learning rate of A (a float or a schedule).
      ratio: ``lr_B / lr_A`` (the paper's lambda; 16 is its suggestion).
      **kwargs: passed to ``make_tx`` for both factors.

    Returns:
      A transformation with state for A and B only and zero updates elsewhere.

    Examples:
      >>> import optax
      >>> tx = lora_plus(optax.adamw, 1e-4, ratio=16, weight_decay=0.0)
    """
    if not ratio > 0:
        raise LoraError(f"lora_plus: ratio must be > 0, got {ratio!r}")
    if callable(learning_rate):
        lr_b = lambda step: ratio * learning_rate(step)  # noqa: E731
    else:
        lr_b = ratio * learning_rate
    return optax.multi_transform(
        {
            "a": make_tx(learning_rate=learning_rate, **kwargs),
            "b": make_tx(learning_rate=lr_b, **kwargs),
            "frozen": optax.set_to_zero(),
        },
        lambda t: _paths.map_with_path(_label, t),
    )


def state_size(opt_state: PyTree) -> int:
    """Number of float elements held in an optimizer state (counters excluded)."""
    return sum(
        int(x.size)
        for x in jax.tree.leaves(opt_state)
        if hasattr(x, "dtype") and jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
    )


__all__ = ["masked", "lora_plus", "trainable_mask", "state_size"]
