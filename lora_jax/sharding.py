"""Device meshes, and where each leaf of a train state and a batch lives on one.

A mesh has the named axes :data:`AXES` (``data``, ``fsdp``, ``tensor``; a size
of ``-1`` takes the devices the others leave). :func:`param_shardings` gives
every leaf of a parameter tree a ``NamedSharding`` by these conventions
(``shared/DESIGN.md``, "Scale conventions"):

- a frozen matrix is split over ``fsdp`` along its larger dimension, and over
  ``tensor`` along the other one, each only where the size divides; vectors
  (norm scales, biases) are replicated;
- a :class:`~lora_jax.quant.QTensor` splits its packed codes, scales and
  offsets on the same stored axis, so every device holds whole quantization
  blocks: along ``d_in`` only when the number of blocks divides (a block is
  never cut), otherwise along ``d_out``, otherwise the leaf is replicated.
  The double-quantization ``scale_scales`` (one per 256 columns) follow a
  ``d_out`` split when each device's columns are whole groups of 256, and are
  replicated otherwise (they are 1/256 of the scales);
- a LoRA factor ``A (d_in, r)`` is split like its weight's input dimension,
  ``B (r, d_out)`` like its output dimension; the rank axis is replicated;
- leading axes (the layer axis of stacked layers, :mod:`lora_jax.models.stacking`)
  are replicated; so are the children of other node kinds (a method's own
  weight type) until their rules are written here;
- optimizer state is split like the parameter it belongs to; the step and key
  are replicated; batches are split over ``data`` x ``fsdp`` (:data:`BATCH_AXES`).

:func:`shard_state` places a :class:`~lora_jax.train.TrainState` so that the
unchanged :func:`lora_jax.train.make_train_step` runs sharded: XLA partitions
the step from its arguments' shardings. With several processes
(:mod:`lora_jax.distributed`) each process places only its own devices' shards.

Examples:
  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> mesh = make_mesh({"fsdp": -1})
  >>> dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
  True
  >>> p = lj.lora.init(jax.random.key(0), {"w": jnp.ones((64, 16))}, [lj.LoraRule(pattern="w", rank=2)])
  >>> s = param_shardings(p, make_mesh({"fsdp": 1}))  # one device: nothing to split
  >>> s["w"].base.spec, s["w"].lora_a.spec, s["w"].lora_b.spec
  (P(None, None), P(None, None), P(None, None))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import ConfigError
from lora_jax.io.hashing import host_array as to_host  # noqa: F401  (the whole value, from every process)
from lora_jax.io.hashing import is_typed_key
from lora_jax.models import stacking as _stacking
from lora_jax.quant.codecs import DQ_BLOCK
from lora_jax.quant.qtensor import QTensor
from lora_jax.train import TrainState

PyTree = Any

AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
"""The mesh axis names, outermost first. A tuple that may grow: fused sweeps add ``member``."""

BATCH_AXES: tuple[str, ...] = ("data", "fsdp")
"""The mesh axes the batch dimension is split over."""


def mesh_shape(sizes: Mapping[str, int] | Sequence[int] | None, n_devices: int,
               axis_names: Sequence[str] = AXES) -> tuple[int, ...]:
    """Resolve axis sizes (missing axes are 1, one ``-1`` takes the rest) against ``n_devices``.

    Raises:
      ConfigError: an unknown axis, a size that is neither ``-1`` nor positive,
        two ``-1``, or sizes whose product is not the number of devices.

    Examples:
      >>> mesh_shape({"data": 2, "fsdp": -1}, 8)
      (2, 4, 1)
      >>> mesh_shape((1, 4, 2), 8)
      (1, 4, 2)
    """
    if sizes is None:
        sizes = {}
    if not isinstance(sizes, Mapping):
        sizes = dict(zip(axis_names, sizes, strict=True))
    unknown = [k for k in sizes if k not in axis_names]
    if unknown:
        raise ConfigError(f"mesh: unknown axis {unknown[0]!r}; the axes are {', '.join(axis_names)}")
    shape = [int(sizes.get(a, 1)) for a in axis_names]
    bad = [f"{a}={s}" for a, s in zip(axis_names, shape) if s != -1 and s < 1]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if bad or len(fill) > 1:
        raise ConfigError(f"mesh: each axis size must be a positive int or one -1 (the rest of the devices); got "
                          f"{', '.join(bad) or 'more than one -1'}")
    fixed = math.prod(s for s in shape if s != -1)
    if fill:
        if n_devices % fixed:
            raise ConfigError(f"mesh: the fixed axis sizes multiply to {fixed}, which does not divide the "
                              f"{n_devices} devices, so -1 cannot fill the rest; choose sizes that divide {n_devices}")
        shape[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"mesh: the axis sizes {dict(zip(axis_names, shape))} need {fixed} devices but there are "
                          f"{n_devices}; make their product {n_devices}, or set one axis to -1")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | Sequence[int] | None = None, *, devices: Sequence[Any] | None = None,
              axis_names: Sequence[str] = AXES) -> Mesh:
    """Build a ``jax.sharding.Mesh`` over ``devices`` (default: all devices of all processes).

    Args:
      sizes: ``{"data": 2, "fsdp": -1}`` or a tuple in the order of ``axis_names``.
      devices: the devices, in mesh order.
      axis_names: the axis names (default :data:`AXES`).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices), axis_names)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), tuple(axis_names))


