"""Experiment configs: frozen dataclasses, safe YAML, ``--set`` overrides, sweeps.

A config file is plain YAML data (read with a safe loader: no tag can build a
Python object) mapped onto frozen, typed, keyword-only dataclasses. Every
section and key has a default, so a minimal file works::

    method: lora          # base | lora | qlora | full
    lora: {rank: 16}
    train: {steps: 200}

Unknown keys, wrong types and impossible values are errors before any compute;
each message names the key path (``lora.rank``) and shows the bad value.
Checks that need the model's shapes are in :func:`check_against_model`.

A ``sweep:`` block maps key paths to lists of values; the runs are the grid of
all combinations (``sweep_mode: zip`` pairs the lists instead). Axes that do
not apply to a run's method (``lora.*`` for ``base`` and ``full``, ``quant.*``
for ``lora``, see :data:`IGNORED_BY_METHOD`) are dropped from that run, and
runs that then coincide are kept once: ``method: [base, lora]`` with
``lora.rank: [1, 4, 16]`` gives four runs, not six.

Two departures from PyYAML's defaults, both safe: ``1e-4`` reads as a float
(YAML 1.2; PyYAML follows YAML 1.1, which reads it as the string ``'1e-4'``),
and a key given twice in one mapping is an error instead of "last one wins".

Examples:
  >>> cfg = from_dict({"method": "lora", "lora": {"rank": 4}, "optim": {"lr": 1e-3}})
  >>> cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr, cfg.train.steps
  (4, None, 0.001, 100)
  >>> [name for name, _ in expand_sweep({"sweep": {"method": ["base", "lora"], "lora.rank": [1, 4]}})]
  ['base', 'lora_r1', 'lora_r4']
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import jax.numpy as jnp
import yaml

from lora_jax.errors import ConfigError
from lora_jax.lora import LoraRule
from lora_jax.models.registry import MODELS
from lora_jax.quant import QuantRule

__all__ = [
    "DEFAULT_TARGETS",
    "IGNORED_BY_METHOD",
    "ConfigError",
    "ExperimentConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "QuantConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "check_against_model",
    "config_hash",
    "expand_sweep",
    "from_dict",
    "load_config",
    "load_raw",
    "load_sweep",
    "to_dict",
    "to_yaml",
]

DEFAULT_TARGETS = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
"""The seven projections of every decoder layer (PEFT's ``all-linear`` minus the head)."""

MIN_MAX_LEN = 16
"""The smallest ``task.max_len`` (tokens) that leaves room for a prompt and an answer."""

IGNORED_BY_METHOD: dict[str, tuple[str, ...]] = {
    "base": ("lora", "quant", "optim", "train.steps", "train.eval_every", "train.checkpoint_every",
             "train.log_every", "task.n_train"),
    "full": ("lora", "quant", "optim.lora_plus_ratio"),
    "lora": ("quant",),
    "qlora": (),
}  # fmt: skip
"""Key-path prefixes a method does not read: dropped from its sweep axes, run names and hash."""


# ----------------------------------------------------------------------------
# Field checks: each returns a complaint or None.


def _at_least(n: float) -> Any:
    return lambda v: None if v >= n else f"must be >= {n}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _unit_interval(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def _regex(v: str) -> str | None:
    try:
        re.compile(v)
    except re.error as e:
        return f"is not a valid regex ({e})"
    return None


def _safe_name(v: str) -> str | None:
    ok = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", v)
    return None if ok else "must be a folder name: letters, digits and . _ + - (no spaces or slashes)"


def _betas(v: tuple[float, float]) -> str | None:
    return None if all(0.0 <= b < 1.0 for b in v) else "must both be in [0, 1)"


def _looks_like_path(v: str) -> bool:
    return "/" in v or os.sep in v or v.endswith(".gguf") or v.startswith((".", "~")) or Path(v).exists()


def _model_name(v: str) -> str | None:
    if v.lower() in MODELS or _looks_like_path(v):
        return None
    close = difflib.get_close_matches(v.lower(), list(MODELS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"unknown model{hint}: give a registered name ({', '.join(sorted(MODELS))}) or a path to a .gguf "
        f"file or a Hugging Face directory (./{v} for a relative path)"
    )


def _field(default: Any = dataclasses.MISSING, *, check: Any = None, factory: Any = dataclasses.MISSING) -> Any:
    meta = {"check": check} if check else {}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------
# Typed sections


def _show(v: Any) -> str:
    return f"{type(v).__name__} {v!r}"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        return f"a list of {len(args)} {_PLURAL.get(args[0], 'values')}"
    return {int: "an int", float: "a number", bool: "a bool (true/false)", str: "a string"}.get(tp, tp.__name__)


_PLURAL = {int: "ints", float: "numbers", bool: "bools", str: "strings"}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it normalized (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, rest[0], key)
        except ConfigError:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}") from None
    if origin is Literal:
        if isinstance(value, bool) or value not in args or not isinstance(value, type(args[0])):
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown value {value!r}; choose one of {', '.join(map(str, args))}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected a {tp.__name__}, got {_show(value)}")
        return value
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        str: lambda v: isinstance(v, str),
    }[tp]
    if not ok(value):
        extra = " (booleans are not numbers)" if isinstance(value, bool) and tp in (int, float) else ""
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}{extra}")
    return float(value) if tp is float else value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


