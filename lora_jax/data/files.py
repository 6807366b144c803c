"""User data files: JSON lines of prompt/completion pairs or chats, and plain text.

A JSONL file holds one object per line (blank lines are skipped), either

- ``{"prompt": str, "completion": str}``: one user turn and the answer to learn, or
- ``{"messages": [{"role": str, "content": str}, ...]}``: a conversation; the
  loss falls on the ``assistant`` turns.

Other keys are ignored. Every problem is reported as ``path:line: what is wrong``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from lora_jax.errors import DataError


class Conversation(NamedTuple):
    """One example of a user JSONL file.

    Attributes:
      messages: ``{"role", "content"}`` dicts; a prompt/completion row is a user
        turn followed by an assistant turn.
      origin: ``path:line`` of the row.
    """

    messages: tuple[Mapping[str, str], ...]
    origin: str


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of the file's non-blank lines, decoded as UTF-8."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            if text.strip():
                yield n, text


def _parse_row(row: object, where: str) -> tuple[Mapping[str, str], ...]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list, got {json.dumps(msgs)[:80]}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content', got {m!r:.80}")
            for key in ("role", "content"):
                if not isinstance(m[key], str):
                    raise DataError(f"{where}: messages[{i}].{key} must be a string, got {type(m[key]).__name__}")
        if not any(m["role"] == "assistant" for m in msgs[1:]):
            raise DataError(f"{where}: 'messages' has no assistant turn after the first message: nothing to learn")
        return tuple({"role": m["role"], "content": m["content"]} for m in msgs)
    if "prompt" in row and "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
        return ({"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]})
    raise DataError(f"{where}: expected keys 'prompt' and 'completion', or 'messages'; got {sorted(row)}")


def read_jsonl(path: str | os.PathLike) -> list[Conversation]:
    """Read a JSONL file of prompt/completion pairs or chats.

    Args:
      path: the file.

    Returns:
      One :class:`Conversation` per non-blank line.

    Raises:
      DataError: malformed JSON, a row of the wrong shape or types, non-UTF-8 text,
        or a file without rows; the message starts with ``path:line``.

    Examples:
      >>> import pathlib, tempfile
      >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
      >>> _ = p.write_text('{"prompt": "2+2?", "completion": "4"}\\n')
      >>> [m["role"] for m in read_jsonl(p)[0].messages]
      ['user', 'assistant']
    """
    path = Path(path)
    out = []
    for n, text in _lines(path):
        where = f"{path}:{n}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        out.append(Conversation(_parse_row(row, where), where))
    if not out:
        raise DataError(f"{path}: empty file; expected JSON lines with 'prompt' and 'completion', or 'messages'")
    return out


def read_text(path: str | os.PathLike) -> str:
    """Read a plain UTF-8 text file for language modelling.

    Raises:
      DataError: the file is empty (or only whitespace), or a line is not UTF-8.

    Examples:
      >>> import pathlib, tempfile
      >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.txt"
      >>> _ = p.write_text("Hello.\\n")
      >>> read_text(p)
      'Hello.\\n'
    """
    path = Path(path)
    if not any(True for _ in _lines(path)):
        raise DataError(f"{path}: empty file; expected text")
    return path.read_text(encoding="utf-8")