def axis_size(mesh: Mesh, name: str) -> int:
    """The size of mesh axis ``name`` (1 when the mesh has no such axis)."""
    return int(mesh.shape.get(name, 1))


def _assign(mesh: Mesh, dims: Sequence[int], fits) -> list[str | None]:
    """Mesh axis per dimension: ``fsdp`` on the largest that fits, ``tensor`` on the next largest that fits."""
    out: list[str | None] = [None] * len(dims)
    order = sorted(range(len(dims)), key=lambda i: -dims[i])
    for name in ("fsdp", "tensor"):
        n = axis_size(mesh, name)
        if n > 1:
            i = next((i for i in order if out[i] is None and fits(i, n)), None)
            if i is not None:
                out[i] = name
    return out


def _named(mesh: Mesh, lead: int, axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*([None] * lead), *axes))


def _qtensor_shardings(q: QTensor, mesh: Mesh, lead: int) -> tuple[QTensor, list[str | None]]:
    """Shardings of a QTensor's children and the mesh axes of its logical ``(in, out)`` dims."""
    d_in, d_out = q.stored_shape
    nb = d_in // q.block_size

    def fits(i, n):  # axis 0 only on block boundaries
        return nb % n == 0 if i == 0 else d_out % n == 0

    s_in, s_out = _assign(mesh, (d_in, d_out), fits)
    groups = s_out if s_out and (d_out // axis_size(mesh, s_out)) % DQ_BLOCK == 0 else None
    specs = {"codes": (s_in, s_out), "scales": (s_in, s_out), "offsets": (s_in, s_out),
             "scale_scales": (s_in, groups), "scale_mean": ()}
    keyed, aux = q.tree_flatten_with_keys()
    children = [None if x is None else _named(mesh, lead, specs[k.name]) for k, x in keyed]
    logical = [s_out, s_in] if q.transposed else [s_in, s_out]
    return QTensor.tree_unflatten(aux, children), logical


def _lora_shardings(w: _lora.LoraWeight, mesh: Mesh) -> _lora.LoraWeight:
    lead = np.ndim(w.lora_a) - 2
    if isinstance(w.base, QTensor):
        base, (s_in, s_out) = _qtensor_shardings(w.base, mesh, lead)
    else:
        shape = tuple(np.shape(w.base))[lead:]
        groups = (shape[: w.in_ndim], shape[w.in_ndim:])  # a group is split on its first axis (row-major)
        s_in, s_out = _assign(mesh, [math.prod(g) for g in groups], lambda i, n: groups[i][0] % n == 0)
        axes = [s_in] + [None] * (w.in_ndim - 1) + [s_out] + [None] * (len(shape) - w.in_ndim - 1)
        base = _named(mesh, lead, axes)
    children = (base, _named(mesh, lead, (s_in, None)), _named(mesh, lead, (None, s_out)),
                None if w.dropout_key is None else _named(mesh, 0, ()))
    return _lora.LoraWeight.tree_unflatten(w.tree_flatten_with_keys()[1], children)


def _array_sharding(x: Any, mesh: Mesh, lead: int) -> NamedSharding:
    dims = tuple(np.shape(x))[lead:]
    if len(dims) < 2 or is_typed_key(x):
        return _named(mesh, 0, ())
    return _named(mesh, lead, _assign(mesh, dims, lambda i, n: dims[i] % n == 0))


def param_shardings(params: PyTree, mesh: Mesh) -> PyTree:
    """Return a tree like ``params`` with a ``NamedSharding`` for every array (``None`` stays ``None``).

    LoRA nodes and quantized leaves keep their types, their children replaced
    by shardings, so the result can be flattened alongside ``params``.
    """
    stacked = _stacking.is_stacked(params)

    def one(path, x):
        if x is None:
            return None
        if type(x) is _lora.LoraWeight:
            return _lora_shardings(x, mesh)
        if type(x) is QTensor:
            return _qtensor_shardings(x, mesh, np.ndim(x.codes) - 2)[0]
        if _lora.is_node(x):  # another kind of node (a method's own weight type): its children replicated
            return jax.tree.map(lambda _: _named(mesh, 0, ()), x)
        lead = 1 if stacked and _paths.path_str(path).startswith(_stacking.LAYERS + "/") else 0
        return _array_sharding(x, mesh, lead)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: x is None or _lora.is_node(x))


