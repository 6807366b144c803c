"""Stacked adapter members: K adapter sets on one frozen base, trained or applied as one program.

A fused sweep trains K adapter sets ("members") of the same targets on one
frozen (possibly quantized) base. Their factors are stacked along a leading
member axis, ``A (K, *lead, d_in, r_max)`` and ``B (K, *lead, r_max, d_out)``;
member ``k`` uses the first ``ranks[k]`` columns of ``A`` and rows of ``B``
(the rest are masked in the forward pass, get exactly zero updates and stay
zero), and its own scale, learning rate, weight decay, adapter dropout rate,
seed and batches, all traced values, so one compiled step serves the whole
grid. The step is ``jax.vmap`` over the member axis of the trainable tree, the
optimizer state, the keys, the hyperparameters and the batches, with the
frozen base unmapped: it is read (and dequantized) once per step for all
members. With ``shared_batch`` every member reads the same batch (unmapped
too): the base's work that comes before the first adapter (the embedding, the
first norm and the first projections' ``x @ W0``) is then done once for all.

A member's forward tree (:func:`member_params`) is the ordinary LoRA tree of
:mod:`lora_jax.lora` with scale 1 and the member's scale folded into its masked
``A``: ``x @ W0 + ((x @ (s_k * A_k)) @ B_k)``, which is the member's own
``x @ W0 + s_k * (x @ A_k) @ B_k``; :class:`~lora_jax.lora.LoraWeight` is not changed.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax import lora
  >>> base = {"w": {"kernel": jnp.ones((8, 6))}}
  >>> trees = [lora.init(jax.random.key(s), base, [lora.LoraRule(pattern=".*kernel", rank=r)])
  ...          for s, r in ((0, 1), (1, 4))]
  >>> m = stack(trees)
  >>> m.trainable["w"]["kernel"].lora_a.shape, m.ranks.tolist(), m.r_max
  ((2, 8, 4), [1, 4], 4)
  >>> unstack(m, 0)["w"]["kernel"].rank
  1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import LoraError
from lora_jax.train import TrainState

__all__ = [
    "Hyper", "Members", "hyper", "init_state", "make_fused_eval", "make_fused_step", "mask_factors",
    "member_params", "rank_masks", "side_by_side", "stack", "unstack", "with_scale",
]

PyTree = Any


class Members(NamedTuple):
    """K adapter sets on one frozen base.

    Attributes:
      trainable: the stacked factors (LoRA nodes with scale 1 whose ``lora_a``
        is ``(K, *lead, d_in, r_max)`` and ``lora_b`` ``(K, *lead, r_max, d_out)``;
        ``None`` at every frozen leaf, as :func:`lora_jax.paths.split` gives).
      frozen: the shared frozen half (scale-1 LoRA nodes holding the base).
      ranks: ``(K,)`` int32, each member's true rank.
      scales: ``(K,)`` float32, each member's ``alpha / r`` (or ``alpha / sqrt(r)``).
      dropouts: ``(K,)`` float32, each member's adapter dropout rate (the
        stacked nodes' static ``dropout`` is 0: the fused step applies these as
        traced values); ``None`` reads as no dropout.
    """

    trainable: PyTree
    frozen: PyTree
    ranks: jax.Array
    scales: jax.Array
    dropouts: jax.Array | None = None

    @property
    def size(self) -> int:
        """The number of members K."""
        return int(self.ranks.shape[0])

    @property
    def r_max(self) -> int:
        """The padded rank: the largest rank of the members."""
        return int(np.max(np.asarray(self.ranks)))


def with_scale(params: PyTree, scale: float, **static: Any) -> PyTree:
    """Every LoRA node of ``params`` with its static scale set to ``scale`` (and other static fields: ``dropout=``)."""
    return jax.tree.map(lambda x: dataclasses.replace(x, scale=scale, **static) if _lora.is_lora(x) else x, params,
                        is_leaf=_lora.is_node)


def _node_value(params: PyTree, field: str, where: str) -> float:
    values = {float(getattr(n, field)) for _, n in _lora.nodes(params)}
    if len(values) != 1:
        raise LoraError(f"{where}: a member's LoRA nodes must share one {field} (one rule), got {sorted(values)}; "
                        "stack members built from a single LoraRule each")
    return values.pop()


def _pad(node: _lora.LoraWeight, r_max: int) -> _lora.LoraWeight:
    a, b = node.lora_a, node.lora_b
    extra = r_max - a.shape[-1]
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, extra), (0, 0)])
    return dataclasses.replace(node, lora_a=a, lora_b=b)


def stack(trees: Sequence[PyTree], *, r_max: int | None = None) -> Members:
    """Stack K LoRA parameter trees of one base (same targets, any ranks) into :class:`Members`.

    Args:
      trees: LoRA trees as :func:`lora_jax.lora.init` gives them, one per member,
        on the same base (member 0's base is kept; the others' are not read).
      r_max: the padded rank (default: the largest rank); at least every rank.

    Returns:
      The members; a factor's columns (of ``A``) and rows (of ``B``) beyond a
      member's rank are zero. Each member's dropout rate moves from its nodes
      (static) to :attr:`Members.dropouts` (traced in the fused step).

    Raises:
      LoraError: no tree, trees whose LoRA targets or settings differ, or ranks
        that differ within one tree.
    """
    if not trees:
        raise LoraError("members.stack: no tree given; pass one LoRA params tree per member")
    ranks, scales, dropouts, halves = [], [], [], []
    for k, tree in enumerate(trees):
        nodes = _lora.nodes(tree)
        if not nodes:
            raise LoraError(f"members.stack: member {k} has no LoRA node; build it with lora.init first")
        rk = {n.rank for _, n in nodes}
        if len(rk) != 1:
            raise LoraError(f"members.stack: member {k} mixes ranks {sorted(rk)}; a member has one rank")
        ranks.append(rk.pop())
        scales.append(_node_value(tree, "scale", f"members.stack: member {k}"))
        dropouts.append(_node_value(tree, "dropout", f"members.stack: member {k}"))
        halves.append(_paths.split(with_scale(tree, 1.0, dropout=0.0)))
    r_max = max(ranks) if r_max is None else int(r_max)
    if r_max < max(ranks):
        raise LoraError(f"members.stack: r_max={r_max} is below the largest member rank {max(ranks)}")
    padded = [jax.tree.map(lambda x: _pad(x, r_max) if _lora.is_lora(x) else x, t, is_leaf=_lora.is_node)
              for t, _ in halves]
    defs = [jax.tree.structure(t) for t in padded]
    for k, d in enumerate(defs[1:], 1):
        if d != defs[0]:
            raise LoraError(f"members.stack: member {k}'s adapters differ from member 0's (targets, in_ndim or "
                            "custom_vjp): members of one group share every LoRA setting except rank, alpha, "
                            "dropout, init and seed")
    trainable = jax.tree.map(lambda *xs: jnp.stack(xs), *padded)
    return Members(trainable, halves[0][1], jnp.asarray(ranks, jnp.int32), jnp.asarray(scales, jnp.float32),
                   jnp.asarray(dropouts, jnp.float32))


def rank_masks(rank: jax.Array, r_max: int) -> jax.Array:
    """``(r_max,)`` booleans: True for the first ``rank`` positions of the rank axis.

    Examples:
      >>> rank_masks(jnp.asarray(2), 4).tolist()
      [True, True, False, False]
    """
    return jnp.arange(r_max) < rank


def _masked(node: _lora.LoraWeight, rank: jax.Array, a_mul=None) -> _lora.LoraWeight:
    keep = rank_masks(rank, node.lora_a.shape[-1])
    a = jnp.where(keep, node.lora_a, jnp.zeros((), node.lora_a.dtype))
    b = jnp.where(keep[:, None], node.lora_b, jnp.zeros((), node.lora_b.dtype))
    if a_mul is not None:
        a = a * jnp.asarray(a_mul, a.dtype)
    return dataclasses.replace(node, lora_a=a, lora_b=b)


def mask_factors(tree: PyTree, rank: jax.Array) -> PyTree:
    """Zero the columns of ``A`` and rows of ``B`` beyond ``rank`` in every LoRA node of one member's tree."""
    return jax.tree.map(lambda x: _masked(x, rank) if _lora.is_lora(x) else x, tree, is_leaf=_lora.is_node)


