"""Experiment configs: frozen dataclasses, safe YAML, ``--set`` overrides, sweeps.

A config file is plain YAML data (read with a safe loader: no tag can build a
Python object) mapped onto frozen, typed, keyword-only dataclasses. Every
section and key has a default, so a minimal file works::

    method: lora          # base | lora | qlora | full
    lora: {rank: 16}
    train: {steps: 200}

Unknown keys, wrong types and impossible values are errors before any compute;
each message names the key path (``lora.rank``) and shows the bad value.
Checks that need the model's shapes are in
:func:`lora_jax.runner.build.check_against_model`: this package is standard
library plus PyYAML only, so reading a config imports no JAX.

A ``sweep:`` block maps key paths to lists of values; the runs are the grid of
all combinations (``sweep_mode: zip`` pairs the lists instead). Axes that do
not apply to a run's method (``lora.*`` for ``base`` and ``full``, ``quant.*``
for ``lora``, see :data:`IGNORED_BY_METHOD`) are dropped from that run, and
runs that then coincide are kept once: ``method: [base, lora]`` with
``lora.rank: [1, 4, 16]`` gives four runs, not six.

Two departures from PyYAML's defaults, both safe: ``1e-4`` reads as a float
(YAML 1.2; PyYAML follows YAML 1.1, which reads it as the string ``'1e-4'``),
and a key given twice in one mapping is an error instead of "last one wins".

Modules, along the data flow (every public name is re-exported here):

- :mod:`~lora_jax.config.fields`: field checks, type coercion, the ``Section`` base.
- :mod:`~lora_jax.config.schema`: the section dataclasses, ``ExperimentConfig``, the key tables.
- :mod:`~lora_jax.config.dicts`: ``from_dict`` / ``to_dict`` / ``to_yaml``, ``config_hash``.
- :mod:`~lora_jax.config.safe_yaml`: the safe YAML reader.
- :mod:`~lora_jax.config.overrides`: ``--set`` overrides.
- :mod:`~lora_jax.config.expand`: sweep axes, run names, ``expand_sweep``.
- :mod:`~lora_jax.config.load`: ``load_raw`` / ``load_config`` / ``load_sweep``.

Examples:
  >>> cfg = from_dict({"method": "lora", "lora": {"rank": 4}, "optim": {"lr": 1e-3}})
  >>> cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr, cfg.train.steps
  (4, None, 0.001, 100)
  >>> [name for name, _ in expand_sweep({"sweep": {"method": ["base", "lora"], "lora.rank": [1, 4]}})]
  ['base', 'lora_r1', 'lora_r4']
"""

import importlib

from lora_jax.config.dicts import config_hash, from_dict, to_dict, to_yaml
from lora_jax.config.expand import expand_sweep
from lora_jax.config.load import load_config, load_raw, load_sweep
from lora_jax.config.overrides import apply_overrides
from lora_jax.config.schema import (
    DEFAULT_TARGETS,
    IGNORED_BY_METHOD,
    MIN_MAX_LEN,
    ExperimentConfig,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    QuantConfig,
    TaskConfig,
    TrainConfig,
)
from lora_jax.errors import ConfigError

__all__ = [
    "DEFAULT_TARGETS",
    "IGNORED_BY_METHOD",
    "MIN_MAX_LEN",
    "ConfigError",
    "ExperimentConfig",
    "LoraConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "QuantConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "config_hash",
    "expand_sweep",
    "from_dict",
    "load_config",
    "load_raw",
    "load_sweep",
    "to_dict",
    "to_yaml",
]

# Names that moved out of this stdlib-only package and keep working from here.
# They load on first use, so `import lora_jax.config` still imports no JAX.
_MOVED = {"check_against_model": "lora_jax.runner.build"}


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'lora_jax.config' has no attribute {name!r}")
