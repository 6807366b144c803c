"""Loading config files: YAML file -> dict (with ``--set`` overrides) -> one config or a sweep's runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_jax.config.dicts import from_dict
from lora_jax.config.expand import expand_sweep
from lora_jax.config.fields import show
from lora_jax.config.overrides import apply_overrides
from lora_jax.config.safe_yaml import parse_yaml
from lora_jax.config.schema import SWEEP_KEYS, ExperimentConfig
from lora_jax.errors import ConfigError
from lora_jax.io.names import path_name


def load_raw(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a config file into a plain dict (sweep block included) and apply ``overrides``.

    Args:
      path: the YAML file.
      overrides: ``key=value`` strings as given to ``--set`` (see :func:`apply_overrides`).

    Returns:
      The dict, with ``name`` set to the file's stem when the file has none.

    Raises:
      ConfigError: YAML syntax (with file, line and column), a tag that would
        build a Python object, a top level that is not a mapping, a bad override.
    """
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{source}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); a config is a YAML "
            "text file: save it as UTF-8"
        ) from None
    raw = parse_yaml(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of keys (method:, model:, lora:, ...), got {show(raw)}"
        )
    if "name" not in raw:  # the file's name, slugged ("my config.yaml" -> "my-config"); "config" if nothing is left
        try:
            raw["name"] = path_name(Path(source).stem)
        except ConfigError:
            raw["name"] = "config"
    try:
        return apply_overrides(raw, overrides)
    except ConfigError as e:
        raise e.within(source) from None


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load one experiment from a YAML file.

    A ``sweep:`` block is checked (every run it declares must be valid) but not
    applied: the result is the config outside the sweep. Use :func:`load_sweep`
    for the runs.

    Args:
      path: the YAML file.
      overrides: ``key=value`` strings as given to ``--set``.

    Returns:
      The validated config.

    Raises:
      ConfigError: the messages name the file and the key path and show the value.

    Examples:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     p = Path(d, "tiny.yaml")
      ...     _ = p.write_text("lora:\\n  rank: 4\\n")
      ...     cfg = load_config(p, ["optim.lr=3e-4"])
      >>> cfg.name, cfg.lora.rank, cfg.optim.lr
      ('tiny', 4, 0.0003)
    """
    raw = load_raw(path, overrides)
    try:
        if any(k in raw for k in SWEEP_KEYS):
            expand_sweep(raw)
        return from_dict({k: v for k, v in raw.items() if k not in SWEEP_KEYS})
    except ConfigError as e:
        raise e.within(os.fspath(path)) from None


def load_sweep(path: str | os.PathLike, overrides: Sequence[str] = ()) -> list[tuple[str, ExperimentConfig]]:
    """Load a YAML file and expand its ``sweep:`` block into runs.

    Args:
      path: the YAML file.
      overrides: ``key=value`` strings as given to ``--set``.

    Returns:
      ``[(run_name, config)]`` as :func:`expand_sweep` gives them.

    Raises:
      ConfigError: as :func:`load_config`.
    """
    raw = load_raw(path, overrides)
    try:
        return expand_sweep(raw)
    except ConfigError as e:
        raise e.within(os.fspath(path)) from None
