"""The runner end to end on a tiny GGUF model: results, resume after SIGKILL, failures, plots."""

import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from tiny_models import write_tiny_chat_gguf, write_yaml_config

from lora_jax import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_chat_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


def write_config(path: Path, model: Path, **over) -> Path:
    cfg = {
        "name": "t",
        "seed": 0,
        "method": "lora",
        "model": {"name": str(model)},
        "task": {"name": "python-docs-lm", "max_len": 64, "n_train": 64, "n_val": 8},
        "lora": {"rank": 2, "alpha": 4},
        "optim": {"name": "adamw", "lr": 3e-3},
        "train": {"steps": 12, "batch_size": 4, "log_every": 1, "checkpoint_every": 4, "eval_batches": 2},
    }
    return write_yaml_config(path, cfg, over)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lora_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_runs_results_and_figures(tmp_path, tiny_gguf):
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, sweep={"method": ["base", "lora"], "lora.rank": [1, 2]})
    out = tmp_path / "runs"
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out)]) == 0
    rows = read_csv(out / "t" / "results.csv")
    assert [r["run"] for r in rows] == ["base", "lora_r1", "lora_r2"]
    assert all(r["status"] == "finished" for r in rows)
    assert int(rows[2]["trainable_params"]) == 2 * int(rows[1]["trainable_params"])
    run = out / "t" / "lora_r2"
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/lora_jax_adapter.json"):
        assert (run / f).exists(), f
    assert not (run / "ckpt").exists()  # checkpoints go once a run is finished
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    summary = json.loads((run / "summary.json").read_text())
    for k in ("val_loss", "trainable_params", "base_bytes", "peak_rss_mb", "wall_s", "seed", "versions",
              "git_commit", "config_hash"):
        assert k in summary, k
    assert summary["data"]["dataset_hash"]
    assert (out / "t" / "figures" / "val_loss_vs_rank.pdf").exists()
    # A second invocation skips the finished runs.
    mtime = (run / "summary.json").stat().st_mtime_ns
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out)]) == 0
    assert (run / "summary.json").stat().st_mtime_ns == mtime


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_gguf):
    # Killed once 30 steps are logged: 70 steps before the end leave the watcher ample time (it polls every 10 ms).
    over = {"train.steps": 100, "train.checkpoint_every": 20, "lora.dropout": 0.1}
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, **over)
    ref = run_cli("train", str(cfg), "--quiet", "--output-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    ref_summary = json.loads((tmp_path / "ref" / "t" / "run" / "summary.json").read_text())

    out = tmp_path / "killed"
    metrics = out / "t" / "run" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "lora_jax.cli", "train", str(cfg), "--quiet", "--output-dir",
                             str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if len(lines) >= 30:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = len(lines)
                break
        time.sleep(0.01)
    proc.wait()
    assert killed_at is not None, "the run finished before it could be killed; make it longer"
    assert not (out / "t" / "run" / "summary.json").exists()
    assert (out / "t" / "run" / "ckpt").exists()

    again = run_cli("train", str(cfg), "--quiet", "--output-dir", str(out))
    assert again.returncode == 0, again.stderr
    summary = json.loads((out / "t" / "run" / "summary.json").read_text())
    for k in ("train_loss", "val_loss"):
        assert summary[k] == pytest.approx(ref_summary[k], rel=1e-6), k
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 101)), "each step logged exactly once after the resume"


def test_a_diverging_run_is_marked_failed_and_the_sweep_goes_on(tmp_path, tiny_gguf, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, **{"optim.grad_clip": None, "optim.name": "sgd"},
                       sweep={"optim.lr": [1e30, 1e-3]})
    out = tmp_path / "runs"
    # the other run finishes and everything is written, but the command says that one failed
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out)]) == 1
    rows = read_csv(out / "t" / "results.csv")
    assert [r["status"] for r in rows] == ["failed", "finished"]
    assert "loss became" in rows[0]["reason"]
    err = capsys.readouterr().err
    assert f"1 run(s) failed: {rows[0]['run']}: loss became" in err and "Traceback" not in err
    assert (out / "t" / "figures").is_dir()


