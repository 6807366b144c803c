"""LoRA for third-party ``flax.linen`` and ``flax.nnx`` models, without editing them.

Two front ends share one low-rank kernel (:func:`_lowrank`): the input's
contracted axes are moved last and folded to ``d_in``, ``s * (dropout(x) @ A) @ B``
is computed through the rank dimension, and the result is unfolded to the
layer's output shape. ``W0 + s * A @ B`` is never formed.

* **linen** (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``): the parameter
  tree is adapted with the ordinary :func:`lora_jax.lora.init`, and
  :func:`linen_apply` runs ``model.apply`` on the base weights while
  ``nn.intercept_methods`` adds the low-rank term to every layer whose
  ``kernel`` is a :class:`~lora_jax.lora.LoraWeight`. Train with
  :func:`lora_jax.split` and ``jax.grad`` as for any other tree.
* **nnx** (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``):
  :func:`nnx_lora` replaces each targeted layer in its parent by a
  :class:`LoraLayer` that holds the original layer and the factors as
  :class:`LoraParam` variables, so ``nnx.Optimizer(model, tx, wrt=LoraParam)``
  trains A and B alone. :func:`nnx_merge` folds the adapters back in.

Both use the same rules (:class:`~lora_jax.lora.LoraRule`), init conventions
and scale as :func:`lora_jax.lora.init`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import LoraError

PyTree = Any

# ----------------------------------------------------------------------------
# Shared: the low-rank term of one layer


def _in_dims_error(where: str, node_in_ndim: int, k: int, fix: str) -> ValueError:
    return ValueError(
        f"{where}: the LoRA weight flattens its first {node_in_ndim} kernel axis(es) into d_in, but the layer "
        f"contracts {k} input axis(es). {fix}"
    )


def _lowrank(node: _lora.LoraWeight, x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """``s * (dropout(x) @ A) @ B`` with ``x``'s ``axes`` contracted: shape ``(*rest, *out_shape)``.

    ``axes`` are the input axes in the order of the kernel's input axes; the
    remaining axes of ``x`` keep their order (as ``lax.dot_general`` keeps them).
    """
    k = len(axes)
    xt = jnp.moveaxis(x, tuple(axes), tuple(range(x.ndim - k, x.ndim)))
    lead = xt.shape[: x.ndim - k]
    y = node.delta(xt.reshape(*lead, -1))
    return y.reshape(*lead, *node.out_shape)


def _normalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


@dataclasses.dataclass(frozen=True)
class _EinsumPlan:
    """How an einsum ``lhs,rhs->out`` with a LoRA kernel is computed in low rank."""

    lhs: str
    k: int  # number of contracted kernel letters (the leading ones)
    contracted: str  # kernel letters contracted with the input, in kernel order
    out_letters: str  # kernel letters that reach the output, in kernel order
    out: str

    def axes(self, x_ndim: int) -> tuple[int, ...]:
        """Positions in ``x`` of the contracted letters (ellipsis expanded)."""
        if "..." in self.lhs:
            head, tail = self.lhs.split("...")
            pos = {c: i for i, c in enumerate(head)}
            pos.update({c: x_ndim - len(tail) + i for i, c in enumerate(tail)})
        else:
            pos = {c: i for i, c in enumerate(self.lhs)}
        return tuple(pos[c] for c in self.contracted)

    @property
    def finish(self) -> str:
        """Einsum from ``(*rest, *out_shape)`` (the output of :func:`_lowrank`) to the layer's output."""
        rest = "".join(c for c in self.lhs if c not in self.contracted)
        return f"{rest}{self.out_letters}->{self.out}"


