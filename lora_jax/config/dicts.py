"""Plain data <-> :class:`ExperimentConfig`: key checks with "did you mean" hints, YAML dump, the hash.

:func:`from_dict` builds a validated config from nested mappings, :func:`to_dict`
and :func:`to_yaml` write every resolved key back, and :func:`config_hash`
identifies what can change a run's results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import yaml

from lora_jax.config.fields import show, type_hints
from lora_jax.config.schema import (
    IGNORED_BY_METHOD,
    LEAVES,
    RUNTIME_SECTIONS,
    SECTIONS,
    SWEEP_KEYS,
    TOP_KEYS,
    ExperimentConfig,
    key_hint,
)
from lora_jax.errors import ConfigError


def check_keys(raw: Mapping[str, Any], *, allow_sweep: bool) -> None:
    """Raise for unknown keys and non-mapping sections, with "did you mean" hints."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the top level must be a mapping of keys (method:, model:, ...), got {show(raw)}")
    known = [*TOP_KEYS, *SECTIONS, *LEAVES]
    errors = []
    for key, value in raw.items():
        key = str(key)
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                errors.append(f"{key}: expected a mapping of {key} settings, got {show(value)}")
                continue
            for sub in value:
                if sub not in type_hints(SECTIONS[key]) or sub == "section":
                    full = f"{key}.{sub}"
                    valid = ", ".join(f.name for f in dataclasses.fields(SECTIONS[key]))
                    errors.append(f"{full}: unknown key{key_hint(full, known)}; {key} takes: {valid}")
        elif key not in TOP_KEYS and not (allow_sweep and key in SWEEP_KEYS):
            if key in SWEEP_KEYS:
                errors.append(f"{key}: this config declares a sweep; expand it with expand_sweep / load_sweep")
            else:
                errors.append(
                    f"{key}: unknown key{key_hint(key, known)}; the top level takes: "
                    f"{', '.join([*TOP_KEYS, *SECTIONS, *SWEEP_KEYS])}"
                )
    if errors:
        raise ConfigError(errors)


def from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from plain data (no ``sweep:`` block).

    Args:
      raw: nested mappings as read from YAML; missing keys take their defaults.

    Returns:
      The validated config.

    Raises:
      ConfigError: every problem found, one per line.

    Examples:
      >>> from_dict({"lora": {"rnak": 4}})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax.errors.ConfigError: lora.rnak: unknown key (did you mean 'lora.rank'?); lora takes: rank, alpha, ...
    """
    check_keys(raw, allow_sweep=False)
    sections, errors = {}, []
    for name, cls in SECTIONS.items():
        try:
            sections[name] = cls(**(raw.get(name) or {}))
        except ConfigError as e:
            errors += e.errors
    top = {k: v for k, v in raw.items() if k in TOP_KEYS}
    if errors:
        try:  # report top-level problems too
            ExperimentConfig(**top)
        except ConfigError as e:
            errors = e.errors + errors
        raise ConfigError(errors)
    return ExperimentConfig(**top, **sections)


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Return ``cfg`` as plain nested dicts and lists (every key, resolved).

    Examples:
      >>> to_dict(ExperimentConfig())["optim"]["betas"]
      [0.9, 0.999]
    """

    def plain(x):
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: ExperimentConfig) -> str:
    """Return ``cfg`` as YAML that loads back to an equal config.

    Examples:
      >>> from lora_jax.config.schema import LoraConfig
      >>> cfg = ExperimentConfig(lora=LoraConfig(rank=16))
      >>> from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
      True
    """
    head = f"# resolved lora-jax config (config_hash {config_hash(cfg)[:12]})\n"
    return head + yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def relevant(key: str, method: str) -> bool:
    """Return whether ``method`` reads ``key`` (see :data:`IGNORED_BY_METHOD`, :data:`RUNTIME_SECTIONS`)."""
    if key.split(".", 1)[0] in RUNTIME_SECTIONS:
        return False
    return not any(key == p or key.startswith(p + ".") for p in IGNORED_BY_METHOD[method])


def _canonical(cfg: ExperimentConfig) -> dict[str, Any]:
    out = {}
    for path, value in _flatten(to_dict(cfg)).items():
        if path not in ("name", "output_dir") and relevant(path, cfg.method):
            out[path] = value
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_hash(cfg: ExperimentConfig) -> str:
    """Return the sha256 (hex) of what can change a run's results.

    The hash covers the resolved config except ``name``, ``output_dir`` and the
    keys the method does not read (:data:`IGNORED_BY_METHOD`) or that only say
    where it runs (``mesh`` included) and logs (:data:`RUNTIME_SECTIONS`): the same run
    under another experiment name, or a ``base`` run with another ``lora.rank``,
    hashes the same.

    Examples:
      >>> from lora_jax.config.schema import LoraConfig
      >>> a = ExperimentConfig(method="base", lora=LoraConfig(rank=4))
      >>> config_hash(a) == config_hash(ExperimentConfig(method="base", name="other"))
      True
      >>> config_hash(ExperimentConfig(method="lora")) == config_hash(ExperimentConfig(method="full"))
      False
    """
    text = json.dumps(_canonical(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