def test_plots_come_from_stored_files_in_a_process_without_training_code(tmp_path, tiny_gguf):
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, sweep={"lora.rank": [1, 2]})
    out = tmp_path / "runs"
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out)]) == 0
    figures = out / "t" / "figures"
    for f in figures.iterdir():
        f.unlink()
    code = (
        "import sys; from lora_jax import plots; files = plots.make_all(sys.argv[1]); "
        "bad = [m for m in sys.modules if m == 'jax' or m in "
        "('lora_jax.train', 'lora_jax.runner.sweep', 'lora_jax.lora')]; "
        "assert not bad, bad; print(len(files))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out / "t")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 4 and (figures / "loss_curves.png").exists()


def test_config_errors_are_one_clear_line(tmp_path, tiny_gguf, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, **{"lora.rnak": 4})
    assert cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "lora.rnak" in err and "did you mean" in err and "Traceback" not in err


@pytest.mark.parametrize("sub", ["sweep", "train", "plan", "eval", "generate", "plot", "models"])
def test_every_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([sub, "--help"])
    assert e.value.code == 0
    assert "usage: lora-jax" in capsys.readouterr().out


def test_config_problems_of_any_run_stop_the_sweep_before_it_starts(tmp_path, tiny_gguf, capsys):
    # The tiny model's attention matrices are 32 x 16: rank 64 fits none; a missing data file is reported too.
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, sweep={"lora.rank": [1, 64]})
    out = tmp_path / "runs"
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lora_r64: lora.rank=64 is too large" in err and "lora_r1:" not in err and "Traceback" not in err
    assert not (out / "t").exists()  # nothing ran, nothing was written
    text = write_config(tmp_path / "d.yaml", tiny_gguf, **{"task.name": "text", "task.path": str(tmp_path / "no.txt")})
    assert cli.main(["sweep", str(text), "--quiet", "--output-dir", str(out)]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_a_second_sweep_on_a_held_folder_is_refused(tmp_path, tiny_gguf, capsys):
    from lora_jax.io.files import locked

    cfg = write_config(tmp_path / "c.yaml", tiny_gguf)
    out = tmp_path / "runs"
    with locked(out / "t"):  # held by this (running) process
        assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and "in use by another" in err
    assert not (out / "t" / "results.csv").exists()


def test_run_name_cannot_leave_the_output_folder(tmp_path, tiny_gguf):
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, **{"train.steps": 2, "train.checkpoint_every": 0})
    out = tmp_path / "runs"
    assert cli.main(["train", str(cfg), "--quiet", "--output-dir", str(out), "--run-name", "../../../escaped"]) == 0
    assert (out / "t" / "escaped" / "summary.json").exists()
    assert not list(tmp_path.parent.glob("escaped")) and not (tmp_path / "escaped").exists()


def test_a_run_interrupted_in_its_final_evaluation_resumes_with_every_metric(tmp_path, tiny_gguf, monkeypatch):
    from lora_jax.runner import sweep as runner_sweep

    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, **{"train.steps": 4, "train.checkpoint_every": 2})
    whole = tmp_path / "whole"
    assert cli.main(["train", str(cfg), "--quiet", "--output-dir", str(whole)]) == 0
    expected = json.loads((whole / "t" / "run" / "summary.json").read_text())

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(runner_sweep, "evaluate", interrupted)
        assert cli.main(["train", str(cfg), "--quiet", "--output-dir", str(out)]) == 130
    assert not (out / "t" / "run" / "summary.json").exists() and (out / "t" / "run" / "ckpt").exists()
    assert cli.main(["train", str(cfg), "--quiet", "--output-dir", str(out)]) == 0
    got = json.loads((out / "t" / "run" / "summary.json").read_text())
    assert got["status"] == "finished"
    for k in ("train_loss", "val_loss"):
        assert got[k] == pytest.approx(expected[k], rel=1e-6), k
    assert got["step_time_s"] > 0 and got["tokens_per_s"] > 0


# ----------------------------------------------------------------------------
# plan, eval, generate and models run for real on the tiny model

# Trainable parameters of rank-1 adapters on the seven projections of the tiny chat model (dim 32,
# 4 query / 2 key-value heads of 8, ffn 64, 2 layers): r * (d_in + d_out) summed by hand.
PER_RANK = 2 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 64) + (32 + 64) + (64 + 32))


def plan_table(capsys) -> list[dict[str, str]]:
    header, *rows = capsys.readouterr().out.strip().splitlines()
    return [dict(zip(header.split(), row.split(), strict=True)) for row in rows]


