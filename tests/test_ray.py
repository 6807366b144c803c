"""Sweeps on a Ray cluster: same files as a local sweep, a killed worker resumes, one driver per folder.

The cluster is real: a head node and one more worker node on this machine,
1 CPU each, started once for the module and shut down by a finalizer. The
driver reaches it at ``127.0.0.1:<port>`` (Ray itself binds this host's
address and maps the loopback address onto it).
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import write_tiny_chat_gguf, write_yaml_config

from lora_jax import cli
from lora_jax.errors import LockedError
from lora_jax.io.files import locked

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("train_loss", "val_loss", "val_ppl", "trainable_params", "steps", "config_hash")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_chat_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


def write_config(path: Path, model: Path, name: str, **over) -> Path:
    cfg = {
        "name": name,
        "method": "lora",
        "model": {"name": str(model)},
        "task": {"name": "python-docs-lm", "max_len": 64, "n_train": 64, "n_val": 8},
        "lora": {"rank": 2, "alpha": 4, "dropout": 0.1},
        "optim": {"name": "adamw", "lr": 3e-3},
        "train": {"steps": 24, "batch_size": 2, "log_every": 1, "checkpoint_every": 8, "eval_batches": 1},
        "sweep": {"lora.rank": [1, 2], "seed": [0, 1]},
    }
    return write_yaml_config(path, cfg, over)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_results(got: Path, want: Path):
    a, b = read_csv(got), read_csv(want)
    assert [r["run"] for r in a] == [r["run"] for r in b] and len(a) == 4
    for ra, rb in zip(a, b):
        assert ra["status"] == rb["status"] == "finished", (ra, rb)
        for k in METRICS:
            if k in ("config_hash",) or not ra[k].replace(".", "").replace("-", "").isdigit():
                assert ra[k] == rb[k], (ra["run"], k)
            else:
                assert abs(float(ra[k]) - float(rb[k])) <= 1e-6 * max(1.0, abs(float(rb[k]))), (ra["run"], k)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent XLA cache for the local runs, the driver and the Ray workers: each program compiles once."""
    import jax

    d = str(tmp_path_factory.mktemp("xla_cache"))
    keys = {"jax_compilation_cache_dir": d, "jax_persistent_cache_min_compile_time_secs": 0.0}
    old = {k: getattr(jax.config, k) for k in keys}
    old_env = {k.upper(): os.environ.get(k.upper()) for k in keys}
    for k, v in keys.items():
        jax.config.update(k, v)
        os.environ[k.upper()] = str(v)  # for the processes started from here
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    for k, v in old_env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def cluster(compile_cache):
    """A head node and one worker node, 1 CPU and a 100 MB object store each; shut down whatever happens."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([old_path] if old_path else [])])  # for the workers
    small = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
    c = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    try:
        c.add_node(**small)
        c.wait_for_nodes()
        yield "127.0.0.1:" + c.address.rsplit(":", 1)[1]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


@pytest.fixture(scope="module")
def local_results(tmp_path_factory, tiny_gguf, compile_cache):
    """The sweep run here, without Ray: the reference."""
    d = tmp_path_factory.mktemp("local")
    cfg = write_config(d / "c.yaml", tiny_gguf, "raysweep")
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(d / "runs")]) == 0
    return d / "runs" / "raysweep"


def test_sweep_on_a_two_node_cluster_writes_the_local_results(tmp_path, tiny_gguf, cluster, local_results, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, "raysweep")
    out = tmp_path / "runs"
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out), "--ray", cluster]) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert [p.split("] ")[0] for p in progress] == [f"[{k}/4" for k in range(1, 5)]  # one line per ended run
    assert sorted(p.split("] ")[1] for p in progress) == [f"lora_r{r}_s{s}: finished" for r in (1, 2) for s in (0, 1)]
    sweep = out / "raysweep"
    assert_same_results(sweep / "results.csv", local_results / "results.csv")
    for run in ("lora_r1_s0", "lora_r1_s1", "lora_r2_s0", "lora_r2_s1"):
        for f in ("config.yaml", "metrics.jsonl", "adapter/lora_jax_adapter.json", "events.out.tfevents.lora-jax"):
            assert (sweep / run / f).is_file(), (run, f)
        assert not (sweep / run / "ckpt").exists()
        assert (sweep / run / "config.yaml").read_text() == (local_results / run / "config.yaml").read_text()
        assert (sweep / run / "adapter" / "adapter.safetensors").read_bytes() == \
            (local_results / run / "adapter" / "adapter.safetensors").read_bytes()
    assert list((sweep / "figures").iterdir())
    # Again: every run is finished, so nothing is submitted and no file changes.
    mtimes = {p: p.stat().st_mtime_ns for p in sweep.rglob("summary.json")}
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out), "--ray", cluster]) == 0
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("summary.json")} == mtimes


def task_processes(sweep_name: str) -> list[int]:
    """PIDs of the Ray workers now running a run of ``sweep_name`` (their process title names the run)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                title = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::") and f"lora-jax {sweep_name}/" in title:
                pids.append(int(p.name))
    return pids


def test_worker_killed_mid_run_is_retried_and_resumes_to_the_same_results(tmp_path, tiny_gguf, cluster,
                                                                           local_results):
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, "raysweep")
    out = tmp_path / "runs"
    sweep = out / "raysweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-m", "lora_jax.cli", "sweep", str(cfg), "--output-dir",
                               str(out), "--ray", cluster], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    killed = []
    try:
        while not killed and driver.poll() is None:
            # A run with a checkpoint and no summary yet is mid-run: kill the workers running runs.
            mid = [d for d in sweep.glob("*/ckpt") if not (d.parent / "summary.json").exists()]
            if mid and any(p.name.isdigit() for p in mid[0].iterdir()):
                for pid in task_processes("raysweep"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)
        log, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert killed, "no run was caught mid-run"
    assert driver.returncode == 0, log
    assert "runs: 100%" in log and "4/4" in log and "failed=0" in log  # the driver's bar; killed runs did not fail
    resumed = [json.loads(p.read_text()).get("resumed_from_step") for p in sweep.glob("*/summary.json")]
    assert any(r for r in resumed), resumed  # at least one run resumed from a checkpoint after the kill
    assert_same_results(sweep / "results.csv", local_results / "results.csv")


def test_second_driver_on_the_same_sweep_folder_is_refused(tmp_path, tiny_gguf):
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, "raysweep")
    out = tmp_path / "runs"
    with locked(out / "raysweep", "lora-jax sweep"), pytest.raises(LockedError, match="in use by another"):
        from lora_jax.runner import sweep

        sweep.run_sweep(cfg, output_dir=str(out), quiet=True, ray="auto")
    assert not (out / "raysweep" / "lora_r1_s0").exists()  # nothing was submitted


def test_ray_flag_without_ray_prints_the_install_line(tmp_path, tiny_gguf, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, "noray")
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(tmp_path / "runs"), "--ray", "auto"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'lora-jax[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "noray" / "lora_r1_s0").exists()
