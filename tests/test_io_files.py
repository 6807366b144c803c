"""Plain-file helpers: the one atomic write, read_json, safetensors reading, and no JAX on import."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lora_jax.errors import CheckpointError
from lora_jax.io import files


def test_atomic_write_bytes_and_text(tmp_path):
    f = tmp_path / "new" / "a.bin"
    files.atomic_write(f, b"\x00\x01")
    files.atomic_write(tmp_path / "b.txt", "héllo\n", fsync=False)
    assert f.read_bytes() == b"\x00\x01" and (tmp_path / "b.txt").read_bytes() == "héllo\n".encode()
    assert (f.stat().st_mode & 0o777) == 0o644


def test_failed_atomic_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    f = tmp_path / "a.txt"
    files.atomic_write(f, "old")

    def fail(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(f, "new")
    monkeypatch.undo()
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_read_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing the config"):
        files.read_json(tmp_path / "c.json", "the config")
    (tmp_path / "c.json").write_text('{"r": ')
    with pytest.raises(CheckpointError, match=r"not valid JSON \(.*\)$"):
        files.read_json(tmp_path / "c.json", "the config")
    with pytest.raises(CheckpointError, match=r"not valid JSON \(.*\); the file is truncated or corrupted"):
        files.read_json(tmp_path / "c.json", "the config", hint=files.CORRUPTED)
    (tmp_path / "c.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="expected a JSON object, got list"):
        files.read_json(tmp_path / "c.json", "the config")


def test_safetensors_roundtrip_and_refusals(tmp_path):
    f = tmp_path / "t.safetensors"
    data = files.safetensors_bytes({"a": np.arange(6, dtype=np.float16).reshape(2, 3)})
    np.testing.assert_array_equal(files.read_safetensors(f, data)["a"], np.arange(6).reshape(2, 3))
    with pytest.raises(CheckpointError, match="truncated or corrupted safetensors file"):
        files.read_safetensors(f, data[:-3])
    with pytest.raises(CheckpointError, match="has dtype I32; LoRA factors must be floats"):
        files.read_safetensors(f, files.safetensors_bytes({"i": np.ones(2, np.int32)}))


def test_importing_files_imports_no_jax():
    code = "import sys, lora_jax.io.files; assert 'jax' not in sys.modules, 'jax imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    import json
    import socket

    from lora_jax.io.files import LOCK_NAME, locked

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match="no longer runs"), locked(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] != int(gone.stdout)
    assert not (tmp_path / LOCK_NAME).exists()
