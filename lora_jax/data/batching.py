"""Fixed-shape batches with a data position that is a pure function of the step.

:func:`pad_examples` right-pads tokenized examples to ``max_len`` once, giving
``(N, T)`` arrays with the keys of a batch; :func:`batch_at` picks batch ``k``
from them. Batch ``k`` depends only on ``(seed, k)``: epoch ``e = k // S`` (``S``
full batches per epoch, the remainder dropped) takes its examples in the order of
a permutation drawn from ``(seed, e)``. A run resumed at step ``k`` therefore sees
the same data as one that never stopped, and every batch has the same shape, so a
jit-compiled step compiles once.

A batch holds ``tokens`` (int32), ``loss_mask`` (float32, 1 where the token is a
target, as :func:`lora_jax.models.llama.loss` reads it) and ``attention_mask``
(int32, 1 for real tokens, 0 for padding).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from lora_jax.errors import DataError

Batch = dict[str, np.ndarray]


def pad_examples(examples: Sequence[Sequence[np.ndarray]], max_len: int, *, pad_id: int = 0) -> Batch:
    """Right-pad examples into ``(N, max_len)`` arrays.

    Args:
      examples: :class:`~lora_jax.data.encoding.Tokenized` examples, or ``(ids, loss_mask)`` pairs.
      max_len: the width ``T`` of every row.
      pad_id: the token id written into padding.

    Returns:
      ``tokens``, ``loss_mask`` and ``attention_mask``, each ``(N, max_len)``.

    Examples:
      >>> b = pad_examples([([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1])], 4)
      >>> b["tokens"].tolist(), b["loss_mask"].tolist(), b["attention_mask"].tolist()
      ([[5, 6, 7, 0], [8, 9, 0, 0]], [[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]], [[1, 1, 1, 0], [1, 1, 0, 0]])
    """
    n = len(examples)
    if n == 0:
        raise DataError("no examples to pad")
    tokens = np.full((n, max_len), pad_id, np.int32)
    loss = np.zeros((n, max_len), np.float32)
    attn = np.zeros((n, max_len), np.int32)
    for i, ex in enumerate(examples):
        ids, mask = np.asarray(ex[0]), np.asarray(ex[1])
        if len(ids) == 0 or len(ids) > max_len:
            raise DataError(f"example {i} has {len(ids)} tokens; every example needs 1..max_len={max_len}")
        if mask.shape != ids.shape:
            raise DataError(f"example {i}: loss_mask has shape {mask.shape} but ids {ids.shape}")
        if mask[0]:
            raise DataError(f"example {i}: loss_mask[0] is set, but position 0 cannot be a target")
        tokens[i, : len(ids)] = ids
        loss[i, : len(ids)] = mask
        attn[i, : len(ids)] = 1
    return {"tokens": tokens, "loss_mask": loss, "attention_mask": attn}


def _check(data: Mapping[str, np.ndarray], batch_size: int) -> int:
    n = len(data["tokens"])
    if not 1 <= batch_size <= n:
        raise DataError(f"batch_size must be in 1..{n} (the number of examples), got {batch_size}")
    return n


def position(step: int, n: int, batch_size: int) -> tuple[int, int]:
    """The ``(epoch, index in epoch)`` of training step ``step``.

    Examples:
      >>> position(7, n=10, batch_size=3)  # 3 batches per epoch
      (2, 1)
    """
    if step < 0:
        raise DataError(f"step must be >= 0, got {step}")
    return divmod(step, n // batch_size)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.setflags(write=False)
    return perm


def batch_at(data: Mapping[str, np.ndarray], step: int, *, batch_size: int, seed: int, shuffle: bool = True) -> Batch:
    """Training batch number ``step``: a pure function of ``(data, batch_size, seed, step)``.

    Args:
      data: padded examples (:func:`pad_examples`).
      step: the training step, from 0; it runs on through the epochs.
      batch_size: rows per batch; the examples left over in an epoch are dropped.
      seed: the shuffling seed.
      shuffle: reshuffle each epoch (else take the examples in order).

    Returns:
      ``{key: (batch_size, T) array}`` for every key of ``data``.

    Examples:
      >>> data = pad_examples([([i, i], [0, 1]) for i in range(1, 6)], 3)
      >>> b = batch_at(data, 4, batch_size=2, seed=0)
      >>> bool((b["tokens"] == batch_at(data, 4, batch_size=2, seed=0)["tokens"]).all())  # same step, same batch
      True
      >>> batch_at(data, 1, batch_size=2, seed=0, shuffle=False)["tokens"][:, 0].tolist()
      [3, 4]
    """
    n = _check(data, batch_size)
    epoch, index = position(step, n, batch_size)
    order = _permutation(seed, epoch, n) if shuffle else np.arange(n)
    rows = order[index * batch_size : (index + 1) * batch_size]
    return {k: v[rows] for k, v in data.items()}


def eval_batches(data: Mapping[str, np.ndarray], batch_size: int) -> Iterator[Batch]:
    """All examples in order, in fixed-shape batches; the last is filled with empty rows.

    Empty rows have zero ``loss_mask`` and ``attention_mask``, so sums over a
    batch count only real examples. (A row with no key to attend to must not
    produce NaN: the built-in models mask with ``-1e30``, not ``-inf``.)

    Examples:
      >>> data = pad_examples([([1, 2], [0, 1])] * 3, 2)
      >>> [float(b["loss_mask"].sum()) for b in eval_batches(data, 2)]
      [2.0, 1.0]
    """
    n = _check(data, 1)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items()}
        short = batch_size - len(batch["tokens"])
        if short:
            batch = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        yield batch
