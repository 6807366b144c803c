"""Config field checks and type coercion: the machinery every config section validates with.

A field check takes a value and returns a complaint (a phrase such as
``"must be >= 1"``) or ``None``; :func:`checked_field` attaches one to a
dataclass field. :func:`coerce` checks a value against the field's annotation
and normalizes it (int -> float, list -> tuple). :class:`Section` runs both for
every field after ``__init__`` and raises one :class:`ConfigError` that lists
every problem, each named by its key path (``lora.rank``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

from lora_jax.errors import ConfigError
from lora_jax.models.registry import MODELS

# ----------------------------------------------------------------------------
# Field checks: each returns a complaint or None.


def at_least(n: float) -> Any:
    """Return a check that a number is at least ``n``."""
    return lambda v: None if v >= n else f"must be >= {n}"


def positive(v: float) -> str | None:
    """Check that a number is greater than 0."""
    return None if v > 0 else "must be > 0"


def unit_interval(v: float) -> str | None:
    """Check that a number is in [0, 1)."""
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def valid_regex(v: str) -> str | None:
    """Check that a string compiles as a regular expression."""
    try:
        re.compile(v)
    except re.error as e:
        return f"is not a valid regex ({e})"
    return None


def safe_name(v: str) -> str | None:
    """Check that a string can name a folder (letters, digits and ``. _ + -``)."""
    ok = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", v)
    return None if ok else "must be a folder name: letters, digits and . _ + - (no spaces or slashes)"


def valid_betas(v: tuple[float, float]) -> str | None:
    """Check that both of Adam's betas are in [0, 1)."""
    return None if all(0.0 <= b < 1.0 for b in v) else "must both be in [0, 1)"


def mesh_axis(v: int) -> str | None:
    """Check a mesh axis size: a positive int, or -1 for the devices the other axes leave."""
    return None if v == -1 or v >= 1 else "must be a positive int, or -1 (the devices the other axes leave)"


def _looks_like_path(v: str) -> bool:
    return "/" in v or os.sep in v or v.endswith(".gguf") or v.startswith((".", "~")) or Path(v).exists()


def known_model(v: str) -> str | None:
    """Check that a string is a registered model name or looks like a path (with a "did you mean")."""
    if v.lower() in MODELS or _looks_like_path(v):
        return None
    close = difflib.get_close_matches(v.lower(), list(MODELS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"unknown model{hint}: give a registered name ({', '.join(sorted(MODELS))}) or a path to a .gguf "
        f"file or a Hugging Face directory (./{v} for a relative path)"
    )


def checked_field(default: Any = dataclasses.MISSING, *, check: Any = None, factory: Any = dataclasses.MISSING) -> Any:
    """Return a dataclass field whose value :class:`Section` checks with ``check``."""
    meta = {"check": check} if check else {}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------
# Typed sections


def show(v: Any) -> str:
    """Return a value with its type for an error message (``int 0``)."""
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


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it normalized (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        try:
            return coerce(value, rest[0], key)
        except ConfigError:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {show(value)}") from None
    if origin is Literal:
        if isinstance(value, bool) or value not in args or not isinstance(value, type(args[0])):
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown value {value!r}; choose one of {', '.join(map(str, args))}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {show(value)}")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected a {tp.__name__}, got {show(value)}")
        return value
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        str: lambda v: isinstance(v, str),
    }[tp]
    if not ok(value):
        extra = " (booleans are not numbers)" if isinstance(value, bool) and tp in (int, float) else ""
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {show(value)}{extra}")
    return float(value) if tp is float else value


_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """Return the resolved field annotations of a config class (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


class Section:
    """Type-checks and normalizes every field after ``__init__``; raises :class:`ConfigError`."""

    section: ClassVar[str] = ""

    def _key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def __post_init__(self) -> None:
        errors: list[str] = []
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):
            key, value = self._key(f.name), getattr(self, f.name)
            try:
                value = coerce(value, hints[f.name], key)
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
