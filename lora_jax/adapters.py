"""Adapter folders, and several adapters on one base: switch between them, combine them.

An adapter folder (:func:`save_adapter`, :func:`load_adapter`) holds the A and
B factors alone in ``adapter.safetensors`` (keys: our ``/``-joined paths, e.g.
``layers/0/attn/q_proj/kernel/lora_a``) and their description in
``lora_jax_adapter.json``: per path the base shape, rank, scale, alpha,
rsLoRA flag, in_ndim and dropout; the rules; the base model id and
:func:`~lora_jax.checkpoint.base_hash`; the lora-jax version; and a SHA-256 of
the tensors file, which detects a truncated file or a torn pair. Both files
are written atomically. :func:`load` reads our folders and PEFT folders alike.

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
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import checkpoint as _ckpt
from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.checkpoint import BaseMismatchError, CheckpointError
from lora_jax.checkpoint import base_hash as _base_hash

PyTree = Any
PathLike = str | os.PathLike

ADAPTER_FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
ADAPTER_CONFIG = "lora_jax_adapter.json"
ADAPTER_TENSORS = "adapter.safetensors"

# ----------------------------------------------------------------------------
# Adapter folders


def _rule_record(rule: _lora.LoraRule) -> dict:
    init = rule.init if isinstance(rule.init, str) else getattr(rule.init, "__name__", "custom")
    return {
        "pattern": rule.pattern,
        "rank": rule.rank,
        "alpha": rule.alpha,
        "dropout": rule.dropout,
        "init": init,
        "rslora": rule.rslora,
        "in_dims": rule.in_dims,
    }


def save_adapter(
    directory: PathLike,
    params: PyTree,
    *,
    base_model_id: str | None = None,
    base_hash: str | None = None,
    rules: Sequence[_lora.LoraRule] | None = None,
) -> Path:
    """Write the LoRA factors of ``params`` (A and B only) and their description to a folder.

    Files: ``adapter.safetensors`` (keys ``<path>/lora_a`` of shape
    ``(d_in, r)`` and ``<path>/lora_b`` of shape ``(r, d_out)``) and
    ``lora_jax_adapter.json``. Each is written atomically; the JSON, written
    last, records a hash of the tensors file so a torn pair is detected.

    Args:
      directory: the folder (created if needed).
      params: adapted params, or their ``trainable`` half.
      base_model_id: name of the base model (recorded).
      base_hash: :func:`base_hash` of the base (recorded; checked by
        ``load_adapter(..., check_base=True)``).
      rules: the :class:`~lora_jax.lora.LoraRule` s used (recorded, and the
        source of each path's alpha and rsLoRA flag).

    Returns:
      The folder.

    Raises:
      ValueError: ``params`` holds no LoRA weight, or ``rules`` disagree with
        a weight's scale.

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> base = {"w": jnp.ones((4, 3))}
      >>> p = _lora.init(jax.random.key(0), base, [_lora.LoraRule(pattern="w", rank=2, alpha=4)])
      >>> d = save_adapter(tempfile.mkdtemp(), p, base_model_id="toy")
      >>> sorted(f.name for f in d.iterdir())
      ['adapter.safetensors', 'lora_jax_adapter.json']
      >>> w = load_adapter(d, base)["w"]
      >>> w.rank, w.scale, w.base is base["w"]
      (2, 2.0, True)
    """
    nodes = _lora.nodes(params)
    if not nodes:
        raise ValueError("save_adapter: params hold no LoRA weight; call lora_jax.lora.init(key, params, rules) first")
    assigned = _paths.assign_rules(params, list(rules), is_leaf=_lora.is_node, what="LoRA rule") if rules else {}
    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    for path, n in nodes:
        a, b = np.asarray(n.lora_a), np.asarray(n.lora_b)
        rule = assigned.get(path)
        if rule is not None:
            if not math.isclose(rule.scale, n.scale, rel_tol=1e-12):
                raise ValueError(f"save_adapter: {rule!r} gives scale {rule.scale:g} but {path!r} has {n.scale:g}")
            alpha, rslora = float(rule.rank if rule.alpha is None else rule.alpha), rule.rslora
        else:
            alpha, rslora = float(n.scale) * n.rank, False
        entries[path] = {
            "shape": None if n.base is None else [int(d) for d in n.base.shape],
            "in_ndim": int(n.in_ndim),
            "rank": int(n.rank),
            "scale": float(n.scale),
            "alpha": alpha,
            "rslora": rslora,
            "dropout": float(n.dropout),
            "dtype": a.dtype.name,
        }
        tensors[f"{path}/lora_a"], tensors[f"{path}/lora_b"] = a, b
    data = _ckpt._safetensors_bytes(tensors)
    config = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_jax_version": _ckpt._version(),
        "base_model_id": base_model_id,
        "base_hash": base_hash,
        "tensors_file": ADAPTER_TENSORS,
        "tensors_sha256": _ckpt._sha256(data),
        "rules": [_rule_record(r) for r in rules] if rules else None,
        "adapters": entries,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _ckpt._atomic_write(directory / ADAPTER_TENSORS, data)
    _ckpt._atomic_write(directory / ADAPTER_CONFIG, _ckpt._json_bytes(config))
    return directory


def read_adapter_config(directory: PathLike) -> dict:
    """Return the parsed ``lora_jax_adapter.json`` of an adapter folder, checked for format.

    Raises:
      FileNotFoundError: no such folder or file.
      CheckpointError: not valid JSON, not a lora-jax adapter, or a newer format.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such adapter folder")
    file = directory / ADAPTER_CONFIG
    if not file.is_file() and (directory / _ckpt.PEFT_CONFIG).is_file():
        raise FileNotFoundError(f"{file}: missing; this is a PEFT adapter folder, read it with import_peft")
    config = _ckpt._read_json(file, f"{ADAPTER_CONFIG} (the adapter description written by save_adapter)")
    if config.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{file}: not a lora-jax adapter (format={config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format version {config['format_version']} (lora-jax {config.get('lora_jax_version')}); "
            f"this lora-jax {_ckpt._version()} reads up to {FORMAT_VERSION}; upgrade lora-jax"
        )
    if not isinstance(config.get("adapters"), dict) or not config["adapters"]:
        raise CheckpointError(f"{file}: no 'adapters' entries")
    return config


def load_adapter(directory: PathLike, base_params: PyTree, *, check_base: bool = False) -> PyTree:
    """Rebuild the LoRA weights saved by :func:`save_adapter` on ``base_params``.

    Args:
      directory: the adapter folder.
      base_params: the base tree (adapters already in it are replaced: their
        base weights are used, which makes switching adapters cheap).
      check_base: refuse a base whose :func:`base_hash` differs from the one
        recorded (off by default: an adapter trained on a float base may be
        applied to its quantized version).

    Returns:
      ``base_params`` with the recorded paths as :class:`~lora_jax.lora.LoraWeight` s
      (the other leaves are the same objects).

    Raises:
      FileNotFoundError: a file is missing.
      CheckpointError: a file is truncated or corrupted, the pair is torn,
        or a path or shape does not fit the base (the first one is named).
      BaseMismatchError: ``check_base`` and another base.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    file = directory / ADAPTER_TENSORS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing adapter tensors (listed in {ADAPTER_CONFIG})")
    data = file.read_bytes()
    if _ckpt._sha256(data) != config.get("tensors_sha256"):
        raise CheckpointError(
            f"{file}: its content does not match the hash in {ADAPTER_CONFIG}; it is truncated, corrupted, or "
            "from another save; save the adapter again"
        )
    tensors = _ckpt._read_safetensors(file, data)
    leaves, treedef = _ckpt._base_leaves(base_params)
    if check_base and config.get("base_hash"):
        have = _base_hash(base_params)
        if have != config["base_hash"]:
            raise BaseMismatchError(
                f"{directory}: adapter was trained on base {config.get('base_model_id')!r} "
                f"({config['base_hash'][:19]}) but base_params hash to {have[:19]}"
            )
    by_path = dict(leaves)
    described = set()
    new: dict[str, _lora.LoraWeight] = {}
    for path, e in config["adapters"].items():
        if not isinstance(e, dict) or not {"rank", "scale", "in_ndim"} <= set(e):
            raise CheckpointError(
                f"{directory / ADAPTER_CONFIG}: the entry for {path!r} lacks rank, scale or in_ndim; it is corrupted"
            )
        if path not in by_path:
            raise _ckpt._no_such_path(directory / ADAPTER_CONFIG, path, leaves)
        base = by_path[path]
        if e.get("shape") is not None and tuple(e["shape"]) != tuple(base.shape):
            raise CheckpointError(
                f"{directory / ADAPTER_CONFIG}: {path!r} was trained on a weight of shape {tuple(e['shape'])}, "
                f"the base has {tuple(base.shape)}"
            )
        names = (f"{path}/lora_a", f"{path}/lora_b")
        for name in names:
            if name not in tensors:
                raise CheckpointError(f"{file}: missing tensor {name!r} (described in {ADAPTER_CONFIG})")
        described.update(names)
        a, b = tensors[names[0]], tensors[names[1]]
        _ckpt._check_factors(file, path, base, a, b, int(e["in_ndim"]))
        if a.shape[1] != e["rank"]:
            raise CheckpointError(f"{file}: {path!r}: A has rank {a.shape[1]}, {ADAPTER_CONFIG} says {e['rank']}")
        new[path] = _lora.LoraWeight(
            base, jnp.asarray(a), jnp.asarray(b), float(e["scale"]), int(e["in_ndim"]), float(e.get("dropout", 0.0))
        )
    unknown = sorted(set(tensors) - described)
    if unknown:
        raise CheckpointError(f"{file}: tensors not described in {ADAPTER_CONFIG}: {', '.join(unknown[:6])}")
    return treedef.unflatten([new.get(p, x) for p, x in leaves])


def load(directory: PathLike, base_params: PyTree, *, model_kind: str | None = None) -> PyTree:
    """Load an adapter folder of either format onto ``base_params``.

    Args:
      directory: a folder from :func:`save_adapter` (``lora_jax_adapter.json``)
        or a PEFT folder (``adapter_config.json``; see :func:`lora_jax.checkpoint.import_peft`).
      base_params: the base tree (adapters already in it are replaced).
      model_kind: for PEFT folders, ``"llama"`` or ``"bert"`` (default: inferred).

    Returns:
      ``base_params`` with the adapter's LoRA weights.

    Raises:
      FileNotFoundError: the folder holds neither kind of adapter.
    """
    directory = Path(directory)
    if (directory / ADAPTER_CONFIG).is_file():
        return load_adapter(directory, base_params)
    if (directory / _ckpt.PEFT_CONFIG).is_file():
        return _ckpt.import_peft(directory, base_params, model_kind)
    raise FileNotFoundError(
        f"{directory}: not an adapter folder (no {ADAPTER_CONFIG} from save_adapter, no {_ckpt.PEFT_CONFIG} from PEFT)"
    )


# ----------------------------------------------------------------------------
# Several adapters on one base


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """Split a command-line adapter spec ``DIR[:WEIGHT]`` into ``(DIR, WEIGHT)`` (weight 1 by default).

    The text after the last ``:`` is the weight when it reads as a number;
    otherwise the whole spec is the folder (so ``C:\\\\adapters\\\\x`` stays a
    path). A folder whose name ends in ``:<number>`` needs an explicit weight:
    ``runs/a:3:1``.

    Raises:
      ValueError: an empty folder or weight, or a weight that is not finite.

    Examples:
      >>> parse_adapter_spec("runs/b/adapter:0.5")
      ('runs/b/adapter', 0.5)
      >>> parse_adapter_spec("runs/a/adapter")
      ('runs/a/adapter', 1.0)
      >>> parse_adapter_spec("x:-1e-1")
      ('x', -0.1)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"adapter spec must be 'DIR' or 'DIR:WEIGHT', got {spec!r}")
    head, sep, tail = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    if not tail.strip():
        raise ValueError(f"adapter spec {spec!r} has an empty weight after ':'; write DIR or DIR:WEIGHT, e.g. a:0.5")
    try:
        weight = float(tail)
    except ValueError:
        return spec, 1.0
    if not head:
        raise ValueError(f"adapter spec {spec!r} has no folder before ':'; write DIR:WEIGHT, e.g. a:0.5")
    if not math.isfinite(weight):
        raise ValueError(f"adapter spec {spec!r}: the weight must be finite, got {tail!r}")
    return head, weight


def _flat(adapters: Sequence[PyTree]) -> tuple[list[list[tuple[str, Any]]], Any]:
    """Flatten each tree down to LoRA/quantized nodes; all must share one set of paths."""
    if not adapters:
        raise ValueError("need at least one adapted params tree")
    flats, treedef = [], None
    for i, tree in enumerate(adapters):
        flat, td = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_lora.is_node)
        flat = [(_paths.path_str(p), x) for p, x in flat]
        if flats and [p for p, _ in flat] != [p for p, _ in flats[0]]:
            diff = next(
                (a, b)
                for (a, _), (b, _) in zip(flats[0] + [("<end>", 0)], flat + [("<end>", 0)], strict=False)
                if a != b
            )
            raise ValueError(f"adapter {i} is on another base tree: path {diff[1]!r} where adapter 0 has {diff[0]!r}")
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
            raise ValueError(
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
      ValueError: ``rank`` is smaller than the node's rank.

    Examples:
      >>> import jax.numpy as jnp
      >>> w = _lora.LoraWeight(jnp.zeros((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)))
      >>> pad_rank(w, 4).rank
      4
    """
    extra = rank - node.rank
    if extra < 0:
        raise ValueError(f"pad_rank: cannot pad a rank-{node.rank} adapter down to rank {rank}")
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
      ValueError: the trees are on different bases, adapt a weight with
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
        raise ValueError(f"align: rank={rank} is below the largest adapter rank {top}")
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
      ValueError: the numbers of adapters and weights differ, or the trees are
        on different bases.

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
        raise ValueError(f"combine: {n} adapters but {len(weights)} weights; give one weight per adapter")
    flats, treedef = _flat(adapters)
    leaves = []
    for j, (_, x) in enumerate(flats[0]):
        if not any(_lora.is_lora(f[j][1]) for f in flats):
            leaves.append(x)
            continue
        nodes = _column(flats, j)
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
      ValueError: no specs.

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> base = {"w": jnp.zeros((4, 3))}
      >>> p = _lora.init(jax.random.key(0), base, [_lora.LoraRule(pattern="w", rank=2)])
      >>> d = save_adapter(tempfile.mkdtemp(), p)
      >>> combine_adapters(base, [f"{d}:0.5", (d, 0.25)])["w"].rank
      4
    """
    if not specs:
        raise ValueError("combine_adapters: give at least one adapter folder, e.g. [('runs/a/adapter', 1.0)]")
    pairs = [parse_adapter_spec(s) if isinstance(s, str) else (s[0], float(s[1])) for s in specs]
    trees = [load(folder, base_params, model_kind=model_kind) for folder, _ in pairs]
    return combine(trees, [w for _, w in pairs])