def _is_none(x: Any) -> bool:
    return x is None


def _like(shardings: PyTree, tree: PyTree) -> PyTree:
    """``shardings`` where ``tree`` has an array, ``None`` where it has ``None`` (one half of a split)."""
    s_leaves = jax.tree.leaves(shardings, is_leaf=_is_none)
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_none)
    return treedef.unflatten([None if x is None else s for s, x in zip(s_leaves, leaves, strict=True)])


def _follow_params(opt_state: PyTree, trainable: PyTree, t_shardings: PyTree, mesh: Mesh) -> PyTree:
    """Optimizer-state shardings: a leaf whose path ends with a parameter's path and has its shape follows it."""
    known = {}
    for (p, x), s in zip(_paths.leaves_with_paths(trainable), jax.tree.leaves(t_shardings), strict=True):
        known[p] = (tuple(np.shape(x)), s)
    replicated = _named(mesh, 0, ())

    def one(path, x):
        parts = _paths.path_str(path).split("/")
        for k in range(len(parts)):
            hit = known.get("/".join(parts[k:]))
            if hit is not None and hit[0] == tuple(np.shape(x)):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """A :class:`~lora_jax.train.TrainState` of shardings for ``state`` on ``mesh`` (see the module docstring)."""
    ps = param_shardings(_paths.combine(state.trainable, state.frozen), mesh)
    t = _like(ps, state.trainable)
    replicated = _named(mesh, 0, ())
    return TrainState(replicated, t, _like(ps, state.frozen),
                      _follow_params(state.opt_state, state.trainable, t, mesh), replicated)


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place one array on ``sharding``; each process fills only the shards of its own devices.

    ``x`` is a host array, or a device array this process holds in full
    (every process passes the same values). Typed PRNG keys travel as their key data.
    """
    if is_typed_key(x):
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and x.is_fully_addressable and sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)  # already global: reshard
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """Place every array of ``tree`` on the sharding at the same place of ``shardings`` (``None`` stays)."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_none)
    s_leaves = jax.tree.leaves(shardings, is_leaf=_is_none)
    return treedef.unflatten([None if x is None else put(x, s) for x, s in zip(leaves, s_leaves, strict=True)])


def shard_state(state: TrainState, mesh: Mesh) -> TrainState:
    """Place a train state on ``mesh``; :func:`lora_jax.train.make_train_step` then runs it sharded.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> p = lj.lora.init(jax.random.key(0), {"w": jnp.ones((8, 4))}, [lj.LoraRule(pattern="w", rank=2)])
      >>> state = lj.train.init_state(p, optax.adam(1e-3), jax.random.key(1))
      >>> sharded = shard_state(state, make_mesh({"fsdp": -1}))
      >>> sharded.trainable["w"].lora_a.sharding.mesh.axis_names
      ('data', 'fsdp', 'tensor')
    """
    sh = state_shardings(state, mesh)
    return TrainState(*(place(x, s) for x, s in zip(state, sh, strict=True)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Split the leading (batch) axis over :data:`BATCH_AXES`; the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def check_batch(rows: int, mesh: Mesh) -> None:
    """Raise :class:`ConfigError` unless a batch of ``rows`` splits evenly over ``data`` x ``fsdp``."""
    n = math.prod(axis_size(mesh, a) for a in BATCH_AXES)
    if rows % n:
        raise ConfigError(f"train.batch_size: a batch of {rows} rows cannot be split over the mesh's data x fsdp = "
                          f"{n} devices; make the batch size a multiple of {n}")


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Place a batch (every process passes the same global batch) split over ``data`` x ``fsdp``.

    Raises:
      ConfigError: the batch size is not a multiple of ``data * fsdp``.
    """
    for rows in sorted({np.shape(x)[0] for x in jax.tree.leaves(batch)}):
        check_batch(rows, mesh)
    return jax.tree.map(lambda x: put(x, batch_sharding(mesh, np.ndim(x))), batch)


def bytes_per_device(tree: PyTree) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays held on each device (the addressable shards of this process)."""
    out: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for s in getattr(x, "addressable_shards", ()):
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out
