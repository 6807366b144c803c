"""TensorBoard events next to metrics.jsonl, read back with TensorBoard's own reader; W&B and MLflow calls."""

import importlib.machinery
import json
import sys
import types
import zlib

import numpy as np
import pytest
from tiny_models import write_tiny_chat_gguf, write_yaml_config

from lora_jax import cli, config, tracking
from lora_jax.errors import ConfigError


def tiny_config(path, model, **over):
    cfg = {
        "name": "tb",
        "method": "lora",
        "model": {"name": str(model)},
        "task": {"name": "python-docs-lm", "max_len": 64, "n_train": 16, "n_val": 4},
        "lora": {"rank": 2},
        "train": {"steps": 6, "batch_size": 2, "log_every": 1, "eval_every": 3, "eval_batches": 1},
    }
    return write_yaml_config(path, cfg, over)


def read_events(run_dir):
    """``{tag: [(step, value)]}`` as TensorBoard's EventAccumulator reads the run's folder."""
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    ea = ea_mod.EventAccumulator(str(run_dir), size_guidance={ea_mod.SCALARS: 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_run_writes_events_whose_scalars_equal_metrics_jsonl(tmp_path):
    model = write_tiny_chat_gguf(tmp_path / "tiny.gguf")
    cfg = tiny_config(tmp_path / "c.yaml", model)
    out = tmp_path / "runs"
    assert cli.main(["train", str(cfg), "--quiet", "--output-dir", str(out)]) == 0
    run = out / "tb" / "run"
    assert (run / tracking.EVENTS_NAME).is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and not isinstance(v, bool):
                want.setdefault(k, []).append((r["step"], np.float32(v)))
    summary = json.loads((run / "summary.json").read_text())
    want["final/val_loss"] = [(6, np.float32(summary["val_loss"]))]
    got = read_events(run)
    assert "val_loss" in want and len(want["loss"]) == 6  # eval lines and every step are in the file
    assert {k: v for k, v in got.items() if k in want} == want
    assert set(got) - set(want) <= {f"final/{k}" for k in tracking.FINAL_METRICS}


def test_tensorboard_false_writes_no_events(tmp_path):
    model = write_tiny_chat_gguf(tmp_path / "tiny.gguf")
    cfg = tiny_config(tmp_path / "c.yaml", model, **{"tracking.tensorboard": False, "train.steps": 2})
    assert cli.main(["train", str(cfg), "--quiet", "--output-dir", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / "tb" / "run" / "metrics.jsonl").is_file()
    assert not (tmp_path / "runs" / "tb" / "run" / tracking.EVENTS_NAME).exists()


def test_event_records_are_framed_with_masked_crc32c(tmp_path):
    """Each record: length, masked CRC-32C of it, payload, masked CRC-32C of it (checked independently here)."""
    crc32c = pytest.importorskip("tensorboard.compat.tensorflow_stub.pywrap_tensorflow").masked_crc32c
    f = tracking.write_scalar_events(tmp_path / tracking.EVENTS_NAME, [(1, {"a": 1.0}), (2, {"a": 0.5, "b": -3.0})])
    data, n = f.read_bytes(), 0
    while data:
        length = int.from_bytes(data[:8], "little")
        assert int.from_bytes(data[8:12], "little") == crc32c(data[:8])
        assert int.from_bytes(data[12 + length:16 + length], "little") == crc32c(data[12:12 + length])
        data, n = data[16 + length:], n + 1
    assert n == 3
    assert tracking.crc32c(b"abc") != zlib.crc32(b"abc")  # Castagnoli, not the zlib polynomial
    assert read_events(tmp_path) == {"a": [(1, 1.0), (2, 0.5)], "b": [(2, -3.0)]}


def fake_module(name, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    return m


def write_metrics(run_dir):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "includes_compile": true}\n'
                                           '{"step": 2, "loss": 1.5, "val_loss": 1.75}\n')


def test_wandb_and_mlflow_get_the_same_scalars_and_the_config(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, d, step):
            calls.append(("wandb", step, d))

        def finish(self):
            calls.append(("wandb-finish",))

    def init(**kw):
        calls.append(("wandb-init", kw["project"], kw["name"], kw["config"]["lora"]["rank"]))
        return Run()

    class Ctx:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            calls.append(("mlflow-end",))

    mlflow = fake_module("mlflow", set_tracking_uri=lambda u: calls.append(("mlflow-uri", u)),
                         start_run=lambda run_name: calls.append(("mlflow-run", run_name)) or Ctx(),
                         log_params=lambda p: calls.append(("mlflow-params", p["lora.rank"])),
                         log_metric=lambda k, v, step: calls.append(("mlflow", step, k, v)))
    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", init=init))
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    cfg = config.from_dict({"lora": {"rank": 3}, "tracking": {"tensorboard": False, "wandb_project": "p",
                                                              "mlflow_uri": "file:/tmp/x"}})
    tracking.check_installed(cfg.tracking)
    write_metrics(tmp_path / "r")
    tracking.log_run("r", cfg, tmp_path / "r", {"steps": 2, "val_loss": 1.25})
    assert calls == [
        ("wandb-init", "p", "r", 3),
        ("wandb", 1, {"loss": 2.0}), ("wandb", 2, {"loss": 1.5, "val_loss": 1.75}),
        ("wandb", 2, {"final/val_loss": 1.25}), ("wandb-finish",),
        ("mlflow-uri", "file:/tmp/x"), ("mlflow-run", "r"), ("mlflow-params", 3),
        ("mlflow", 1, "loss", 2.0), ("mlflow", 2, "loss", 1.5), ("mlflow", 2, "val_loss", 1.75),
        ("mlflow", 2, "final.val_loss", 1.25), ("mlflow-end",),
    ]
    assert not (tmp_path / "r" / tracking.EVENTS_NAME).exists()


def test_a_failing_tracker_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    def init(**kw):
        raise ConnectionError("service unreachable")

    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", init=init))
    write_metrics(tmp_path / "r")
    cfg = config.from_dict({"tracking": {"wandb_project": "p"}})
    with pytest.warns(UserWarning, match=r"run r: could not log to wandb \(ConnectionError: service unreachable\)"):
        tracking.log_run("r", cfg, tmp_path / "r", {"steps": 2})
    assert read_events(tmp_path / "r")["loss"] == [(1, 2.0), (2, 1.5)]  # TensorBoard events written all the same


def test_configured_tracker_that_is_not_installed_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    cfg = config.from_dict({"tracking": {"wandb_project": "p"}})
    with pytest.raises(ConfigError, match=r"tracking.wandb_project: 'p' needs the wandb package.*pip install wandb"):
        tracking.check_installed(cfg.tracking)


def test_resources_and_tracking_do_not_change_the_config_hash():
    a = config.from_dict({"lora": {"rank": 4}})
    b = config.from_dict({"lora": {"rank": 4}, "resources": {"cpu": 4, "gpu": 1, "max_retries": 0},
                          "tracking": {"tensorboard": False}})
    assert config.config_hash(a) == config.config_hash(b)
    assert config.config_hash(a) != config.config_hash(config.from_dict({"lora": {"rank": 5}}))
    with pytest.raises(ConfigError, match=r"resources.gpu: must be >= 0"):
        config.from_dict({"resources": {"gpu": -1}})


def test_values_beyond_float32_are_written_as_infinities_not_errors(tmp_path):
    """A perplexity of exp(100) (a diverged run) does not fit a float32 scalar: it is +inf, the run still ends."""
    tracking.write_scalar_events(tmp_path / tracking.EVENTS_NAME, [(1, {"val_ppl": 1e40, "d": -1e300, "ok": 2.5})])
    events = read_events(tmp_path)
    assert events["val_ppl"] == [(1, np.inf)] and events["d"] == [(1, -np.inf)] and events["ok"] == [(1, 2.5)]
