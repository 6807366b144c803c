"""Train-state checkpoints: an orbax folder of steps tied to the frozen base they were trained on.

:func:`save_train_state` and :func:`restore_train_state` use an orbax
``CheckpointManager`` folder with one sub-folder per step, the last
``max_to_keep`` kept. Orbax writes each step into a temporary folder and
renames it when complete, so a save killed half-way leaves the previous steps
restorable. A step holds the trainable params, the optimizer state, the step
counter and the RNG key (typed keys as their key data), plus a JSON record:
leaf paths, shapes and dtypes, a SHA-256 digest of the arrays, the caller's
``extra`` metadata (data position, ...) and the identity of the frozen base (a
name and :func:`~lora_jax.io.hashing.base_hash`). The frozen base itself is
never written; restoring onto a base with another hash is refused. Nothing is
read with pickle.

Sharded states (:mod:`lora_jax.sharding`) save and restore as they are: a
save gathers each array's whole value (from every process, which all call
it; process 0 writes the file list), and a restore places each array on the
sharding of ``like_state``'s array, so a step saved on one mesh restores on
another mesh or on one device.

Once a step is complete, the size and SHA-256 of each of its files are written
beside them (``lora_jax_files.json``), so a file truncated or changed later is
named before orbax reads it. ``restore_train_state(..., fallback=True)`` skips
damaged steps, newest first, with a warning, and restores the latest good one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import BaseMismatchError, CheckpointError
from lora_jax.io import hashing as _hashing
from lora_jax.io.files import atomic_write, version
from lora_jax.io.hashing import digest, host_array, is_typed_key
from lora_jax.train import TrainState

PyTree = Any
PathLike = str | os.PathLike

TRAIN_FORMAT = "lora_jax.train_state"
FORMAT_VERSION = 1
FILES_NAME = "lora_jax_files.json"  # size and SHA-256 of each file of a complete step, written beside them
KEEP = 2  # steps kept by default: the latest, and one to fall back to when the latest is damaged


class _DamagedStep(CheckpointError):
    """A saved step whose files are truncated or corrupted (the ones ``fallback`` skips)."""


def checkpoint_manager(directory: PathLike, *, max_to_keep: int = KEEP, async_save: bool = False):
    """Open (creating it) an orbax ``CheckpointManager`` for :func:`save_train_state`.

    The folder is meant to have one writer: opening it removes the temporary
    folders that a killed save left behind.

    Args:
      directory: the checkpoint folder (one sub-folder per step).
      max_to_keep: how many of the latest steps to keep; older ones are deleted.
      async_save: write in a background thread; :func:`save_train_state` then
        returns once the arrays are copied to host memory. Call
        ``manager.wait_until_finished()`` before reading the folder, and
        ``manager.close()`` at the end.

    Returns:
      An ``orbax.checkpoint.CheckpointManager``.

    Raises:
      CheckpointError: ``max_to_keep`` is not a positive int.
      NotADirectoryError: ``directory`` is a file.

    Examples:
      >>> import tempfile
      >>> m = checkpoint_manager(tempfile.mkdtemp(), max_to_keep=2)
      >>> m.latest_step() is None
      True
      >>> m.close()
    """
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
        raise CheckpointError(f"max_to_keep must be a positive int, got {max_to_keep!r}")
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory}: expected a checkpoint folder, got a file")
    if directory.is_dir():
        for tmp in directory.iterdir():
            if _TMP_STEP.fullmatch(tmp.name) and tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
    return _open_manager(directory, max_to_keep=max_to_keep, async_save=async_save)


_TMP_STEP = re.compile(r"\d+\.orbax-checkpoint-tmp.*")


def _open_manager(directory: Path, *, max_to_keep: int = KEEP, async_save: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory, options=options)


@contextlib.contextmanager
def _manager(manager_or_dir, *, create: bool, max_to_keep: int = KEEP):
    """Yield a manager; for a folder, a writer's (``create``) or a reader's (``None`` if it does not exist)."""
    if hasattr(manager_or_dir, "latest_step"):
        yield manager_or_dir
        return
    directory = Path(manager_or_dir).absolute()
    if not create and not directory.exists():
        yield None
        return
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory}: expected a checkpoint folder, got a file")
    m = checkpoint_manager(directory, max_to_keep=max_to_keep) if create else _open_manager(directory)
    try:
        yield m
    finally:
        m.close()


def _state_leaves(state: TrainState) -> tuple[list[tuple[str, Any]], Any]:
    if not isinstance(state, TrainState):
        raise TypeError(f"expected a lora_jax.train.TrainState, got {type(state).__name__}")
    names = ("trainable", "opt_state", "step", "key")
    flat, treedef = jax.tree_util.tree_flatten_with_path(tuple(getattr(state, n) for n in names))
    leaves = [(_paths.path_str((names[p[0].idx], *p[1:])), x) for p, x in flat]
    seen: set[str] = set()
    for path, _ in leaves:
        if path in seen:
            raise CheckpointError(f"two leaves of the train state share the path {path!r}; rename a key")
        seen.add(path)
    return leaves, treedef


def _lora_statics(trainable: PyTree) -> dict[str, list]:
    return {p: [float(n.scale), int(n.in_ndim), float(n.dropout)] for p, n in _lora.nodes(trainable)}


def save_train_state(
    manager_or_dir: Any,
    state: TrainState,
    *,
    base_id: str,
    extra: dict | None = None,
    base_hash: str | None = None,
    max_to_keep: int = KEEP,
) -> int:
    """Save the trainable params, optimizer state, step and RNG key as checkpoint step ``state.step``.

    The frozen half of ``state`` is not written; its :func:`~lora_jax.io.hashing.base_hash` and
    ``base_id`` are recorded so :func:`restore_train_state` can refuse another
    base. Arrays are copied to host memory first, so the train step may donate
    its buffers right after this returns.

    Args:
      manager_or_dir: a manager from :func:`checkpoint_manager`, or a folder
        (a manager is opened, used and closed; the save is complete on return,
        and the size and SHA-256 of each file of the step are recorded).
      state: the :class:`~lora_jax.train.TrainState`.
      base_id: a name for the base model (a hub id or a path), for messages.
      extra: JSON-serializable metadata restored with the state (e.g. the data
        position ``{"epoch": 1, "batch": 420}``).
      base_hash: :func:`~lora_jax.io.hashing.base_hash` of ``state.frozen`` if already known
        (otherwise computed here).
      max_to_keep: with a folder, how many latest steps to keep (default 2: the latest, and
        the one :func:`restore_train_state` falls back to when the latest is damaged).

    Returns:
      The step number saved.

    Raises:
      TypeError: ``extra`` is not JSON-serializable.
      CheckpointError: the step is already saved in that folder.

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp, optax
      >>> from lora_jax import train
      >>> p = _lora.init(jax.random.key(0), {"w": jnp.ones((4, 3))}, [_lora.LoraRule(pattern="w", rank=2)])
      >>> state = train.init_state(p, optax.sgd(0.1), jax.random.key(1))
      >>> d = tempfile.mkdtemp()
      >>> save_train_state(d, state, base_id="toy", extra={"batch": 7})
      0
      >>> restored, extra = restore_train_state(d, state, base_id="toy")
      >>> extra, int(restored.step)
      ({'batch': 7}, 0)
    """
    import orbax.checkpoint as ocp

    extra = {} if extra is None else extra
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra must be JSON-serializable (dicts, lists, str, int, finite float): {e}") from e
    leaves, _ = _state_leaves(state)
    arrays, records = [], []
    for path, x in leaves:
        record: dict[str, Any] = {"path": path}
        if is_typed_key(x):
            record["key_impl"] = str(jax.random.key_impl(x))
        a = np.array(host_array(x))  # a host copy (gathered from every process): safe against donation
        record.update(shape=list(a.shape), dtype=a.dtype.name)
        arrays.append(a)
        records.append(record)
    step = int(np.asarray(state.step))
    meta = {
        "format": TRAIN_FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_jax_version": version(),
        "step": step,
        "base": {"id": str(base_id), "hash": base_hash or _hashing.base_hash(state.frozen)},
        "leaves": records,
        "lora": _lora_statics(state.trainable),
        "digest": digest([(r["path"], a) for r, a in zip(records, arrays, strict=True)]),
        "extra": extra,
    }
    with _manager(manager_or_dir, create=True, max_to_keep=max_to_keep) as m:
        if step in m.all_steps():
            raise CheckpointError(
                f"{m.directory}: step {step} is already saved; checkpoints are never overwritten "
                "(restore it, or save after the next train step)"
            )
        args = ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))
        m.save(step, args=args, force=True)
        if not hasattr(manager_or_dir, "latest_step"):
            m.wait_until_finished()
            if jax.process_index() == 0:  # with several processes (one shared folder), the first writes the list
                _write_file_list(Path(m.directory) / str(step))
            _sync(f"lora_jax_saved_{step}")
    return step


def _sync(name: str) -> None:
    """Wait until every process got here (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _write_file_list(step_dir: Path) -> None:
    """Record the size and SHA-256 of every file of a complete step (read back by :func:`_check_file_list`)."""
    files = {}
    for f in sorted(step_dir.rglob("*")):
        if f.is_file() and f.name != FILES_NAME:
            data = f.read_bytes()
            files[f.relative_to(step_dir).as_posix()] = [len(data), hashlib.sha256(data).hexdigest()]
    atomic_write(step_dir / FILES_NAME, json.dumps({"files": files}, indent=0) + "\n")


def _check_file_list(step_dir: Path) -> None:
    """Raise :class:`_DamagedStep` naming the first file of a step that differs from its recorded size or hash.

    A step without the list (saved through a caller's manager, by an older
    lora-jax, or killed between orbax's commit and the list) is left to orbax
    and the digest.
    """
    listing = step_dir / FILES_NAME
    if not listing.is_file():
        return
    try:
        files = json.loads(listing.read_text())["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as e:
        raise _DamagedStep(f"{step_dir}: its file list {FILES_NAME} is unreadable ({e}); the step is corrupted") from e
    for rel, (size, sha) in files.items():
        f = step_dir / rel
        if not f.is_file():
            raise _DamagedStep(f"{step_dir}: the file {rel} is missing; the step is truncated")
        data = f.read_bytes()
        if len(data) != size:
            raise _DamagedStep(f"{step_dir}: the file {rel} has {len(data)} bytes, {size} were written; "
                               "the step is truncated")
        if hashlib.sha256(data).hexdigest() != sha:
            raise _DamagedStep(f"{step_dir}: the file {rel} changed after it was written; the step is corrupted")


def latest_step(manager_or_dir: Any) -> int | None:
    """Return the latest complete step in a checkpoint folder, or ``None`` when there is none.

    Examples:
      >>> latest_step("/nonexistent/folder") is None
      True
    """
    with _manager(manager_or_dir, create=False) as m:
        return None if m is None else m.latest_step()


def _first_difference(saved: list[dict], mine: list[tuple[str, tuple, str]]) -> str:
    theirs = {r["path"]: (tuple(r["shape"]), r["dtype"]) for r in saved}
    ours = {p: (s, d) for p, s, d in mine}
    for r in saved:
        p = r["path"]
        if p not in ours:
            return f"the checkpoint has {p!r} {theirs[p][0]} {theirs[p][1]}, like_state has no such leaf"
        if ours[p] != theirs[p]:
            return f"{p!r} is {theirs[p][0]} {theirs[p][1]} in the checkpoint, {ours[p][0]} {ours[p][1]} in like_state"
    for p, s, d in mine:
        if p not in theirs:
            return f"like_state has {p!r} {s} {d}, the checkpoint has no such leaf"
    return "the leaves are in another order"


def restore_train_state(
    manager_or_dir: Any,
    like_state: TrainState,
    *,
    base_id: str,
    step: int | None = None,
    base_hash: str | None = None,
    fallback: bool = False,
) -> tuple[TrainState, dict] | None:
    """Restore a train state saved by :func:`save_train_state` onto the frozen base of ``like_state``.

    Args:
      manager_or_dir: a manager from :func:`checkpoint_manager`, or a folder.
      like_state: a state of the same structure (same rules, ranks, optimizer),
        e.g. a fresh :func:`~lora_jax.train.init_state`; its ``frozen`` half
        is the base the restored state uses, and its arrays' shardings are the
        ones restored onto. Its values are not read (donated buffers are fine).
      base_id: a name for that base, for messages.
      step: the step to restore; default the latest.
      base_hash: :func:`~lora_jax.io.hashing.base_hash` of ``like_state.frozen`` if already known.
      fallback: with ``step=None``, a damaged step (truncated or corrupted
        files, a torn record, arrays that fail their digest) is skipped with a
        warning naming it and the step restored instead, newest first, so a
        run resumes from the previous good step (``state.step`` says which).
        The damaged steps stay in the folder (:func:`delete_steps_after` removes
        them). A step that is intact but does not fit ``like_state`` or its
        base is never skipped.

    Returns:
      ``(state, extra)``, or ``None`` when the folder holds no checkpoint.

    Raises:
      BaseMismatchError: the checkpoint was saved with another base (the
        message names both).
      CheckpointError: ``step`` is not in the folder; the step is truncated
        or corrupted (with ``fallback``: every step is); it does not fit
        ``like_state`` (the message names the first leaf that differs).

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp, optax
      >>> from lora_jax import train
      >>> p = _lora.init(jax.random.key(0), {"w": jnp.ones((4, 3))}, [_lora.LoraRule(pattern="w", rank=2)])
      >>> state = train.init_state(p, optax.sgd(0.1), jax.random.key(1))
      >>> restore_train_state(tempfile.mkdtemp(), state, base_id="toy") is None  # nothing saved yet
      True
      >>> d = tempfile.mkdtemp()
      >>> for s in (1, 2):
      ...     _ = save_train_state(d, state._replace(step=jnp.asarray(s)), base_id="toy")
      >>> _ = open(f"{d}/2/meta/metadata", "w").write('{"format": "lora_jax.tr')  # a torn record
      >>> import warnings
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     restored, _ = restore_train_state(d, state, base_id="toy", fallback=True)
      >>> int(restored.step), "step 2" in str(caught[0].message)
      (1, True)
    """
    with _manager(manager_or_dir, create=False) as m:
        if m is None:
            return None
        steps = sorted(m.all_steps())
        if step is not None and step not in steps:
            raise CheckpointError(f"{m.directory}: no checkpoint for step {step}; saved steps: {steps}")
        if step is None and not steps:
            return None
        base_hash = base_hash or _hashing.base_hash(like_state.frozen)  # once, not per step a fallback tries
        if step is not None or not fallback:
            try:
                return _restore_step(m, like_state, steps[-1] if step is None else step, base_id, base_hash)
            except _DamagedStep as e:
                raise _DamagedStep(
                    f"{e}. Restore an earlier step with step=... (saved: {steps}) or fallback=True; from the "
                    f"command line, a re-run resumes from the latest good step, or delete the folder "
                    f"{m.directory} to start the run over"
                ) from e
        damaged = []
        for s in reversed(steps):
            try:
                out = _restore_step(m, like_state, s, base_id, base_hash)
            except _DamagedStep as e:
                damaged.append(f"step {s}: {e}")
                continue
            for d in damaged:
                warnings.warn(f"checkpoint {d}; resuming from step {s} of {m.directory} instead", stacklevel=2)
            return out
    raise CheckpointError(
        f"{m.directory}: every saved step is damaged, none can be resumed from ({'; '.join(damaged)}). "
        f"Delete the folder {m.directory} (rm -r {m.directory}) to start the run over, then run the same "
        "command again"
    )


def delete_steps_after(manager_or_dir: Any, step: int) -> list[int]:
    """Delete the saved steps after ``step`` (e.g. the damaged ones a fallback restore skipped); return them.

    Examples:
      >>> delete_steps_after("/nonexistent/folder", 0)
      []
    """
    with _manager(manager_or_dir, create=False) as m:
        if m is None:
            return []
        later = [s for s in m.all_steps() if s > step]
        for s in later:
            m.delete(s)
        return later


def _restore_step(m, like_state: TrainState, step: int, base_id: str, base_hash: str):
    """Restore one saved step; :class:`_DamagedStep` when its files are truncated or corrupted."""
    import orbax.checkpoint as ocp

    where = f"{m.directory}/{step}"
    _check_file_list(Path(m.directory) / str(step))
    try:
        meta = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for a damaged folder
        raise _DamagedStep(
            f"{where}: cannot read the checkpoint record ({type(e).__name__}: {e}); the step is truncated "
            "or corrupted"
        ) from e
    _check_train_meta(meta, where)
    want = meta["base"]
    if want.get("hash") != base_hash:
        raise BaseMismatchError(
            f"{where}: this checkpoint was trained on base {want.get('id')!r} ({str(want.get('hash'))[:19]}) "
            f"but like_state's frozen weights are base {base_id!r} ({base_hash[:19]}); restore it onto the base "
            "it was trained on"
        )
    leaves, treedef = _state_leaves(like_state)
    mine = []
    targets = []
    for path, x in leaves:
        if is_typed_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            mine.append((path, tuple(data.shape), np.dtype(data.dtype).name))
            targets.append(np.zeros(data.shape, data.dtype))
        else:
            dtype = np.dtype(x.dtype)
            mine.append((path, tuple(x.shape), dtype.name))
            targets.append(
                jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding) if isinstance(x, jax.Array) else np.asarray(x)
            )
    if [(r["path"], tuple(r["shape"]), r["dtype"]) for r in meta["leaves"]] != mine:
        raise CheckpointError(
            f"{where}: the checkpoint does not fit like_state: {_first_difference(meta['leaves'], mine)}. "
            "Build like_state with the LoRA rules, ranks and optimizer the checkpoint was trained with."
        )
    for (path, like), record in zip(leaves, meta["leaves"], strict=True):
        impl = str(jax.random.key_impl(like)) if is_typed_key(like) else None
        if record.get("key_impl") != impl:
            raise CheckpointError(
                f"{where}: {path!r} is a {record.get('key_impl') or 'raw uint32'} key in the checkpoint but a "
                f"{impl or 'raw uint32'} key in like_state; make like_state's key the same kind"
            )
    statics = _lora_statics(like_state.trainable)
    for path, saved in meta["lora"].items():
        if statics.get(path) != saved:
            raise CheckpointError(
                f"{where}: LoRA weight {path!r} has (scale, in_ndim, dropout) = {tuple(saved)} in the "
                f"checkpoint but {tuple(statics.get(path, ()))} in like_state; use the same LoRA rules"
            )
    try:
        arrays = m.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(targets)))["arrays"]
    except Exception as e:
        raise _DamagedStep(
            f"{where}: cannot read the checkpoint arrays ({type(e).__name__}: {e}); the step is truncated "
            "or corrupted"
        ) from e
    if digest([(r["path"], host_array(a)) for r, a in zip(meta["leaves"], arrays, strict=True)]) != meta["digest"]:
        raise _DamagedStep(f"{where}: the arrays do not match the digest recorded at save time; the step is corrupted")
    out = []
    for (_, like), a in zip(leaves, arrays, strict=True):
        out.append(
            jax.random.wrap_key_data(jnp.asarray(a), impl=jax.random.key_impl(like)) if is_typed_key(like) else a
        )
    trainable, opt_state, step_, key = treedef.unflatten(out)
    return TrainState(step_, trainable, like_state.frozen, opt_state, key), meta["extra"]


def _check_train_meta(meta: Any, where: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != TRAIN_FORMAT:
        raise _DamagedStep(f"{where}: not a lora-jax train-state checkpoint (no '{TRAIN_FORMAT}' record)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: written by lora-jax {meta.get('lora_jax_version')} in format version "
            f"{meta['format_version']}; this lora-jax {version()} reads up to {FORMAT_VERSION}; upgrade lora-jax"
        )
    missing = [k for k in ("base", "leaves", "lora", "digest", "extra") if k not in meta]
    if missing:
        raise _DamagedStep(f"{where}: the checkpoint record lacks {missing}; it is corrupted")

