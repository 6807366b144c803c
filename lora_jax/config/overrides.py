"""Shell overrides: ``--set key=value`` applied to a config dict before it is validated."""

from __future__ import annotations

import copy
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from lora_jax.config.fields import show
from lora_jax.config.safe_yaml import parse_yaml
from lora_jax.config.schema import LEAVES, SECTIONS, SWEEP_OPTIONS, key_hint
from lora_jax.errors import ConfigError


def _parse_value(text: str, tp: Any, item: str) -> Any:
    takes_str = str in (typing.get_args(tp) or (tp,)) or (
        typing.get_origin(tp) is Literal and isinstance(typing.get_args(tp)[0], str)
    )
    try:
        value = parse_yaml(text, f"--set {item!r}")
    except ConfigError:
        if takes_str:
            return text.strip()
        raise
    if takes_str and not isinstance(value, str) and not (value is None and type(None) in typing.get_args(tp)):
        return text.strip()  # names, paths and regexes are taken verbatim (e.g. `no`, `[qv]_proj`)
    return value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``key=value`` overrides applied (the ``--set`` flag).

    Values are read as YAML (``16``, ``3e-4``, ``true``, ``null``, ``[0.9, 0.95]``);
    values of string keys (names, paths, regexes) are taken verbatim. A key that
    is a sweep axis pins it: the axis is removed from the sweep. ``sweep.<key>=[...]``
    sets an axis, ``sweep_mode=zip`` the mode, ``sweep=null`` removes the sweep.

    Args:
      raw: a config dict as read from YAML.
      overrides: strings ``dotted.key=value``.

    Returns:
      A new dict; ``raw`` is not modified.

    Raises:
      ConfigError: a string without ``=`` or an unknown key path (with a hint).

    Examples:
      >>> apply_overrides({"lora": {"rank": 8}}, ["lora.rank=16", "optim.lr=3e-4"])
      {'lora': {'rank': 16}, 'optim': {'lr': 0.0003}}
      >>> apply_overrides({}, ["lora.rnak=16"])
      Traceback (most recent call last):
      ...
      lora_jax.errors.ConfigError: --set 'lora.rnak=16': unknown key 'lora.rnak' (did you mean 'lora.rank'?)
    """
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lora.rank=16")
        where = f"--set {item!r}"
        if key == "sweep" or key == "sweep_mode" or key.startswith("sweep."):
            _override_sweep(out, key, text, where)
            continue
        if key in SECTIONS:
            value = parse_yaml(text, where)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {key} is a section; give a mapping, e.g. {key}={{...}}")
            out[key] = {**(out.get(key) or {}), **(value or {})}
        elif key in LEAVES:
            value = _parse_value(text, LEAVES[key], item)
            section, _, leaf = key.rpartition(".")
            if section:
                if not isinstance(out.get(section) or {}, Mapping):
                    raise ConfigError(f"{where}: {section} is not a mapping in the file ({show(out[section])})")
                out[section] = {**(out.get(section) or {}), leaf: value}
            else:
                out[key] = value
        else:
            raise ConfigError(f"{where}: unknown key {key!r}{key_hint(key, [*LEAVES, *SECTIONS])}")
        sweep = out.get("sweep")
        if isinstance(sweep, dict) and key in sweep:
            del sweep[key]
    return out


def _override_sweep(out: dict[str, Any], key: str, text: str, where: str) -> None:
    value = parse_yaml(text, where)
    if key == "sweep_mode":
        out["sweep_mode"] = text.strip() if not isinstance(value, str) else value
    elif key == "sweep":
        if value is None or value == {}:
            out.pop("sweep", None)
        else:
            out["sweep"] = value
    else:
        axis = key[len("sweep.") :]
        if axis not in LEAVES and axis not in SWEEP_OPTIONS:
            raise ConfigError(f"{where}: unknown sweep axis {axis!r}{key_hint(axis, list(LEAVES))}")
        sweep = out.get("sweep") or {}
        if not isinstance(sweep, dict):
            raise ConfigError(f"{where}: the file's sweep is not a mapping ({show(sweep)})")
        if value is None:
            sweep.pop(axis, None)
        else:
            sweep[axis] = value
        out["sweep"] = sweep
