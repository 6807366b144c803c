"""Names that become paths: a safe path component from a user-given name; the check of names read from files.

Stdlib only.
"""

from __future__ import annotations

import os
import re
import unicodedata

from lora_jax.errors import ConfigError


def path_name(name: str, what: str = "name") -> str:
    """``name`` as one safe path component: letters, digits and ``._+-`` kept, anything else becomes ``-``.

    Names that would leave their folder (``..``, ``a/b``) cannot: separators are
    replaced too. Spaces and non-ASCII letters are slugged, not refused.

    Raises:
      ConfigError: nothing usable is left of ``name``.

    Examples:
      >>> path_name("../../../x"), path_name("my run, café"), path_name("lora_r16")
      ('x', 'my-run-cafe', 'lora_r16')
    """
    ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()  # café -> cafe
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", ascii_name).strip("-.+_")
    if not slug:
        raise ConfigError(f"{what} {name!r} has no letter or digit to name a folder with; give e.g. 'run1'")
    return slug


def unsafe_component(name: str) -> str | None:
    """Why ``name`` (read from a file we did not just write) cannot be joined to its folder as one entry, or ``None``.

    Unlike :func:`path_name` nothing is rewritten: the name must already be one
    plain file or folder name (not empty, no NUL, not absolute, no separator, not ``.`` or ``..``).

    Examples:
      >>> unsafe_component("lora_r4") is None, unsafe_component("../x")
      (True, "has a path separator or '..'")
    """
    if not name.strip():
        return "is empty"
    if "\0" in name:
        return "holds a NUL character"
    if os.path.isabs(name) or name.startswith("~"):
        return "is an absolute path"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "has a path separator or '..'"
    return None
