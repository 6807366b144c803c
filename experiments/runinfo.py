"""Provenance of an experiment run: the commit, a hash of its settings and the versions, written before compute starts.

The experiment scripts import this module from their parent folder::

    info = runinfo.start(out_dir, config)   # writes out_dir/run.json: commit, config, config_hash, started_utc
    ...                                     # the computation
    runinfo.finish(out_dir, info, wall_s=...)

``one_thread()`` (call it before JAX is imported) keeps XLA:CPU to one thread so that a
run leaves the other cores of a shared machine free.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def one_thread() -> None:
    """Set ``XLA_FLAGS`` to one CPU thread unless the caller chose flags already (call before importing JAX)."""
    os.environ.setdefault("XLA_FLAGS", ONE_THREAD_FLAGS)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def config_hash(config: dict) -> str:
    """SHA-256 of the settings as canonical JSON (sorted keys): equal settings, equal hash."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def commit() -> tuple[str, bool]:
    """``(commit, dirty)`` of the checkout the code runs from (``("unknown", True)`` outside git).

    The runner's reading (:func:`lora_jax.runner.telemetry.git_commit`, ``<sha>[+dirty]``), split in two.
    """
    from lora_jax.runner.telemetry import git_commit

    head = git_commit()
    if head is None:
        return "unknown", True
    return head.removesuffix("+dirty"), head.endswith("+dirty")


def start(out_dir: Path, config: dict) -> dict:
    """Write ``out_dir/run.json`` (commit, dirty, config, config_hash, start time) and return it."""
    import jax

    head, dirty = commit()
    info = {"commit": head, "dirty": dirty, "config_hash": config_hash(config), "config": config,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "jax": jax.__version__,
            "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def finish(out_dir: Path, info: dict, **extra) -> dict:
    """Add ``extra`` (wall time, counts) to the run record and rewrite ``out_dir/run.json``."""
    info = {**info, **extra}
    (out_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
