"""PiSSA and OLoRA: the adapter starts as the principal part of ``W`` and the frozen base keeps the residual.

Both give plain :class:`~lora_jax.lora.LoraWeight` nodes (the forward pass,
gradients and optimizer are LoRA's) whose base is ``W_res = W - s * A @ B``, so
the model computes ``W`` at init. In our ``(d_in, d_out)`` layout, with PEFT's
definitions (``peft/tuners/lora/layer.py``) transposed:

- PiSSA: ``W = U S Vh``; ``A = U_r sqrt(S_r / s)``, ``B = sqrt(S_r / s) Vh_r``
  (``niter``: PEFT's ``pissa_niter_<n>``, a randomized SVD with ``n`` subspace iterations);
- OLoRA: ``W^T = Q R`` (QR of the torch-layout weight); ``A = R[:r]^T``, ``B = Q[:, :r]^T``.

With ``quant_rules`` the residual is quantized (QPiSSA). An adapter trained from
such an init is only valid on its residual base; :func:`to_plain_lora` converts
it, as PEFT's ``path_initial_model_for_weight_conversion`` does, into a plain LoRA
of rank ``2r`` for the untouched ``W``: ``A' = [A, A0]``, ``B' = [B; -B0]``, same scale.

Examples:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from lora_jax import lora
  >>> w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
  >>> p = init(jax.random.key(0), {"w": w}, [lora.LoraRule(pattern="w", rank=2)])
  >>> bool(jnp.allclose(lora.merge(p)["w"], w, atol=1e-5))
  True
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax import quant as _quant
from lora_jax.errors import LoraError
from lora_jax.models import stacking as _stacking

__all__ = ["METHODS", "factors", "init", "map_nodes", "randomized_svd", "to_plain_lora"]

PyTree = Any
METHODS = ("pissa", "olora")


def randomized_svd(key: jax.Array, w: jax.Array, rank: int, niter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top ``rank`` singular triplets of ``w`` by a randomized range finder (Halko et al.; torch's ``svd_lowrank``).

    Returns ``(U (m, rank), S (rank,), Vh (rank, n))``.
    """
    q, _ = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], rank), w.dtype))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ q)
    u, s, vh = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u, s, vh


