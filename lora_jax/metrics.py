"""Evaluation metrics: perplexity of a causal language model.

:func:`perplexity` follows Hugging Face's sliding-window recipe ("Perplexity of
fixed-length models"): windows of ``window`` tokens start every ``stride``
tokens, and each window scores only the tokens no earlier window scored, so
every token after the first is scored exactly once, with up to ``window - 1``
tokens of context (at least ``window - stride`` once the first window is full).
Unlike the recipe's usual code, which averages per-window means, the result is
the exact mean negative log-likelihood over all scored tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import DataError
from lora_jax.models import layers as _layers
from lora_jax.models import llama as _llama

PyTree = Any


class Perplexity(NamedTuple):
    """Result of :func:`perplexity`.

    Attributes:
      perplexity: ``exp(nll)``.
      nll: mean negative log-likelihood per scored token (nats).
      n_tokens: number of scored tokens (``len(token_ids) - 1`` when ``stride < window``;
        with ``stride == window`` the first token of every window has no context and is not scored).
      n_windows: number of forward windows.
    """

    perplexity: float
    nll: float
    n_tokens: int
    n_windows: int


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The ``(begin, end, first_scored)`` spans of the sliding-window recipe.

    Token ``t`` (``first_scored <= t < end``, ``t >= 1``) is scored in the window
    ``[begin, end)`` from the logits at ``t - 1``.

    Examples:
      >>> windows(10, window=4, stride=3)
      [(0, 4, 0), (3, 7, 4), (6, 10, 7)]
    """
    if window < 2:
        raise DataError(f"window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise DataError(f"stride must be in 1..window={window}, got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, prev_end))
        prev_end = end
        if end == n:
            break
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def _window_nll(params, tokens_BT, weights_BT, config):
    """Sum of NLL of ``tokens[:, 1:]`` weighted by ``weights[:, 1:]``, per row."""
    h_BTD = _llama.hidden_states(params, tokens_BT, config)
    logits_BTV = (h_BTD[:, :-1] @ _llama.output_head(params, config)).astype(jnp.float32)
    return jnp.sum(_layers.token_nll(logits_BTV, tokens_BT[:, 1:]) * weights_BT[:, 1:], axis=-1)


def perplexity(
    params: PyTree,
    config: _llama.LlamaConfig,
    token_ids: Sequence[int] | np.ndarray,
    window: int,
    stride: int,
    *,
    batch_size: int = 1,
    pad_id: int = 0,
) -> Perplexity:
    """Perplexity of one long token sequence with a sliding window.

    Args:
      params: Llama parameters (LoRA nodes and quantized leaves allowed).
      config: the model's config.
      token_ids: the text as one 1-D sequence of ids.
      window: tokens per forward pass (the context size).
      stride: step between window starts; ``stride == window`` gives disjoint
        windows, smaller strides give every scored token more context.
      batch_size: windows per forward pass (all windows have the same padded
        shape, so one compilation serves them all).
      pad_id: id that fills the short last window (never scored, and padding at
        the end cannot influence earlier tokens of a causal model).

    Returns:
      A :class:`Perplexity`.

    Examples:
      >>> cfg = _llama.LlamaConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16)
      >>> params = _llama.init(jax.random.key(0), cfg)
      >>> r = perplexity(params, cfg, list(range(16)) * 3, window=8, stride=4)
      >>> r.n_tokens, r.n_windows, abs(r.perplexity - 16) < 1  # near-uniform at init
      (47, 11, True)
    """
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    if ids.size < 2:
        raise DataError(f"perplexity needs at least 2 tokens, got {ids.size}")
    spans = windows(ids.size, window, stride)
    width = min(window, ids.size)
    tokens = np.full((len(spans), width), pad_id, np.int32)
    weights = np.zeros((len(spans), width), np.float32)
    for i, (begin, end, first) in enumerate(spans):
        tokens[i, : end - begin] = ids[begin:end]
        weights[i, max(first, begin + 1) - begin : end - begin] = 1.0
    n_rows = -(-len(spans) // batch_size) * batch_size
    if n_rows > len(spans):  # whole batches: pad with unscored rows
        tokens = np.concatenate([tokens, np.full((n_rows - len(spans), width), pad_id, np.int32)])
        weights = np.concatenate([weights, np.zeros((n_rows - len(spans), width), np.float32)])
    total = 0.0
    for s in range(0, n_rows, batch_size):
        batch = jnp.asarray(tokens[s : s + batch_size]), jnp.asarray(weights[s : s + batch_size])
        nll = _window_nll(params, *batch, config)
        total += float(np.asarray(nll, np.float64).sum())
    n = int(weights.sum())
    mean = total / n
    return Perplexity(math.exp(mean), mean, n, len(spans))
