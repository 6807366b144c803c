"""Sweep expansion: a ``sweep:`` block's axes -> named, validated, de-duplicated runs.

The runs are the grid of all combinations (``sweep_mode: zip`` pairs the lists
instead). Axes that do not apply to a run's method (see
:data:`lora_jax.config.IGNORED_BY_METHOD`) are dropped from that run, and runs
that then coincide are kept once. Run names are stable and filesystem-safe.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lora_jax.config.dicts import check_keys, config_hash, from_dict, relevant
from lora_jax.config.fields import show
from lora_jax.config.schema import (
    LEAVES,
    SECTIONS,
    SWEEP_CHECKS,
    SWEEP_DEFAULTS,
    SWEEP_KEYS,
    SWEEP_OPTIONS,
    ExperimentConfig,
    key_hint,
)
from lora_jax.errors import ConfigError

_LABELS = {"seed": "s", "lora.rank": "r", "lora.alpha": "alpha", "lora.dropout": "drop", "optim.lr": "lr",
           "quant.block_size": "bs", "train.steps": "steps", "train.batch_size": "bsz", "task.max_len": "len",
           "method": "", "quant.format": "", "lora.init": "", "optim.name": "", "optim.schedule": "",
           "model.dtype": ""}  # fmt: skip


def _token(label: str, value: Any, short: bool) -> str:
    if isinstance(value, bool):
        return f"{label}-{'on' if value else 'off'}"
    if isinstance(value, float):
        text = f"{value:g}" if float(f"{value:g}") == value else repr(value)
    else:
        text = "none" if value is None else str(value)
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")
    if safe != text or len(safe) > 32:
        safe = f"{safe[:16]}-{hashlib.sha256(text.encode()).hexdigest()[:6]}".strip("-")
    sep = "" if not label or (short and isinstance(value, (int, float))) else "-"
    return f"{label}{sep}{safe}"


def _labels(axes: Sequence[str]) -> dict[str, tuple[str, bool]]:
    tails = [a.rsplit(".", 1)[-1] for a in axes]
    out = {}
    for axis, tail in zip(axes, tails, strict=True):
        if axis in _LABELS:
            out[axis] = (_LABELS[axis], True)
        else:
            out[axis] = (tail if tails.count(tail) == 1 else axis.replace(".", "-"), False)
    return out


def _run_name(method: str, assignment: Mapping[str, Any], labels: Mapping[str, tuple[str, bool]]) -> str:
    parts = [method] + [_token(labels[k][0], v, labels[k][1]) for k, v in assignment.items() if k != "method"]
    return "_".join(parts)


def _with(raw: Mapping[str, Any], assignment: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items() if k not in SWEEP_KEYS}
    for key, value in assignment.items():
        section, _, leaf = key.rpartition(".")
        if section:
            out[section] = {**(out.get(section) or {}), leaf: value}
        else:
            out[key] = value
    return out


def _axes(raw: Mapping[str, Any]) -> tuple[dict[str, list[Any]], str]:
    sweep = raw.get("sweep") or {}
    mode = raw.get("sweep_mode", "grid")
    if mode not in ("grid", "zip"):
        raise ConfigError(f"sweep_mode: unknown value {mode!r}; choose one of grid, zip")
    if not isinstance(sweep, Mapping):
        raise ConfigError(f"sweep: expected a mapping of key paths to lists (lora.rank: [1, 4]), got {show(sweep)}")
    errors = [f"sweep.{k}: expected {SWEEP_OPTIONS[k].__name__}, got {show(v)}" for k, v in sweep.items()
              if k in SWEEP_OPTIONS and not isinstance(v, SWEEP_OPTIONS[k])]
    errors += [f"sweep.{k}: {m}" for k, v in sweep.items() if k in SWEEP_CHECKS and isinstance(v, SWEEP_OPTIONS[k])
               and (m := SWEEP_CHECKS[k](v))]
    sweep = {k: v for k, v in sweep.items() if k not in SWEEP_OPTIONS}
    for axis, values in sweep.items():
        if axis not in LEAVES or axis == "name":
            where = "a section; list a key inside it, e.g. lora.rank" if axis in SECTIONS else "unknown key"
            errors.append(f"sweep.{axis}: {where}{key_hint(str(axis), [k for k in LEAVES if k != 'name'])}")
        elif not isinstance(values, list) or not values:
            errors.append(f"sweep.{axis}: expected a non-empty list of values, got {show(values)}")
        elif mode == "grid" and len({repr(v) for v in values}) < len(values):
            # In a grid a repeated value only repeats runs; in zip mode the
            # positions pair up with the other axes, so repeats are meaningful.
            errors.append(f"sweep.{axis}: a value is listed twice ({values!r})")
    if not errors and mode == "zip" and len({len(v) for v in sweep.values()}) > 1:
        lengths = ", ".join(f"{k}: {len(v)}" for k, v in sweep.items())
        errors.append(f"sweep: sweep_mode zip needs lists of one length, got {lengths}")
    if errors:
        raise ConfigError(errors)
    return dict(sweep), mode


def sweep_options(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a config dict's ``sweep:`` block (:data:`SWEEP_OPTIONS`), defaults filled in.

    Examples:
      >>> sweep_options({"sweep": {"lora.rank": [1, 4], "fused": True}})
      {'fused': True, 'fused_batches': 'own', 'rank_buckets': ()}
    """
    sweep = raw.get("sweep")
    sweep = sweep if isinstance(sweep, Mapping) else {}
    return {k: sweep.get(k, SWEEP_DEFAULTS[k]) for k in SWEEP_OPTIONS}


