"""LoRA as a transformation of the parameter pytree.

A targeted weight leaf ``W`` of shape ``(*in_shape, *out_shape)`` becomes a
:class:`LoraWeight` node holding the frozen base ``W0`` and trainable factors
``lora_a`` (``d_in x r``) and ``lora_b`` (``r x d_out``), ``d_in = prod(in_shape)``,
with a static scale ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).

The node behaves like the weight it replaces in model code: ``x @ node`` computes
``x @ W0 + s * ((x @ A) @ B)`` without forming ``W0 + s * A @ B`` (jax arrays
defer ``@`` to the node's ``__rmatmul__``), ``node[ids]`` looks rows up in an
embedding table, ``node.T`` is the transposed weight (tied output heads), and
:func:`contract` handles kernels with several input or output axes. A node is not
an array: ``jnp.asarray(node)``, ``np.asarray(node)``, ``jnp.einsum`` or
``lax.dot_general`` on it raise :class:`lora_jax.errors.LoraError` naming the fixes.

The adapter's product has a hand-written backward pass (:mod:`lora_jax._kernels`);
:func:`with_custom_vjp` switches a tree to plain autodiff, for forward-mode
differentiation (``jax.jvp``, ``jax.jacfwd``).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _kernels
from lora_jax import paths as _paths
from lora_jax.errors import LoraError
from lora_jax.paths import FACTOR_NAMES, is_factor_path  # re-exported: their home is paths

__all__ = [
    "FACTOR_NAMES",
    "LoraRule",
    "LoraWeight",
    "ParamCount",
    "contract",
    "count",
    "dense",
    "init",
    "is_factor_path",
    "is_lora",
    "is_node",
    "merge",
    "nodes",
    "unmerge",
    "with_custom_vjp",
    "with_dropout_keys",
]

PyTree = Any
InitFn = Callable[[jax.Array, Any, int], tuple[jax.Array, jax.Array]]


def dense(w: Any) -> jax.Array:
    """Return ``w`` as a plain array, dequantizing a quantized leaf."""
    deq = getattr(w, "dequantize", None)
    return deq() if callable(deq) else jnp.asarray(w)


def is_node(x: Any) -> bool:
    """True for a LoRA node or a quantized leaf (pytree nodes standing for one weight)."""
    return isinstance(x, LoraWeight) or callable(getattr(x, "dequantize", None))


def _array_misuse(w: Any) -> LoraError:
    shape = getattr(getattr(w, "base", None), "shape", None)
    shape = "" if shape is None else f" of shape {tuple(shape)}"
    return LoraError(
        f"a LoRA weight (LoraWeight{shape}) is not an array: it holds the frozen base W0 and the "
        "factors A, B, and converting it would drop the adapter. Compute with it as `x @ w`, or "
        "`lora_jax.lora.contract(x, w)` for kernels with several input/output axes; for a flax.linen "
        "model call `lora_jax.flax_adapt.linen_apply(model, params, ...)` instead of `model.apply`; "
        "for a plain weight take `lora_jax.merge(params)` first."
    )


def _register_array_misuse_hook() -> None:
    """Make ``lax`` primitives given a node (``lax.dot_general(x, node, ...)``) raise :func:`_array_misuse`.

    JAX checks a registered value handler before it looks at ``__jax_array__``;
    without one it raises its own "Triggering __jax_array__()" error. The hook
    is JAX-internal, so it is optional here; tests/test_lora.py fails when it stops working.
    """
    try:
        from jax._src import dtypes as jax_dtypes

        register = jax_dtypes.register_canonicalize_value_handler
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without the hook
        return

    def refuse(w):
        raise _array_misuse(w)

    register(LoraWeight, refuse)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class LoraWeight:
    """A frozen weight with a low-rank trainable update.

    Attributes:
      base: the frozen weight ``W0`` (an array or a quantized leaf) of shape
        ``(*in_shape, *out_shape)``.
      lora_a: ``(d_in, r)``, ``d_in = prod(in_shape)``.
      lora_b: ``(r, d_out)``, ``d_out = prod(out_shape)``; zero at init.
      scale: static ``alpha / r`` (or ``alpha / sqrt(r)``).
      in_ndim: static number of leading axes of ``base`` that are contracted.
      dropout: static dropout rate on the adapter input.
      dropout_key: PRNG key for the adapter dropout; ``None`` means no dropout
        (evaluation). The train step sets it with :func:`with_dropout_keys`.
      custom_vjp: static; ``True`` runs the adapter (and a quantized base) through
        the hand-written backward passes of :mod:`lora_jax._kernels`, ``False``
        through plain autodiff, which forward-mode AD (``jax.jvp``) also needs.
        Set it on a tree with :func:`with_custom_vjp`.
    """

    base: Any
    lora_a: Any
    lora_b: Any
    scale: float = 1.0
    __array_ufunc__ = None  # numpy defers ``ndarray @ node`` to ``node.__rmatmul__``
    in_ndim: int = 1
    dropout: float = 0.0
    dropout_key: Any = None
    custom_vjp: bool = True
    extra_children: ClassVar[tuple[str, ...]] = ()  # a subclass's array attributes: children after dropout_key

    # -- pytree protocol --------------------------------------------------
    def tree_flatten_with_keys(self):
        k = jax.tree_util.GetAttrKey
        children = (
            (k("base"), self.base),
            (k("lora_a"), self.lora_a),
            (k("lora_b"), self.lora_b),
            (k("dropout_key"), self.dropout_key),
            *((k(name), getattr(self, name)) for name in self.extra_children),
        )
        return children, (self.scale, self.in_ndim, self.dropout, self.custom_vjp)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for name, value in zip(("base", "lora_a", "lora_b", "dropout_key", *cls.extra_children), children, strict=True):
            object.__setattr__(obj, name, value)
        for name, value in zip(("scale", "in_ndim", "dropout", "custom_vjp"), aux):
            object.__setattr__(obj, name, value)
        return obj

    # -- not an array ----------------------------------------------------------
    def __array__(self, *args, **kwargs):
        """``np.asarray(node)``: raise a :class:`LoraError` naming the fixes."""
        raise _array_misuse(self)

    def __jax_array__(self):
        """``jnp.asarray(node)``, ``jnp.einsum(..., node)``: raise a :class:`LoraError` naming the fixes.

        A jax array's binary operators (``x @ node``) also ask for this; for them
        the node answers with itself, which they do not accept, so Python falls
        back to the node's own ``__rmatmul__``.
        """
        if sys._getframe(1).f_code.co_name.startswith("_operator_"):
            return self
        raise _array_misuse(self)

    # -- array-like surface --------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[-1])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shape[: self.in_ndim]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.in_ndim :]

    def _adapter_input(self, x):
        if self.dropout > 0.0 and self.dropout_key is not None:
            keep = 1.0 - self.dropout
            mask = jax.random.bernoulli(self.dropout_key, keep, x.shape)
            return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
        return x

    def delta(self, x_flat: jax.Array) -> jax.Array:
        """``s * (dropout(x) @ A) @ B`` for ``x_flat`` of shape ``(..., d_in)``."""
        a = self.lora_a.astype(x_flat.dtype)
        b = self.lora_b.astype(x_flat.dtype)
        x = self._adapter_input(x_flat)
        lead = x.shape[:-1]
        y = _kernels.low_rank(x.reshape(-1, x.shape[-1]), a, b, float(self.scale), custom_vjp=self.custom_vjp)
        return y.reshape(*lead, b.shape[-1])

    def __rmatmul__(self, x):
        if self.ndim != 2:
            raise TypeError(
                f"x @ w needs a 2-D weight; this LoRA weight has shape {self.shape}. "
                "Use lora_jax.lora.contract(x, w) for kernels with several input/output axes."
            )
        fused = getattr(self.base, "adapted_matmul", None)  # a quantized base (QLoRA): one fused op
        if fused is not None:
            a = self.lora_a.astype(x.dtype)
            b = self.lora_b.astype(x.dtype)
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            y = fused(x2, self._adapter_input(x2), a, b, float(self.scale), custom_vjp=self.custom_vjp)
            return y.reshape(*lead, y.shape[-1])
        return _kernels.matmul(x, self.base, custom_vjp=self.custom_vjp) + self.delta(x)

    def __getitem__(self, idx):
        """Rows of an embedding table: ``W0[idx] + s * A[idx] @ B`` (no dropout)."""
        if self.ndim != 2:
            raise TypeError(f"row lookup needs a 2-D table; this one has shape {self.shape}")
        rows = self.base[idx]
        a = self.lora_a.astype(rows.dtype)[idx]
        return rows + (a @ self.lora_b.astype(rows.dtype)) * jnp.asarray(self.scale, rows.dtype)

    @property
    def T(self) -> LoraWeight:
        """The transposed weight: ``(W0 + s A B)^T = W0^T + s B^T A^T``."""
        if self.ndim != 2:
            raise TypeError(f".T needs a 2-D weight; this one has shape {self.shape}")
        return dataclasses.replace(self, base=self.base.T, lora_a=self.lora_b.T, lora_b=self.lora_a.T)

    def delta_weight(self, shape: Sequence[int] | None = None) -> jax.Array:
        """The dense update ``s * A @ B``, reshaped to ``shape`` (default: the base's).

        This materializes a full-size matrix: for merging and analysis, not training.
        """
        d = (self.lora_a @ self.lora_b) * jnp.asarray(self.scale, self.lora_a.dtype)
        return d.reshape(self.shape if shape is None else tuple(shape))

    def __repr__(self) -> str:
        static = f"scale={self.scale:g}, in_ndim={self.in_ndim}, dropout={self.dropout:g}"
        if not self.custom_vjp:
            static += ", custom_vjp=False"
        if all(hasattr(c, "shape") or c is None for c in (self.base, self.lora_a)):
            shape = "?" if self.base is None else self.shape
            rank = "?" if self.lora_a is None else self.rank
            return f"LoraWeight(shape={shape}, rank={rank}, {static}, base={type(self.base).__name__})"
        # children that are not arrays (e.g. after jax.tree.map(lambda a: a.shape, params)): show them
        return f"LoraWeight(base={self.base!r}, lora_a={self.lora_a!r}, lora_b={self.lora_b!r}, {static})"


def contract(x: jax.Array, w: Any) -> jax.Array:
    """Contract the trailing axes of ``x`` with the leading input axes of ``w``.

    For a plain kernel ``w`` of shape ``(*in_shape, *out_shape)`` and a LoRA weight
    alike; ``in_ndim`` is ``w.in_ndim`` for a LoRA weight and 1 otherwise.
    ``x`` has shape ``(..., *in_shape)``; the result ``(..., *out_shape)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> contract(jnp.ones((2, 3)), jnp.ones((3, 4, 5))).shape
      (2, 4, 5)
    """
    if not isinstance(w, LoraWeight):
        w = dense(w)
        return jnp.tensordot(x, w, axes=1)
    n = w.in_ndim
    if tuple(x.shape[x.ndim - n :]) != w.in_shape:
        raise LoraError(
            f"input trailing shape {tuple(x.shape[x.ndim - n:])} does not match the "
            f"LoRA weight's input shape {w.in_shape} (weight shape {w.shape}, in_ndim={n})"
        )
    base = dense(w.base)
    y = jnp.tensordot(x, base.astype(x.dtype) if base.dtype != x.dtype else base, axes=n)
    lead = x.shape[: x.ndim - n]
    x_flat = x.reshape(*lead, -1)
    return y + w.delta(x_flat).reshape(*lead, *w.out_shape)


# ----------------------------------------------------------------------------
# Rules and init


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraRule:
    """Which leaves become LoRA weights, and how.

    Attributes:
      pattern: regex matched with ``re.fullmatch`` against the leaf path.
      rank: the rank ``r`` (>= 1, <= min(d_in, d_out)).
      alpha: scaling numerator; ``None`` means ``alpha = rank`` (scale 1).
      dropout: dropout rate on the adapter input during training, in [0, 1).
      init: ``"kaiming"`` (PEFT's default: A ~ U(+-1/sqrt(d_in))), ``"gaussian"``
        (A ~ N(0, 1/r^2), as PEFT's ``init_lora_weights="gaussian"``), or a function
        ``(key, w, rank) -> (A, B)`` that sees the base weight (for LoftQ-style
        inits that account for quantization error).
      rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
      in_dims: how many leading kernel axes are inputs (``DenseGeneral`` kernels
        ``(heads, head_dim, d_model)`` that contract two axes use 2).
      stacked_axes: how many leading axes stack independent weights (the layer
        axis of :func:`lora_jax.models.stacking.stack_layers`, a ``flax`` scan):
        each slice gets its own factors, ``A (*lead, d_in, r)``, ``B (*lead, r, d_out)``.
        ``lora.init`` refuses a 3-D kernel under a stacked ``layers`` node
        (path ``layers/<name>/...``) when this is 0, instead of taking the
        layer axis for an input axis.
    """

    pattern: str
    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    init: str | InitFn = "kaiming"
    rslora: bool = False
    in_dims: int = 1
    stacked_axes: int = 0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise LoraError(f"LoraRule({self.pattern!r}): rank must be a positive int, got {self.rank!r}")
        if self.alpha is not None and not (self.alpha > 0):
            raise LoraError(f"LoraRule({self.pattern!r}): alpha must be > 0, got {self.alpha!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise LoraError(f"LoraRule({self.pattern!r}): dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.init, str) and self.init not in ("kaiming", "gaussian"):
            raise LoraError(
                f"LoraRule({self.pattern!r}): init must be 'kaiming', 'gaussian' or a function, "
                f"got {self.init!r}"
            )
        if not isinstance(self.in_dims, int) or self.in_dims < 1:
            raise LoraError(f"LoraRule({self.pattern!r}): in_dims must be an int >= 1, got {self.in_dims!r}")
        if isinstance(self.stacked_axes, bool) or not isinstance(self.stacked_axes, int) or self.stacked_axes < 0:
            raise LoraError(
                f"LoraRule({self.pattern!r}): stacked_axes must be an int >= 0, got {self.stacked_axes!r}"
            )

    @property
    def scale(self) -> float:
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def all_linear(
        cls, rank: int, *, exclude: Sequence[str] = ("lm_head", "embed"), **kwargs
    ) -> LoraRule:
        """A rule for every leaf whose path ends in ``kernel`` (PEFT's ``all-linear``).

        Paths containing any of ``exclude`` (output head, embeddings) are left out.

        Examples:
          >>> LoraRule.all_linear(8).pattern
          '(?!.*(?:lm_head|embed)).*kernel'
        """
        neg = "|".join(exclude)
        pattern = f"(?!.*(?:{neg})).*kernel" if exclude else ".*kernel"
        return cls(pattern=pattern, rank=rank, **kwargs)


def _init_factors(key, w, rule: LoraRule, d_in: int, d_out: int, dtype):
    r = rule.rank
    if callable(rule.init):
        a, b = rule.init(key, w, r)
        if tuple(a.shape) != (d_in, r) or tuple(b.shape) != (r, d_out):
            raise LoraError(
                f"init function of {rule!r} returned A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"expected A {(d_in, r)}, B {(r, d_out)}"
            )
        return jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    if rule.init == "kaiming":
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, (d_in, r), dtype, -bound, bound)
    else:
        a = jax.random.normal(key, (d_in, r), dtype) / r
    return a, jnp.zeros((r, d_out), dtype)


def full_shape(w: Any) -> tuple[int, ...]:
    """The shape of a weight including stacked leading axes (a stacked quantized leaf reports its per-layer shape)."""
    shape, codes = tuple(getattr(w, "shape", ())), getattr(w, "codes", None)
    return (tuple(np.shape(codes)[:-2]) if is_node(w) and np.ndim(codes) > 2 else ()) + shape


def init(key: jax.Array, params: PyTree, rules: Sequence[LoraRule]) -> PyTree:
    """Replace every leaf matched by ``rules`` with a :class:`LoraWeight`.

    Args:
      key: PRNG key; each adapted leaf gets ``fold_in(key, i)`` (i = leaf index).
      params: the parameter pytree (arrays or quantized leaves).
      rules: ordered :class:`LoraRule` s; the first matching rule wins.

    Returns:
      The same tree with targeted weights replaced by LoRA nodes. At init
      ``B = 0``, so the adapted model computes exactly what the base computes.

    Stacked layers (:func:`lora_jax.models.stacking.stack_layers`): init the
    unrolled params and stack after (rules keep their per-layer paths), or give
    the rule ``stacked_axes=1`` and a stacked path (``layers/attn/q_proj/kernel``).

    Raises:
      RuleError: a rule matches nothing (or only paths an earlier rule took).
      LoraError: a rule matches a non-matrix leaf, an already adapted leaf, a
        stacked kernel without ``stacked_axes``, or asks for a rank larger
        than ``min(d_in, d_out)``; a per-layer rule meets stacked params.
        Both are ``ValueError`` s.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.ones((512, 64))}}
      >>> params = init(jax.random.key(0), params, [LoraRule(pattern=".*kernel", rank=8)])
      >>> params["dense"]["kernel"]
      LoraWeight(shape=(512, 64), rank=8, scale=1, in_ndim=1, dropout=0, base=ArrayImpl)
      >>> count(params)
      ParamCount(trainable=4608, frozen=32768, total=37376, adapted=32768)
      >>> round(count(params).reduction, 3)
      0.859
      >>> stacked = {"layers": {"q": {"kernel": jnp.ones((3, 16, 8))}}}
      >>> node = init(jax.random.key(0), stacked, [LoraRule(pattern=".*kernel", rank=2, stacked_axes=1)])
      >>> node["layers"]["q"]["kernel"].lora_a.shape, node["layers"]["q"]["kernel"].lora_b.shape
      ((3, 16, 2), (3, 2, 8))
    """
    leaves = _paths.leaves_with_paths(params, is_leaf=is_node)
    index = {p: i for i, (p, _) in enumerate(leaves)}
    _paths.check_stacked_rules([p for p, _ in leaves], rules, LoraError)

    def adapt(path: str, w: Any, rule: LoraRule) -> LoraWeight:
        if isinstance(w, LoraWeight):
            raise LoraError(f"{rule!r} matched {path!r}, which is already a LoRA weight")
        full = full_shape(w)
        if rule.stacked_axes == 0 and rule.in_dims == 1 and len(full) == 3 and _paths.STACKED_PATH.search(path):
            raise LoraError(
                f"{rule!r} matched {path!r} of shape {full}, a kernel under a stacked 'layers' node: its "
                "leading axis indexes layers, not inputs. Pass stacked_axes=1 to the rule "
                "(LoraRule(..., stacked_axes=1)) for one adapter per layer, or init the unrolled params "
                "and stack after (lora_jax.models.stacking.stack_layers)."
            )
        lead, shape = full[: rule.stacked_axes], full[rule.stacked_axes :]
        if len(shape) < 2:
            raise LoraError(
                f"{rule!r} matched {path!r} of shape {full}, which is not a matrix: LoRA "
                "targets kernels with at least 2 axes (after stacked_axes). Narrow the pattern (e.g. end it "
                "in 'kernel')."
            )
        if rule.in_dims >= len(shape):
            raise LoraError(
                f"{rule!r} matched {path!r} of shape {full}: in_dims={rule.in_dims} leaves no output axis"
            )
        d_in = math.prod(shape[: rule.in_dims])
        d_out = math.prod(shape[rule.in_dims :])
        if rule.rank > min(d_in, d_out):
            raise LoraError(
                f"{rule!r}: rank {rule.rank} is larger than min(d_in, d_out) = {min(d_in, d_out)} "
                f"for {path!r} of shape {full}"
            )
        dtype = w.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise LoraError(f"{rule!r} matched {path!r} with dtype {dtype}; LoRA needs a float weight")
        k = jax.random.fold_in(key, index[path])
        if not lead:
            a, b = _init_factors(k, w, rule, d_in, d_out, dtype)
        else:
            flat = jax.tree.map(lambda c: c.reshape(-1, *np.shape(c)[len(lead) :]), w)  # quantized: its children
            pairs = [_init_factors(jax.random.fold_in(k, j), jax.tree.map(lambda c, j=j: c[j], flat), rule, d_in,
                                   d_out, dtype) for j in range(math.prod(lead))]
            a = jnp.stack([p[0] for p in pairs]).reshape(*lead, d_in, rule.rank)
            b = jnp.stack([p[1] for p in pairs]).reshape(*lead, rule.rank, d_out)
        return LoraWeight(w, a, b, rule.scale, rule.in_dims, rule.dropout)

    return _paths.map_rules(params, rules, adapt, is_leaf=is_node, what="LoRA rule", rule_type=LoraRule,
                            caller="lora.init")


def is_lora(x: Any) -> bool:
    return isinstance(x, LoraWeight)


def nodes(params: PyTree) -> list[tuple[str, LoraWeight]]:
    """All LoRA weights of a tree with their paths."""
    return [(p, x) for p, x in _paths.leaves_with_paths(params, is_leaf=is_node) if is_lora(x)]


def with_custom_vjp(params: PyTree, enabled: bool) -> PyTree:
    """Set :attr:`LoraWeight.custom_vjp` on every LoRA weight (``False``: plain autodiff, ``jax.jvp`` works).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = init(jax.random.key(0), {"kernel": jnp.ones((4, 3))}, [LoraRule(pattern="kernel", rank=1)])
      >>> plain = with_custom_vjp(params, False)
      >>> x = jnp.ones((2, 4))
      >>> jax.jvp(lambda x: x @ plain["kernel"], (x,), (x,))[1].tolist()
      [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
    """
    return jax.tree.map(
        lambda x: dataclasses.replace(x, custom_vjp=bool(enabled)) if is_lora(x) else x, params, is_leaf=is_node
    )


def with_dropout_keys(params: PyTree, key: jax.Array | None) -> PyTree:
    """Give every LoRA weight with dropout its own key (``None`` turns dropout off)."""
    flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_node)
    out = []
    for i, x in enumerate(flat):
        if is_lora(x) and x.dropout > 0.0:
            k = None if key is None else jax.random.fold_in(key, i)
            x = dataclasses.replace(x, dropout_key=k)
        out.append(x)
    return treedef.unflatten(out)


# ----------------------------------------------------------------------------
# merge / unmerge / counts


def merge(params: PyTree) -> PyTree:
    """Fold every adapter into its base: ``W = W0 + s * A @ B`` (plain arrays).

    A quantized base is dequantized first; the result is a dense weight.
    """

    def fold(x):
        if not is_lora(x):
            return x
        base = dense(x.base)
        return base + x.delta_weight().astype(base.dtype)

    return jax.tree.map(fold, params, is_leaf=is_node)


def unmerge(merged: PyTree, adapters: PyTree) -> PyTree:
    """Inverse of :func:`merge`: ``W0 = W - s * A @ B`` at every adapted leaf.

    Args:
      merged: the output of :func:`merge`.
      adapters: a tree holding the LoRA weights (the adapted params, or the
        ``trainable`` half of :func:`lora_jax.split`).

    Returns:
      LoRA params equal to the ones that were merged, up to float rounding of
      ``(W0 + D) - D`` (at most half an ulp of ``W0 + D`` per element).
    """

    def undo(node, w):
        if not is_lora(node):
            return w
        base = w - node.delta_weight(w.shape).astype(w.dtype)
        return dataclasses.replace(node, base=base, dropout_key=None)

    return jax.tree.map(undo, adapters, merged, is_leaf=lambda x: is_node(x) or x is None)


class ParamCount(NamedTuple):
    """Parameter accounting of a (partly) adapted tree."""

    trainable: int
    frozen: int
    total: int
    adapted: int  # elements of the weights that carry adapters

    @property
    def reduction(self) -> float:
        """``1 - trainable / adapted``: the saving against training those weights fully."""
        return 1.0 - self.trainable / self.adapted if self.adapted else 0.0


def _size(x) -> int:
    return int(np.prod(full_shape(x))) if x is not None else 0


def count(params: PyTree) -> ParamCount:
    """Count trainable (A, B) and frozen elements; quantized leaves count logically."""
    trainable = frozen = adapted = 0
    for _, x in _paths.leaves_with_paths(params, is_leaf=is_node):
        if is_lora(x):
            trainable += sum(_size(c) for k, c in x.tree_flatten_with_keys()[0] if k.name in FACTOR_NAMES)  # A, B, ...
            frozen += _size(x.base)
            adapted += _size(x.base)
        else:
            frozen += _size(x)
    return ParamCount(trainable, frozen, trainable + frozen, adapted)


def __getattr__(name: str):  # lora.audit: its home, lora_jax.methods.audit, imports this module
    if name == "audit":
        return importlib.import_module("lora_jax.methods.audit").audit
    raise AttributeError(f"module 'lora_jax.lora' has no attribute {name!r}")


_register_array_misuse_hook()