class _Section:
    """Type-checks and normalizes every field after ``__init__``; raises :class:`ConfigError`."""

    section: ClassVar[str] = ""

    def _key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def __post_init__(self) -> None:
        errors: list[str] = []
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key, value = self._key(f.name), getattr(self, f.name)
            try:
                value = _coerce(value, hints[f.name], key)
            except ConfigError as e:
                errors += e.errors
                continue
            check = f.metadata.get("check")
            complaint = check(value) if check and value is not None else None
            if complaint:
                errors.append(f"{key}: {complaint} (got {value!r})")
            object.__setattr__(self, f.name, value)
        if not errors:
            errors += self._cross_checks()
        if errors:
            raise ConfigError(errors)

    def _cross_checks(self) -> list[str]:
        return []


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section):
    """The pretrained model.

    Attributes:
      name: a registered short name (``smollm2-135m``, ``minilm-l6``) or a path
        to a ``.gguf`` file or a Hugging Face model directory.
      dtype: compute dtype of the weights, ``float32`` or ``bfloat16``.
      max_seq_len: the longest sequence the run builds (positions, KV cache).
    """

    section: ClassVar[str] = "model"
    name: str = _field("smollm2-135m", check=_model_name)
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_seq_len: int = _field(2048, check=_at_least(1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig(_Section):
    """The data: a built-in task or the user's files.

    Attributes:
      name: ``code-summarization`` (stdlib function -> docstring summary, scored
        with ROUGE), ``python-docs-lm`` (perplexity on the Python docs), or a
        user file: ``jsonl`` (``prompt``/``completion`` records) or ``text``.
      path: the user file (``jsonl`` and ``text`` only).
      max_len: tokens per training example (prompt and answer).
      n_train, n_val, n_test: caps on the number of examples; ``None`` = all.
      max_new_tokens: generation length for generation metrics.
      n_eval_generate: examples decoded for generation metrics (0 = none).
    """

    section: ClassVar[str] = "task"
    name: Literal["code-summarization", "python-docs-lm", "jsonl", "text"] = "code-summarization"
    path: str | None = None
    max_len: int = _field(256, check=_at_least(MIN_MAX_LEN))
    n_train: int | None = _field(None, check=_at_least(1))
    n_val: int | None = _field(None, check=_at_least(1))
    n_test: int | None = _field(None, check=_at_least(1))
    max_new_tokens: int = _field(32, check=_at_least(1))
    n_eval_generate: int = _field(64, check=_at_least(0))

    def _cross_checks(self) -> list[str]:
        if self.name in ("jsonl", "text") and not self.path:
            return [f"task.path: task {self.name!r} reads the user's file; set task.path to it"]
        if self.name not in ("jsonl", "text") and self.path is not None:
            return [
                f"task.path: the built-in task {self.name!r} takes no file (got {self.path!r}); "
                "use task.name: jsonl or text for your own data"
            ]
        return []


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(_Section):
    """The adapters (used by methods ``lora`` and ``qlora``).

    Attributes:
      rank: the rank ``r`` of every adapter.
      alpha: scale numerator; ``None`` means ``alpha = rank`` (scale 1).
      dropout: dropout on the adapter input while training, in [0, 1).
      rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
      init: ``kaiming`` (PEFT's default) or ``gaussian``.
      targets: regex, matched with ``re.fullmatch`` on ``/``-joined parameter paths.
    """

    section: ClassVar[str] = "lora"
    rank: int = _field(8, check=_at_least(1))
    alpha: float | None = _field(None, check=_positive)
    dropout: float = _field(0.0, check=_unit_interval)
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    targets: str = _field(DEFAULT_TARGETS, check=_regex)

    def to_rules(self) -> list[LoraRule]:
        """Return the :class:`lora_jax.lora.LoraRule` list for ``lora.init``.

        Examples:
          >>> LoraConfig(rank=4, targets=".*q_proj/kernel").to_rules()[0].scale
          1.0
        """
        return [
            LoraRule(
                pattern=self.targets,
                rank=self.rank,
                alpha=self.alpha,
                dropout=self.dropout,
                init=self.init,
                rslora=self.rslora,
            )
        ]


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig(_Section):
    """The quantized base (used by method ``qlora``).

    Attributes:
      format: ``nf4``, ``fp4``, ``int4``, ``int4_asym`` or ``int8`` (see :mod:`lora_jax.quant`).
      block_size: input rows per scale: 32, 64, 128 or 256; 0 means one block per output channel.
      double_quant: quantize the block scales to int8 too (QLoRA).
      targets: regex over parameter paths, as ``lora.targets``.
    """

    section: ClassVar[str] = "quant"
    format: Literal["nf4", "fp4", "int4", "int4_asym", "int8"] = "nf4"
    block_size: Literal[0, 32, 64, 128, 256] = 64
    double_quant: bool = True
    targets: str = _field(DEFAULT_TARGETS, check=_regex)

    def to_rules(self, dtype: Any = "float32") -> list[QuantRule]:
        """Return the :class:`lora_jax.quant.QuantRule` list for ``quant.quantize``.

        Args:
          dtype: compute dtype of the dequantized weights (``model.dtype``).

        Examples:
          >>> QuantConfig(block_size=0).to_rules()[0].block_size is None
          True
        """
        return [
            QuantRule(
                pattern=self.targets,
                format=self.format,
                block_size=self.block_size or None,
                double_quant=self.double_quant,
                dtype=jnp.dtype(dtype),
            )
        ]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig(_Section):
    """The optimizer and learning-rate schedule.

    Attributes:
      name: ``adamw``, ``adam`` or ``sgd``.
      lr: peak learning rate (of ``A`` when ``lora_plus_ratio`` is set).
      weight_decay: decoupled weight decay (``adamw`` only).
      betas: Adam's ``(b1, b2)``.
      warmup_steps: linear warmup from 0 to ``lr``.
      schedule: after warmup: ``constant``, ``cosine`` or ``linear`` decay to 0.
      grad_clip: global-norm clipping; ``None`` switches it off.
      lora_plus_ratio: LoRA+ ``lr_B / lr_A``; ``None`` is plain LoRA.
    """

    section: ClassVar[str] = "optim"
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = _field(2e-4, check=_positive)
    weight_decay: float = _field(0.0, check=_at_least(0))
    betas: tuple[float, float] = _field((0.9, 0.999), check=_betas)
    warmup_steps: int = _field(0, check=_at_least(0))
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float | None = _field(1.0, check=_positive)
    lora_plus_ratio: float | None = _field(None, check=_positive)

    def _cross_checks(self) -> list[str]:
        if self.weight_decay > 0 and self.name != "adamw":
            return [
                f"optim.weight_decay: {self.name} has no weight decay (got {self.weight_decay!r}); "
                "use optim.name: adamw or weight_decay: 0"
            ]
        return []


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(_Section):
    """The training loop.

    Attributes:
      steps: optimizer steps.
      batch_size: examples per step (and per evaluation batch).
      eval_every: evaluate every this many steps; 0 means only at the end.
      checkpoint_every: save every this many steps; 0 means only at the end.
      log_every: write training metrics every this many steps.
      eval_batches: batches per loss evaluation.
    """

    section: ClassVar[str] = "train"
    steps: int = _field(100, check=_at_least(1))
    batch_size: int = _field(8, check=_at_least(1))
    eval_every: int = _field(0, check=_at_least(0))
    checkpoint_every: int = _field(0, check=_at_least(0))
    log_every: int = _field(10, check=_at_least(1))
    eval_batches: int = _field(8, check=_at_least(1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig(_Section):
    """One run: what to train, how, and where its files go.

    Attributes:
      name: the experiment; its runs go to ``<output_dir>/<name>/<run>/``; default: the file's stem.
      method: ``base`` (evaluate the pretrained model), ``lora``, ``qlora``
        (LoRA on a quantized base) or ``full`` (fine-tune every weight).
      seed: the root of every PRNG key of the run.
      output_dir: the folder that holds experiments.
      model, task, lora, quant, optim, train: the sections.
    """

    name: str = _field("experiment", check=_safe_name)
    method: Literal["base", "lora", "qlora", "full"] = "lora"
    seed: int = _field(0, check=lambda v: None if 0 <= v < 2**32 else "must be in [0, 2**32)")
    output_dir: str = _field("runs", check=lambda v: None if v else "must not be empty")
    model: ModelConfig = _field(factory=ModelConfig)
    task: TaskConfig = _field(factory=TaskConfig)
    lora: LoraConfig = _field(factory=LoraConfig)
    quant: QuantConfig = _field(factory=QuantConfig)
    optim: OptimConfig = _field(factory=OptimConfig)
    train: TrainConfig = _field(factory=TrainConfig)

    def _cross_checks(self) -> list[str]:
        errors = []
        if self.task.max_len > self.model.max_seq_len:
            errors.append(
                f"task.max_len: {self.task.max_len} is longer than model.max_seq_len="
                f"{self.model.max_seq_len}; shorten it or raise model.max_seq_len"
            )
        if self.optim.warmup_steps > self.train.steps:
            errors.append(f"optim.warmup_steps: {self.optim.warmup_steps} is more than train.steps={self.train.steps}")
        return errors


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "task": TaskConfig, "lora": LoraConfig,
    "quant": QuantConfig, "optim": OptimConfig, "train": TrainConfig,
}  # fmt: skip
_TOP = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in _SECTIONS]
_SWEEP_KEYS = ("sweep", "sweep_mode")
_LEAVES: dict[str, Any] = {k: _hints(ExperimentConfig)[k] for k in _TOP}
for _s, _cls in _SECTIONS.items():
    _LEAVES.update({f"{_s}.{k}": t for k, t in _hints(_cls).items() if k != "section"})


# ----------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-4`` as a float and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges may be overridden by explicit keys
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first given on line {seen[key] + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line
            except TypeError:
                continue  # unhashable key: SafeLoader's own error follows
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a yaml.SafeLoader: plain data only
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        if isinstance(e, yaml.constructor.ConstructorError) and "constructor for the tag" in str(e.problem):
            raise ConfigError(
                f"{where}: {e.problem}: YAML tags that build objects are not allowed; a config is plain data "
                "(mappings, lists, strings, numbers, true/false, null) read with a safe loader"
            ) from None
        raise ConfigError(f"{where}: YAML syntax error: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: YAML error: {e}") from None


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
    raw = _parse_yaml(Path(path).read_text(), source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of keys (method:, model:, lora:, ...), got {_show(raw)}"
        )
    raw.setdefault("name", re.sub(r"[^A-Za-z0-9._+-]+", "-", Path(source).stem))
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
        if any(k in raw for k in _SWEEP_KEYS):
            expand_sweep(raw)
        return from_dict({k: v for k, v in raw.items() if k not in _SWEEP_KEYS})
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


# ----------------------------------------------------------------------------
# Dicts <-> dataclasses


def _hint(bad: str, candidates: Sequence[str]) -> str:
    last = bad.rsplit(".", 1)[-1]
    close = [c for c in candidates if c != bad and c.rsplit(".", 1)[-1] == last]
    close = close or difflib.get_close_matches(bad, candidates, n=1, cutoff=0.6)
    if not close:
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [tails[t] for t in difflib.get_close_matches(last, list(tails), n=1, cutoff=0.7)]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _check_keys(raw: Mapping[str, Any], *, allow_sweep: bool) -> None:
    """Raise for unknown keys and non-mapping sections, with "did you mean" hints."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the top level must be a mapping of keys (method:, model:, ...), got {_show(raw)}")
    known = [*_TOP, *_SECTIONS, *_LEAVES]
    errors = []
    for key, value in raw.items():
        key = str(key)
        if key in _SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                errors.append(f"{key}: expected a mapping of {key} settings, got {_show(value)}")
                continue
            for sub in value:
                if sub not in _hints(_SECTIONS[key]) or sub == "section":
                    full = f"{key}.{sub}"
                    valid = ", ".join(f.name for f in dataclasses.fields(_SECTIONS[key]))
                    errors.append(f"{full}: unknown key{_hint(full, known)}; {key} takes: {valid}")
        elif key not in _TOP and not (allow_sweep and key in _SWEEP_KEYS):
            if key in _SWEEP_KEYS:
                errors.append(f"{key}: this config declares a sweep; expand it with expand_sweep / load_sweep")
            else:
                errors.append(
                    f"{key}: unknown key{_hint(key, known)}; the top level takes: "
                    f"{', '.join([*_TOP, *_SECTIONS, *_SWEEP_KEYS])}"
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
      lora_jax.config.ConfigError: lora.rnak: unknown key (did you mean 'lora.rank'?); lora takes: rank, alpha, ...
    """
    _check_keys(raw, allow_sweep=False)
    sections, errors = {}, []
    for name, cls in _SECTIONS.items():
        try:
            sections[name] = cls(**(raw.get(name) or {}))
        except ConfigError as e:
            errors += e.errors
    top = {k: v for k, v in raw.items() if k in _TOP}
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
      >>> cfg = ExperimentConfig(lora=LoraConfig(rank=16))
      >>> from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
      True
    """
    head = f"# resolved lora-jax config (config_hash {config_hash(cfg)[:12]})\n"
    return head + yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def _relevant(key: str, method: str) -> bool:
    return not any(key == p or key.startswith(p + ".") for p in IGNORED_BY_METHOD[method])


def _canonical(cfg: ExperimentConfig) -> dict[str, Any]:
    out = {}
    for path, value in _flatten(to_dict(cfg)).items():
        if path not in ("name", "output_dir") and _relevant(path, cfg.method):
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
    keys the method does not read (:data:`IGNORED_BY_METHOD`): the same run
    under another experiment name, or a ``base`` run with another ``lora.rank``,
    hashes the same.

    Examples:
      >>> a = ExperimentConfig(method="base", lora=LoraConfig(rank=4))
      >>> config_hash(a) == config_hash(ExperimentConfig(method="base", name="other"))
      True
      >>> config_hash(ExperimentConfig(method="lora")) == config_hash(ExperimentConfig(method="full"))
      False
    """
    text = json.dumps(_canonical(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------
# Overrides


def _parse_value(text: str, tp: Any, item: str) -> Any:
    takes_str = str in (typing.get_args(tp) or (tp,)) or (
        typing.get_origin(tp) is Literal and isinstance(typing.get_args(tp)[0], str)
    )
    try:
        value = _parse_yaml(text, f"--set {item!r}")
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
      lora_jax.config.ConfigError: --set 'lora.rnak=16': unknown key 'lora.rnak' (did you mean 'lora.rank'?)
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
        if key in _SECTIONS:
            value = _parse_yaml(text, where)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {key} is a section; give a mapping, e.g. {key}={{...}}")
            out[key] = {**(out.get(key) or {}), **(value or {})}
        elif key in _LEAVES:
            value = _parse_value(text, _LEAVES[key], item)
            section, _, leaf = key.rpartition(".")
            if section:
                if not isinstance(out.get(section) or {}, Mapping):
                    raise ConfigError(f"{where}: {section} is not a mapping in the file ({_show(out[section])})")
                out[section] = {**(out.get(section) or {}), leaf: value}
            else:
                out[key] = value
        else:
            raise ConfigError(f"{where}: unknown key {key!r}{_hint(key, [*_LEAVES, *_SECTIONS])}")
        sweep = out.get("sweep")
        if isinstance(sweep, dict) and key in sweep:
            del sweep[key]
    return out


def _override_sweep(out: dict[str, Any], key: str, text: str, where: str) -> None:
    value = _parse_yaml(text, where)
    if key == "sweep_mode":
        out["sweep_mode"] = text.strip() if not isinstance(value, str) else value
    elif key == "sweep":
        if value is None or value == {}:
            out.pop("sweep", None)
        else:
            out["sweep"] = value
    else:
        axis = key[len("sweep.") :]
        if axis not in _LEAVES:
            raise ConfigError(f"{where}: unknown sweep axis {axis!r}{_hint(axis, list(_LEAVES))}")
        sweep = out.get("sweep") or {}
        if not isinstance(sweep, dict):
            raise ConfigError(f"{where}: the file's sweep is not a mapping ({_show(sweep)})")
        if value is None:
            sweep.pop(axis, None)
        else:
            sweep[axis] = value
        out["sweep"] = sweep


# ----------------------------------------------------------------------------
# Sweeps


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
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items() if k not in _SWEEP_KEYS}
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
        raise ConfigError(f"sweep: expected a mapping of key paths to lists (lora.rank: [1, 4]), got {_show(sweep)}")
    errors = []
    for axis, values in sweep.items():
        if axis not in _LEAVES or axis == "name":
            where = "a section; list a key inside it, e.g. lora.rank" if axis in _SECTIONS else "unknown key"
            errors.append(f"sweep.{axis}: {where}{_hint(str(axis), [k for k in _LEAVES if k != 'name'])}")
        elif not isinstance(values, list) or not values:
            errors.append(f"sweep.{axis}: expected a non-empty list of values, got {_show(values)}")
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
      lora_jax.config.ConfigError: sweep run lora.rank=0: lora.rank: must be >= 1 (got 0)
    """
    _check_keys(raw, allow_sweep=True)
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
            point = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in assignment.items())
            raise e.within(f"sweep run {point}") from None
        applied = {k: v for k, v in assignment.items() if _relevant(k, full.method)}
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


# ----------------------------------------------------------------------------
# Checks against the model


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
      >>> shapes = {"layers/0/attn/k_proj/kernel": (64, 16), "layers/0/attn/q_proj/kernel": (64, 64)}
      >>> cfg = ExperimentConfig(lora=LoraConfig(rank=32, targets=".*_proj/kernel"))
      >>> check_against_model(cfg, shapes)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax.config.ConfigError: lora.rank=32 is too large ... the largest rank every target allows is 16
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