def _einsum_plan(spec: str, where: str) -> _EinsumPlan:
    """Parse ``spec`` (already validated by the layer) and check it suits a LoRA kernel."""
    spec = spec.replace(" ", "")
    ins, out = spec.split("->")
    lhs, rhs = ins.split(",")
    if "." in rhs:
        raise LoraError(f"{where}: einsum {spec!r} has an ellipsis in the kernel operand; LoRA needs named axes")
    for operand in (lhs.replace("...", ""), rhs):
        if len(set(operand)) != len(operand):
            raise LoraError(
                f"{where}: einsum {spec!r} repeats a letter within an operand (a trace or diagonal); "
                "LoRA supports einsums where each operand names each axis once"
            )
    contracted = "".join(c for c in rhs if c not in out)
    k = len(contracted)
    if any(c not in lhs for c in contracted):
        raise LoraError(
            f"{where}: einsum {spec!r} sums kernel axis(es) {[c for c in contracted if c not in lhs]} that the "
            "input does not have; LoRA supports kernels whose axes are either contracted with the input or "
            "kept in the output"
        )
    if rhs[:k] != contracted:
        raise LoraError(
            f"{where}: einsum {spec!r} contracts kernel axes {list(contracted)}, which must be the kernel's "
            f"leading axes (kernel axes are {list(rhs)}); LoRA folds the leading in_ndim axes into d_in. "
            "Reorder the kernel axes in the model, or adapt another layer."
        )
    shared = [c for c in rhs[k:] if c in lhs]
    if shared:
        raise LoraError(
            f"{where}: einsum {spec!r} keeps kernel axis(es) {shared} that also index the input (a separate "
            "weight per slice, not one linear map); LoRA supports kernels (*in_axes, *out_axes) only"
        )
    return _EinsumPlan(lhs, k, contracted, rhs[k:], out)


# ----------------------------------------------------------------------------
# flax.linen


_LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _linen_delta(path: str, node: _lora.LoraWeight, mod: nn.Module, x: jax.Array, args, kwargs):
    def fix(k: int) -> str:
        return f"Give the rule matching {path!r} in_dims={k}: LoraRule(pattern=..., rank=..., in_dims={k})."

    if isinstance(mod, nn.Einsum):
        spec = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or mod.einsum_str
        plan = _einsum_plan(spec, path)
        if plan.k != node.in_ndim:
            raise _in_dims_error(path, node.in_ndim, plan.k, fix(plan.k))
        return jnp.einsum(plan.finish, _lowrank(node, x, plan.axes(x.ndim)))
    if isinstance(mod, nn.DenseGeneral):
        if mod.batch_dims:
            raise LoraError(
                f"{path}: nn.DenseGeneral with batch_dims={mod.batch_dims} holds a separate weight per batch "
                "index; LoRA supports DenseGeneral without batch_dims only. Remove the LoRA rule for this path."
            )
        axes = _normalize_axes(mod.axis, x.ndim)
    else:
        axes = (x.ndim - 1,)
    if len(axes) != node.in_ndim:
        raise _in_dims_error(path, node.in_ndim, len(axes), fix(len(axes)))
    return _lowrank(node, x, axes)


def _linen_interceptor(adapters: Mapping[str, tuple[str, _lora.LoraWeight]]):
    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        entry = adapters.get("/".join(mod.path))
        if entry is None or context.method_name == "setup":
            return next_fun(*args, **kwargs)
        leaf, node = entry
        path = "/".join((*mod.path, leaf))
        if not isinstance(mod, _LINEN_LAYERS) or leaf != "kernel":
            raise TypeError(
                f"{path!r} is a LoRA weight of a {type(mod).__name__} module; linen_apply adds adapters to the "
                "'kernel' of nn.Dense, nn.DenseGeneral and nn.Einsum only. Narrow the LoraRule pattern so it "
                "leaves this weight out."
            )
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        kernel = mod.get_variable("params", "kernel")
        if tuple(kernel.shape) != node.shape:
            raise LoraError(
                f"{path}: the layer sees a kernel of shape {tuple(kernel.shape)} but the LoRA weight there has "
                f"shape {node.shape}; lifted transforms that stack parameters (nn.scan, nn.vmap) are not "
                "supported by linen_apply"
            )
        x = args[0] if args else kwargs["inputs"]
        return y + _linen_delta(path, node, mod, x.astype(y.dtype), args, kwargs).astype(y.dtype)

    return intercept


def _base_weight(x: Any) -> Any:
    if _lora.is_lora(x):
        return _lora.dense(x.base)
    return _lora.dense(x) if _lora.is_node(x) else x


