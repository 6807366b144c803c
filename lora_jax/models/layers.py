"""Layers shared by the built-in models: affine projections, weight init, the token NLL.

These are the pieces :mod:`lora_jax.models.llama` and :mod:`lora_jax.models.bert`
(and :mod:`lora_jax.metrics`) compute the same way. They multiply with ``@`` and
index with ``[]`` only, so LoRA and quantized leaves work in place of arrays.
Shape suffixes as in the models: B batch, T time, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import _kernels

PyTree = Any

INIT_STD = 0.02
"""Standard deviation of random weights (Hugging Face's ``initializer_range``)."""


def matmul(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w``; a bfloat16 array ``w`` times bfloat16 ``x`` accumulates in float32 (:func:`lora_jax._kernels.matmul`).

    LoRA and quantized leaves keep their own ``@`` (they do the same inside).
    """
    return _kernels.matmul(x, w) if isinstance(w, jax.Array) else x @ w


def linear(x: jax.Array, p: PyTree) -> jax.Array:
    """Return ``x @ p["kernel"]`` plus ``p["bias"]`` when present (cast to the output dtype).

    Examples:
      >>> linear(jnp.ones((2, 3)), {"kernel": jnp.ones((3, 4)), "bias": jnp.arange(4.0)}).tolist()
      [[3.0, 4.0, 5.0, 6.0], [3.0, 4.0, 5.0, 6.0]]
    """
    y = matmul(x, p["kernel"])
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def normal_init(key: jax.Array, n: int, dtype: Any) -> Callable[[tuple[int, ...]], jax.Array]:
    """Return ``w(shape)``: each call draws the next of ``n`` keys split from ``key``, normal with std 0.02.

    The values are drawn in float32 and cast to ``dtype``, so a model's weights
    do not depend on the dtype it is built in beyond that cast.

    Examples:
      >>> w = normal_init(jax.random.key(0), 2, jnp.bfloat16)
      >>> w((3, 4)).shape, w((5,)).dtype
      ((3, 4), dtype(bfloat16))
    """
    keys = iter(jax.random.split(key, n))

    def w(shape: tuple[int, ...]) -> jax.Array:
        return (INIT_STD * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    return w


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Return the negative log-likelihood ``(B, T)`` of ``targets`` under ``logits`` (``logsumexp - picked``).

    Examples:
      >>> nll = token_nll(jnp.zeros((1, 2, 4)), jnp.array([[0, 3]]))
      >>> bool(jnp.allclose(nll, jnp.log(4.0)))
      True
    """
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return lse_BT - picked_BT
