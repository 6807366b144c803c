"""Fitting saved LoRA factors onto a base tree: the base without adapters, its leaves, shape checks.

Shared by the readers of adapter folders (:mod:`lora_jax.io.adapters`, :mod:`lora_jax.io.peft`)
and by the writers that need the bare base (:mod:`lora_jax.io.hashing`, :mod:`lora_jax.models.export_hf`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import CheckpointError

PyTree = Any


def strip_adapters(tree: PyTree) -> PyTree:
    """Return ``tree`` with every LoRA weight replaced by its base weight."""
    return jax.tree.map(lambda x: x.base if _lora.is_lora(x) else x, tree, is_leaf=_lora.is_lora)


def base_leaves(base_params: PyTree) -> tuple[list[tuple[str, Any]], Any]:
    """Return the ``(path, leaf)`` pairs of the base of ``base_params`` (quantized leaves whole) and its treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(strip_adapters(base_params), is_leaf=_lora.is_node)
    return [(_paths.path_str(p), x) for p, x in flat], treedef


def no_such_path(file: Path, path: str, leaves: list[tuple[str, Any]]) -> CheckpointError:
    """Return the error for an adapter path of ``file`` that the base does not have (nearby paths named)."""
    near = ", ".join(_paths.nearby_paths([p for p, _ in leaves], path, n=4))
    return CheckpointError(f"{file}: adapter path {path!r} is not in the base params (nearby: {near})")


def check_factors(file: Path, path: str, base: Any, a: np.ndarray, b: np.ndarray, in_ndim: int) -> None:
    """Raise :class:`CheckpointError` unless A ``(d_in, r)`` and B ``(r, d_out)`` fit the base weight."""
    shape = tuple(base.shape)
    if in_ndim >= len(shape):
        raise CheckpointError(f"{file}: {path!r}: in_ndim={in_ndim} does not fit the base weight of shape {shape}")
    d_in, d_out = math.prod(shape[:in_ndim]), math.prod(shape[in_ndim:])
    r = a.shape[-1] if a.ndim == 2 else -1
    if a.shape != (d_in, r) or b.shape != (r, d_out):
        raise CheckpointError(
            f"{file}: {path!r}: factors A {a.shape} and B {b.shape} do not fit the base weight of shape {shape} "
            f"(expected A ({d_in}, r) and B (r, {d_out}))"
        )