def linen_apply(
    model: nn.Module,
    variables: Mapping[str, PyTree],
    *args: Any,
    method: Any = None,
    **kwargs: Any,
) -> Any:
    """Apply a linen ``model`` whose ``params`` hold LoRA weights, as ``model.apply`` would.

    The model runs unchanged on the base weights (quantized leaves are
    dequantized); every ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum``
    whose ``kernel`` is a :class:`~lora_jax.lora.LoraWeight` gets
    ``s * (dropout(x) @ A) @ B`` added to its output, computed through the
    rank dimension. Gradients reach A and B; differentiate with respect to the
    ``trainable`` half of :func:`lora_jax.split`.

    Args:
      model: the linen module, unaware of LoRA.
      variables: ``{"params": params, ...}`` as for ``model.apply``; ``params``
        adapted by :func:`lora_jax.lora.init` (paths such as
        ``encoder/layers_0/q/kernel``). A ``DenseGeneral`` or ``Einsum`` that
        contracts k input axes needs ``LoraRule(..., in_dims=k)``.
      *args: positional arguments of the model's method.
      method: the method to apply (default ``__call__``), as for ``model.apply``.
      **kwargs: keyword arguments of ``model.apply`` (``rngs``, ``mutable``)
        and of the method.

    Returns:
      What ``model.apply`` returns.

    Raises:
      LoraError: ``variables`` has no ``params``; a layer contracts a number
        of axes other than its LoRA weight's ``in_ndim``; a ``DenseGeneral``
        has ``batch_dims``; an einsum does not contract its kernel's leading
        axes; a lifted transform stacks the adapted kernel.
      TypeError: a LoRA weight sits in a module other than the three above.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from lora_jax import lora
      >>> model = nn.Dense(3)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
      >>> params = lora.init(jax.random.key(1), params, [lora.LoraRule(pattern="kernel", rank=2)])
      >>> y = linen_apply(model, {"params": params}, jnp.ones((1, 4)))
      >>> bool((y == model.apply({"params": lora.merge(params)}, jnp.ones((1, 4)))).all())
      True
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise LoraError(
            f"linen_apply takes variables as model.apply does, with a 'params' collection; got {keys}. "
            "Call it as linen_apply(model, {'params': params}, x)."
        )
    adapters = {}
    for path, node in _lora.nodes(variables["params"]):
        mod_path, _, leaf = path.rpartition("/")
        adapters[mod_path] = (leaf, node)
    base = dict(variables)
    base["params"] = jax.tree.map(_base_weight, variables["params"], is_leaf=_lora.is_node)
    with nn.intercept_methods(_linen_interceptor(adapters)):
        return model.apply(base, *args, method=method, **kwargs)


# ----------------------------------------------------------------------------
# flax.nnx


class LoraParam(nnx.Param):
    """A trainable LoRA factor (A or B): filter with it to train the adapters alone."""


_NNX_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def _nnx_contracted(layer: nnx.Module, where: str) -> int:
    """Number of input axes ``layer`` contracts (the leading axes of its kernel)."""
    if isinstance(layer, nnx.Einsum):
        return _einsum_plan(layer.einsum_str, where).k
    if isinstance(layer, nnx.LinearGeneral):
        if layer.batch_axis:
            raise LoraError(
                f"{where}: nnx.LinearGeneral with batch_axis={dict(layer.batch_axis)} holds a separate weight per "
                "batch index; LoRA supports LinearGeneral without batch_axis only. Narrow the rule pattern."
            )
        return len(layer.axis)
    return 1


class LoraLayer(nnx.Module):
    """An ``nnx.Linear``, ``LinearGeneral`` or ``Einsum`` with a low-rank trainable update.

    Computes ``base(x) + s * (dropout(x) @ A) @ B`` with the input's contracted
    axes folded to ``d_in``; ``base`` is the original layer, unchanged. Built
    by :func:`nnx_lora`.

    Attributes:
      base: the wrapped layer (its kernel is ``(*in_shape, *out_shape)``).
      lora_a: :class:`LoraParam` ``(d_in, r)``.
      lora_b: :class:`LoraParam` ``(r, d_out)``, zero at init.
      scale: ``alpha / r`` (or ``alpha / sqrt(r)``).
      in_ndim: the number of leading kernel axes contracted with the input.
      dropout: an ``nnx.Dropout`` on the adapter input, or ``None``.
    """

    def __init__(self, base: nnx.Module, node: _lora.LoraWeight, *, rngs: nnx.Rngs):
        self.base = base
        self.lora_a = LoraParam(node.lora_a)
        self.lora_b = LoraParam(node.lora_b)
        self.scale = node.scale
        self.in_ndim = node.in_ndim
        self.dropout = nnx.Dropout(node.dropout, rngs=rngs) if node.dropout > 0.0 else None

    def node(self) -> _lora.LoraWeight:
        """This layer as a :class:`~lora_jax.lora.LoraWeight` (no dropout)."""
        return _lora.LoraWeight(self.base.kernel[...], self.lora_a[...], self.lora_b[...], self.scale, self.in_ndim)

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        y = self.base(inputs, *args, **kwargs)
        x = inputs.astype(y.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        node = self.node()
        if isinstance(self.base, nnx.Einsum):
            spec = kwargs.get("einsum_str", args[0] if args else None) or self.base.einsum_str
            plan = _einsum_plan(spec, type(self).__name__)
            if plan.k != self.in_ndim:
                raise _in_dims_error(
                    f"LoraLayer({spec!r})",
                    self.in_ndim,
                    plan.k,
                    "The adapter was built for the layer's own einsum_str; call it with an einsum that "
                    "contracts as many kernel axes.",
                )
            d = jnp.einsum(plan.finish, _lowrank(node, x, plan.axes(x.ndim)))
        elif isinstance(self.base, nnx.LinearGeneral):
            d = _lowrank(node, x, _normalize_axes(self.base.axis, x.ndim))
        else:
            d = _lowrank(node, x, (x.ndim - 1,))
        return y + d.astype(y.dtype)


def _edges(root: Any, kinds: tuple[type, ...]) -> list[tuple[tuple, Any, Any, Any]]:
    """Every reference ``(first_path, parent, key, child)`` to a ``kinds`` instance in the graph.

    A module shared by several parents appears once per reference, all with the
    path at which ``nnx.iter_graph`` first meets it.
    """
    first_path = {}
    containers = []
    for path, node in nnx.iter_graph(root):
        if isinstance(node, kinds):
            first_path.setdefault(id(node), path)
        if isinstance(node, nnx.Pytree):
            containers.append((node, nnx.iter_children(node)))
        elif isinstance(node, (list, tuple)):
            containers.append((node, enumerate(node)))
        elif isinstance(node, Mapping):
            containers.append((node, node.items()))
    out = []
    for parent, children in containers:
        if isinstance(parent, kinds):
            continue  # a LoraLayer's base is not a reference to replace
        for key, child in children:
            if isinstance(child, kinds):
                out.append((first_path[id(child)], parent, key, child))
    return sorted(out, key=lambda e: tuple(map(str, e[0])))


def _replace(parent: Any, key: Any, value: Any, path: str) -> None:
    if isinstance(parent, (MutableMapping, MutableSequence)):
        parent[key] = value
    elif isinstance(parent, nnx.Pytree):
        setattr(parent, key, value)
    else:
        raise TypeError(
            f"cannot replace the layer at {path!r}: it sits in a {type(parent).__name__}, which cannot be "
            "changed in place. Hold layers in an nnx.List, nnx.Dict or a module attribute."
        )


def _rngs(rngs: nnx.Rngs | jax.Array | int) -> nnx.Rngs:
    return rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(rngs)


def nnx_lora(model: nnx.Module, rules: Sequence[_lora.LoraRule], *, rngs: nnx.Rngs | jax.Array | int) -> Any:
    """Wrap the layers of an nnx ``model`` selected by ``rules`` in :class:`LoraLayer` s, in place.

    Candidates are the ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum``
    layers, named by their kernel's ``/``-joined path (``layers/0/q_proj/kernel``).
    Rules are matched as in :func:`lora_jax.lora.init` (``re.fullmatch``, first
    match wins, a rule matching no candidate is an error), and A and B are made
    by it, with the same init, scale and rank checks. The number of contracted
    axes comes from the layer (``LinearGeneral(axis=(-2, -1))`` contracts 2), so
    ``in_dims`` need not be set; a rule with ``in_dims > 1`` must agree with it.

    Args:
      model: the nnx model, unaware of LoRA; changed in place.
      rules: ordered :class:`~lora_jax.lora.LoraRule` s.
      rngs: ``nnx.Rngs`` or a key: ``params`` draws A; ``dropout`` drives the
        adapter dropout of rules with ``dropout > 0``.

    Returns:
      ``model`` (or the new :class:`LoraLayer` when ``model`` itself is a target).
      Train with ``nnx.Optimizer(model, tx, wrt=LoraParam)`` and
      ``nnx.grad(..., argnums=nnx.DiffState(0, LoraParam))``.

    Raises:
      LoraError: a rule matches no layer, matches an adapted layer, disagrees
        on ``in_dims``; a rank is too large; an einsum does not contract its
        kernel's leading axes; a ``LinearGeneral`` has ``batch_axis``.
      TypeError: a targeted layer sits in a tuple (cannot be replaced).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lora_jax.lora import LoraRule
      >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> y0 = model(jnp.ones((1, 4)))
      >>> model = nnx_lora(model, [LoraRule(pattern=r"layers/0/kernel", rank=2)], rngs=nnx.Rngs(2))
      >>> type(model.layers[0]).__name__, model.layers[0].lora_a.shape
      ('LoraLayer', (4, 2))
      >>> bool((model(jnp.ones((1, 4))) == y0).all())
      True
    """
    rngs = _rngs(rngs)
    root_kind = isinstance(model, (*_NNX_LAYERS, LoraLayer))
    edges = _edges(model, (*_NNX_LAYERS, LoraLayer))
    layers = {(): model} if root_kind else {}
    for path, _, _, child in edges:
        layers.setdefault(path, child)
    kernels = {}
    for path, layer in layers.items():
        base = layer.base if isinstance(layer, LoraLayer) else layer
        kernels["/".join(map(str, (*path, "kernel")))] = base.kernel[...]
    assigned = _paths.assign_rules(kernels, rules, what="LoRA rule (over nnx Linear/LinearGeneral/Einsum kernels)",
                                   rule_type=_lora.LoraRule, caller="nnx_lora")
    wrapped = {}
    for path, layer in layers.items():
        kpath = "/".join(map(str, (*path, "kernel")))
        rule = assigned.get(kpath)
        if rule is None:
            continue
        if isinstance(layer, LoraLayer):
            raise LoraError(f"{rule!r} matched {kpath!r}, whose layer already has a LoRA adapter")
        k = _nnx_contracted(layer, kpath)
        if rule.in_dims not in (1, k):
            raise _in_dims_error(
                f"{rule!r} at {kpath!r}",
                rule.in_dims,
                k,
                f"nnx_lora takes in_dims from the layer; drop in_dims from the rule or set in_dims={k}.",
            )
        node = _lora.init(rngs.params(), {kpath: kernels[kpath]}, [dataclasses.replace(rule, in_dims=k)])[kpath]
        wrapped[id(layer)] = LoraLayer(layer, node, rngs=rngs)
    for path, parent, key, child in edges:
        if id(child) in wrapped:
            _replace(parent, key, wrapped[id(child)], "/".join(map(str, path)))
    return wrapped.get(id(model), model)


def nnx_merge(model: nnx.Module) -> Any:
    """Fold every :class:`LoraLayer` into its base layer, in place: ``W = W0 + s * A @ B``.

    Args:
      model: a model adapted by :func:`nnx_lora`.

    Returns:
      ``model`` with each :class:`LoraLayer` replaced by its base layer, whose
      kernel now includes the update (or that base layer when ``model`` itself
      is a :class:`LoraLayer`). Clone first (``nnx.clone``) to keep the adapters.

    Raises:
      TypeError: an adapted layer sits in a tuple (cannot be replaced).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lora_jax.lora import LoraRule
      >>> model = nnx_lora(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), [LoraRule(pattern="kernel", rank=2)], rngs=0)
      >>> type(nnx_merge(model)).__name__
      'Linear'
    """
    layers = [(path, parent, key, child) for path, parent, key, child in _edges(model, (LoraLayer,))]
    todo = {id(c): c for *_, c in layers}
    if isinstance(model, LoraLayer):
        todo[id(model)] = model
    for layer in todo.values():
        kernel = layer.base.kernel
        kernel[...] = kernel[...] + layer.node().delta_weight().astype(kernel.dtype)
    for path, parent, key, child in layers:
        _replace(parent, key, child.base, "/".join(map(str, path)))
    return model.base if isinstance(model, LoraLayer) else model


__all__ = ["LoraLayer", "LoraParam", "linen_apply", "nnx_lora", "nnx_merge"]
