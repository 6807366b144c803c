"""Experiment tracking: a run's metrics as TensorBoard events (and W&B or MLflow when configured).

When a run ends (finished or failed), :func:`log_run` turns the lines of its
``metrics.jsonl`` into scalars: every number of a line is one scalar at the
line's step, tagged with its key (``loss``, ``lr``, ``val_loss``...), and the
final evaluation of ``summary.json`` follows as ``final/<metric>`` at the last
step. The same happens locally and on a Ray worker, next to ``metrics.jsonl``:

    runs/<sweep>/<run>/events.out.tfevents.lora-jax    open with ``tensorboard --logdir runs/<sweep>``

The event file is written by :func:`write_scalar_events` with no TensorFlow
and no extra package: TFRecord framing (length, masked CRC-32C, payload,
masked CRC-32C) around hand-encoded ``Event`` protocol buffers, the format
TensorBoard's readers take. The file is replaced atomically, so a run that
resumes and ends again leaves one event file whose steps match its metrics.

Weights & Biases (``tracking.wandb_project``) and MLflow
(``tracking.mlflow_uri``) receive the same scalars and the resolved config
when configured; they are optional and checked up front by
:func:`check_installed`. A tracker that fails (a service that is down) only
warns: the run's own files are complete either way.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lora_jax.errors import ConfigError
from lora_jax.io.files import atomic_write

EVENTS_NAME = "events.out.tfevents.lora-jax"
"""The file name of a run's TensorBoard events (TensorBoard reads files whose name holds ``tfevents``)."""

FINAL_METRICS = ("val_loss", "val_ppl", "rouge1", "rouge2", "rougeL", "exact_match")
"""The keys of ``summary.json`` logged as ``final/<key>`` at the run's last step."""

INSTALL = {"wandb": "pip install wandb", "mlflow": "pip install mlflow"}
"""The install line of each optional tracker."""


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Return the CRC-32C (Castagnoli) checksum of ``data``.

    Examples:
      >>> hex(crc32c(b"123456789"))  # the check value of the CRC-32C standard
      '0xe3069283'
    """
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    c = crc32c(data)
    return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields encode negatives as ten bytes
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited field (strings, messages)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _f32(v: float) -> float:
    """``v`` as a float32 can hold it: beyond float32's range (a perplexity of exp(100)) it is +-inf, not an error."""
    return v if math.isnan(v) or abs(v) <= _F32_MAX else math.copysign(math.inf, v)


_F32_MAX = 3.4028234663852886e38


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", _f32(v)))
                          for tag, v in scalars.items())
        out += _field(5, values)
    return out


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


def write_scalar_events(file: Path, points: Iterable[tuple[int, Mapping[str, float]]]) -> Path:
    """Write ``(step, {tag: value})`` points as a TensorBoard event file (replaced atomically).

    Examples:
      >>> import tempfile
      >>> f = write_scalar_events(Path(tempfile.mkdtemp()) / EVENTS_NAME, [(1, {"loss": 2.5})])
      >>> data = f.read_bytes()  # two records: the file version, then step 1's scalar
      >>> first = struct.unpack("<Q", data[:8])[0]
      >>> b"brain.Event:2" in data[12:12 + first], b"loss" in data[16 + first:]
      (True, True)
    """
    now = time.time()
    data = _record(_event(now, 0, file_version="brain.Event:2"))
    data += b"".join(_record(_event(now, step, scalars=s)) for step, s in points if s)
    atomic_write(file, data)
    return Path(file)


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def scalar_points(run_dir: Path, summary: Mapping[str, Any] | None = None) -> list[tuple[int, dict[str, float]]]:
    """The scalars of a run: one point per ``metrics.jsonl`` line, then the final metrics of ``summary``."""
    points = []
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                points.append((row["step"], _numbers(row)))
    if summary:
        final = _numbers({f"final/{k}": summary.get(k) for k in FINAL_METRICS})
        if final:
            points.append((int(summary.get("steps") or 0), final))
    return points


def check_installed(tracking) -> None:
    """Raise :class:`ConfigError` when a configured tracker's package is not installed (with the install line)."""
    for key, module in (("wandb_project", "wandb"), ("mlflow_uri", "mlflow")):
        if getattr(tracking, key) is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"tracking.{key}: {getattr(tracking, key)!r} needs the {module} package, which is "
                              f"not installed; run `{INSTALL[module]}` or remove tracking.{key} from the config")


def log_run(run_name: str, cfg, run_dir: Path, summary: Mapping[str, Any]) -> None:
    """Send a run's metrics to the trackers its ``cfg.tracking`` names (TensorBoard events by default)."""
    tr = cfg.tracking
    if not (tr.tensorboard or tr.wandb_project or tr.mlflow_uri):
        return
    points = scalar_points(run_dir, summary)
    if tr.tensorboard:
        write_scalar_events(Path(run_dir) / EVENTS_NAME, points)
    if tr.wandb_project or tr.mlflow_uri:
        from lora_jax import config as _config

        params = _config.to_dict(cfg)
        for on, send, args in ((tr.wandb_project, _log_wandb, (tr.wandb_project, run_name, run_dir)),
                               (tr.mlflow_uri, _log_mlflow, (tr.mlflow_uri, run_name))):
            if not on:
                continue
            try:
                send(*args, params, points)
            except Exception as e:  # a tracking service that is down must not turn a finished run into a failed one
                warnings.warn(f"run {run_name}: could not log to {send.__name__[5:]} ({type(e).__name__}: {e}); "
                              f"its metrics are in {Path(run_dir) / 'metrics.jsonl'}", stacklevel=2)


def _log_wandb(project: str, run_name: str, run_dir: Path, params: dict, points) -> None:
    import wandb

    run = wandb.init(project=project, name=run_name, dir=str(run_dir), config=params, reinit=True)
    try:
        for step, scalars in points:
            run.log(dict(scalars), step=step)
    finally:
        run.finish()


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def _log_mlflow(uri: str, run_name: str, params: dict, points) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_name=run_name):
        mlflow.log_params(_flat(params))
        for step, scalars in points:
            for tag, v in scalars.items():
                mlflow.log_metric(tag.replace("/", "."), v, step=step)
