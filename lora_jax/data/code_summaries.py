"""Function -> one-line summary pairs extracted from the installed Python standard library.

Every function and method of the stdlib (outside tests, ``idlelib``,
``lib2to3``, ``turtledemo``, ``ensurepip``, ``site-packages``...) whose docstring
starts with a one-line summary becomes a pair: the function's source with the
docstring removed, and the docstring's first line. A first line qualifies when it
has 3 to 30 words, and either ends a sentence (``.``, ``!``, ``?``) or stands alone
(a blank line or nothing follows it) and does not end in ``:``, ``,``, ``;`` or
``-``; signatures such as ``get(key) -> value`` and grammar rules such as
``atom = [CFWS] 1*atext [CFWS]`` do not qualify. The body left
after removing the docstring must do something (not only ``pass``, ``...``, a
string or ``raise NotImplementedError``), and identical sources are kept once
(the first in path order).

The split is by file: ``sha256(relative path)`` puts each file in ``train``
(80%), ``val`` (10%) or ``test`` (10%), so no module leaks across splits. (Whole
files move together, and a few large ones hold hundreds of functions: 5% splits
would leave about a hundred functions to evaluate on.)

Extraction takes a few seconds; :func:`load` caches the records as JSON lines
under :func:`cache_dir`, keyed by the Python version and :data:`EXTRACTOR_VERSION`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import re
import sys
import sysconfig
import tokenize
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from lora_jax.io.files import atomic_write

EXTRACTOR_VERSION = 1
SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}
SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages"}
    | {"pydoc_data", "lib-dynload", "__pycache__"}
)
MIN_WORDS, MAX_WORDS = 3, 30
# ``get(key) -> value``, ``x.__iter__() <==> iter(x)``, ``error(msg : string)``; grammar rules ``atom = ...``.
_NOT_A_SUMMARY = re.compile(r"^[\w.]+\(.*\)\s*($|-+>|<?==>?|:)|^[\w-]+\s*:{0,2}=\s")


class CodeSummary(NamedTuple):
    """One example of the code-summarization task.

    Attributes:
      path: the file, relative to the stdlib root (``/``-separated).
      qualname: ``Class.method`` or ``outer.<locals>.inner``.
      lineno: line of the ``def`` (or of its first decorator) in the file.
      source: the function's source, decorators included, dedented, docstring removed.
      summary: the first line of the docstring.
    """

    path: str
    qualname: str
    lineno: int
    source: str
    summary: str

    @property
    def id(self) -> str:
        """``path:lineno:qualname``, unique within a dataset."""
        return f"{self.path}:{self.lineno}:{self.qualname}"


def split_of(path: str) -> str:
    """The split a file belongs to, from the sha256 of its relative path.

    Examples:
      >>> split_of("json/decoder.py"), split_of("json/decoder.py") == split_of("json/decoder.py")
      ('train', True)
    """
    u = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") / 2.0**64
    edge = 0.0
    for name, frac in SPLITS.items():
        edge += frac
        if u < edge:
            return name
    return name


def summary_line(docstring: str | None) -> str | None:
    """The one-line summary of a docstring, or ``None`` when it has none.

    Args:
      docstring: a cleaned docstring (``ast.get_docstring``).

    Returns:
      The first line, stripped, if it qualifies (see the module docstring).

    Examples:
      >>> summary_line("Return the sum of two numbers.\\n\\nLonger text.")
      'Return the sum of two numbers.'
      >>> summary_line("Return the sum of two\\nnumbers.") is None  # wraps: not a one-line summary
      True
      >>> summary_line("add(a, b) -> number") is None
      True
    """
    if not docstring:
        return None
    lines = docstring.strip().splitlines()
    first = lines[0].strip()
    alone = len(lines) == 1 or not lines[1].strip()
    if not MIN_WORDS <= len(first.split()) <= MAX_WORDS or _NOT_A_SUMMARY.match(first):
        return None
    if first[-1] in ".!?" and not first.endswith(".."):
        return first
    return first if alone and first[-1] not in ":,;-." else None


def _is_trivial(body: list[ast.stmt]) -> bool:
    def trivial(s: ast.stmt) -> bool:
        if isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)):
            return True
        if isinstance(s, ast.Raise) and s.exc is not None:
            exc = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
            return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
        return False

    return all(trivial(s) for s in body)


def _function_source(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's text without its docstring, dedented; ``None`` if that cannot be done cleanly."""
    doc = node.body[0]
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    doc_first = lines[doc.lineno - 1].encode()
    doc_last = lines[doc.end_lineno - 1].encode()
    # The docstring must sit on lines of its own (not ``def f(): "doc"`` or ``"doc"; x = 1``).
    if doc_first[: doc.col_offset].strip() or doc_last[doc.end_col_offset :].strip():
        return None
    kept = lines[first - 1 : doc.lineno - 1]
    rest = lines[doc.end_lineno : node.end_lineno]
    while rest and not rest[0].strip():
        rest = rest[1:]
    indent = lines[first - 1][: len(lines[first - 1]) - len(lines[first - 1].lstrip())]
    out = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in kept + rest]
    text = "\n".join(out).rstrip() + "\n"
    try:
        ast.parse(text)
    except SyntaxError:
        return None
    return text


