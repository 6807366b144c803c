"""Names that become paths: one safe path component from any user-given name (stdlib only)."""

from __future__ import annotations

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