def member_params(trainable: PyTree, frozen: PyTree, rank: jax.Array, scale: jax.Array) -> PyTree:
    """The forward tree of one member: its factors masked to ``rank``, ``scale`` folded into ``A``.

    ``trainable`` is one member's slice of :attr:`Members.trainable` (under
    ``jax.vmap``, or indexed). The result computes ``x @ W0 + scale * (x @ A[:, :rank]) @ B[:rank]``
    at every LoRA node, and the gradient of a loss of it is zero beyond ``rank``.
    """
    params = _paths.combine(trainable, frozen)
    return jax.tree.map(lambda x: _masked(x, rank, scale) if _lora.is_lora(x) else x, params, is_leaf=_lora.is_node)


def unstack(members: Members, k: int, *, like: PyTree = None) -> PyTree:
    """Member ``k`` as an ordinary LoRA params tree: its true rank, its own static scale and dropout.

    The scale and dropout come from the float32 :attr:`Members.scales` and
    :attr:`Members.dropouts`; ``like`` (member ``k``'s tree as given to
    :func:`stack`) gives them exactly as that tree had them instead.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import lora
      >>> t = [lora.init(jax.random.key(0), {"w": jnp.ones((4, 3))}, [lora.LoraRule(pattern="w", rank=r, alpha=4)])
      ...      for r in (1, 2)]
      >>> node = unstack(stack(t), 1)["w"]
      >>> node.lora_a.shape, node.scale
      ((4, 2), 2.0)
    """
    r = int(members.ranks[k])
    scale = float(members.scales[k])
    dropout = 0.0 if members.dropouts is None else float(members.dropouts[k])

    def cut(x):
        if not _lora.is_lora(x):
            return x
        return dataclasses.replace(x, lora_a=x.lora_a[k][..., :r], lora_b=x.lora_b[k][..., :r, :])

    mine = jax.tree.map(cut, members.trainable, is_leaf=_lora.is_node)
    out = with_scale(_paths.combine(mine, members.frozen), scale, dropout=dropout)
    if like is None:
        return out
    flat, treedef = jax.tree_util.tree_flatten(out, is_leaf=_lora.is_node)
    given = jax.tree_util.tree_leaves(like, is_leaf=_lora.is_node)
    return treedef.unflatten([dataclasses.replace(x, scale=g.scale, dropout=g.dropout) if _lora.is_lora(x) else x
                              for x, g in zip(flat, given, strict=True)])


