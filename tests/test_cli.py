"""The command's error contract and its process-level settings."""

import os
import subprocess
import sys

import pytest

from lora_jax import cli, errors, hostmem


@pytest.mark.parametrize(
    "exc, code",
    [
        (errors.LoraError("rank 9 is too large for layers/0/q_proj/kernel; use rank <= 8"), 2),
        (errors.DataError("data.jsonl:3: not JSON"), 2),
        (FileNotFoundError("configs/nope.yaml: no such file"), 2),
        (IsADirectoryError("configs: is a directory"), 2),
    ],
)
def test_input_errors_print_one_paragraph_without_traceback(monkeypatch, capsys, exc, code):
    def fail(_):
        raise exc

    monkeypatch.setattr(cli, "cmd_models", fail)
    assert cli.main(["models"]) == code
    err = capsys.readouterr().err
    assert err.startswith("lora-jax models: error: ") and str(exc) in err and "Traceback" not in err


@pytest.mark.parametrize("exc", [RuntimeError("internal"), ValueError("a bare ValueError is a bug"), KeyError("k")])
def test_other_exceptions_surface_as_bugs(monkeypatch, exc):
    def fail(_):
        raise exc

    monkeypatch.setattr(cli, "cmd_models", fail)
    with pytest.raises(type(exc)):
        cli.main(["models"])


SETTINGS = "from lora_jax import cli, hostmem; cli.main([{args}]); print(hostmem.configured())"


@pytest.mark.skipif(hostmem._libc() is None, reason="glibc malloc only")
@pytest.mark.parametrize(
    "args, env, expected",
    [("'models'", None, "True"), ("'models'", "system", "False"), ("'plot', '/nonexistent'", None, "False")],
)
def test_the_command_applies_the_allocator_settings(args, env, expected):
    environ = {k: v for k, v in os.environ.items() if k != hostmem.ENV}
    if env:
        environ[hostmem.ENV] = env
    r = subprocess.run([sys.executable, "-c", SETTINGS.format(args=args)], env=environ, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == expected


def test_ctrl_c_says_how_to_resume_and_exits_130(monkeypatch, capsys):
    def interrupted(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_models", interrupted)
    assert cli.main(["models"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "run the same command again to resume" in err and "Traceback" not in err