def expand_sweep(raw: Mapping[str, Any]) -> list[tuple[str, ExperimentConfig]]:
    """Expand a config dict's ``sweep:`` block into named, validated runs.

    The runs are the grid of all axis values (first axis slowest), or the
    axes zipped with ``sweep_mode: zip``. A run does not apply the axes its
    method ignores (:data:`IGNORED_BY_METHOD`), and of runs whose resolved
    configs coincide only the first is kept.

    Args:
      raw: a config dict as read from YAML, with an optional ``sweep:`` block.

    Returns:
      ``[(run_name, config)]`` in sweep order; names are unique, stable and
      filesystem-safe: the method, then one token per applied axis (``lora_r8_s0``).
      A config without a sweep gives one run named after its method.

    Raises:
      ConfigError: a bad axis, or a run that does not validate (the message
        names the run's axis values).

    Examples:
      >>> runs = expand_sweep({"method": "qlora", "sweep": {"quant.format": ["nf4", "int4"], "seed": [0, 1]}})
      >>> [name for name, _ in runs]
      ['qlora_nf4_s0', 'qlora_nf4_s1', 'qlora_int4_s0', 'qlora_int4_s1']
      >>> expand_sweep({"sweep": {"lora.rank": [4, 0]}})
      Traceback (most recent call last):
      ...
      lora_jax.errors.ConfigError: sweep run lora.rank=0: lora.rank: must be >= 1 (got 0)
    """
    check_keys(raw, allow_sweep=True)
    sweep, mode = _axes(raw)
    names = list(sweep)
    points = zip(*sweep.values(), strict=True) if mode == "zip" and sweep else itertools.product(*sweep.values())
    labels = _labels(names)
    runs: list[tuple[str, ExperimentConfig]] = []
    seen_hashes: set[str] = set()
    for values in points:
        assignment = dict(zip(names, values, strict=True))
        try:
            full = from_dict(_with(raw, assignment))
        except ConfigError as e:
            if not assignment:  # no sweep block: the config itself is wrong
                raise
            point = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in assignment.items())
            raise e.within(f"sweep run {point}") from None
        applied = {k: v for k, v in assignment.items() if relevant(k, full.method)}
        cfg = full if len(applied) == len(assignment) else from_dict(_with(raw, applied))
        h = config_hash(cfg)
        if h in seen_hashes:
            continue
        seen_hashes.add(h)
        name = _run_name(cfg.method, applied, labels)
        if any(name == n for n, _ in runs):
            name = f"{name}_{h[:8]}"
        runs.append((name, cfg))
    return runs