# ----------------------------------------------------------------------------
# The fused train step


class Hyper(NamedTuple):
    """The per-member hyperparameters of a fused step (each ``(K,)``; ``lr`` is this step's learning rate).

    ``keep`` is each member's probability of keeping an adapter input,
    ``1 - dropout`` (a member without dropout keeps all: 1.0); ``None``: no
    member has dropout, and no dropout mask is drawn. :func:`hyper` fills it
    from :attr:`Members.dropouts`.
    """

    ranks: jax.Array
    scales: jax.Array
    lr: jax.Array
    weight_decay: jax.Array
    keep: jax.Array | None = None


def hyper(members: Members, lr: Any, weight_decay: Any) -> Hyper:
    """The :class:`Hyper` of ``members`` at learning rates ``lr`` and weight decays ``weight_decay`` (each ``(K,)``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import lora
      >>> t = [lora.init(jax.random.key(0), {"w": jnp.ones((4, 3))}, [lora.LoraRule(pattern="w", rank=2, dropout=d)])
      ...      for d in (0.0, 0.25)]
      >>> h = hyper(stack(t), [1e-3, 1e-3], [0.0, 0.0])
      >>> h.keep.tolist(), hyper(stack(t[:1]), [1e-3], [0.0]).keep
      ([1.0, 0.75], None)
    """
    rates = np.zeros(members.size) if members.dropouts is None else np.asarray(members.dropouts, np.float64)
    keep = jnp.asarray((1.0 - rates).astype(np.float32)) if np.any(rates > 0) else None  # as 1 - rate in a run alone
    return Hyper(members.ranks, members.scales, jnp.asarray(lr, jnp.float32), jnp.asarray(weight_decay, jnp.float32),
                 keep)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class _TracedDropout(_lora.LoraWeight):
    """A LoRA weight whose adapter dropout keeps each input with a traced probability ``keep`` (a fused member).

    It draws what :class:`~lora_jax.lora.LoraWeight` draws with the static rate
    ``1 - keep`` and the same key: ``bernoulli(key, keep)`` and ``x / keep``.
    """

    keep: Any = None
    extra_children = ("keep",)

    def _adapter_input(self, x):
        if self.dropout_key is None or self.keep is None:
            return x
        mask = jax.random.bernoulli(self.dropout_key, self.keep, x.shape)
        return jnp.where(mask, x / self.keep.astype(x.dtype), jnp.zeros((), x.dtype))


