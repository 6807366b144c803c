"""Several adapters on one base: switch between them without recompiling, combine them.

Adapter folders themselves (:func:`save_adapter`, :func:`load_adapter`,
:func:`load`, :func:`read_adapter_config`) live in :mod:`lora_jax.io.adapters`;
they are re-exported here, so ``lora_jax.adapters.save_adapter`` keeps working.

**Switching without recompiling.** A jit-compiled forward that takes the
params as an argument runs another adapter without recompiling when the new
tree has the same structure, shapes, dtypes and static fields. A
:class:`~lora_jax.lora.LoraWeight`'s ``scale``, ``in_ndim`` and ``dropout``
are static, so :func:`align` brings adapters to one form, exactly: each scale
folded into A (``A' = s A``, scale 1), dropout off, ranks zero-padded to one
rank, and every adapter given every adapted path (zero factors where it has
none).

**Combining.** :func:`combine` puts ``n`` adapters with weights ``w_i`` into one
LoRA weight per path by concatenating along the rank axis::

    A = [w_1 s_1 A_1 | ... | w_n s_n A_n]    (d_in, r_1 + ... + r_n)
    B = [B_1; ...; B_n]                      (r_1 + ... + r_n, d_out)
    A @ B = sum_i w_i s_i A_i @ B_i          (scale 1)

This is the exact weighted sum of the adapters' updates (PEFT's
``add_weighted_adapter(combination_type="cat")``; its ``"linear"`` mixes A and
B separately, which is not this sum). The weights may be traced: a jitted
forward taking ``(adapters, weights)`` compiles once for all weights.

**Methods.** A VeRA node's update ``(A * lambda_d) @ B * lambda_b`` is a LoRA
update of the same rank, so VeRA adapters combine (and align) as that plain
LoRA node (:func:`lora_jax.methods.vera.to_plain_lora`, exact). A DoRA update
``m * (W0 + sAB) / ||W0 + sAB|| - W0`` rescales every column of the base: a
weighted sum of such updates is no low-rank factor pair, so :func:`combine`
refuses DoRA nodes (merge each adapter into the base instead).
:func:`align` keeps them: where one tree has a DoRA node, the others get the
DoRA node that computes what they computed (``m = ||W0 + sAB||``, so the gain is 1).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import BaseMismatchError, CheckpointError, LoraError
from lora_jax.io.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_TENSORS,
    FORMAT_VERSION,
    load,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from lora_jax.methods import dora as _dora
from lora_jax.methods import vera as _vera

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FORMAT",
    "ADAPTER_TENSORS",
    "FORMAT_VERSION",
    "BaseMismatchError",
    "CheckpointError",
    "align",
    "combine",
    "combine_adapters",
    "fold_scale",
    "load",
    "load_adapter",
    "pad_rank",
    "parse_adapter_spec",
    "read_adapter_config",
    "save_adapter",
]

PyTree = Any
PathLike = str | os.PathLike


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """Split a command-line adapter spec ``DIR[:WEIGHT]`` into ``(DIR, WEIGHT)`` (weight 1 by default).

    The text after the last ``:`` is the weight when it reads as a number;
    otherwise the whole spec is the folder (so ``C:\\\\adapters\\\\x`` stays a
    path). A folder whose name ends in ``:<number>`` needs an explicit weight:
    ``runs/a:3:1``.

    Raises:
      LoraError: an empty folder or weight, or a weight that is not finite.

    Examples:
      >>> parse_adapter_spec("runs/b/adapter:0.5")
      ('runs/b/adapter', 0.5)
      >>> parse_adapter_spec("runs/a/adapter")
      ('runs/a/adapter', 1.0)
      >>> parse_adapter_spec("x:-1e-1")
      ('x', -0.1)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise LoraError(f"adapter spec must be 'DIR' or 'DIR:WEIGHT', got {spec!r}")
    head, sep, tail = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    if not tail.strip():
        raise LoraError(f"adapter spec {spec!r} has an empty weight after ':'; write DIR or DIR:WEIGHT, e.g. a:0.5")
    try:
        weight = float(tail)
    except ValueError:
        return spec, 1.0
    if not head:
        raise LoraError(f"adapter spec {spec!r} has no folder before ':'; write DIR:WEIGHT, e.g. a:0.5")
    if not math.isfinite(weight):
        raise LoraError(f"adapter spec {spec!r}: the weight must be finite, got {tail!r}")
    return head, weight


def _flat(adapters: Sequence[PyTree]) -> tuple[list[list[tuple[str, Any]]], Any]:
    """Flatten each tree down to LoRA/quantized nodes; all must share one set of paths."""
    if not adapters:
        raise LoraError("need at least one adapted params tree")
    flats, treedef = [], None
    for i, tree in enumerate(adapters):
        flat, td = jax.tree_util.tree_flatten_with_path(_vera.to_plain_lora(tree), is_leaf=_lora.is_node)
        flat = [(_paths.path_str(p), x) for p, x in flat]
        if flats and [p for p, _ in flat] != [p for p, _ in flats[0]]:
            diff = next(
                (a, b)
                for (a, _), (b, _) in zip(flats[0] + [("<end>", 0)], flat + [("<end>", 0)], strict=False)
                if a != b
            )
            raise LoraError(f"adapter {i} is on another base tree: path {diff[1]!r} where adapter 0 has {diff[0]!r}")
        flats.append(flat)
        treedef = treedef or td
    return flats, treedef


