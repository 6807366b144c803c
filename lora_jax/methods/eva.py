"""EVA (Paischer et al., 2024): A from the principal components of each layer's inputs, ranks redistributed.

For every adapted weight, the inputs it sees on a few batches are gathered
(:func:`collect_inputs`, an eager forward pass with recording nodes), centred,
and decomposed (PCA, as PEFT's ``IncrementalPCA`` on one batch). Each layer offers
its first ``round(rho * r)`` components; the ``sum(r)`` components with the
largest explained-variance ratios over all layers are kept, so a layer's rank is
how many of its components made the cut (PEFT's ``_get_rank_distribution``,
``peft/tuners/lora/eva.py``). ``A`` holds the kept components (``A = V_k^T``),
``B = 0`` (the base model at init), and the scale stays ``alpha / r`` (PEFT's
``adjust_scaling_factors=True``). A layer whose rank comes out 0 is left unadapted.

Against PEFT (``initialize_lora_eva_weights``): on one batch both give the same
components (up to sign) and ranks (tested on a Hugging Face Llama). PEFT's
IncrementalPCA keeps ``round(rho * r)`` components after each batch and stops
when they stop moving (cycling the loader), with a randomized SVD; here one
exact PCA covers all the given batches, so over several batches the two differ
by PEFT's truncation. Layers fed the same input (q/k/v) tie exactly; PEFT gives
tied components to the first module in the model's order, this to the first
path in the tree's order.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax import lora
  >>> w = {"a": jnp.ones((8, 4)), "b": jnp.ones((8, 4))}
  >>> x = jax.random.normal(jax.random.key(0), (64, 8))
  >>> inputs = {"a": x * jnp.array([9.0, 9, 9, 1, 1, 1, 1, 1]), "b": x}  # a's inputs vary along 3 axes
  >>> p = init(w, [lora.LoraRule(pattern="a|b", rank=2)], inputs)
  >>> p["a"].rank, p["b"].rank  # the budget of 4 goes where the variance is
  (3, 1)
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import LoraError

__all__ = ["collect_inputs", "init", "pca", "rank_distribution"]

PyTree = Any


def pca(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(components (k, d), explained_variance_ratio (k,))`` of the rows of ``x`` (centred), in float64."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    x = x - x.mean(axis=0)
    _, s, vh = np.linalg.svd(x, full_matrices=False)
    var = s**2
    return vh, var / var.sum()


def rank_distribution(ratios: dict[str, np.ndarray], budget: int) -> dict[str, int]:
    """How many components each layer keeps: the ``budget`` largest ratios over all layers (ties: first layer)."""
    pool = [(-float(v), i, k) for i, (k, vs) in enumerate(ratios.items()) for v in vs]
    counts = Counter(k for _, _, k in sorted(pool)[:budget])
    return {k: counts.get(k, 0) for k in ratios}


class _Recorder:
    """Stands for a weight in an eager forward pass and keeps the inputs it multiplies."""

    def __init__(self, w: Any, seen: list):
        self.w, self.seen, self.shape = w, seen, tuple(np.shape(w))
        self.__array_ufunc__ = None

    def __rmatmul__(self, x):
        self.seen.append(np.asarray(x))
        return x @ self.w

    def __getitem__(self, idx):
        return self.w[idx]

    @property
    def T(self):
        return self.w.T


def collect_inputs(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batches: Iterable[Any],
                   paths: Sequence[str], masks: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
    """The inputs each of ``paths`` multiplies over ``batches`` (``apply_fn(params, batch)`` run eagerly, no jit).

    ``masks``: one ``(B, T)`` array per batch (the attention mask); an input of shape ``(B, T', d)`` with
    ``T' <= T`` keeps the rows where ``mask[:, :T']`` is set (padding dropped, as PEFT's EVA does). Without
    masks every position is kept.
    """
    seen: dict[str, list] = {p: [] for p in paths}
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_lora.is_node)
    leaves = []
    for p, x in flat:
        path = _paths.path_str(p)
        leaves.append(_Recorder(x, seen[path]) if path in seen else x)
    recording = treedef.unflatten(leaves)
    rows: dict[str, list] = {p: [] for p in paths}
    with jax.disable_jit():
        for i, batch in enumerate(batches):
            apply_fn(recording, batch)
            m = None if masks is None else np.asarray(masks[i]).astype(bool)
            for p, got in seen.items():
                for x in got:
                    if m is not None and x.ndim == 3 and x.shape[0] == m.shape[0] and x.shape[1] <= m.shape[1]:
                        x = x[m[:, : x.shape[1]]]
                    rows[p].append(x.reshape(-1, x.shape[-1]))
                got.clear()
    missing = [p for p, v in rows.items() if not v]
    if missing:
        raise LoraError(f"eva.collect_inputs: {missing[0]!r} saw no input (is it used as `x @ w` by apply_fn?)")
    return {p: np.concatenate(v) for p, v in rows.items()}


def init(params: PyTree, rules: Sequence[_lora.LoraRule], inputs: dict[str, Any], *, rho: float = 2.0) -> PyTree:
    """EVA-initialised LoRA weights from the layer ``inputs`` (``{path: (n, d_in)}``, e.g. :func:`collect_inputs`).

    Args:
      params: the base (float or quantized).
      rules: :class:`~lora_jax.lora.LoraRule` s; their ranks sum to the rank budget.
      inputs: the inputs of every weight the rules match.
      rho: each layer offers ``round(rho * r)`` components (PEFT's ``rho``, >= 1).

    Raises:
      LoraError: ``rho < 1``, a matched weight without inputs, or inputs of the wrong width.
    """
    if not rho >= 1:
        raise LoraError(f"EVA: rho must be >= 1, got {rho!r}")
    adapted = _lora.init(jax.random.key(0), params, rules)  # shapes, ranks and scales; the factors are replaced
    nodes = dict(_lora.nodes(adapted))
    comps, ratios = {}, {}
    for path, n in nodes.items():
        if path not in inputs:
            raise LoraError(f"EVA: no inputs for {path!r}; collect them with eva.collect_inputs")
        if np.shape(inputs[path])[-1] != n.shape[0] or n.ndim != 2:
            raise LoraError(f"EVA: inputs of {path!r} have width {np.shape(inputs[path])[-1]}, the 2-D weight "
                            f"{n.shape} takes {n.shape[0]}")
        k = min(round(rho * n.rank), n.shape[0], n.shape[-1])
        comps[path], ratio = pca(inputs[path])
        ratios[path] = ratio[:k]
    ranks = rank_distribution(ratios, sum(n.rank for n in nodes.values()))

    def fill(path: str, x: Any) -> Any:
        if path not in nodes:
            return x
        n, r = nodes[path], ranks[path]
        if r == 0:
            return n.base
        a = jnp.asarray(comps[path][:r].T, n.lora_a.dtype)
        return dataclasses.replace(n, lora_a=a, lora_b=jnp.zeros((r, n.shape[-1]), n.lora_b.dtype))

    flat, treedef = jax.tree_util.tree_flatten_with_path(adapted, is_leaf=_lora.is_node)
    return treedef.unflatten([fill(_paths.path_str(p), x) for p, x in flat])