def _with_dropout(params: PyTree, keep: jax.Array | None, key: jax.Array) -> PyTree:
    """:func:`lora_jax.lora.with_dropout_keys` with the traced ``keep``: each LoRA node the key a run alone gives it."""
    if keep is None:
        return params
    flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=_lora.is_node)

    def traced(x, i):
        fields = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
        return _TracedDropout(**{**fields, "dropout_key": jax.random.fold_in(key, i), "keep": keep})

    return treedef.unflatten([traced(x, i) if _lora.is_lora(x) else x for i, x in enumerate(flat)])


def init_state(members: Members, keys: jax.Array, *, optimizer: str = "adamw",
               betas: tuple[float, float] = (0.9, 0.999)) -> TrainState:
    """The fused train state: stacked factors, per-member Adam state, per-member keys, no member failed.

    ``opt_state`` is ``(adam_state, failed_at)``: ``failed_at[k]`` is 0 while
    member ``k`` trains and the step whose loss was not finite once it failed
    (it is frozen from then on). ``keys`` are ``(K,)`` typed keys, each the
    key the member's sequential run would use.
    """
    t = jax.tree.map(jnp.copy, members.trainable)
    adam = jax.vmap(_adam(optimizer, betas).init)(t)
    failed = jnp.zeros((members.size,), jnp.int32)
    return TrainState(jnp.zeros((), jnp.int32), t, members.frozen, (adam, failed), keys)


def _adam(optimizer: str, betas) -> optax.GradientTransformation:
    if optimizer in ("adam", "adamw"):
        return optax.scale_by_adam(b1=betas[0], b2=betas[1])
    if optimizer == "sgd":
        return optax.identity()
    raise LoraError(f"members: optimizer {optimizer!r} is not fused; use adamw, adam or sgd")