def test_plan_prints_one_row_per_run_with_the_parameter_counts(tmp_path, tiny_gguf, capsys):
    from lora_jax.models import registry

    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, sweep={"lora.rank": [1, 2]})
    assert cli.main(["plan", str(cfg), "--no-compile"]) == 0
    rows = plan_table(capsys)
    params, _, _ = registry.load_model(str(tiny_gguf), dequantize=True)
    total = sum(x.size for x in jax.tree.leaves(params))
    assert [(r["method"], r["rank"]) for r in rows] == [("lora", "1"), ("lora", "2")]
    for rank, row in zip((1, 2), rows):
        assert list(row)[:7] == ["run", "method", "rank", "trainable", "frozen", "base_mb", "base_bits"]
        assert row["trainable"] == f"{rank * PER_RANK:,}" and row["frozen"] == f"{total:,}"
        assert float(row["base_mb"]) == pytest.approx(4 * total / 1e6, abs=0.05) and row["base_bits"] == "32.0"
    # With XLA's cost analysis (one run): the step's arguments hold at least the float32 base.
    assert cli.main(["plan", str(write_config(tmp_path / "one.yaml", tiny_gguf))]) == 0
    (row,) = plan_table(capsys)
    assert row["trainable"] == f"{2 * PER_RANK:,}" and "gflop_per_step" in row
    assert float(row["step_args_mb"]) >= float(row["base_mb"]) > 0


@pytest.fixture(scope="module")
def hand_adapter(tiny_gguf, tmp_path_factory):
    """An adapter folder with large random B, so it changes what the model says: ``(folder, adapted params)``."""
    from lora_jax import lora
    from lora_jax.io import adapters
    from lora_jax.models import registry

    params, _, _ = registry.load_model(str(tiny_gguf), dequantize=True)
    rule = lora.LoraRule(pattern=r"layers/\d+/(attn/(q|v)_proj|mlp/down_proj)/kernel", rank=4, alpha=8)
    adapted = jax.tree.map(
        lambda x: dataclasses.replace(x, lora_b=2.0 * jax.random.normal(jax.random.key(9), x.lora_b.shape))
        if lora.is_lora(x) else x,
        lora.init(jax.random.key(8), params, [rule]), is_leaf=lora.is_lora)  # fmt: skip
    folder = adapters.save_adapter(tmp_path_factory.mktemp("adapter") / "a", adapted, rules=[rule])
    return folder, adapted


def test_eval_scores_the_base_and_the_adapter_given(tmp_path, tiny_gguf, hand_adapter, capsys):
    from lora_jax import config, lora
    from lora_jax.runner import build, evaluate

    folder, adapted = hand_adapter
    cfg_file = write_config(tmp_path / "c.yaml", tiny_gguf, **{"task.n_eval_generate": 0})
    cfg = config.load_config(cfg_file)
    ctx = build.prepare(dataclasses.replace(cfg, method="base"), build.load_model(cfg.model))
    want = {"base": evaluate.evaluate(ctx, ctx.model.params)["val_loss"],
            "adapter": evaluate.evaluate(ctx, lora.merge(adapted))["val_loss"]}  # fmt: skip
    assert abs(want["adapter"] - want["base"]) > 1e-2
    for which, extra in (("base", []), ("adapter", ["--adapter", str(folder)])):
        assert cli.main(["eval", str(cfg_file), *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["val_loss"] == pytest.approx(want[which], rel=1e-5), which
        assert out["val_ppl"] == pytest.approx(math.exp(want[which]), rel=1e-5)


def test_generate_answers_as_generate_text_with_and_without_the_adapter(tiny_gguf, hand_adapter, capsys):
    from lora_jax import generate
    from lora_jax.models import registry

    folder, adapted = hand_adapter
    params, cfg, tok = registry.load_model(str(tiny_gguf), dequantize=True)
    prompts = ["hello there", "what is up"]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    want = {}
    for which, p in (("base", params), ("adapter", adapted)):
        want[which] = generate.generate_text(p, cfg, tok, chats, chat=True, max_new_tokens=6)
    assert want["base"] != want["adapter"]
    for which, extra in (("base", []), ("adapter", ["--adapter", str(folder)])):
        argv = ["generate", "--model", str(tiny_gguf), "--max-new-tokens", "6", *extra]
        assert cli.main([*argv, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
        assert capsys.readouterr().out == "".join(t + "\n" for t in want[which]), which


def test_models_lists_every_registered_model_and_whether_it_is_installed(capsys):
    import importlib.util

    from lora_jax.models import registry

    assert cli.main(["models"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == set(registry.MODELS) and {"smollm2-135m", "minilm-l6"} <= set(out)
    for name, row in out.items():
        spec = registry.MODELS[name]
        assert row["description"] == spec.description and row["description"]
        assert row["install"].startswith("pip install") and spec.package.replace("_", "-") in row["install"]
        assert row["installed"] is (importlib.util.find_spec(spec.package) is not None), name
