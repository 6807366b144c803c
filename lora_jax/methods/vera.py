"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by every layer, trained scaling vectors.

A :class:`VeraWeight` computes ``x @ W0 + lambda_b * ((lambda_d * (x @ A)) @ B)``
(PEFT's ``peft/tuners/vera/layer.py``), where ``A (d_in, r)`` and ``B (r, d_out)``
are slices of the shared ``vera_A (r, max_in)`` and ``vera_B (max_out, r)`` (torch
layout, PEFT's names), frozen, and only ``vera_lambda_d (r,)`` and
``vera_lambda_b (d_out,)`` train. At init ``lambda_b = 0`` (the base model) and
``lambda_d = d_initial`` (0.1). VeRA has no ``alpha``: the scale is 1.

The node is a :class:`~lora_jax.lora.LoraWeight` whose ``lora_a`` / ``lora_b``
attributes hold the frozen slices, flattened under the keys ``vera_a`` /
``vera_b`` (so the default trainable filter leaves them frozen); merge folds in
``(A * lambda_d) @ B * lambda_b``. Each node keeps its own copy of its slices.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax import lora, paths
  >>> base = {"q": jnp.ones((8, 4)), "v": jnp.ones((6, 8))}
  >>> p = init(jax.random.key(0), base, [lora.LoraRule(pattern="q|v", rank=2)])
  >>> sorted(k for k, _ in paths.leaves_with_paths(paths.split(p)[0]))
  ['q/vera_lambda_b', 'q/vera_lambda_d', 'v/vera_lambda_b', 'v/vera_lambda_d']
  >>> p["q"].vera_lambda_d.tolist()
  [0.10000000149011612, 0.10000000149011612]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _kernels
from lora_jax import lora as _lora
from lora_jax.errors import LoraError
from lora_jax.methods.pissa import map_nodes

__all__ = [
    "VeraWeight", "export_peft", "from_shared", "import_peft", "init", "is_vera", "shared_projections", "to_plain_lora",
]

PyTree = Any


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class VeraWeight(_lora.LoraWeight):
    """A frozen weight with VeRA's update; ``lora_a`` / ``lora_b`` are the frozen shared slices.

    Attributes:
      vera_lambda_d: ``(r,)``, trained.
      vera_lambda_b: ``(d_out,)``, trained; zero at init.

    Raises (on construction):
      LoraError: shapes that do not fit: A ``(d_in, r)``, B ``(r, d_out)``, lambda_d ``(r,)``, lambda_b ``(d_out,)``.
    """

    vera_lambda_d: Any = None
    vera_lambda_b: Any = None
    extra_children = ("vera_lambda_d", "vera_lambda_b")

    def __post_init__(self):
        d_in, d_out = self.shape[-2], self.shape[-1]  # trailing axes: stacked layers lead
        r = np.shape(self.lora_a)[-1]
        want = {"A": (d_in, r), "B": (r, d_out), "lambda_d": (r,), "lambda_b": (d_out,)}
        got = {"A": np.shape(self.lora_a), "B": np.shape(self.lora_b), "lambda_d": np.shape(self.vera_lambda_d),
               "lambda_b": np.shape(self.vera_lambda_b)}
        if any(tuple(got[k])[len(got[k]) - len(want[k]):] != want[k] for k in want):
            raise LoraError(
                f"VeRA: shapes do not fit a base of shape {self.shape}: got "
                + ", ".join(f"{k} {tuple(v)}" for k, v in got.items())
                + "; expected " + ", ".join(f"{k} {v}" for k, v in want.items())
                + " (the shared vera_A must have at least d_in columns and vera_B at least d_out rows)"
            )

    def tree_flatten_with_keys(self):
        """As :class:`~lora_jax.lora.LoraWeight`'s, the frozen shared slices under the keys ``vera_a``, ``vera_b``."""
        children, aux = super().tree_flatten_with_keys()
        k = jax.tree_util.GetAttrKey
        renamed = {"lora_a": k("vera_a"), "lora_b": k("vera_b")}
        return tuple((renamed.get(key.name, key), x) for key, x in children), aux

    def delta(self, x_flat: jax.Array) -> jax.Array:
        """``lambda_b * ((lambda_d * (dropout(x) @ A)) @ B)`` for ``x_flat`` of shape ``(..., d_in)``."""
        dt = x_flat.dtype
        h = (self._adapter_input(x_flat) @ self.lora_a.astype(dt)) * self.vera_lambda_d.astype(dt)
        return (h @ self.lora_b.astype(dt)) * self.vera_lambda_b.astype(dt)

    def __rmatmul__(self, x):
        if _lora.is_node(self.base):  # a quantized base
            return x @ self.base + self.delta(x)
        return _kernels.matmul(x, self.base, custom_vjp=self.custom_vjp) + self.delta(x)

    def __getitem__(self, idx):
        raise LoraError("VeRA targets linear kernels; a row lookup (embedding) of a VeRA weight is not supported")

    @property
    def T(self):
        raise LoraError("a transposed VeRA weight (a tied output head) is not supported; target the kernels only")

    def delta_weight(self, shape: Sequence[int] | None = None) -> jax.Array:
        """The dense update ``(A * lambda_d) @ B * lambda_b`` (for merging and analysis)."""
        d = ((self.lora_a * self.vera_lambda_d) @ self.lora_b) * self.vera_lambda_b
        return d.reshape(self.shape if shape is None else tuple(shape))

    def __repr__(self) -> str:
        return f"VeraWeight(shape={self.shape}, rank={self.rank}, base={type(self.base).__name__})"


def is_vera(x: Any) -> bool:
    """True for a :class:`VeraWeight`."""
    return isinstance(x, VeraWeight)


def shared_projections(key: jax.Array, rank: int, max_in: int, max_out: int) -> tuple[jax.Array, jax.Array]:
    """Shared ``vera_A (rank, max_in)``, ``vera_B (max_out, rank)`` (torch layout), kaiming-uniform as in PEFT."""
    ka, kb = jax.random.split(key)
    bound_a, bound_b = math.sqrt(6.0 / max_in), math.sqrt(6.0 / rank)
    return (jax.random.uniform(ka, (rank, max_in), jnp.float32, -bound_a, bound_a),
            jax.random.uniform(kb, (max_out, rank), jnp.float32, -bound_b, bound_b))


def from_shared(node: _lora.LoraWeight, vera_a: Any, vera_b: Any, lambda_d: Any, lambda_b: Any) -> VeraWeight:
    """The VeRA node on ``node``'s base from the shared matrices (torch layout) and the two vectors."""
    d_in, d_out = node.shape[0], node.shape[-1]
    vera_a, vera_b = jnp.asarray(vera_a), jnp.asarray(vera_b)
    if vera_a.shape[1] < d_in or vera_b.shape[0] < d_out or vera_a.shape[0] != vera_b.shape[1]:
        raise LoraError(
            f"VeRA: shared vera_A {tuple(vera_a.shape)} / vera_B {tuple(vera_b.shape)} cannot serve a weight of shape "
            f"{node.shape}: vera_A needs >= {d_in} columns, vera_B >= {d_out} rows, and both the same rank"
        )
    lam_d, lam_b = jnp.asarray(lambda_d, jnp.float32), jnp.asarray(lambda_b, jnp.float32)
    return VeraWeight(node.base, vera_a[:, :d_in].T, vera_b[:d_out].T, 1.0, node.in_ndim, node.dropout,
                      vera_lambda_d=lam_d, vera_lambda_b=lam_b)


def init(key: jax.Array, params: PyTree, rules: Sequence[_lora.LoraRule], *, d_initial: float = 0.1) -> PyTree:
    """VeRA nodes on every weight ``rules`` match, sharing one ``vera_A`` / ``vera_B`` drawn from ``key``.

    Raises:
      LoraError: rules of different ranks (the matrices are shared), a rule with alpha, rsLoRA or in_dims != 1, or
        stacked params (init the unrolled params and stack after).
    """
    ranks = {r.rank for r in rules}
    if len(ranks) != 1:
        raise LoraError(f"VeRA shares one vera_A / vera_B between all layers, so every rule needs the same rank; "
                        f"got ranks {sorted(ranks)}")
    bad = [r for r in rules if r.alpha is not None or r.rslora or r.in_dims != 1 or r.stacked_axes]
    if bad:
        raise LoraError(f"VeRA takes no alpha, rslora, in_dims or stacked_axes (it has no scale): {bad[0]!r}")
    adapted = _lora.init(key, params, rules)
    nodes = _lora.nodes(adapted)
    if any(np.ndim(n.lora_a) != 2 for _, n in nodes):
        raise LoraError("VeRA: stacked params; init the unrolled params and stack after (stack_layers)")
    rank = ranks.pop()
    vera_a, vera_b = shared_projections(jax.random.fold_in(key, 0x7E7A), rank, max(n.shape[0] for _, n in nodes),
                                        max(n.shape[-1] for _, n in nodes))
    return map_nodes(adapted, lambda path, n: from_shared(n, vera_a, vera_b, jnp.full((rank,), d_initial),
                                                          jnp.zeros(n.shape[-1])))


def to_plain_lora(params: PyTree) -> PyTree:
    """Every VeRA node as the plain LoRA node it equals: ``A' = A * lambda_d``, ``B' = B * lambda_b``, scale 1."""

    def convert(path: str, n: Any) -> Any:
        if not is_vera(n):
            return n
        return _lora.LoraWeight(n.base, n.lora_a * n.vera_lambda_d, n.lora_b * n.vera_lambda_b[None, :], 1.0,
                                n.in_ndim, n.dropout, n.dropout_key, n.custom_vjp)

    return map_nodes(params, convert)


# ----------------------------------------------------------------------------
# PEFT's VeRA folders


def export_peft(directory: Any, params: PyTree, *, base_model_name_or_path: str, model_kind: str = "llama") -> Any:
    """Write the VeRA nodes of a built-in Llama or BERT model as a PEFT VeRA folder (``save_projection=True``).

    Raises:
      CheckpointError: no VeRA node, a node PEFT cannot name, or nodes that are not slices of one shared pair.
    """
    from pathlib import Path

    from lora_jax.errors import CheckpointError
    from lora_jax.io import peft as io_peft
    from lora_jax.io.files import atomic_write, json_bytes, safetensors_bytes

    nodes = [(p, n) for p, n in _lora.nodes(params) if is_vera(n)]
    if not nodes:
        raise CheckpointError("vera.export_peft: params hold no VeRA weight")
    wide = max((n for _, n in nodes), key=lambda n: n.shape[0])
    tall = max((n for _, n in nodes), key=lambda n: n.shape[-1])
    vera_a, vera_b = np.asarray(wide.lora_a).T, np.asarray(tall.lora_b).T
    tensors = {"base_model.vera_A": vera_a, "base_model.vera_B": vera_b}
    for path, n in nodes:
        name = io_peft.hf_module_name(path, model_kind)
        if name is None:
            raise CheckpointError(f"vera.export_peft: {path!r} has no {model_kind} module in PEFT's naming")
        if not (np.array_equal(vera_a[:, : n.shape[0]], np.asarray(n.lora_a).T)
                and np.array_equal(vera_b[: n.shape[-1]], np.asarray(n.lora_b).T)):
            raise CheckpointError(f"vera.export_peft: {path!r} does not hold slices of the shared vera_A / vera_B "
                                  "the other nodes hold (adapters of different VeRA inits mixed)")
        tensors[f"base_model.model.{name}.vera_lambda_d"] = np.asarray(n.vera_lambda_d)
        tensors[f"base_model.model.{name}.vera_lambda_b"] = np.asarray(n.vera_lambda_b)
    config = {
        "peft_type": "VERA", "task_type": "CAUSAL_LM" if model_kind == "llama" else "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model_name_or_path, "r": int(wide.rank),
        "target_modules": sorted(io_peft.hf_module_name(p, model_kind) for p, _ in nodes),
        "projection_prng_key": 0, "save_projection": True, "vera_dropout": float(nodes[0][1].dropout),
        "d_initial": 0.1, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "init_weights": True,
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }  # fmt: skip
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / io_peft.PEFT_TENSORS, safetensors_bytes(tensors))
    atomic_write(directory / io_peft.PEFT_CONFIG, json_bytes(config))
    return directory


def import_peft(directory: Any, base_params: PyTree, model_kind: str = "llama") -> PyTree:
    """Read a PEFT VeRA folder (saved with ``save_projection=True``) into VeRA nodes on ``base_params``.

    Raises:
      CheckpointError: not a VeRA folder, no saved projections, an unknown tensor or module.
      LoraError: shared matrices too small for a module's weight (the shapes are named).
    """
    import re
    from pathlib import Path

    from lora_jax.errors import CheckpointError
    from lora_jax.io import peft as io_peft
    from lora_jax.io.factors import base_leaves
    from lora_jax.io.files import CORRUPTED, read_json, read_safetensors

    directory = Path(directory)
    cfg_file = directory / io_peft.PEFT_CONFIG
    config = read_json(cfg_file, f"{io_peft.PEFT_CONFIG} (the PEFT adapter config)", hint=CORRUPTED)
    if config.get("peft_type") != "VERA":
        raise CheckpointError(f"{cfg_file}: peft_type={config.get('peft_type')!r}; vera.import_peft reads VERA only")
    tensors = read_safetensors(directory / io_peft.PEFT_TENSORS)
    if "base_model.vera_A" not in tensors or "base_model.vera_B" not in tensors:
        raise CheckpointError(f"{directory}: no base_model.vera_A / vera_B; save the adapter with save_projection=True")
    vectors: dict[str, dict[str, np.ndarray]] = {}
    for name, x in tensors.items():
        if name in ("base_model.vera_A", "base_model.vera_B"):
            continue
        m = re.fullmatch(r"(?:base_model\.model\.)?(?P<module>.+)\.vera_lambda_(?P<v>b|d)", name)
        if not m:
            raise CheckpointError(f"{directory / io_peft.PEFT_TENSORS}: tensor {name!r} is not a VeRA vector")
        vectors.setdefault(m.group("module"), {})[m.group("v")] = x
    leaves, treedef = base_leaves(base_params)
    by_path = dict(leaves)
    new = {}
    for module, v in vectors.items():
        path = io_peft.kernel_path(module, model_kind)
        if path is None or path not in by_path or set(v) != {"b", "d"}:
            raise CheckpointError(f"{directory}: module {module!r} has no weight in the {model_kind} model "
                                  "or lacks one of vera_lambda_b / vera_lambda_d")
        node = _lora.LoraWeight(by_path[path], None, None, 1.0, 1, float(config.get("vera_dropout") or 0.0))
        new[path] = from_shared(node, tensors["base_model.vera_A"], tensors["base_model.vera_B"], v["d"], v["b"])
    return treedef.unflatten([new.get(p, x) for p, x in leaves])
