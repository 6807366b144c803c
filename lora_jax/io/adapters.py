"""lora-jax adapter folders: :func:`save_adapter`, :func:`load_adapter`, and :func:`load` for either format.

An adapter folder holds the A and B factors alone in ``adapter.safetensors``
(keys: our ``/``-joined paths, e.g. ``layers/0/attn/q_proj/kernel/lora_a``)
and their description in ``lora_jax_adapter.json``: per path the base shape,
rank, scale, alpha, rsLoRA flag, in_ndim and dropout; the rules; the base
model id and :func:`~lora_jax.io.hashing.base_hash`; the lora-jax version; and
a SHA-256 of the tensors file, which detects a truncated file or a torn pair.
Both files are written atomically. :func:`load` reads our folders and PEFT
folders (:mod:`lora_jax.io.peft`) alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import BaseMismatchError, CheckpointError, LoraError
from lora_jax.io import hashing as _hashing
from lora_jax.io import peft as _peft
from lora_jax.io.factors import base_leaves, check_factors, no_such_path
from lora_jax.io.files import (
    CORRUPTED,
    atomic_write,
    json_bytes,
    read_json,
    read_safetensors,
    safetensors_bytes,
    sha256,
    version,
)
from lora_jax.methods import dora as _dora
from lora_jax.methods import select as _select
from lora_jax.models import stacking as _stacking

PyTree = Any
PathLike = str | os.PathLike

ADAPTER_FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
ADAPTER_CONFIG = "lora_jax_adapter.json"
ADAPTER_TENSORS = "adapter.safetensors"


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
      base_hash: :func:`~lora_jax.io.hashing.base_hash` of the base (recorded; checked by
        ``load_adapter(..., check_base=True)``).
      rules: the :class:`~lora_jax.lora.LoraRule` s used (recorded, and the
        source of each path's alpha and rsLoRA flag).

    Returns:
      The folder.

    Raises:
      LoraError: ``params`` holds no LoRA weight, or ``rules`` disagree with
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
    params = _stacking.unstack_layers(params)  # files hold per-layer paths whichever layout trained
    nodes = _lora.nodes(params)
    if not nodes:
        raise LoraError("save_adapter: params hold no LoRA weight; call lora_jax.lora.init(key, params, rules) first")
    assigned = _paths.assign_rules(params, list(rules), is_leaf=_lora.is_node, what="LoRA rule") if rules else {}
    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    _select.check_exportable(params, "a lora-jax adapter folder", holds=("dora",))  # VeRA: to_plain_lora first
    for path, n in nodes:
        a, b = np.asarray(n.lora_a), np.asarray(n.lora_b)
        rule = assigned.get(path)
        if rule is not None:
            if not math.isclose(rule.scale, n.scale, rel_tol=1e-12):
                raise LoraError(f"save_adapter: {rule!r} gives scale {rule.scale:g} but {path!r} has {n.scale:g}")
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
        if getattr(n, "lora_magnitude", None) is not None:  # DoRA (lora_jax.methods.dora)
            tensors[f"{path}/lora_magnitude"], entries[path]["method"] = np.asarray(n.lora_magnitude), "dora"
    data = safetensors_bytes(tensors)
    config = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_jax_version": version(),
        "base_model_id": base_model_id,
        "base_hash": base_hash,
        "tensors_file": ADAPTER_TENSORS,
        "tensors_sha256": sha256(data),
        "rules": [_rule_record(r) for r in rules] if rules else None,
        "adapters": entries,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / ADAPTER_TENSORS, data)
    atomic_write(directory / ADAPTER_CONFIG, json_bytes(config))
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
    if not file.is_file() and (directory / _peft.PEFT_CONFIG).is_file():
        raise FileNotFoundError(f"{file}: missing; this is a PEFT adapter folder, read it with import_peft")
    config = read_json(file, f"{ADAPTER_CONFIG} (the adapter description written by save_adapter)", hint=CORRUPTED)
    if config.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{file}: not a lora-jax adapter (format={config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format version {config['format_version']} (lora-jax {config.get('lora_jax_version')}); "
            f"this lora-jax {version()} reads up to {FORMAT_VERSION}; upgrade lora-jax"
        )
    if not isinstance(config.get("adapters"), dict) or not config["adapters"]:
        raise CheckpointError(f"{file}: no 'adapters' entries")
    return config


def _check_scale(file: Path, path: str, e: dict) -> None:
    """The recorded scale must be finite and agree with the recorded alpha and rank (alpha/r, or alpha/sqrt(r))."""
    scale, rank, alpha = e["scale"], e["rank"], e.get("alpha")
    if not isinstance(scale, int | float) or not math.isfinite(scale):
        raise CheckpointError(f"{file}: {path!r}: scale is {scale!r}; it must be a finite number")
    if isinstance(alpha, int | float) and isinstance(rank, int) and rank > 0:
        expected = alpha / (math.sqrt(rank) if e.get("rslora") else rank)
        if not math.isclose(scale, expected, rel_tol=1e-6):
            raise CheckpointError(
                f"{file}: {path!r}: scale {scale:g} disagrees with alpha {alpha:g} and rank {rank} "
                f"(expected {expected:g}{' with rslora' if e.get('rslora') else ''}); the file was edited or "
                "corrupted: fix scale or alpha, or save the adapter again"
            )


def load_adapter(directory: PathLike, base_params: PyTree, *, check_base: bool = False) -> PyTree:
    """Rebuild the LoRA weights saved by :func:`save_adapter` on ``base_params``.

    Args:
      directory: the adapter folder.
      base_params: the base tree (adapters already in it are replaced: their
        base weights are used, which makes switching adapters cheap).
      check_base: refuse a base whose :func:`~lora_jax.io.hashing.base_hash` differs from the one
        recorded (off by default: an adapter trained on a float base may be
        applied to its quantized version).

    Returns:
      ``base_params`` with the recorded paths as :class:`~lora_jax.lora.LoraWeight` s
      (the other leaves are the same objects).

    Raises:
      FileNotFoundError: a file is missing.
      CheckpointError: a file is truncated or corrupted, the pair is torn, a
        recorded scale is not finite or disagrees with its alpha and rank, or a
        path or shape does not fit the base (the first one is named).
      BaseMismatchError: ``check_base`` and another base.

    A stacked base (:func:`lora_jax.models.stacking.stack_layers`) gets the
    adapters of the per-layer paths the file holds and comes back stacked.
    """
    if _stacking.is_stacked(base_params):
        unrolled = load_adapter(directory, _stacking.unstack_layers(base_params), check_base=check_base)
        return _stacking.stack_layers(unrolled)
    directory = Path(directory)
    config = read_adapter_config(directory)
    file = directory / ADAPTER_TENSORS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing adapter tensors (listed in {ADAPTER_CONFIG})")
    data = file.read_bytes()
    if sha256(data) != config.get("tensors_sha256"):
        raise CheckpointError(
            f"{file}: its content does not match the hash in {ADAPTER_CONFIG}; it is truncated, corrupted, or "
            "from another save; save the adapter again"
        )
    tensors = read_safetensors(file, data)
    leaves, treedef = base_leaves(base_params)
    if check_base and config.get("base_hash"):
        have = _hashing.base_hash(base_params)
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
            raise no_such_path(directory / ADAPTER_CONFIG, path, leaves)
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
        check_factors(file, path, base, a, b, int(e["in_ndim"]))
        if a.shape[1] != e["rank"]:
            raise CheckpointError(f"{file}: {path!r}: A has rank {a.shape[1]}, {ADAPTER_CONFIG} says {e['rank']}")
        _check_scale(directory / ADAPTER_CONFIG, path, e)
        new[path] = _lora.LoraWeight(
            base, jnp.asarray(a), jnp.asarray(b), float(e["scale"]), int(e["in_ndim"]), float(e.get("dropout", 0.0))
        )
        if e.get("method") == "dora":
            described.add(f"{path}/lora_magnitude")
            m = tensors.get(f"{path}/lora_magnitude")
            new[path] = _dora.from_peft(new[path], m, True, f"{file}: {path!r} (method dora)")
    unknown = sorted(set(tensors) - described)
    if unknown:
        raise CheckpointError(f"{file}: tensors not described in {ADAPTER_CONFIG}: {', '.join(unknown[:6])}")
    return treedef.unflatten([new.get(p, x) for p, x in leaves])


def load(directory: PathLike, base_params: PyTree, *, model_kind: str | None = None) -> PyTree:
    """Load an adapter folder of either format onto ``base_params``.

    Args:
      directory: a folder from :func:`save_adapter` (``lora_jax_adapter.json``)
        or a PEFT folder (``adapter_config.json``; see :func:`lora_jax.io.peft.import_peft`).
      base_params: the base tree (adapters already in it are replaced); stacked layers stay stacked.
      model_kind: for PEFT folders, ``"llama"`` or ``"bert"`` (default: inferred).

    Returns:
      ``base_params`` with the adapter's LoRA weights.

    Raises:
      FileNotFoundError: the folder holds neither kind of adapter.
    """
    directory = Path(directory)
    if (directory / ADAPTER_CONFIG).is_file():
        return load_adapter(directory, base_params)
    if (directory / _peft.PEFT_CONFIG).is_file():
        return _peft.import_peft(directory, base_params, model_kind)  # stacked layers stay stacked there too
    raise FileNotFoundError(
        f"{directory}: not an adapter folder (no {ADAPTER_CONFIG} from save_adapter, no {_peft.PEFT_CONFIG} from PEFT)"
    )
