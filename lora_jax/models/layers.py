"""Layers shared by the built-in models: affine projections, weight init, the token NLL, remat policies.

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
from lora_jax.errors import ConfigError

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


REMAT = ("none", "full", "dots", "offload")
"""Rematerialization policies of a layer: what its backward pass recomputes instead of storing.

``none`` stores every activation autodiff needs; ``full`` stores only each
layer's input and recomputes the layer; ``dots`` stores the outputs of the
matmuls without batch dimensions (the projections) and recomputes the rest
(``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``); ``offload``
stores those same matmul outputs in host memory (GPU/TPU only). ``True`` means
``full`` and ``False`` ``none``, as before the policies existed.
"""


def remat_name(remat: bool | str | None) -> str:
    """Return the policy name (one of :data:`REMAT`) of a ``remat`` argument (a bool or a name).

    Examples:
      >>> remat_name(True), remat_name(False), remat_name("dots")
      ('full', 'none', 'dots')
    """
    if remat is None or isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT:
        raise ConfigError(f"train.remat: unknown value {remat!r}; choose one of {', '.join(REMAT)} (or true/false)")
    return remat


def remat_layer(fn: Callable, remat: bool | str | None, *, backend: str | None = None) -> Callable:
    """Wrap a layer function in ``jax.checkpoint`` with the policy ``remat`` names (see :data:`REMAT`).

    Args:
      fn: the layer, ``(x, layer_params) -> x``.
      remat: a bool or a name in :data:`REMAT`.
      backend: where it runs (default ``jax.default_backend()``); ``offload``
        needs memory outside the device's own.

    Raises:
      ConfigError: an unknown name, or ``offload`` on the CPU, whose activations
        already live in host memory.

    Examples:
      >>> f = remat_layer(lambda x, p: jnp.sin(x @ p), "dots")
      >>> float(jax.grad(lambda x: f(x, jnp.eye(2)).sum())(jnp.zeros(2))[0])
      1.0
    """
    name = remat_name(remat)
    if name == "none":
        return fn
    if name == "full":
        return jax.checkpoint(fn)
    if name == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    backend = backend or jax.default_backend()
    if backend == "cpu":
        raise ConfigError(
            "train.remat: 'offload' moves saved activations from device to host memory, and on the CPU "
            "they live in host memory already; use 'none', 'dots' or 'full' here (offload is for GPU/TPU)"
        )
    policy = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return jax.checkpoint(fn, policy=policy)
