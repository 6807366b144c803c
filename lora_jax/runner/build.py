"""From a config to the objects a run is built from: LoRA and quantization rules, model checks.

The config package (:mod:`lora_jax.config`) is plain data and imports no JAX;
this module turns its sections into :class:`~lora_jax.lora.LoraRule` and
:class:`~lora_jax.quant.QuantRule` lists and checks a config against a
model's parameter shapes before anything is built.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from lora_jax.errors import ConfigError
from lora_jax.lora import LoraRule
from lora_jax.quant import QuantRule

if TYPE_CHECKING:
    from lora_jax.config import ExperimentConfig, LoraConfig, QuantConfig

__all__ = ["check_against_model", "lora_rules", "quant_rules"]


def lora_rules(lora_cfg: LoraConfig) -> list[LoraRule]:
    """Return the :class:`lora_jax.lora.LoraRule` list for ``lora.init`` from the ``lora:`` section.

    Examples:
      >>> from lora_jax.config import LoraConfig
      >>> lora_rules(LoraConfig(rank=4, targets=".*q_proj/kernel"))[0].scale
      1.0
    """
    return [
        LoraRule(
            pattern=lora_cfg.targets,
            rank=lora_cfg.rank,
            alpha=lora_cfg.alpha,
            dropout=lora_cfg.dropout,
            init=lora_cfg.init,
            rslora=lora_cfg.rslora,
        )
    ]


def quant_rules(quant_cfg: QuantConfig, dtype: Any = "float32") -> list[QuantRule]:
    """Return the :class:`lora_jax.quant.QuantRule` list for ``quant.quantize`` from the ``quant:`` section.

    Args:
      quant_cfg: the ``quant:`` section.
      dtype: compute dtype of the dequantized weights (``model.dtype``).

    Examples:
      >>> from lora_jax.config import QuantConfig
      >>> quant_rules(QuantConfig(block_size=0))[0].block_size is None
      True
    """
    return [
        QuantRule(
            pattern=quant_cfg.targets,
            format=quant_cfg.format,
            block_size=quant_cfg.block_size or None,
            double_quant=quant_cfg.double_quant,
            dtype=jnp.dtype(dtype),
        )
    ]


def check_against_model(config: ExperimentConfig, param_shapes: Mapping[str, Any]) -> None:
    """Check the config against the model's parameters before building anything.

    Args:
      config: the run.
      param_shapes: ``{path: shape}`` for every parameter (``/``-joined paths as
        :func:`lora_jax.paths.leaves_with_paths` gives; arrays work too).

    Raises:
      ConfigError: ``lora.targets`` or ``quant.targets`` matches no parameter
        (nearby paths listed), matches a non-matrix, ``lora.rank`` exceeds
        ``min(d_in, d_out)`` of a targeted matrix (the path and the largest
        allowed rank named), or ``quant.block_size`` does not divide ``d_in``.

    Examples:
      >>> from lora_jax.config import ExperimentConfig, LoraConfig
      >>> shapes = {"layers/0/attn/k_proj/kernel": (64, 16), "layers/0/attn/q_proj/kernel": (64, 64)}
      >>> cfg = ExperimentConfig(lora=LoraConfig(rank=32, targets=".*_proj/kernel"))
      >>> check_against_model(cfg, shapes)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax.errors.ConfigError: lora.rank=32 is too large ... the largest rank every target allows is 16
    """
    shapes = {p: tuple(getattr(s, "shape", s)) for p, s in param_shapes.items()}
    paths = list(shapes)
    errors: list[str] = []

    def targets(key: str, pattern: str) -> list[str]:
        hits = [p for p in paths if re.fullmatch(pattern, p)]
        if not hits:
            near = "\n    ".join(f"{p} {shapes[p]}" for p in difflib.get_close_matches(pattern, paths, n=6, cutoff=0))
            errors.append(
                f"{key}: {pattern!r} matches no parameter of {config.model.name} (re.fullmatch on "
                f"'/'-joined paths); paths include:\n    {near}"
            )
        for p in hits:
            if len(shapes[p]) < 2:
                errors.append(f"{key}: {pattern!r} matches {p} of shape {shapes[p]}, which is not a matrix")
        return [p for p in hits if len(shapes[p]) >= 2]

    if config.method in ("lora", "qlora"):
        hits = targets("lora.targets", config.lora.targets)
        limit = {p: min(shapes[p][0], math.prod(shapes[p][1:])) for p in hits}
        bad = [p for p in hits if config.lora.rank > limit[p]]
        if bad:
            shown = "; ".join(f"{p} {shapes[p]} allows at most rank {limit[p]}" for p in bad[:3])
            more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
            errors.append(
                f"lora.rank={config.lora.rank} is too large for {len(bad)} of the {len(hits)} matrices "
                f"lora.targets matches: {shown}{more}; the largest rank every target allows is {min(limit.values())}"
            )
    if config.method == "qlora" and config.quant.block_size:
        bs = config.quant.block_size
        hits = targets("quant.targets", config.quant.targets)
        bad = [p for p in hits if shapes[p][0] % bs]
        if bad:
            shown = ", ".join(f"{p} {shapes[p]}" for p in bad[:3])
            ok = [b for b in (32, 64, 128, 256) if all(shapes[p][0] % b == 0 for p in hits)]
            errors.append(
                f"quant.block_size={bs} does not divide d_in (axis 0) of {len(bad)} of the {len(hits)} "
                f"matrices quant.targets matches, e.g. {shown}; block sizes that divide all: "
                f"{', '.join(map(str, ok)) or 'none'}; 0 (one block per output channel) always fits"
            )
    elif config.method == "qlora":
        targets("quant.targets", config.quant.targets)
    if errors:
        raise ConfigError(errors)
