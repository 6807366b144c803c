"""Which attention kernel a decoder runs, and the fused path through ``jax.nn.dot_product_attention``.

Three implementations compute the same causal, grouped-query softmax attention:

``blocked``
    Today's CPU path in :mod:`lora_jax.models.llama`: queries in blocks of
    ``CAUSAL_BLOCK`` positions, each scored only against the keys up to its
    block (the causally masked key blocks are skipped, not scored). Scores and
    probabilities are ordinary XLA tensors.
``dot_product``
    ``jax.nn.dot_product_attention(implementation="xla")``: one
    ``(B, heads, T, S)`` score tensor; what XLA on TPU and on GPUs without
    cuDNN's fused kernel runs best.
``cudnn``
    ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN's flash
    attention (GPU, bfloat16/float16, head dim a multiple of 8 and at most
    128): no ``(T, S)`` tensor is kept for the backward pass.

:func:`choose` picks one for ``"auto"`` by backend, dtype and shape (CPU:
``blocked``; GPU: ``cudnn`` where its shape rules allow, else ``dot_product``;
other backends: ``dot_product``) and checks an explicit request. The model
records the choice it ran: :func:`lora_jax.models.llama.attention_choice`.
A Pallas/splash kernel for TPU is not wired in; TPU runs ``dot_product``.

Shape suffixes as in the models: B batch, T queries, S keys, K kv heads,
G query heads per kv head, H head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ConfigError

ATTENTION = ("auto", "blocked", "dot_product", "cudnn")
"""The values of ``model.attention`` (and of the ``attention=`` keyword of the model functions)."""

CUDNN_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16))
"""The dtypes cuDNN's fused attention takes."""

CUDNN_MAX_HEAD_DIM = 128
"""The largest head dim cuDNN's flash attention takes on every GPU generation JAX supports (256 on Hopper)."""


def cudnn_fits(dtype: Any, head_dim: int) -> str | None:
    """Why cuDNN's fused attention cannot take this dtype and head dim, or ``None`` when it can.

    Examples:
      >>> cudnn_fits(jnp.bfloat16, 64) is None, cudnn_fits(jnp.float32, 64)
      (True, 'cuDNN attention takes bfloat16 or float16, got float32')
    """
    if np.dtype(dtype) not in CUDNN_DTYPES:
        return f"cuDNN attention takes bfloat16 or float16, got {np.dtype(dtype)}"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"cuDNN attention needs a head dim that is a multiple of 8 and <= {CUDNN_MAX_HEAD_DIM}, got {head_dim}"
    return None


def choose(requested: str, *, backend: str, dtype: Any, head_dim: int) -> str:
    """Resolve ``requested`` (one of :data:`ATTENTION`) to the implementation that runs.

    Args:
      requested: ``auto`` picks by backend and shape; the others are checked.
      backend: ``jax.default_backend()`` (``cpu``, ``gpu``/``cuda``/``rocm``, ``tpu``).
      dtype: the activations' dtype.
      head_dim: the attention head dim.

    Returns:
      ``blocked``, ``dot_product`` or ``cudnn``.

    Raises:
      ConfigError: an unknown name, or ``cudnn`` where it cannot run (not a
        CUDA GPU, or a dtype/head dim cuDNN does not take).

    Examples:
      >>> choose("auto", backend="cpu", dtype=jnp.float32, head_dim=64)
      'blocked'
      >>> choose("auto", backend="gpu", dtype=jnp.bfloat16, head_dim=64)
      'cudnn'
      >>> choose("auto", backend="gpu", dtype=jnp.float32, head_dim=64)
      'dot_product'
    """
    if requested not in ATTENTION:
        raise ConfigError(f"model.attention: unknown value {requested!r}; choose one of {', '.join(ATTENTION)}")
    gpu = backend in ("gpu", "cuda")
    if requested == "cudnn":
        why = None if gpu else f"cuDNN attention needs a CUDA GPU; this process runs on {backend!r}"
        why = why or cudnn_fits(dtype, head_dim)
        if why:
            raise ConfigError(
                f"model.attention: 'cudnn' cannot run here: {why}. Use attention 'auto' (it picks "
                "cuDNN where it fits), 'dot_product' or 'blocked'."
            )
        return "cudnn"
    if requested != "auto":
        return requested
    if backend == "cpu":
        return "blocked"
    if gpu and cudnn_fits(dtype, head_dim) is None:
        return "cudnn"
    return "dot_product"


def dot_product(
    q_BTKGH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    key_valid_BS: jax.Array | None,
    window: int | None,
    implementation: str,
) -> jax.Array:
    """Causal grouped-query attention through ``jax.nn.dot_product_attention``; returns ``(B, T, K, G, H)``.

    Args:
      q_BTKGH, k_BSKH, v_BSKH: queries (RoPE applied), keys, values; ``T == S``.
      key_valid_BS: True at real (non-padding) keys, or ``None`` (all real).
      window: sliding window: query ``t`` sees keys ``t - window < s <= t``; ``None``: all ``s <= t``.
      implementation: ``dot_product`` (XLA) or ``cudnn``.

    A query that may see no key (left padding) gets an unspecified output, as
    in the blocked path; no loss may depend on it.
    """
    B, T, K, G, H = q_BTKGH.shape
    q_BTNH = q_BTKGH.reshape(B, T, K * G, H)  # head n = k * G + g: jax groups query heads the same way
    mask = None
    if key_valid_BS is not None:
        mask = key_valid_BS.astype(bool)[:, None, None, :]
        if implementation == "cudnn":  # cuDNN takes a mask as a full (B, N, T, S) bias only
            mask = jnp.broadcast_to(mask, (B, 1, T, T))
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        mask=mask,
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="xla" if implementation == "dot_product" else "cudnn",
    )
    return out_BTNH.reshape(B, T, K, G, H)
