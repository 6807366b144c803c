"""Checkpoints and interoperability: train state, PEFT folders, merged Hugging Face folders.

Three kinds of files, none of them ever read with pickle (adapter folders in
our own format are in :mod:`lora_jax.adapters`, which uses the helpers here):

- **Train-state checkpoints** (:func:`save_train_state`, :func:`restore_train_state`):
  an orbax ``CheckpointManager`` folder with one sub-folder per step, the last
  ``max_to_keep`` kept. Orbax writes each step into a temporary folder and
  renames it when complete, so a save killed half-way leaves the previous
  steps restorable. A step holds the trainable params, the optimizer state,
  the step counter and the RNG key (typed keys as their key data), plus a
  JSON record: leaf paths, shapes and dtypes, a SHA-256 digest of the arrays,
  the caller's ``extra`` metadata (data position, ...) and the identity of the
  frozen base (a name and :func:`base_hash`). The frozen base itself is never
  written; restoring onto a base with another hash is refused.
- **PEFT folders** (:func:`export_peft`, :func:`import_peft`): ``adapter_config.json``
  and ``adapter_model.safetensors`` as Hugging Face PEFT writes them for the
  built-in Llama and BERT models, readable by ``peft.PeftModel.from_pretrained``.
- **Merged Hugging Face folders** (:func:`export_merged_hf`): ``config.json``,
  ``model.safetensors`` and ``tokenizer.json`` of the model with its adapters
  folded in, readable by ``transformers``' ``from_pretrained``.

Every file is written atomically: to a temporary file in the same folder,
flushed, then moved over the target with :func:`os.replace`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import BaseMismatchError, CheckpointError
from lora_jax.models import bert as _bert
from lora_jax.models import llama as _llama
from lora_jax.models import load_hf as _load_hf
from lora_jax.train import TrainState

PyTree = Any
PathLike = str | os.PathLike

TRAIN_FORMAT = "lora_jax.train_state"
FORMAT_VERSION = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_TENSORS = "adapter_model.safetensors"


# ----------------------------------------------------------------------------
# Hashing and plain files


def _is_typed_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host(x: Any) -> np.ndarray:
    """``x`` as a host numpy array (typed PRNG keys as their key data)."""
    return np.asarray(jax.random.key_data(x) if _is_typed_key(x) else x)


def _strip_adapters(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x.base if _lora.is_lora(x) else x, tree, is_leaf=_lora.is_lora)


def _update(h, path: str, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    h.update(f"{path}|{a.shape}|{a.dtype.name}\n".encode())
    h.update(a.reshape(-1).view(np.uint8))


def base_hash(params: PyTree) -> str:
    """Return a content hash of the frozen base weights of ``params``.

    SHA-256 over every leaf's path, shape, dtype and bytes (and the static
    fields of quantized leaves), with LoRA nodes replaced by their base: the
    raw base, the same base with adapters, and the ``frozen`` half of
    :func:`lora_jax.split` all hash alike. About 0.3 s for SmolLM2-135M in
    float32 on one CPU core.

    Args:
      params: a parameter tree.

    Returns:
      ``"sha256:<64 hex digits>"``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> p = {"w": jnp.ones((4, 3))}
      >>> adapted = _lora.init(jax.random.key(0), p, [_lora.LoraRule(pattern="w", rank=2)])
      >>> base_hash(p) == base_hash(adapted) != base_hash({"w": jnp.zeros((4, 3))})
      True
      >>> base_hash(p)[:7]
      'sha256:'
    """
    h = hashlib.sha256()
    tree = _strip_adapters(params)
    for path, node in _paths.leaves_with_paths(tree, is_leaf=_lora.is_node):
        flatten = getattr(node, "tree_flatten_with_keys", None)
        if _lora.is_node(node) and callable(flatten):  # quantized leaf: its static fields too
            h.update(f"{path}|{type(node).__name__}|{flatten()[1]!r}\n".encode())
    for path, x in _paths.leaves_with_paths(tree):
        _update(h, path, _host(x))
    return "sha256:" + h.hexdigest()


_compute_base_hash = base_hash  # for functions whose keyword argument is named base_hash


def _digest(named: Sequence[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for path, a in named:
        _update(h, path, a)
    return "sha256:" + h.hexdigest()


def _atomic_write(file: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``file``, fsync it, then ``os.replace`` it over ``file``."""
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where directories can be opened
        dfd = os.open(file.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def _read_json(file: Path, what: str) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing {what}")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); the file is truncated or corrupted") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def _read_safetensors(file: Path, data: bytes | None = None) -> dict[str, np.ndarray]:
    """Parse a safetensors file into numpy arrays (bfloat16 through ``ml_dtypes``); no pickle anywhere."""
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


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _version() -> str:
    import lora_jax

    return lora_jax.__version__


