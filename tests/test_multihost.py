"""Several processes: start-up settings, and two processes on 127.0.0.1 against one process.

The two-process case runs ``experiments/benchmarks/multihost_check.py`` in a
subprocess: two workers with 4 host CPU devices each form one 8-device mesh
through ``jax.distributed`` (gloo CPU collectives) and save a checkpoint
together; the launching process trains the same steps on 8 devices of its own
and restores the workers' checkpoint.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_jax import cli, distributed
from lora_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_settings_come_from_arguments_then_environment():
    env = {"LORA_JAX_COORDINATOR": "10.0.0.1:99", "JAX_NUM_PROCESSES": "4", "LORA_JAX_PROCESS_ID": "3"}
    assert distributed.settings(environ=env) == {"coordinator": "10.0.0.1:99", "num_processes": 4, "process_id": 3}
    assert distributed.settings(process_id=0, environ=env)["process_id"] == 0
    assert distributed.settings(environ={}) is None


@pytest.mark.parametrize("args, match", [
    ({"coordinator": "h:1"}, "missing --num-processes, --process-id"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, r"must be in 0\.\.1"),
    ({"coordinator": "h:1", "num_processes": "two", "process_id": 0}, "must be ints"),
    ({"coordinator": "host", "num_processes": 2, "process_id": 0}, "host:port"),
])
def test_bad_settings_are_refused(args, match):
    with pytest.raises(ConfigError, match=match):
        distributed.settings(**args, environ={})


def test_cli_refuses_incomplete_process_flags(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\n")
    assert cli.main(["plan", str(cfg), "--no-compile", "--coordinator", "127.0.0.1:1"]) == 2
    assert "missing --num-processes, --process-id" in capsys.readouterr().err


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path):
    out = tmp_path / "mh.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/benchmarks/multihost_check.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert len(res["losses_two_processes"]) == 3
    assert res["multiprocess_loss_rel_diff"] <= 1e-5, res
    assert res["restored_step"] == 3 and res["restored_max_rel_diff"] <= 1e-5, res
