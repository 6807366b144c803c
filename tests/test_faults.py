"""Faults against ``lora-jax sweep``: kill -9 at each moment, a damaged checkpoint, Ctrl-C.

Each case runs the sweep in a subprocess through a harness script (written
into tmp_path) that wraps one function of the library to kill its own process
with SIGKILL (or send itself SIGINT) at the Nth call, then re-runs the same
command cleanly and compares with one uninterrupted run of the same config in
another folder: the same final metrics and adapter, every metric present, one
row per run, each metrics line once, finished runs not run again, nothing left
behind (no checkpoint, lock or temporary file). The library has no fault hooks.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "reliability"))

import faults  # noqa: E402

STEPS = 6  # checkpoints at 2, 4, 6; a mid-run evaluation at step 3
SWEEP, LORA = "faults", "lora_r2"
RUNS = ["base", LORA]
EQUAL = ["status", "steps", "trainable_params", "total_params", "base_bytes", "train_loss", "val_loss", "val_ppl"]
PRESENT = ["step_time_s", "tokens_per_s", "wall_s", "peak_rss_mb"]

HARNESS = textwrap.dedent(
    '''
    """Run `lora-jax sweep` with one function wrapped to signal this process at its Nth matching call."""
    import importlib, json, os, signal, sys

    spec = json.loads(sys.argv[1])
    module_name, attr = spec["target"].split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, attr)
    calls = 0

    def fire():
        for _ in range(spec.get("times", 1)):
            os.kill(os.getpid(), getattr(signal, spec.get("signal", "SIGKILL")))

    def wrapped(*args, **kwargs):
        global calls
        hit = spec.get("match") is None or any(spec["match"] in str(a) for a in args)
        calls += hit
        if hit and calls == spec["nth"] and not spec.get("after"):
            fire()
        out = real(*args, **kwargs)
        if hit and calls == spec["nth"] and spec.get("after"):
            fire()
        return out

    setattr(module, attr, wrapped)  # before lora_jax.cli imports the modules that use it
    from lora_jax import cli

    sys.exit(cli.main(["sweep", *sys.argv[2:]]))
    '''
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config, the harness, a JAX compilation cache for the subprocesses, and an uninterrupted run.

    They live in the session's shared temporary folder, made once under a file
    lock, so parallel pytest-xdist workers share one reference run.
    """
    d = tmp_path_factory.getbasetemp().parent / "faults"  # shared by pytest-xdist workers
    d.mkdir(exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(d / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(d / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "ref" / SWEEP / "results.csv").exists():
            cfg = faults.write_config(d, STEPS, [2])  # the tiny sweep of the random fault script, 2 runs
            cfg.rename(d / "c.yaml")
            (d / "harness.py").write_text(HARNESS)
            ref = sweep(d, d / "ref", env)
            assert ref.returncode == 0, ref.stderr[-3000:]
    return d, env


def sweep(d: Path, out: Path, env: dict, spec: dict | None = None) -> subprocess.CompletedProcess:
    """``lora-jax sweep`` on the test config into ``out``, through the harness when ``spec`` names a fault."""
    args = [str(d / "c.yaml"), "--quiet", "--output-dir", str(out)]
    cmd = [str(d / "harness.py"), json.dumps(spec)] if spec else ["-m", "lora_jax.cli", "sweep"]
    return subprocess.run([sys.executable, *cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def summaries(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / SWEEP).glob("*/summary.json")}


def metrics_steps(run_dir: Path) -> list[int]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # none torn


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "ckpt").glob("*") if p.name.isdigit())


def assert_matches_reference(d: Path, out: Path, finished: dict[str, int]) -> dict[str, dict]:
    """The re-run's files equal the uninterrupted run's; return its summaries."""
    ref, got = summaries(d / "ref"), summaries(out)
    assert sorted(got) == sorted(RUNS)
    with open(out / SWEEP / "results.csv", newline="") as f:
        assert [r["run"] for r in csv.DictReader(f)] == RUNS  # one row per run
    for run in RUNS:
        for k in EQUAL:
            assert got[run][k] == ref[run][k], (run, k, got[run][k], ref[run][k])
        for k in PRESENT:
            if ref[run][k] is not None:
                assert got[run][k] is not None and got[run][k] > 0, (run, k)
    lines = [json.loads(x) for x in (out / SWEEP / LORA / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (d / "ref" / SWEEP / LORA / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1)), "each step logged once"
    for k in ("loss", "grad_norm", "lr", "val_loss"):
        assert [r.get(k) for r in lines] == [r.get(k) for r in ref_lines], k
    adapter = f"{LORA}/adapter/adapter.safetensors"
    assert (out / SWEEP / adapter).read_bytes() == (d / "ref" / SWEEP / adapter).read_bytes()
    for run, mtime in finished.items():  # a finished run is not run again
        assert (out / SWEEP / run / "summary.json").stat().st_mtime_ns == mtime, f"{run} was run again"
    left = [p.relative_to(out) for p in out.rglob("*") if p.name in ("ckpt", ".lora-jax.lock") or p.suffix == ".tmp"]
    assert not left, left
    assert (out / SWEEP / "figures" / "val_loss_vs_rank.png").exists()
    return got


def run_chain(d: Path, env: dict, out: Path, chain: list) -> dict[str, dict]:
    """Interrupt one sweep folder at each moment of ``chain`` in turn, re-running the command each time.

    Each row is ``(moment, spec, exit code, check)``: the wrapped function and
    its Nth matching call (counted in that process), and a check of what the
    interrupted process left (it proves the fault hit where the row says).
    Then the command runs cleanly and must give the uninterrupted result.
    """
    finished: dict[str, int] = {}
    lock = out / SWEEP / ".lora-jax.lock"
    for moment, spec, code, check in chain:
        stale = lock.exists()
        r = sweep(d, out, env, spec)
        assert r.returncode == code, (moment, r.returncode, r.stderr[-3000:])
        assert ("taking over a lock left by process" in r.stderr) == stale, moment
        assert lock.exists() == (code == KILL), moment  # a killed process leaves its lock behind
        check(out / SWEEP, r.stderr)
        for run, s in summaries(out).items():
            if s["status"] == "finished":
                finished.setdefault(run, (out / SWEEP / run / "summary.json").stat().st_mtime_ns)
    again = sweep(d, out, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ("taking over a lock left by process" in again.stderr) == (chain[-1][2] == KILL)
    return assert_matches_reference(d, out, finished)


def state_is(ckpts, lines):
    """A check: the lora run's checkpoint steps and metrics lines are these."""

    def check(sweep_dir, err):
        assert (ckpt_steps(sweep_dir / LORA), metrics_steps(sweep_dir / LORA)) == (ckpts, list(lines)), err[-2000:]

    return check


def damage_step_4_and_ctrl_c_at_step_5(sweep_dir, err):
    assert "checkpoint step 4:" in err and "has 100 bytes" in err and "resuming from step 2 of" in err
    assert f"stopped after step 5 of {STEPS}" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    state_is([4, 5], range(1, 6))(sweep_dir, err)


def truncate_a_file_of_step_4(sweep_dir, err):
    state_is([2, 4], range(1, 5))(sweep_dir, err)
    data = [f for f in (sweep_dir / LORA / "ckpt" / "4").rglob("*") if f.is_file() and f.parent.name == "d"]
    data[0].write_bytes(data[0].read_bytes()[:100])


def second_ctrl_c(sweep_dir, err):
    assert "interrupted" in err and "stopped after" not in err and "Traceback" not in err, err[-2000:]
    state_is([4, 5], range(1, 6))(sweep_dir, err)


KILL = -signal.SIGKILL
# Moments while the lora run trains. The base run comes first (one evaluation, one summary); lora checkpoints
# at steps 2, 4, 6 and evaluates at step 3. Calls are counted per process, and each process resumes the last.
TRAINING = [
    ("compile", {"target": "lora_jax.train:_compile", "nth": 1}, KILL, state_is([], [])),
    ("training, step 4", {"target": "lora_jax.data:batch_at", "nth": 4}, KILL, state_is([2], [1, 2, 3])),
    ("mid-run evaluation", {"target": "lora_jax.runner.evaluate:evaluate", "nth": 1}, KILL, state_is([2], [1, 2])),
    ("orbax's commit of step 4", {"target": "os:rename", "match": "/4.orbax-checkpoint-tmp", "nth": 3}, KILL,
     state_is([2], [1, 2, 3, 4])),
    ("checkpoint 4 saved, nothing after", {"target": "lora_jax.io.state:save_train_state", "nth": 1, "after": True},
     KILL, truncate_a_file_of_step_4),
    ("Ctrl-C in step 5", {"target": "lora_jax.data:batch_at", "nth": 3, "signal": "SIGINT"}, 130,
     damage_step_4_and_ctrl_c_at_step_5),
    ("Ctrl-C twice before step 6", {"target": "lora_jax.data:batch_at", "nth": 1, "signal": "SIGINT", "times": 2},
     130, second_ctrl_c),
]


def adapter_half_written(sweep_dir, err):
    assert (sweep_dir / LORA / "adapter" / "adapter.safetensors").exists()
    assert not (sweep_dir / LORA / "adapter" / "lora_jax_adapter.json").exists()


def summary_torn(sweep_dir, err):
    assert list((sweep_dir / LORA).glob(".summary.json.*.tmp")) and not (sweep_dir / LORA / "summary.json").exists()


def summary_written_ckpt_left(sweep_dir, err):
    assert (sweep_dir / LORA / "summary.json").exists() and ckpt_steps(sweep_dir / LORA) == [4, 6]


def results_torn(sweep_dir, err):
    assert list(sweep_dir.glob(".results.csv.*.tmp"))


def figures_half_written(sweep_dir, err):
    assert len(list((sweep_dir / "figures").glob("*.png"))) == 2


# Moments after training: evaluation, files, figures.
AFTER_TRAINING = [
    ("final evaluation", {"target": "lora_jax.runner.evaluate:evaluate", "nth": 3}, KILL,
     state_is([4, 6], range(1, 7))),
    ("adapter write", {"target": "lora_jax.io.files:atomic_write", "match": "lora_jax_adapter.json", "nth": 1}, KILL,
     adapter_half_written),
    ("summary write", {"target": "os:replace", "match": "summary.json", "nth": 1}, KILL, summary_torn),
    ("summary written, ckpt not yet removed", {"target": "lora_jax.io.files:atomic_write", "match": "summary.json",
                                               "nth": 1, "after": True}, KILL, summary_written_ckpt_left),
    ("results.csv write", {"target": "os:replace", "match": "results.csv", "nth": 1}, KILL, results_torn),
    ("plotting", {"target": "os:replace", "match": ".png", "nth": 3}, KILL, figures_half_written),
]


def test_kills_and_ctrl_c_while_training_resume_to_the_uninterrupted_result(setup, tmp_path):
    d, env = setup
    got = run_chain(d, env, tmp_path / "out", TRAINING)
    assert got[LORA]["resumed_from_step"] == 5


def test_kills_after_training_resume_to_the_uninterrupted_result(setup, tmp_path):
    d, env = setup
    got = run_chain(d, env, tmp_path / "out", AFTER_TRAINING)
    assert got[LORA]["resumed_from_step"] == STEPS  # finished by the process killed before removing its ckpt/


def test_the_sigint_handler_lives_only_as_long_as_the_loop():
    from lora_jax.runner.loop import stop_on_sigint

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, mine)
    try:
        with stop_on_sigint() as stop:
            assert signal.getsignal(signal.SIGINT) is not mine
            signal.raise_signal(signal.SIGINT)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is mine
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job ignores Ctrl-C, and keeps ignoring it
        with stop_on_sigint():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        seen = []

        def in_thread():
            with stop_on_sigint():
                seen.append(signal.getsignal(signal.SIGINT))

        t = threading.Thread(target=in_thread)
        t.start()
        t.join()
        assert seen == [signal.SIG_IGN]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_random_fault_script_finds_nothing_wrong(setup, tmp_path):
    _, env = setup  # its compilation cache
    script = ROOT / "experiments" / "reliability" / "faults.py"
    r = subprocess.run([sys.executable, str(script), "--kills", "2", "--steps", "4", "--ranks", "2", "--seed", "1",
                        "--workdir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout
    out = json.loads(r.stdout)
    assert out["kills"] == 2 and out["runs"] == 2 and len(out["kill_delays_s"]) == 2
    for k in ("runs_rerun", "metric_mismatches", "missing_metrics", "row_errors", "torn_lines", "leftovers"):
        assert out[k] == 0, (k, out)


def test_the_fault_script_counts_each_kind_of_damage(setup, tmp_path):
    d, _ = setup
    ref = d / "ref" / SWEEP
    got = tmp_path / SWEEP
    shutil.copytree(ref, got)
    assert faults.compare(ref, got, STEPS) == dict.fromkeys(
        ["metric_mismatches", "missing_metrics", "row_errors", "torn_lines", "leftovers"], 0)
    s = json.loads((got / LORA / "summary.json").read_text())
    (got / LORA / "summary.json").write_text(json.dumps({**s, "val_loss": 1.0, "step_time_s": None}))
    lines = (got / LORA / "metrics.jsonl").read_text().splitlines()
    (got / LORA / "metrics.jsonl").write_text("\n".join(lines + [lines[-1], lines[-1][:20]]) + "\n")
    (got / "results.csv").write_text((ref / "results.csv").read_text().splitlines()[0] + "\n")
    (got / LORA / "ckpt").mkdir()
    assert faults.compare(ref, got, STEPS) == {"metric_mismatches": 1, "missing_metrics": 1, "row_errors": 1,
                                               "torn_lines": 2, "leftovers": 1}
