"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation, on float and quantized bases (QDoRA).

A :class:`DoraWeight` is a :class:`~lora_jax.lora.LoraWeight` with one more
trainable child, the magnitude ``m`` (``d_out``,) under the key
``lora_magnitude``. The adapted weight is

    W = m * (W0 + s * A @ B) / ||W0 + s * A @ B||

with the norm taken per output feature (over the input axis of our
``(d_in, d_out)`` kernel: PEFT's ``dim=1`` of the torch ``(out, in)`` weight)
and detached from the gradient, as DoRA's section 4.3 and PEFT do. ``x @ node``
computes ``g * (x @ W0 + s * (x @ A) @ B)`` with ``g = m / ||.||`` without
forming ``W``; with adapter dropout it is PEFT's
``x @ W0 + (g - 1) * (x' @ W0) + g * s * (x' @ A) @ B`` (``x'``: the dropped input).
At init ``m = ||W0||`` and ``B = 0``, so the node computes the base exactly.

:func:`lora_jax.lora.merge` folds a DoRA node like a LoRA one (its
:meth:`DoraWeight.delta_weight` is ``W - W0``); :func:`unmerge` needs the norms
:func:`merge_norms` returned, as PEFT's unmerge needs its cached norm.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax import lora
  >>> p = init(jax.random.key(0), {"w": jnp.ones((4, 3))}, [lora.LoraRule(pattern="w", rank=2)])
  >>> p["w"].lora_magnitude.tolist()
  [2.0, 2.0, 2.0]
  >>> (jnp.ones((1, 4)) @ p["w"]).tolist()
  [[4.0, 4.0, 4.0]]
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _kernels
from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import CheckpointError, LoraError

__all__ = [
    "PEFT_MAGNITUDE_KEY", "DoraWeight", "check_peft_export", "from_peft", "init", "is_dora", "merge_norms", "to_dora",
    "to_dora_with", "unmerge",
]

PyTree = Any


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class DoraWeight(_lora.LoraWeight):
    """A LoRA weight with a trained magnitude per output feature (DoRA).

    Attributes:
      lora_magnitude: ``(*lead, d_out)``, the magnitude ``m``; trainable (its key is in
        :data:`lora_jax.paths.FACTOR_NAMES`).

    The other attributes are :class:`~lora_jax.lora.LoraWeight`'s. Only 2-D kernels
    with one input axis (``in_ndim=1``) are supported.
    """

    lora_magnitude: Any = None
    extra_children = ("lora_magnitude",)

    def weight_norm(self, dtype=None) -> jax.Array:
        """``||W0 + s * A @ B||`` per output feature (over axis ``-2``), outside the gradient graph."""
        base = _lora.dense(self.base)
        dtype = base.dtype if dtype is None else dtype
        a, b = jax.lax.stop_gradient(self.lora_a), jax.lax.stop_gradient(self.lora_b)
        w = base.astype(dtype) + (a.astype(dtype) @ b.astype(dtype)) * jnp.asarray(self.scale, dtype)
        return jax.lax.stop_gradient(jnp.linalg.norm(w, axis=-2))

    def gain(self, dtype=None) -> jax.Array:
        """``m / ||W0 + s * A @ B||`` (``(d_out,)``): the factor DoRA applies to each output feature."""
        norm = self.weight_norm(dtype)
        return self.lora_magnitude.astype(norm.dtype) / norm

    def _lora_out(self, x, xa):
        """``x @ W0 + s * (xa @ A) @ B`` for 2-D ``x``, ``xa`` (one fused op on a quantized base)."""
        a, b = self.lora_a.astype(x.dtype), self.lora_b.astype(x.dtype)
        fused = getattr(self.base, "adapted_matmul", None)
        if fused is not None:
            return fused(x, xa, a, b, float(self.scale), custom_vjp=self.custom_vjp)
        base = _kernels.matmul(x, self.base, custom_vjp=self.custom_vjp)
        return base + _kernels.low_rank(xa, a, b, float(self.scale), custom_vjp=self.custom_vjp)

    def __rmatmul__(self, x):
        if self.ndim != 2 or self.in_ndim != 1:
            raise TypeError(f"x @ w needs a 2-D weight; this DoRA weight has shape {self.shape}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xa = self._adapter_input(x2)
        g = self.gain(x.dtype)
        if xa is x2:  # no dropout: g * (x @ W0 + s * x @ A @ B)
            y = self._lora_out(x2, x2) * g
        else:  # PEFT: x @ W0 + (g - 1) * (x' @ W0) + g * s * x' @ A @ B
            y = self._lora_out(x2, xa) + self._lora_out(xa, xa) * (g - 1)
        return y.reshape(*lead, y.shape[-1])

    def __getitem__(self, idx):
        raise LoraError("DoRA targets linear kernels; a row lookup (embedding) of a DoRA weight is not supported")

    @property
    def T(self):
        raise LoraError(
            "DoRA's magnitude is per output feature, so a transposed DoRA weight (a tied output head) is not "
            "supported; target the kernels only (lora.targets) or use plain LoRA for the head"
        )

    def delta_weight(self, shape: Sequence[int] | None = None) -> jax.Array:
        """``W - W0`` with ``W = g * (W0 + s * A @ B)``: what :func:`lora_jax.lora.merge` adds to the base.

        This materializes a full-size matrix: for merging and analysis, not training.
        """
        base = _lora.dense(self.base)
        lora_part = (self.lora_a @ self.lora_b) * jnp.asarray(self.scale, self.lora_a.dtype)
        w = base.astype(lora_part.dtype) + lora_part
        d = w * (self.lora_magnitude / jnp.linalg.norm(w, axis=-2))[..., None, :] - base
        return d.reshape(self.shape if shape is None else tuple(shape))

    def __repr__(self) -> str:
        return "Dora" + super().__repr__()


def is_dora(x: Any) -> bool:
    """True for a :class:`DoraWeight`."""
    return isinstance(x, DoraWeight)


def _stacked_norm(node: _lora.LoraWeight) -> jax.Array:
    """``||W0 + s * A @ B||`` per output feature for a node with any leading stacked axes."""
    a, b = node.lora_a, node.lora_b
    lead, d_in, d_out = tuple(np.shape(a)[:-2]), int(np.shape(a)[-2]), int(np.shape(b)[-1])
    if not lead:
        return DoraWeight.weight_norm(node)
    base = jax.tree.map(lambda c: c.reshape(-1, *np.shape(c)[len(lead):]), node.base)
    a2, b2 = a.reshape(-1, d_in, a.shape[-1]), b.reshape(-1, b.shape[-2], d_out)
    norms = [DoraWeight.weight_norm(dataclasses.replace(node, base=jax.tree.map(lambda c, j=j: c[j], base),
                                                        lora_a=a2[j], lora_b=b2[j])) for j in range(math.prod(lead))]
    return jnp.stack(norms).reshape(*lead, d_out)


def to_dora(params: PyTree) -> PyTree:
    """Turn every LoRA weight into a :class:`DoraWeight` with ``m = ||W0 + s * A @ B||`` (the model is unchanged).

    Raises:
      LoraError: a LoRA weight with several input axes (``in_ndim > 1``), which DoRA does not cover.
    """

    def convert(path: str, x: Any) -> Any:
        if not _lora.is_lora(x) or is_dora(x):
            return x
        if x.in_ndim != 1:
            raise LoraError(
                f"DoRA: {path!r} has in_ndim={x.in_ndim}; DoRA (as PEFT) adapts kernels with one input axis; "
                "narrow lora.targets to 2-D kernels"
            )
        return to_dora_with(x, _stacked_norm(x).astype(x.lora_b.dtype))

    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_lora.is_node)
    return treedef.unflatten([convert(_paths.path_str(p), x) for p, x in flat])


def init(key: jax.Array, params: PyTree, rules: Sequence[_lora.LoraRule]) -> PyTree:
    """:func:`lora_jax.lora.init`, then :func:`to_dora`: DoRA nodes on every weight the rules match.

    On a quantized base (QDoRA) the norm is taken of the dequantized base, as
    PEFT does for a 4-bit bitsandbytes layer.
    """
    return to_dora(_lora.init(key, params, rules))


def merge_norms(params: PyTree) -> dict[str, jax.Array]:
    """The norms ``||W0 + s * A @ B||`` of every DoRA node by path, which :func:`unmerge` needs."""
    return {p: _stacked_norm(x) for p, x in _lora.nodes(params) if is_dora(x)}


def unmerge(merged: PyTree, adapters: PyTree, norms: dict[str, jax.Array]) -> PyTree:
    """Inverse of :func:`lora_jax.lora.merge` for DoRA: ``W0 = W * ||.|| / m - s * A @ B`` (PEFT's unmerge).

    Args:
      merged: the output of :func:`lora_jax.lora.merge`.
      adapters: the adapted tree (its DoRA and LoRA nodes; the ``trainable`` half works).
      norms: :func:`merge_norms` of the adapted tree, taken before merging.

    Raises:
      LoraError: a DoRA node has no entry in ``norms``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: _lora.is_node(x) or x is None)
    weights = treedef.flatten_up_to(merged)
    out = []
    for (p, node), w in zip(flat, weights):
        path = _paths.path_str(p)
        if is_dora(node):
            if path not in norms:
                raise LoraError(f"dora.unmerge: no norm for {path!r}; pass dora.merge_norms(params) taken before merge")
            lora_part = (node.lora_a @ node.lora_b) * jnp.asarray(node.scale, node.lora_a.dtype)
            base = w * (norms[path] / node.lora_magnitude)[..., None, :] - lora_part.reshape(w.shape)
            node = dataclasses.replace(node, base=base.astype(w.dtype), dropout_key=None)
        elif _lora.is_lora(node):
            node = _lora.unmerge(w, node)
        else:
            node = w
        out.append(node)
    return treedef.unflatten(out)


# ----------------------------------------------------------------------------
# PEFT's files (used by lora_jax.io.peft)

#: A DoRA magnitude in a PEFT file; the group ``ab`` reads ``m`` (lora_A / lora_B read ``A`` / ``B``).
PEFT_MAGNITUDE_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>m)agnitude_vector(?:\.[^.]+)?")


def check_peft_export(modules: dict[str, _lora.LoraWeight]) -> bool:
    """``use_dora`` for a PEFT folder of these nodes: all DoRA (True) or none (False).

    Raises:
      CheckpointError: DoRA and plain LoRA nodes mixed (PEFT's ``use_dora`` holds for every module).
    """
    kinds = {m: is_dora(n) for m, n in modules.items()}
    if len(set(kinds.values())) > 1:
        plain = next(m for m, d in kinds.items() if not d)
        with_dora = next(m for m, d in kinds.items() if d)
        raise CheckpointError(
            f"export_peft: {with_dora!r} is DoRA but {plain!r} is plain LoRA; PEFT's use_dora holds for every module "
            "of a folder. Export them as two adapters, or adapt every module with one method"
        )
    return bool(kinds) and all(kinds.values())


def from_peft(node: _lora.LoraWeight, magnitude: Any, use_dora: bool, where: str) -> _lora.LoraWeight:
    """The node of a module read from a PEFT folder: ``node`` itself, or a DoRA node when ``use_dora``.

    Raises:
      CheckpointError: ``use_dora`` and no magnitude (or one of the wrong shape), or a magnitude without ``use_dora``.
    """
    if not use_dora:
        if magnitude is not None:
            raise CheckpointError(f"{where} has a lora_magnitude_vector but adapter_config.json has use_dora=false")
        return node
    d_out = int(node.lora_b.shape[-1])
    if magnitude is None or tuple(np.shape(magnitude)) != (d_out,):
        got = "none" if magnitude is None else f"shape {tuple(np.shape(magnitude))}"
        raise CheckpointError(
            f"{where}: adapter_config.json has use_dora=true, so each module needs a lora_magnitude_vector of shape "
            f"({d_out},); this one has {got} (the file is incomplete or corrupted)"
        )
    return to_dora_with(node, jnp.asarray(magnitude, node.lora_b.dtype))


def to_dora_with(node: _lora.LoraWeight, magnitude: Any) -> DoraWeight:
    """The DoRA node of a LoRA ``node`` with the given magnitude."""
    fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(_lora.LoraWeight)}
    return DoraWeight(**fields, lora_magnitude=magnitude)