def make_fused_step(loss_fn: Callable[[PyTree, Any], tuple[jax.Array, dict]], *, optimizer: str = "adamw",
                    betas: tuple[float, float] = (0.9, 0.999), grad_clip: float | None = None,
                    shared_batch: bool = False):
    """Build ``fused_step(state, hyper, batch) -> (state, metrics)``: one optimizer step of every member.

    Each member computes what its own run's optax chain computes
    (:func:`lora_jax.runner.build.make_optimizer`): gradient clipping by the
    member's own global norm, ``scale_by_adam``, AdamW's decoupled weight decay
    ``+ wd_k * p``, then ``* -lr_k``; the updates beyond the member's rank are
    exact zeros. A member whose loss is not finite is marked failed (its
    ``failed_at`` set to this step) and keeps its previous factors from then on;
    the others are not affected (no value crosses the member axis). Adapter
    dropout draws, per member, the masks its run alone draws (same keys), at
    the member's traced rate (``hyper.keep``): one compilation serves members
    of any dropout rates.

    Args:
      loss_fn: ``(params, batch) -> (loss, aux)`` of one member's batch.
      optimizer: ``adamw``, ``adam`` or ``sgd``.
      betas: Adam's ``(b1, b2)``.
      grad_clip: global-norm clipping per member; ``None``: none.
      shared_batch: every member reads the same ``batch`` (no member axis), so
        the work on it before the first adapter is done once for all.

    Returns:
      ``fused_step`` (jit-compiled; ``fused_step.cache_size()`` counts its
      compilations). ``batch`` leaves are ``(K, ...)`` (``shared_batch``: as one
      member's), ``hyper`` a :class:`Hyper` (see :func:`hyper`); the metrics
      ``loss`` and ``grad_norm`` are ``(K,)``.
    """
    tx = _adam(optimizer, betas)
    traces = []

    def one(t, adam, key, failed, rank, scale, lr, wd, keep, frozen, step, batch):
        step_key = jax.random.fold_in(key, step)

        def objective(t):
            params = _with_dropout(member_params(t, frozen, rank, scale), keep, step_key)
            return loss_fn(params, batch)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(t)
        grad_norm = optax.global_norm(grads)
        if grad_clip:
            grads, _ = optax.clip_by_global_norm(grad_clip).update(grads, optax.EmptyState())
        updates, new_adam = tx.update(grads, adam, t)
        if optimizer == "adamw":
            updates = jax.tree.map(lambda u, p: u + wd * p, updates, t)
        updates = mask_factors(jax.tree.map(lambda u: u * -lr, updates), rank)
        new_t = optax.apply_updates(t, updates)
        ok = (failed == 0) & jnp.isfinite(loss)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        failed = jnp.where((failed == 0) & ~ok, step + 1, failed)
        return keep(new_t, t), keep(new_adam, adam), failed, {"loss": loss, "grad_norm": grad_norm, **aux}

    def update(trainable, opt_state, frozen, keys, step, hyper, batch):
        traces.append(None)
        adam, failed = opt_state
        t, adam, failed, metrics = jax.vmap(one, in_axes=(0,) * 9 + (None, None, None if shared_batch else 0))(
            trainable, adam, keys, failed, hyper.ranks, hyper.scales, hyper.lr, hyper.weight_decay, hyper.keep, frozen,
            step, batch)
        return t, (adam, failed), step + 1, metrics

    update.__name__ = update.__qualname__ = "fused_train_step"  # its name in JAX's compilation log
    jitted = jax.jit(update, donate_argnums=(0, 1))

    def fused_step(state: TrainState, hyper: Hyper, batch) -> tuple[TrainState, dict]:
        t, opt_state, step, metrics = jitted(state.trainable, state.opt_state, state.frozen, state.key, state.step,
                                             hyper, batch)
        return state._replace(step=step, trainable=t, opt_state=opt_state), metrics

    fused_step.jitted = jitted
    fused_step.cache_size = lambda: len(traces)
    return fused_step


def make_fused_eval(loss_fn: Callable[[PyTree, Any], tuple[jax.Array, dict]]):
    """Build a jit-compiled ``eval(trainable, frozen, ranks, scales, batch) -> metrics`` of every member (no dropout).

    ``batch`` is shared by the members (unmapped); the metrics are ``(K,)``.
    """

    @jax.jit
    def fused_eval(trainable, frozen, ranks, scales, batch):
        def one(t, rank, scale):
            loss, aux = loss_fn(member_params(t, frozen, rank, scale), batch)
            return {"loss": loss, **aux}

        return jax.vmap(one)(trainable, ranks, scales)

    return fused_eval


def side_by_side(base: PyTree, specs: Sequence[tuple[str, float]]) -> Members:
    """Load adapter folders (``(folder, weight)`` as ``lora-jax generate --adapter`` gives them) as members.

    Raises:
      GenerateError: an adapter is given a weight other than 1 (each answers as it is).
      LoraError: the adapters target different weights (see :func:`stack`).
    """
    from lora_jax import adapters
    from lora_jax.errors import GenerateError

    if not specs:
        raise GenerateError("--side-by-side compares adapters: give two or more --adapter DIR")
    weighted = [f"{folder}:{w:g}" for folder, w in specs if w != 1.0]
    if weighted:
        raise GenerateError(f"--side-by-side answers with each adapter as it is; drop the weights of {weighted}")
    return stack([adapters.load(folder, base) for folder, _ in specs])
