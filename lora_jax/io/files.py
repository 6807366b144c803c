"""Plain files: the package's one atomic write, JSON and safetensors reading, content hashes, lock files.

Importing this module imports no JAX (only numpy and ``ml_dtypes``), so tools
that read stored results (:mod:`lora_jax.plots`) can use it. Nothing here
reads pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lora_jax.errors import CheckpointError, LockedError

PathLike = str | os.PathLike

CORRUPTED = "the file is truncated or corrupted"  # the ``hint`` of :func:`read_json` for files lora-jax wrote


def atomic_write(file: PathLike, data: bytes | str, *, fsync: bool = True) -> None:
    """Write ``data`` so that readers see the old or the new content of ``file``, never a mix.

    The data goes to a temporary file next to ``file`` (its folder is created
    if needed), which is then moved over ``file`` with :func:`os.replace`; a
    failed write leaves no temporary file behind. Text is written as UTF-8.

    Args:
      file: the target file.
      data: bytes, or text.
      fsync: flush the file (and, where possible, its folder) to disk before
        and after the rename, so the new content survives a power loss.

    Examples:
      >>> import tempfile
      >>> f = Path(tempfile.mkdtemp()) / "sub" / "a.txt"
      >>> atomic_write(f, "new\\n")
      >>> f.read_text(), sorted(p.name for p in f.parent.iterdir())
      ('new\\n', ['a.txt'])
    """
    file = Path(file)
    if isinstance(data, str):
        data = data.encode("utf-8")
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not fsync:
        return
    with contextlib.suppress(OSError):  # make the rename durable where directories can be opened
        dfd = os.open(file.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def remove_stale_temporaries(directory: PathLike) -> list[Path]:
    """Remove the temporary files that :func:`atomic_write` calls killed mid-write left under ``directory``.

    Call it only while no other process writes there (e.g. under :func:`locked`).

    Examples:
      >>> import tempfile
      >>> d = Path(tempfile.mkdtemp())
      >>> _ = (d / ".results.csv.k2j4.tmp").write_text("half")
      >>> [p.name for p in remove_stale_temporaries(d)]
      ['.results.csv.k2j4.tmp']
    """
    gone = [p for p in Path(directory).rglob(".*.tmp") if p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def json_bytes(obj: Any) -> bytes:
    """Return ``obj`` as indented JSON bytes with a final newline (NaN and infinity refused)."""
    return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def read_json(file: Path, what: str, *, hint: str | None = None) -> dict:
    """Return the JSON object in ``file``; ``what`` names the file in errors, ``hint`` follows a parse error.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: not valid UTF-8 JSON, or not a JSON object.

    Examples:
      >>> import tempfile
      >>> f = Path(tempfile.mkdtemp()) / "c.json"
      >>> _ = f.write_text('{"r": 8}')
      >>> read_json(f, "the config")
      {'r': 8}
    """
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing {what}")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})" + (f"; {hint}" if hint else "")) from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """Return ``tensors`` serialized in the safetensors format."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def read_safetensors(file: Path, data: bytes | None = None) -> dict[str, np.ndarray]:
    """Parse a safetensors file into numpy arrays (bfloat16 through ``ml_dtypes``); no pickle anywhere.

    Args:
      file: the file (named in errors).
      data: its bytes if already read.

    Raises:
      CheckpointError: a truncated or corrupted file, or a tensor that is not a float.

    Examples:
      >>> import tempfile
      >>> f = Path(tempfile.mkdtemp()) / "t.safetensors"
      >>> _ = f.write_bytes(safetensors_bytes({"a": np.ones((2, 3), np.float32)}))
      >>> read_safetensors(f)["a"].shape
      (2, 3)
    """
    from safetensors import SafetensorError, deserialize

    if data is None:
        data = file.read_bytes()
    try:
        entries = deserialize(data)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: truncated or corrupted safetensors file ({e}); save it again") from e
    out = {}
    for name, e in entries:
        if e["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {e['dtype']}; LoRA factors must be floats")
        out[name] = np.frombuffer(e["data"], _ST_DTYPES[e["dtype"]]).reshape(e["shape"])
    return out


def sha256(data: bytes) -> str:
    """Return ``"sha256:<hex digest>"`` of ``data``.

    Examples:
      >>> sha256(b"")[:15]
      'sha256:e3b0c442'
    """
    return "sha256:" + hashlib.sha256(data).hexdigest()


def version() -> str:
    """Return the installed lora-jax version (recorded in the files written)."""
    import lora_jax

    return lora_jax.__version__


LOCK_NAME = ".lora-jax.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def locked(directory: PathLike, what: str = "lora-jax"):
    """Hold ``directory`` for this process while the block runs (a lock file naming pid and host).

    A second process that asks for the same directory gets a :class:`LockedError`
    naming the holder; a lock left by a process that no longer runs on this host
    is taken over with a warning. Once held, the temporary files that killed
    :func:`atomic_write` calls left under ``directory`` are removed
    (:func:`remove_stale_temporaries`: only the holder may, as no one else writes
    there). The lock file is removed on exit.

    Examples:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> with locked(d):
      ...     (Path(d) / LOCK_NAME).exists()
      True
      >>> (Path(d) / LOCK_NAME).exists()
      False
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    may_take_over = True  # once: if another process takes the stale lock at the same moment, it wins
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if may_take_over and host == me["host"] and isinstance(pid, int) and not _alive(pid):
                warnings.warn(f"{lock}: taking over a lock left by process {pid}, which no longer runs", stacklevel=3)
                lock.unlink(missing_ok=True)
                may_take_over = False
                continue
            raise LockedError(
                f"{directory} is in use by another {what} process (pid {pid} on {host}; lock file {lock}). "
                "Wait for it to finish, or give this one another --output-dir; if that process is gone "
                "(e.g. on another host), delete the lock file."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        remove_stale_temporaries(directory)
        yield lock
    finally:
        lock.unlink(missing_ok=True)