def _column(flats, j: int) -> list[tuple[int, _lora.LoraWeight]]:
    """The LoRA weights at leaf position ``j``, checked to share base shape and in_ndim."""
    nodes = [(i, f[j][1]) for i, f in enumerate(flats) if _lora.is_lora(f[j][1])]
    path = flats[0][j][0]
    ref = nodes[0][1]
    for i, n in nodes[1:]:
        if (
            n.in_ndim != ref.in_ndim
            or n.lora_a.shape[0] != ref.lora_a.shape[0]
            or n.lora_b.shape[1] != ref.lora_b.shape[1]
        ):
            raise LoraError(
                f"{path!r}: adapter {i} has A {tuple(n.lora_a.shape)}, B {tuple(n.lora_b.shape)}, in_ndim={n.in_ndim}; "
                f"adapter {nodes[0][0]} has A {tuple(ref.lora_a.shape)}, B {tuple(ref.lora_b.shape)}, "
                f"in_ndim={ref.in_ndim}: they do not adapt the same weight"
            )
    return nodes


def fold_scale(node: _lora.LoraWeight) -> _lora.LoraWeight:
    """Return ``node`` with its scale folded into A (``A' = s A``, scale 1) and dropout off.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> w = _lora.LoraWeight(jnp.zeros((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)), scale=0.5)
      >>> fold_scale(w).lora_a[:, 0].tolist(), fold_scale(w).scale
      ([0.5, 0.5, 0.5], 1.0)
    """
    a = (node.lora_a * jnp.asarray(node.scale, jnp.float32)).astype(node.lora_a.dtype)
    return dataclasses.replace(node, lora_a=a, scale=1.0, dropout=0.0, dropout_key=None)


def pad_rank(node: _lora.LoraWeight, rank: int) -> _lora.LoraWeight:
    """Return ``node`` with A and B zero-padded to ``rank`` (the update is unchanged).

    Raises:
      LoraError: ``rank`` is smaller than the node's rank.

    Examples:
      >>> import jax.numpy as jnp
      >>> w = _lora.LoraWeight(jnp.zeros((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)))
      >>> pad_rank(w, 4).rank
      4
    """
    extra = rank - node.rank
    if extra < 0:
        raise LoraError(f"pad_rank: cannot pad a rank-{node.rank} adapter down to rank {rank}")
    a = jnp.pad(node.lora_a, ((0, 0), (0, extra)))
    b = jnp.pad(node.lora_b, ((0, extra), (0, 0)))
    return dataclasses.replace(node, lora_a=a, lora_b=b)


def align(adapters: Sequence[PyTree], *, rank: int | None = None) -> list[PyTree]:
    """Bring adapted trees of one base to one structure, so one compiled forward runs them all.

    Each LoRA weight gets its scale folded into A and dropout off
    (:func:`fold_scale`), ranks are zero-padded to ``rank``, and a path
    adapted in some trees but not in another gets zero factors there. Every
    tree computes what it computed before (up to the rounding of ``s * A``).

    Args:
      adapters: adapted params of one base (e.g. from :func:`load`).
      rank: the common rank; default the largest one. Choose a larger one to
        leave room for adapters loaded later.

    Returns:
      The trees, in order, with identical structure, shapes and static fields.

    Raises:
      LoraError: the trees are on different bases, adapt a weight with
        different shapes, or ``rank`` is below an adapter's rank.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> base = {"q": jnp.ones((8, 8)), "v": jnp.ones((8, 8))}
      >>> a = _lora.init(jax.random.key(0), base, [_lora.LoraRule(pattern="q", rank=2)])
      >>> b = _lora.init(jax.random.key(1), base, [_lora.LoraRule(pattern="v", rank=4, alpha=8)])
      >>> a2, b2 = align([a, b])
      >>> jax.tree.structure(a2) == jax.tree.structure(b2), a2["v"].rank, b2["v"].scale
      (True, 4, 1.0)
    """
    flats, treedef = _flat(adapters)
    columns = {j: _column(flats, j) for j in range(len(flats[0])) if any(_lora.is_lora(f[j][1]) for f in flats)}
    top = max((n.rank for nodes in columns.values() for _, n in nodes), default=0)
    rank = top if rank is None else rank
    if rank < top:
        raise LoraError(f"align: rank={rank} is below the largest adapter rank {top}")
    out = []
    for flat in flats:
        leaves = []
        for j, (_, x) in enumerate(flat):
            if j in columns:
                if _lora.is_lora(x):
                    x = pad_rank(fold_scale(x), rank)
                else:
                    ref = columns[j][0][1]
                    a = jnp.zeros((ref.lora_a.shape[0], rank), ref.lora_a.dtype)
                    b = jnp.zeros((rank, ref.lora_b.shape[1]), ref.lora_b.dtype)
                    x = _lora.LoraWeight(x, a, b, 1.0, ref.in_ndim, 0.0)
                if any(_dora.is_dora(n) for _, n in columns[j]) and not _dora.is_dora(x):
                    x = _dora.to_dora(x)  # m = ||W0 + sAB||: the same function, the DoRA structure
            leaves.append(x)
        out.append(treedef.unflatten(leaves))
    return out