def _walk(tree: ast.AST):
    """Yield ``(qualname, node)`` for every function in the tree."""
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                yield name, child
                stack.append((child, name + ".<locals>."))
            elif isinstance(child, ast.ClassDef):
                stack.append((child, prefix + child.name + "."))
            else:
                stack.append((child, prefix))


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The ``.py`` files of the standard library the task reads, sorted.

    Args:
      root: the stdlib directory (default ``sysconfig.get_paths()["stdlib"]``).

    Returns:
      Absolute paths, in sorted order, outside :data:`SKIP_DIRS`.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("config-"))
        out += [Path(d) / f for f in sorted(files) if f.endswith(".py")]
    return sorted(out)


def extract(
    files: Iterable[str | os.PathLike] | None = None, root: str | os.PathLike | None = None
) -> list[CodeSummary]:
    """Extract the (source, summary) pairs from standard-library files.

    Args:
      files: the files to read (default :func:`stdlib_files`); files that cannot
        be read or parsed are skipped.
      root: the directory paths are made relative to (default the stdlib).

    Returns:
      The pairs, sorted by path and line, identical sources kept once.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root) if files is None else sorted(Path(f) for f in files)
    records, seen = [], set()
    for path in files:
        try:
            with tokenize.open(path) as f:
                text = f.read()
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        rel = Path(path).resolve().relative_to(root.resolve()).as_posix()
        lines = text.split("\n")
        found = []
        for qualname, node in _walk(tree):
            summary = summary_line(ast.get_docstring(node))
            if summary is None or _is_trivial(node.body[1:]):
                continue
            source = _function_source(lines, node)
            if source is not None:
                lineno = min([node.lineno] + [d.lineno for d in node.decorator_list])
                found.append(CodeSummary(rel, qualname, lineno, source, summary))
        for r in sorted(found, key=lambda r: (r.lineno, r.qualname)):
            if r.source not in seen:
                seen.add(r.source)
                records.append(r)
    return records


def dataset_hash(records: Iterable[CodeSummary]) -> str:
    """The sha256 of the records as canonical JSON lines (what :func:`load` caches).

    Examples:
      >>> dataset_hash([])
      'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    h = hashlib.sha256()
    for r in records:
        h.update(_line(r).encode())
    return h.hexdigest()


def _line(r: CodeSummary) -> str:
    return json.dumps(r._asdict(), ensure_ascii=False, sort_keys=True) + "\n"


def cache_dir() -> Path:
    """Where lora-jax caches prepared data.

    Returns:
      ``$LORA_JAX_CACHE``, else ``$XDG_CACHE_HOME/lora_jax``, else ``~/.cache/lora_jax``.
    """
    if os.environ.get("LORA_JAX_CACHE"):
        return Path(os.environ["LORA_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_jax"


def python_version() -> str:
    """The implementation and version whose stdlib is read, e.g. ``cpython-3.11.7``."""
    return f"{sys.implementation.name}-{platform.python_version()}"


def load(cache: str | os.PathLike | None = None) -> list[CodeSummary]:
    """The stdlib pairs, from the cache when present, else extracted and cached.

    The cache file is ``<cache>/code_summarization/stdlib-<python_version>-x<EXTRACTOR_VERSION>.jsonl``,
    written atomically (a temporary file renamed into place).

    Args:
      cache: the cache directory (default :func:`cache_dir`).

    Returns:
      The records, as :func:`extract` returns them.
    """
    path = Path(cache or cache_dir()) / "code_summarization" / f"stdlib-{python_version()}-x{EXTRACTOR_VERSION}.jsonl"
    if path.exists():
        try:
            with open(path, encoding="utf-8") as f:
                return [CodeSummary(**json.loads(line)) for line in f]
        except (ValueError, TypeError) as e:
            warnings.warn(f"ignoring the unreadable cache {path} ({e}); extracting again", stacklevel=2)
    records = extract()
    try:
        atomic_write(path, "".join(_line(r) for r in records), fsync=False)
    except OSError as e:
        warnings.warn(f"could not cache the extracted stdlib pairs in {path} ({e})", stacklevel=2)
    return records
