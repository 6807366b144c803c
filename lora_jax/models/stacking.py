"""Stacked decoder layers: one tree of arrays with a leading layer axis, for ``jax.lax.scan``.

The built-in decoders keep their layers as a list, ``params["layers"][i]``
(paths ``layers/3/attn/q_proj/kernel``). :func:`stack_layers` turns the list
into one dict of the same keys whose every array gains a leading axis of
length ``L`` (paths ``layers/attn/q_proj/kernel``, shape ``(L, d_in, d_out)``);
:func:`unstack_layers` turns it back. LoRA nodes and quantized leaves are
stacked through their children: a LoRA node's ``lora_a`` becomes
``(L, d_in, r)`` and ``lora_b`` ``(L, r, d_out)``; a ``QTensor``'s codes and
scales gain the axis and its static fields (format, block size, per-layer
shape) stay as they were. Every layer must therefore hold the same kinds of
leaves with the same shapes and static fields (the same rank, scale, format);
:func:`stack_layers` names the first layer and path where they differ.

The model functions of :mod:`lora_jax.models.llama` read either layout: a
stacked ``layers`` runs under ``jax.lax.scan`` (one compiled layer instead of
``L``), a list runs unrolled, with the same numbers. LoRA rules and adapter
files use the unrolled paths: initialize adapters (and quantize) on the
unrolled tree and stack after (:func:`lora_jax.lora.init` refuses a stacked
kernel unless its rule says ``stacked_axes=1``). The KV-cache path
(generation) runs unrolled; :func:`lora_jax.generate.generate` unstacks first.

Stacking copies every layer's weights once (the list and the stack are both
alive while it runs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import LoraError

PyTree = Any

LAYERS = "layers"
"""The key under which the built-in decoders keep their layers."""


def is_stacked(params: PyTree) -> bool:
    """True when ``params["layers"]`` is one stacked tree (a dict), not a list of layers.

    Examples:
      >>> is_stacked({"layers": [{"w": 1}]}), is_stacked({"layers": {"w": 1}})
      (False, True)
    """
    return isinstance(params, Mapping) and isinstance(params.get(LAYERS), Mapping)


def n_layers(params: PyTree) -> int:
    """The number of layers of a stacked or unrolled tree."""
    layers = params[LAYERS]
    if not is_stacked(params):
        return len(layers)
    return int(np.shape(jax.tree.leaves(layers)[0])[0])


def _describe(x: Any) -> str:
    """What must agree between layers for a leaf to stack: its kind, static fields and shapes."""
    if _lora.is_lora(x):
        inner = _describe(x.base)
        return (f"LoraWeight(rank={x.rank}, scale={x.scale:g}, in_ndim={x.in_ndim}, dropout={x.dropout:g}, "
                f"base={inner})")
    if _lora.is_node(x):  # a quantized leaf
        leaves, treedef = jax.tree.flatten(x)
        return f"{x!r} {[tuple(np.shape(c)) for c in leaves]} {treedef}"
    return f"array {tuple(np.shape(x))} {getattr(x, 'dtype', type(x).__name__)}"


def _first_difference(layers: list[PyTree]) -> str | None:
    ref = dict(_paths.leaves_with_paths(layers[0], is_leaf=_lora.is_node))
    for i, layer in enumerate(layers[1:], 1):
        mine = dict(_paths.leaves_with_paths(layer, is_leaf=_lora.is_node))
        for path in list(ref) + [p for p in mine if p not in ref]:
            a = _describe(ref[path]) if path in ref else "absent"
            b = _describe(mine[path]) if path in mine else "absent"
            if a != b:
                return f"layer {i} {path}: {b}; layer 0 {path}: {a}"
        if jax.tree.structure(layer, is_leaf=_lora.is_node) != jax.tree.structure(layers[0], is_leaf=_lora.is_node):
            return f"layer {i} has another tree structure than layer 0"
    return None


def stack_layers(params: PyTree) -> PyTree:
    """Return ``params`` with the list ``params["layers"]`` stacked on a leading layer axis.

    A tree that is stacked already is returned as it is.

    Raises:
      LoraError: two layers differ in the kinds, shapes or static fields of
        their leaves (e.g. adapters of different ranks, or on some layers
        only): the message names the first layer and path that differs.

    Examples:
      >>> import jax, lora_jax
      >>> from lora_jax.models import llama
      >>> cfg = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64)
      >>> p = lora_jax.lora.init(jax.random.key(1), llama.init(jax.random.key(0), cfg),
      ...                        [lora_jax.LoraRule(pattern=r"layers/\\d+/attn/q_proj/kernel", rank=4)])
      >>> s = stack_layers(p)
      >>> node = s["layers"]["attn"]["q_proj"]["kernel"]
      >>> node.base.shape, node.lora_a.shape, node.lora_b.shape
      ((3, 32, 32), (3, 32, 4), (3, 4, 32))
      >>> jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), unstack_layers(s), p))
      True
    """
    if is_stacked(params):
        return params
    layers = list(params[LAYERS])
    if not layers:
        raise LoraError("stack_layers: params['layers'] is empty; there is nothing to stack")
    diff = _first_difference(layers)
    if diff is not None:
        raise LoraError(
            f"stack_layers: the layers differ, so they cannot share one stacked tree: {diff}. Every layer "
            "needs the same leaves (adapters of one rank and scale on the same weights of every layer, one "
            "quantization format); run such a model unrolled (model.scan_layers: false)."
        )
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, LAYERS: stacked}


def unstack_layers(params: PyTree) -> PyTree:
    """Return ``params`` with a stacked ``params["layers"]`` split into a list of per-layer trees.

    The inverse of :func:`stack_layers`; a tree with a list of layers is returned as it is.
    """
    if not is_stacked(params):
        return params
    layers = params[LAYERS]
    return {**params, LAYERS: [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n_layers(params))]}


def per_layer_dropout_keys(layers: PyTree, n: int) -> PyTree:
    """Give every stacked LoRA node with a dropout key ``n`` keys, one per layer (split from its key).

    :func:`lora_jax.lora.with_dropout_keys` gives a node one key; under
    ``lax.scan`` each layer's slice then needs its own, or every layer would
    drop the same positions.
    """

    def split(x):
        if _lora.is_lora(x) and x.dropout_key is not None and np.ndim(x.dropout_key) == 0:
            return dataclasses.replace(x, dropout_key=jax.random.split(x.dropout_key, n))
        return x

    return jax.tree.map(split, layers, is_leaf=_lora.is_node)