def factors(key: jax.Array, w: jax.Array, rank: int, scale: float, method: str = "pissa",
            niter: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(A, B, W_res)`` of one ``(d_in, d_out)`` matrix, computed in float32 (``W_res`` in ``w``'s dtype).

    Examples:
      >>> import numpy as np
      >>> w = jnp.asarray(np.diag([3.0, 2.0, 1.0]), jnp.float32)
      >>> a, b, res = factors(jax.random.key(0), w, 1, 1.0)
      >>> np.round(np.abs(a @ b), 4).tolist(), np.round(res, 4).tolist()[0]
      ([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [0.0, 0.0, 0.0])
    """
    w32 = jnp.asarray(w, jnp.float32)
    if method == "pissa":
        if niter is None:
            u, s, vh = jnp.linalg.svd(w32, full_matrices=False)
            u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        else:
            u, s, vh = randomized_svd(key, w32, rank, niter)
        root = jnp.sqrt(s / scale)
        a, b = u * root, root[:, None] * vh
    elif method == "olora":
        q, r = jnp.linalg.qr(w32.T)  # PEFT's QR of the (out, in) weight
        a, b = r[:rank].T, q[:, :rank].T
    else:
        raise LoraError(f"pissa.factors: method must be one of {METHODS}, got {method!r}")
    res = w32 - scale * (a @ b)
    return a, b, res.astype(w.dtype)


def map_nodes(params: PyTree, fn) -> PyTree:
    """Apply ``fn(path, node) -> node`` to every LoRA node of ``params`` (other leaves unchanged)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_lora.is_node)
    return treedef.unflatten([fn(_paths.path_str(p), x) if _lora.is_lora(x) else x for p, x in flat])


def per_matrix(node: _lora.LoraWeight, fn) -> tuple[jax.Array, ...]:
    """Run ``fn(j, w (d_in, d_out)) -> arrays`` on each stacked slice of a node's dense base and stack the results."""
    a = node.lora_a
    lead, d_in, d_out = tuple(np.shape(a)[:-2]), int(np.shape(a)[-2]), int(np.shape(node.lora_b)[-1])
    w = _lora.dense(node.base).reshape(-1, d_in, d_out)
    outs = [fn(j, w[j]) for j in range(math.prod(lead))]
    return tuple(jnp.stack([o[i] for o in outs]).reshape(*lead, *np.shape(outs[0][i])) for i in range(len(outs[0])))


def init(
    key: jax.Array,
    params: PyTree,
    rules: Sequence[_lora.LoraRule],
    *,
    method: str = "pissa",
    niter: int | None = None,
    quant_rules: Sequence[_quant.QuantRule] | None = None,
) -> PyTree:
    """Adapt ``params`` (float weights) with PiSSA or OLoRA factors; quantize the residuals with ``quant_rules``.

    Args:
      key: PRNG key (the randomized SVD's draws; nothing else is random).
      params: the float base (a quantized leaf is refused: PEFT's PiSSA also needs the float weight).
      rules: :class:`~lora_jax.lora.LoraRule` s (rank, alpha / rsLoRA give the scale ``s``; ``init`` is ignored).
      method: ``"pissa"`` or ``"olora"``.
      niter: PiSSA only: subspace iterations of the randomized SVD; ``None``: the full SVD.
      quant_rules: quantize the residual bases (QPiSSA / QOLoRA).

    Raises:
      LoraError: an unknown method, ``niter`` with OLoRA, or a rule that matches a quantized leaf.
    """
    if method not in METHODS:
        raise LoraError(f"pissa.init: method must be one of {METHODS}, got {method!r}")
    if niter is not None and method != "pissa":
        raise LoraError(f"pissa.init: niter is an option of PiSSA's randomized SVD; method {method!r} takes none")
    adapted = _lora.init(key, params, rules)

    def move(path: str, node: _lora.LoraWeight) -> _lora.LoraWeight:
        if _lora.is_node(node.base):
            raise LoraError(
                f"{method}: {path!r} is quantized; {method} needs the float weight. Adapt the float params and pass "
                "quant_rules to quantize the residual (QPiSSA)"
            )
        k = jax.random.fold_in(key, zlib.crc32(path.encode()) % (2**31))  # the same draws in every process
        a, b, res = per_matrix(node, lambda j, w: factors(jax.random.fold_in(k, j), w, node.rank, node.scale,
                                                                  method, niter))
        return dataclasses.replace(node, base=res.reshape(node.base.shape), lora_a=a.astype(node.lora_a.dtype),
                                   lora_b=b.astype(node.lora_b.dtype))

    adapted = map_nodes(adapted, move)
    if not quant_rules:
        return adapted
    bases = _quant.quantize(jax.tree.map(lambda x: x.base if _lora.is_lora(x) else x, adapted, is_leaf=_lora.is_node),
                            quant_rules)
    return jax.tree.map(lambda x, q: dataclasses.replace(x, base=q) if _lora.is_lora(x) else q, adapted, bases,
                        is_leaf=_lora.is_node)


def to_plain_lora(trained: PyTree, initial: PyTree, base: PyTree | None = None) -> PyTree:
    """A plain LoRA of rank ``2r`` on the untouched base from an adapter trained after PiSSA / OLoRA / LoftQ init.

    ``W_res + s * A @ B = W + s * [A, A0] @ [B; -B0]`` since ``W_res = W - s * A0 @ B0``:
    PEFT's conversion (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``).

    Args:
      trained: the adapted params after training (or their ``trainable`` half).
      initial: the adapted params right after :func:`init` (their ``trainable`` half works).
      base: the untouched base params; the nodes get its leaves (``None``: keep the
        trained nodes' bases, for saving factors only).

    Raises:
      LoraError: the two trees disagree on where the adapters are or on their shapes.
    """
    trained, initial = _stacking.unstack_layers(trained), _stacking.unstack_layers(initial)
    before = dict(_lora.nodes(initial))
    by_path = dict(_paths.leaves_with_paths(_stacking.unstack_layers(base), is_leaf=_lora.is_node)) if base else {}

    def convert(path: str, node: _lora.LoraWeight) -> _lora.LoraWeight:
        n0 = before.get(path)
        if n0 is None or np.shape(n0.lora_a) != np.shape(node.lora_a) or np.shape(n0.lora_b) != np.shape(node.lora_b):
            raise LoraError(f"to_plain_lora: {path!r} has no initial adapter of the same shape in `initial`")
        a = jnp.concatenate([node.lora_a, n0.lora_a.astype(node.lora_a.dtype)], axis=-1)
        b = jnp.concatenate([node.lora_b, -n0.lora_b.astype(node.lora_b.dtype)], axis=-2)
        w = by_path.get(path, node.base)
        return dataclasses.replace(node, base=w, lora_a=a, lora_b=b)

    return map_nodes(trained, convert)