# ----------------------------------------------------------------------------
# Train-state checkpoints (orbax)


def checkpoint_manager(directory: PathLike, *, max_to_keep: int = 3, async_save: bool = False):
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
      ValueError: ``max_to_keep`` is not a positive int.
      NotADirectoryError: ``directory`` is a file.

    Examples:
      >>> import tempfile
      >>> m = checkpoint_manager(tempfile.mkdtemp(), max_to_keep=2)
      >>> m.latest_step() is None
      True
      >>> m.close()
    """
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
        raise ValueError(f"max_to_keep must be a positive int, got {max_to_keep!r}")
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory}: expected a checkpoint folder, got a file")
    if directory.is_dir():
        for tmp in directory.iterdir():
            if _TMP_STEP.fullmatch(tmp.name) and tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
    return _open_manager(directory, max_to_keep=max_to_keep, async_save=async_save)


_TMP_STEP = re.compile(r"\d+\.orbax-checkpoint-tmp.*")


def _open_manager(directory: Path, *, max_to_keep: int = 3, async_save: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory, options=options)


@contextlib.contextmanager
def _manager(manager_or_dir, *, create: bool, max_to_keep: int = 3):
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
            raise ValueError(f"two leaves of the train state share the path {path!r}; rename a key")
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
    max_to_keep: int = 3,
) -> int:
    """Save the trainable params, optimizer state, step and RNG key as checkpoint step ``state.step``.

    The frozen half of ``state`` is not written; its :func:`base_hash` and
    ``base_id`` are recorded so :func:`restore_train_state` can refuse another
    base. Arrays are copied to host memory first, so the train step may donate
    its buffers right after this returns.

    Args:
      manager_or_dir: a manager from :func:`checkpoint_manager`, or a folder
        (a manager is opened, used and closed; the save is complete on return).
      state: the :class:`~lora_jax.train.TrainState`.
      base_id: a name for the base model (a hub id or a path), for messages.
      extra: JSON-serializable metadata restored with the state (e.g. the data
        position ``{"epoch": 1, "batch": 420}``).
      base_hash: :func:`base_hash` of ``state.frozen`` if already known
        (otherwise computed here).
      max_to_keep: with a folder, how many latest steps to keep.

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
        if _is_typed_key(x):
            record["key_impl"] = str(jax.random.key_impl(x))
        a = np.array(_host(x))  # a host copy: safe against later buffer donation and async writes
        record.update(shape=list(a.shape), dtype=a.dtype.name)
        arrays.append(a)
        records.append(record)
    step = int(np.asarray(state.step))
    meta = {
        "format": TRAIN_FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_jax_version": _version(),
        "step": step,
        "base": {"id": str(base_id), "hash": base_hash or _compute_base_hash(state.frozen)},
        "leaves": records,
        "lora": _lora_statics(state.trainable),
        "digest": _digest([(r["path"], a) for r, a in zip(records, arrays, strict=True)]),
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
    return step


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
      base_hash: :func:`base_hash` of ``like_state.frozen`` if already known.

    Returns:
      ``(state, extra)``, or ``None`` when the folder holds no checkpoint.

    Raises:
      BaseMismatchError: the checkpoint was saved with another base (the
        message names both).
      CheckpointError: ``step`` is not in the folder; the step is truncated
        or corrupted; it does not fit ``like_state`` (the message names the
        first leaf that differs).

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp, optax
      >>> from lora_jax import train
      >>> p = _lora.init(jax.random.key(0), {"w": jnp.ones((4, 3))}, [_lora.LoraRule(pattern="w", rank=2)])
      >>> state = train.init_state(p, optax.sgd(0.1), jax.random.key(1))
      >>> restore_train_state(tempfile.mkdtemp(), state, base_id="toy") is None  # nothing saved yet
      True
    """
    import orbax.checkpoint as ocp

    with _manager(manager_or_dir, create=False) as m:
        if m is None:
            return None
        steps = list(m.all_steps())
        if step is None:
            step = m.latest_step()
            if step is None:
                return None
        elif step not in steps:
            raise CheckpointError(f"{m.directory}: no checkpoint for step {step}; saved steps: {sorted(steps)}")
        where = f"{m.directory}/{step}"
        try:
            meta = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for a damaged folder
            raise CheckpointError(
                f"{where}: cannot read the checkpoint record ({type(e).__name__}: {e}); the step is truncated "
                f"or corrupted; restore an earlier one with step=... (saved: {sorted(steps)})"
            ) from e
        _check_train_meta(meta, where)
        want = meta["base"]
        have = base_hash or _compute_base_hash(like_state.frozen)
        if want.get("hash") != have:
            raise BaseMismatchError(
                f"{where}: this checkpoint was trained on base {want.get('id')!r} ({str(want.get('hash'))[:19]}) "
                f"but like_state's frozen weights are base {base_id!r} ({have[:19]}); restore it onto the base "
                "it was trained on"
            )
        leaves, treedef = _state_leaves(like_state)
        mine = []
        targets = []
        for path, x in leaves:
            if _is_typed_key(x):
                data = jax.eval_shape(jax.random.key_data, x)
                mine.append((path, tuple(data.shape), np.dtype(data.dtype).name))
                targets.append(np.zeros(data.shape, data.dtype))
            else:
                dtype = np.dtype(x.dtype)
                mine.append((path, tuple(x.shape), dtype.name))
                targets.append(
                    jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
                    if isinstance(x, jax.Array)
                    else np.asarray(x)
                )
        if [(r["path"], tuple(r["shape"]), r["dtype"]) for r in meta["leaves"]] != mine:
            raise CheckpointError(
                f"{where}: the checkpoint does not fit like_state: {_first_difference(meta['leaves'], mine)}. "
                "Build like_state with the LoRA rules, ranks and optimizer the checkpoint was trained with."
            )
        for (path, like), record in zip(leaves, meta["leaves"], strict=True):
            impl = str(jax.random.key_impl(like)) if _is_typed_key(like) else None
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
            raise CheckpointError(
                f"{where}: cannot read the checkpoint arrays ({type(e).__name__}: {e}); the step is truncated "
                f"or corrupted; restore an earlier one with step=... (saved: {sorted(steps)})"
            ) from e
    if _digest([(r["path"], _host(a)) for r, a in zip(meta["leaves"], arrays, strict=True)]) != meta["digest"]:
        raise CheckpointError(
            f"{where}: the arrays do not match the digest recorded at save time; the step is corrupted"
        )
    out = []
    for (_, like), a in zip(leaves, arrays, strict=True):
        out.append(
            jax.random.wrap_key_data(jnp.asarray(a), impl=jax.random.key_impl(like)) if _is_typed_key(like) else a
        )
    trainable, opt_state, step_, key = treedef.unflatten(out)
    state = TrainState(step_, trainable, like_state.frozen, opt_state, key)
    return state, meta["extra"]


def _check_train_meta(meta: Any, where: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != TRAIN_FORMAT:
        raise CheckpointError(f"{where}: not a lora-jax train-state checkpoint (no '{TRAIN_FORMAT}' record)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: written by lora-jax {meta.get('lora_jax_version')} in format version "
            f"{meta['format_version']}; this lora-jax {_version()} reads up to {FORMAT_VERSION}; upgrade lora-jax"
        )
    missing = [k for k in ("base", "leaves", "lora", "digest", "extra") if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: the checkpoint record lacks {missing}; it is corrupted")


# ----------------------------------------------------------------------------
# Fitting factors onto a base


def _base_leaves(base_params: PyTree) -> tuple[list[tuple[str, Any]], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(_strip_adapters(base_params), is_leaf=_lora.is_node)
    return [(_paths.path_str(p), x) for p, x in flat], treedef


def _no_such_path(file: Path, path: str, leaves: list[tuple[str, Any]]) -> CheckpointError:
    near = ", ".join(_paths.nearby_paths([p for p, _ in leaves], path, n=4))
    return CheckpointError(f"{file}: adapter path {path!r} is not in the base params (nearby: {near})")


def _check_factors(file: Path, path: str, base: Any, a: np.ndarray, b: np.ndarray, in_ndim: int) -> None:
    shape = tuple(base.shape)
    if in_ndim >= len(shape):
        raise CheckpointError(f"{file}: {path!r}: in_ndim={in_ndim} does not fit the base weight of shape {shape}")
    d_in, d_out = math.prod(shape[:in_ndim]), math.prod(shape[in_ndim:])
    r = a.shape[-1] if a.ndim == 2 else -1
    if a.shape != (d_in, r) or b.shape != (r, d_out):
        raise CheckpointError(
            f"{file}: {path!r}: factors A {a.shape} and B {b.shape} do not fit the base weight of shape {shape} "
            f"(expected A ({d_in}, r) and B (r, {d_out}))"
        )


# ----------------------------------------------------------------------------
# PEFT folders

# Our role paths inside a layer -> the module name inside a Hugging Face layer.
_HF_ROLES = {
    "llama": {
        "attn/q_proj": "self_attn.q_proj",
        "attn/k_proj": "self_attn.k_proj",
        "attn/v_proj": "self_attn.v_proj",
        "attn/o_proj": "self_attn.o_proj",
        "mlp/gate_proj": "mlp.gate_proj",
        "mlp/up_proj": "mlp.up_proj",
        "mlp/down_proj": "mlp.down_proj",
    },
    "bert": {
        "attn/q_proj": "attention.self.query",
        "attn/k_proj": "attention.self.key",
        "attn/v_proj": "attention.self.value",
        "attn/o_proj": "attention.output.dense",
        "mlp/up_proj": "intermediate.dense",
        "mlp/down_proj": "output.dense",
    },
}
_HF_LAYER = {"llama": "model.layers.{}.", "bert": "encoder.layer.{}."}
_HF_LAYER_RE = {"llama": r"(?:model\.)?layers\.(\d+)\.(.+)", "bert": r"(?:bert\.)?encoder\.layer\.(\d+)\.(.+)"}
_HF_TOP = {"llama": {"lm_head": "lm_head"}, "bert": {}}
# Short names PEFT would also match in modules our models do not have (BERT's pooler.dense).
_AMBIGUOUS = {"llama": set(), "bert": {"dense"}}
MODEL_KINDS = ("llama", "bert")


def _kind(model_kind: str | None, params: PyTree) -> str:
    if model_kind is None:
        return "bert" if isinstance(params, dict) and "pos_embed" in params else "llama"
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}")
    return model_kind


def hf_module_name(path: str, model_kind: str) -> str | None:
    """Return the Hugging Face module name of one of our kernel paths (``None`` if it has none).

    Examples:
      >>> hf_module_name("layers/3/attn/q_proj/kernel", "llama")
      'model.layers.3.self_attn.q_proj'
      >>> hf_module_name("layers/0/mlp/up_proj/kernel", "bert")
      'encoder.layer.0.intermediate.dense'
    """
    model_kind = _kind(model_kind, None)
    if path in _HF_TOP[model_kind]:
        return _HF_TOP[model_kind][path]
    m = re.fullmatch(r"layers/(\d+)/(.+)/kernel", path)
    if m and m.group(2) in _HF_ROLES[model_kind]:
        return _HF_LAYER[model_kind].format(m.group(1)) + _HF_ROLES[model_kind][m.group(2)]
    return None


def _our_path(module: str, model_kind: str) -> str | None:
    for ours, theirs in _HF_TOP[model_kind].items():
        if module == theirs:
            return ours
    m = re.fullmatch(_HF_LAYER_RE[model_kind], module)
    if m:
        roles = {v: k for k, v in _HF_ROLES[model_kind].items()}
        if m.group(2) in roles:
            return f"layers/{m.group(1)}/{roles[m.group(2)]}/kernel"
    return None


def _number(x: float) -> int | float:
    r = round(x)
    return int(r) if math.isclose(x, r, rel_tol=1e-9, abs_tol=1e-12) else x


def _most_common(values: list) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def export_peft(
    directory: PathLike,
    params: PyTree,
    *,
    base_model_name_or_path: str,
    model_kind: str = "llama",
    rslora: bool | None = None,
) -> Path:
    """Write the adapters of a built-in Llama or BERT model as a Hugging Face PEFT LoRA folder.

    ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight``
    ``(r, in) = A^T`` and ``lora_B.weight`` ``(out, r) = B^T`` per module
    (``model.layers.<i>.self_attn.q_proj`` for Llama,
    ``encoder.layer.<i>.attention.self.query`` for BERT). ``adapter_config.json``
    gives the most common rank and alpha as ``r`` and ``lora_alpha`` and the
    others in ``rank_pattern`` / ``alpha_pattern`` (keys: escaped full module
    names). Each module's ``lora_alpha`` is ``scale * r`` (``scale * sqrt(r)``
    with rsLoRA), so PEFT's ``lora_alpha / r`` gives our scale back.
    ``target_modules`` lists short names (``q_proj``) when they select exactly
    the adapted modules, full module names otherwise.

    Args:
      directory: the folder (created if needed).
      params: adapted params (LoRA weights on 2-D kernels, ``in_ndim=1``).
      base_model_name_or_path: recorded for PEFT (the hub id or folder of the base).
      model_kind: ``"llama"`` (``LlamaForCausalLM``) or ``"bert"`` (``BertModel``).
      rslora: write ``use_rslora``; default: only when every ``scale * r`` is
        fractional and every ``scale * sqrt(r)`` whole.

    Returns:
      The folder.

    Raises:
      ValueError: no LoRA weight, or one PEFT cannot express (an embedding, a
        kernel with several input axes, a path with no Hugging Face module).

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> base = {"layers": [{"attn": {"q_proj": {"kernel": jnp.ones((8, 8))}}}]}
      >>> p = _lora.init(jax.random.key(0), base, [_lora.LoraRule(pattern=".*q_proj/kernel", rank=2, alpha=6)])
      >>> d = export_peft(tempfile.mkdtemp(), p, base_model_name_or_path="tiny")
      >>> cfg = json.loads((d / "adapter_config.json").read_text())
      >>> cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
      (2, 6, ['q_proj'])
      >>> import_peft(d, base)["layers"][0]["attn"]["q_proj"]["kernel"].scale
      3.0
    """
    model_kind = _kind(model_kind, params)
    nodes = _lora.nodes(params)
    if not nodes:
        raise ValueError("export_peft: params hold no LoRA weight")
    modules = {}
    for path, n in nodes:
        name = hf_module_name(path, model_kind)
        if name is None:
            hint = " (PEFT's embedding LoRA is not exported)" if path in ("embed", "pos_embed", "type_embed") else ""
            raise ValueError(
                f"export_peft: LoRA weight {path!r} has no {model_kind} module in PEFT's naming{hint}; "
                f"supported: layers/<i>/({'|'.join(_HF_ROLES[model_kind])})/kernel"
                + (", lm_head" if _HF_TOP[model_kind] else "")
            )
        if n.in_ndim != 1 or len(n.lora_a.shape) != 2:
            raise ValueError(f"export_peft: {path!r} has in_ndim={n.in_ndim}; PEFT Linear layers need in_ndim=1")
        modules[name] = n
    if rslora is None:
        fractional = all(not isinstance(_number(n.scale * n.rank), int) for n in modules.values())
        whole = all(isinstance(_number(n.scale * math.sqrt(n.rank)), int) for n in modules.values())
        rslora = fractional and whole
    alphas = {m: _number(n.scale * (math.sqrt(n.rank) if rslora else n.rank)) for m, n in modules.items()}
    ranks = {m: n.rank for m, n in modules.items()}
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    short = {m.rsplit(".", 1)[-1] for m in modules}
    all_kernels = [
        hf_module_name(p, model_kind)
        for p, _ in _paths.leaves_with_paths(_strip_adapters(params), is_leaf=_lora.is_node)
    ]
    complete = all(m in modules for m in all_kernels if m and m.rsplit(".", 1)[-1] in short)
    targets = sorted(short) if complete and not short & _AMBIGUOUS[model_kind] else sorted(modules)
    tensors = {}
    for m, n in modules.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = np.asarray(n.lora_a).T
        tensors[f"base_model.model.{m}.lora_B.weight"] = np.asarray(n.lora_b).T
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if model_kind == "llama" else "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common([float(n.dropout) for n in modules.values()]),
        "target_modules": targets,
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
        "use_rslora": bool(rslora),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / PEFT_TENSORS, _safetensors_bytes(tensors))
    _atomic_write(directory / PEFT_CONFIG, _json_bytes(config))
    return directory


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key matching the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight")
# Settings whose non-default value means weights PEFT trains that a LoRA node cannot hold.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "layer_replication": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
}


def import_peft(directory: PathLike, base_params: PyTree, model_kind: str | None = None) -> PyTree:
    """Read a Hugging Face PEFT LoRA folder into LoRA weights on ``base_params``.

    Each module's scale is ``lora_alpha / r`` (``/ sqrt(r)`` with
    ``use_rslora``), with ``rank_pattern`` / ``alpha_pattern`` resolved as PEFT
    does; ``A = lora_A^T``, ``B = lora_B^T``; dropout from ``lora_dropout``.

    Args:
      directory: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
      base_params: params of the built-in model (adapters already in it are replaced).
      model_kind: ``"llama"`` or ``"bert"``; default: ``"bert"`` if the params
        have ``pos_embed``, else ``"llama"``.

    Returns:
      ``base_params`` with the adapted kernels as :class:`~lora_jax.lora.LoraWeight` s.

    Raises:
      FileNotFoundError: a file is missing.
      CheckpointError: pickle-only weights (``adapter_model.bin``), a corrupted
        file, a PEFT feature a LoRA node cannot hold (DoRA, trained biases,
        ``modules_to_save``, ...), an unknown tensor name, or a shape that does
        not fit the base (the first one is named).
    """
    model_kind = _kind(model_kind, base_params)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such PEFT adapter folder")
    cfg_file, file = directory / PEFT_CONFIG, directory / PEFT_TENSORS
    config = _read_json(cfg_file, f"{PEFT_CONFIG} (the PEFT adapter config)")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type={config.get('peft_type')!r}; only LORA adapters are read")
    for key, allowed in _UNSUPPORTED.items():
        if config.get(key, allowed[0]) not in allowed:
            raise CheckpointError(
                f"{cfg_file}: {key}={config[key]!r} is not supported (a LoRA node holds A and B only); "
                f"expected {allowed[0]!r}"
            )
    if not file.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _load_hf.PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{directory / pickles[0]}: pickle adapter weights are refused (unpickling runs arbitrary code); "
                "convert once, in an environment you trust: PeftModel.from_pretrained(model, DIR).save_pretrained(DIR)"
            )
        raise FileNotFoundError(f"{file}: missing PEFT adapter weights")
    tensors = _read_safetensors(file)
    factors: dict[str, dict[str, np.ndarray]] = {}
    for name, x in tensors.items():
        m = _PEFT_KEY.fullmatch(name)
        if not m:
            raise CheckpointError(f"{file}: tensor {name!r} is not a LoRA factor (lora_A/lora_B); not supported")
        factors.setdefault(m.group("module"), {})[m.group("ab")] = x
    leaves, treedef = _base_leaves(base_params)
    by_path = dict(leaves)
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    dropout = float(config.get("lora_dropout") or 0.0)
    new: dict[str, _lora.LoraWeight] = {}
    for module, ab in factors.items():
        path = _our_path(module, model_kind)
        if path is None:
            raise CheckpointError(f"{file}: module {module!r} has no counterpart in the built-in {model_kind} model")
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{file}: module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        if path not in by_path:
            raise _no_such_path(file, path, leaves)
        a, b = ab["A"].T, ab["B"].T
        _check_factors(file, f"{module} -> {path}", by_path[path], a, b, 1)
        r = _pattern_value(config.get("rank_pattern") or {}, module, r0)
        if r != a.shape[1]:
            raise CheckpointError(f"{file}: {module!r} has rank {a.shape[1]} but {PEFT_CONFIG} gives r={r}")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha0))
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        new[path] = _lora.LoraWeight(by_path[path], jnp.asarray(a), jnp.asarray(b), scale, 1, dropout)
    if not new:
        raise CheckpointError(f"{file}: no LoRA tensors")
    return treedef.unflatten([new.get(p, x) for p, x in leaves])


# ----------------------------------------------------------------------------
# Merged Hugging Face folders


def _hf_config(params: PyTree, config: Any, dtype_name: str) -> tuple[dict, list]:
    if isinstance(config, _llama.LlamaConfig):
        c = config
        layer0 = params["layers"][0]
        o_bias = "bias" in layer0["attn"]["o_proj"]
        mlp_bias = "bias" in layer0["mlp"]["up_proj"]
        qwen2 = c.qkv_bias and not o_bias
        hf = {
            "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen2 else "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.dim,
            "intermediate_size": c.ffn_dim,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": c.max_seq_len,
            "rms_norm_eps": c.rms_eps,
            "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "tie_word_embeddings": c.tie_embeddings,
            "dtype": dtype_name,
        }
        if qwen2:
            hf["use_sliding_window"] = False
        else:
            if c.qkv_bias != o_bias:
                raise ValueError("export_merged_hf: an o_proj bias without q/k/v biases has no Hugging Face model")
            hf.update(attention_bias=o_bias, mlp_bias=mlp_bias)
        entries = [("model." + n, p, s, t) for n, p, s, t in _load_hf._llama_entries(c, hf)]
        if not c.tie_embeddings:
            entries.append(("lm_head.weight", ("lm_head",), (c.vocab_size, c.dim), True))
        return hf, entries
    if isinstance(config, _bert.BertConfig):
        c = config
        hf = {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": c.vocab_size,
            "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "intermediate_size": c.ffn_dim,
            "max_position_embeddings": c.max_positions,
            "type_vocab_size": c.type_vocab_size,
            "layer_norm_eps": c.ln_eps,
            "hidden_act": c.act,
            "position_embedding_type": "absolute",
            "dtype": dtype_name,
        }
        return hf, _load_hf._bert_entries(c, hf)
    raise TypeError(f"export_merged_hf: config must be a LlamaConfig or BertConfig, got {type(config).__name__}")


def _at(tree: PyTree, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def export_merged_hf(
    directory: PathLike,
    params: PyTree,
    config: _llama.LlamaConfig | _bert.BertConfig,
    tokenizer: Any = None,
    *,
    original_params: PyTree | None = None,
    dtype: Any = None,
) -> dict[str, float]:
    """Write the model with its adapters folded in as a Hugging Face folder.

    ``config.json``, ``model.safetensors`` (torch layout: kernels transposed)
    and, with a tokenizer, ``tokenizer.json`` and ``tokenizer_config.json``.
    Llama-family configs load with ``transformers.AutoModelForCausalLM``
    (``llama``, or ``qwen2`` for q/k/v biases alone), BERT with ``AutoModel``.
    A quantized base is dequantized and the adapter added to it.

    Args:
      directory: the folder (created if needed).
      params: adapted params (LoRA and quantized leaves allowed).
      config: the model's :class:`~lora_jax.models.llama.LlamaConfig` or
        :class:`~lora_jax.models.bert.BertConfig`.
      tokenizer: a ``tokenizers.Tokenizer`` to save with the model.
      original_params: the float weights a quantized base was made from; with
        them the relative error of each quantized weight is measured.
      dtype: dtype to write (e.g. ``jnp.bfloat16``); default the embedding's dtype.

    Returns:
      ``{path: ||merged_q - merged_float|| / ||merged_float||}`` for every
      weight that was quantized, where ``merged_float`` is the original float
      weight plus the same adapter; empty without ``original_params`` or
      quantized weights.

    Raises:
      TypeError: an unknown config type.
      ValueError: the params do not fit the config (the first leaf is named).

    Examples:
      >>> import tempfile, jax
      >>> cfg = _llama.LlamaConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16)
      >>> p = _lora.init(jax.random.key(1), _llama.init(jax.random.key(0), cfg), [_lora.LoraRule.all_linear(2)])
      >>> d = Path(tempfile.mkdtemp())
      >>> export_merged_hf(d, p, cfg)
      {}
      >>> sorted(f.name for f in d.iterdir()), json.loads((d / "config.json").read_text())["model_type"]
      (['config.json', 'model.safetensors'], 'llama')
    """
    merged = jax.tree.map(_lora.dense, _lora.merge(params), is_leaf=_lora.is_node)
    errors: dict[str, float] = {}
    if original_params is not None:
        original = dict(_paths.leaves_with_paths(_strip_adapters(original_params), is_leaf=_lora.is_node))
        merged_flat = dict(_paths.leaves_with_paths(merged))
        for path, leaf in _paths.leaves_with_paths(params, is_leaf=_lora.is_node):
            q = leaf.base if _lora.is_lora(leaf) else leaf
            if not callable(getattr(q, "dequantize", None)):
                continue
            if path not in original or _lora.is_node(original[path]):
                raise ValueError(f"export_merged_hf: original_params has no float weight at {path!r}")
            want = np.asarray(original[path], np.float32)
            if _lora.is_lora(leaf):
                want = want + np.asarray(leaf.delta_weight(), np.float32)
            got = np.asarray(merged_flat[path], np.float32)
            errors[path] = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    first = merged["embed"]
    dtype = np.dtype(dtype) if dtype is not None else np.dtype(first.dtype)
    hf, entries = _hf_config(merged, config, dtype.name)
    used = set()
    tensors = {}
    for name, path, shape, transpose in entries:
        where = "/".join(str(k) for k in path)
        try:
            x = _at(merged, path)
        except (KeyError, IndexError, TypeError):
            raise ValueError(
                f"export_merged_hf: params have no {where!r}, which {type(config).__name__} needs"
            ) from None
        a = np.asarray(x.T if transpose else x).astype(dtype)
        if a.shape != tuple(shape):
            raise ValueError(f"export_merged_hf: {where!r} has shape {np.shape(x)}; the config implies {shape}")
        tensors[name] = a
        used.add(where)
    left = [p for p, _ in _paths.leaves_with_paths(merged) if p not in used]
    if left:
        raise ValueError(f"export_merged_hf: params the config does not describe: {', '.join(left[:6])}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save

    _atomic_write(directory / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json", _json_bytes(hf))
    if tokenizer is not None:
        _atomic_write(directory / "tokenizer.json", tokenizer.to_str().encode())
        _atomic_write(directory / "tokenizer_config.json", _json_bytes({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return errors