def combine(adapters: Sequence[PyTree], weights: Sequence[float] | jax.Array) -> PyTree:
    """Return one adapted tree whose update at each path is ``sum_i w_i * s_i * A_i @ B_i``.

    The factors are concatenated along the rank axis (see the module
    docstring); the result has scale 1, no dropout, and rank ``sum_i r_i`` at
    paths every adapter adapts. ``weights`` may be a traced array, so a jitted
    ``forward(adapters, weights, x)`` compiles once for all weights.

    Args:
      adapters: adapted params of one base (the base of the first is used).
      weights: one weight per adapter.

    Returns:
      The combined params.

    Raises:
      LoraError: the numbers of adapters and weights differ, the trees are
        on different bases, or a DoRA node (see the module docstring; VeRA
        nodes combine as their plain LoRA node).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> base = {"w": jnp.zeros((4, 3))}
      >>> rule = _lora.LoraRule(pattern="w", rank=2)
      >>> a = _lora.init(jax.random.key(0), base, [rule])
      >>> a = {"w": dataclasses.replace(a["w"], lora_b=jnp.ones((2, 3)))}
      >>> both = combine([a, a], [0.25, 0.75])
      >>> both["w"].rank, bool(jnp.allclose(both["w"].delta_weight(), a["w"].delta_weight()))
      (4, True)
    """
    n = len(adapters)
    if len(weights) != n:
        raise LoraError(f"combine: {n} adapters but {len(weights)} weights; give one weight per adapter")
    flats, treedef = _flat(adapters)
    leaves = []
    for j, (_, x) in enumerate(flats[0]):
        if not any(_lora.is_lora(f[j][1]) for f in flats):
            leaves.append(x)
            continue
        nodes = _column(flats, j)
        dora = next((i for i, node in nodes if _dora.is_dora(node)), None)
        if dora is not None:
            raise LoraError(
                f"combine: {flats[0][j][0]!r} of adapter {dora} is a DoRA weight; a weighted sum of DoRA updates "
                "(each rescales every column of the base W0) is not a low-rank update, so it cannot be one LoRA "
                "node. Fold each adapter into the base instead (W = W0 + sum_i w_i * (lora.merge(adapter_i) - W0)), "
                "or combine plain LoRA or VeRA adapters"
            )
        ref = nodes[0][1]
        dtype = ref.lora_a.dtype
        a = jnp.concatenate(
            [(node.lora_a * (weights[i] * jnp.asarray(node.scale, jnp.float32))).astype(dtype) for i, node in nodes],
            axis=1,
        )
        b = jnp.concatenate([node.lora_b.astype(ref.lora_b.dtype) for _, node in nodes], axis=0)
        leaves.append(_lora.LoraWeight(ref.base, a, b, 1.0, ref.in_ndim, 0.0))
    return treedef.unflatten(leaves)


def combine_adapters(
    base_params: PyTree,
    specs: Sequence[tuple[PathLike, float] | str],
    *,
    model_kind: str | None = None,
) -> PyTree:
    """Load adapter folders onto one base and combine them with weights (see :func:`combine`).

    Args:
      base_params: the base tree.
      specs: ``(folder, weight)`` pairs or ``"folder[:weight]"`` strings
        (:func:`parse_adapter_spec`); folders of either format (:func:`load`).
      model_kind: for PEFT folders, ``"llama"`` or ``"bert"`` (default: inferred).

    Returns:
      The base with the combined adapters. One spec with weight 1 gives that
      adapter, with its scale folded into A.

    Raises:
      LoraError: no specs.

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> base = {"w": jnp.zeros((4, 3))}
      >>> p = _lora.init(jax.random.key(0), base, [_lora.LoraRule(pattern="w", rank=2)])
      >>> d = save_adapter(tempfile.mkdtemp(), p)
      >>> combine_adapters(base, [f"{d}:0.5", (d, 0.25)])["w"].rank
      4
    """
    if not specs:
        raise LoraError("combine_adapters: give at least one adapter folder, e.g. [('runs/a/adapter', 1.0)]")
    pairs = [parse_adapter_spec(s) if isinstance(s, str) else (s[0], float(s[1])) for s in specs]
    trees = [load(folder, base_params, model_kind=model_kind) for folder, _ in pairs]
    return combine(trees, [w for _, w in pairs])
