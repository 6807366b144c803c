"""The adapter audit: on one batch, check that the adapters really train and that swapping them does not recompile.

:func:`audit` (also ``lora_jax.lora.audit``) checks

1. every factor of every adapter node (A, B, DoRA's magnitude) is selected by
   the trainable filter, i.e. sits in the optimizer's mask;
2. B receives a non-zero gradient at step 0 (every stacked layer of it);
3. A receives a non-zero gradient at step 1, after one optimizer step: with
   ``B = 0`` at init A's step-0 gradient is zero by construction, and stays zero
   when B never moves (the bug class where a filter silently trains only A);
4. swapping in an adapter of another rank and alpha through the hot-swap path
   (:func:`lora_jax.adapters.align`) runs the same compiled forward (one trace).

``lora-jax plan CONFIG --audit`` runs it for every run of a config
(:func:`audit_config`).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax import lora
  >>> params = lora.init(jax.random.key(0), {"w": jnp.ones((4, 3))}, [lora.LoraRule(pattern="w", rank=2)])
  >>> loss = lambda p, x: jnp.sum((x @ p["w"]) ** 2)
  >>> audit(loss, params, jnp.ones((2, 4))).ok
  True
  >>> bad = audit(loss, params, jnp.ones((2, 4)), trainable=lambda path, x: path.endswith("lora_a"))
  >>> print(bad.problems[0])
  w/lora_b is not selected by the trainable filter: the optimizer never updates it
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.models import stacking as _stacking

__all__ = ["AuditReport", "audit", "audit_config"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """What :func:`audit` found: ``problems`` (one sentence each; empty when all is well) and what it checked."""

    problems: tuple[str, ...]
    n_adapters: int
    traces: int | None  # compilations of the forward over the two swapped adapters (1 is right)

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return not self.problems

    def __str__(self) -> str:
        head = f"audit of {self.n_adapters} adapters: " + ("ok" if self.ok else f"{len(self.problems)} problem(s)")
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def _zero_slices(g: Any) -> bool:
    """True when ``g`` (``(*lead, m, n)``) is all zero in some stacked slice (or in all of it)."""
    g = np.asarray(g)
    return bool(np.any(np.all(g.reshape(-1, *g.shape[-2:]) == 0, axis=(1, 2))))


def _other_adapter(params: PyTree, key: jax.Array) -> PyTree:
    """The same nodes with rank + 1 (where the matrix allows), twice the scale and random small factors."""
    flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=_lora.is_node)
    out = []
    for i, x in enumerate(flat):
        if _lora.is_lora(x):
            d_in, d_out = x.lora_a.shape[-2], x.lora_b.shape[-1]
            r = min(x.rank + 1, d_in, d_out)
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            a = 0.01 * jax.random.normal(ka, (*x.lora_a.shape[:-1], r), x.lora_a.dtype)
            b = 0.01 * jax.random.normal(kb, (*x.lora_b.shape[:-2], r, d_out), x.lora_b.dtype)
            x = dataclasses.replace(x, lora_a=a, lora_b=b, scale=2.0 * x.scale)
        out.append(x)
    return treedef.unflatten(out)


def audit(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
    *,
    trainable: _paths.Filter = _paths.is_trainable_leaf,
    tx: optax.GradientTransformation | None = None,
    hot_swap: bool = True,
    key: jax.Array | None = None,
) -> AuditReport:
    """Check on one batch that every adapter of ``params`` trains and that swapping adapters does not recompile.

    Args:
      loss_fn: ``(params, batch) -> loss`` or ``-> (loss, aux)``.
      params: adapted params at init (``B = 0``; trained ones work too).
      batch: one batch for ``loss_fn``.
      trainable: the filter the training uses (default: the adapter factors).
      tx: the optimizer of the one step between the two gradient checks (default Adam, lr 1e-3).
      hot_swap: also run check 4.
      key: PRNG key of the swapped-in adapter's factors.

    Returns:
      An :class:`AuditReport`; ``report.ok`` is False when a check failed, each problem named by path.
    """
    nodes = _lora.nodes(params)
    if not nodes:
        return AuditReport(("params hold no adapter node; call lora_jax.lora.init (or a method's init) first",), 0,
                           None)
    problems: list[str] = []
    for path, node in nodes:
        for name in _paths.FACTOR_NAMES:
            value = getattr(node, name, None)
            if value is not None and not trainable(f"{path}/{name}", value):
                problems.append(f"{path}/{name} is not selected by the trainable filter: the optimizer never "
                                "updates it")
    t, f = _paths.split(params, trainable)

    grad_fn = jax.jit(jax.grad(lambda t, f, batch: _scalar(loss_fn(_paths.combine(t, f), batch))))

    def grads(t):
        return dict(_paths.leaves_with_paths(grad_fn(t, f, batch)))

    g0 = grads(t)
    for path, _ in nodes:
        if f"{path}/lora_b" in g0 and _zero_slices(g0[f"{path}/lora_b"]):
            problems.append(f"{path}/lora_b gets a zero gradient at step 0: the adapter does not reach the loss")
        elif f"{path}/lora_b" not in g0 and not any(p.startswith(f"{path}/lora_b") for p in problems):
            problems.append(f"{path}/lora_b gets no gradient at step 0")
    tx = optax.adam(1e-3) if tx is None else tx
    step = jax.jit(lambda g, t: optax.apply_updates(t, tx.update(g, tx.init(t), t)[0]))
    g1 = grads(step(_tree_of(t, g0), t))
    for path, _ in nodes:
        if f"{path}/lora_a" in g1 and _zero_slices(g1[f"{path}/lora_a"]):
            problems.append(
                f"{path}/lora_a gets a zero gradient at step 1 (after one optimizer step): B never moved, so only A "
                "would train, and A's gradient stays zero; put lora_b in the trainable filter"
            )
    traces = None
    if hot_swap:
        from lora_jax import adapters

        count = [0]

        def forward(p):
            count[0] += 1
            return _scalar(loss_fn(p, batch))

        fwd = jax.jit(forward)
        other = _other_adapter(params, jax.random.key(0) if key is None else key)
        stacked = _stacking.is_stacked(params)  # align works on per-layer paths
        pair = [_stacking.unstack_layers(p) if stacked else p for p in (_lora.with_dropout_keys(params, None), other)]
        for p in adapters.align(pair):
            jax.block_until_ready(fwd(_stacking.stack_layers(p) if stacked else p))
        traces = count[0]
        if traces != 1:
            problems.append(f"swapping in an adapter of another rank and alpha (adapters.align) compiled the forward "
                            f"{traces} times instead of once")
    return AuditReport(tuple(problems), len(nodes), traces)


def _scalar(out: Any) -> jax.Array:
    """The loss of a loss function's output (``loss`` or ``(loss, aux)``, as :func:`lora_jax.train.make_train_step`)."""
    return out[0] if isinstance(out, tuple) else out


def _tree_of(t: PyTree, by_path: dict[str, Any]) -> PyTree:
    """The gradient tree of ``t``'s structure from gradients by path."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(t)
    return treedef.unflatten([by_path[_paths.path_str(p)] for p, _ in flat])


def audit_config(config_path: Any, overrides: Any = ()) -> list[tuple[str, AuditReport]]:
    """:func:`audit` for every adapter run of a config (``lora-jax plan --audit``), on the run's first train batch."""
    from lora_jax import config as _config
    from lora_jax import data as _data
    from lora_jax.runner import build as _build

    out = []
    for name, cfg in _config.load_sweep(config_path, overrides):
        if cfg.method not in ("lora", "qlora"):
            continue
        model = _build.load_model(cfg.model)
        ctx = _build.prepare(cfg, model)
        batch = _data.batch_at(ctx.train_data, 0, batch_size=cfg.train.batch_size, seed=cfg.seed)
        tx = _build.make_optimizer(cfg.optim, cfg.train.steps)
        out.append((name, audit(_build.loss_fn(model.config, cfg), ctx.params, batch, tx=tx)))
    return out
