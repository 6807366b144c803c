"""The YAML reader of configs: a safe loader (plain data only) with two stricter rules.

``1e-4`` reads as a float (YAML 1.2; PyYAML follows YAML 1.1, which reads it as
the string ``'1e-4'``), and a key given twice in one mapping is an error
instead of "last one wins". Errors carry the file, line and column.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from lora_jax.errors import ConfigError


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


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text as plain data; raise :class:`ConfigError` located at ``source``:line:column."""
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
