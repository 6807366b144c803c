"""Fused sweeps end to end on a tiny GGUF model: same files and numbers as runs alone, failures, resume, plan."""

import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from tiny_models import write_tiny_chat_gguf, write_yaml_config

from lora_jax import cli, config
from lora_jax.errors import ConfigError
from lora_jax.runner import fused

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "benchmarks"))  # the benchmark's smoke run


@pytest.fixture(scope="module")
def shared(tmp_path_factory, worker_id):
    """A folder of the test session that the pytest-xdist workers share (made under its ``lock``)."""
    if worker_id == "master":
        return tmp_path_factory.mktemp("fused")
    d = tmp_path_factory.getbasetemp().parent / "fused_sweep"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="module")
def tiny(shared):
    """The model and data files, the same paths in every worker (the runs' config hashes compare equal)."""
    model, data = shared / "tiny.gguf", shared / "pairs.jsonl"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not model.exists():
            data.write_text("".join(json.dumps({"prompt": f"add {i} and {i + 1}", "completion": str(2 * i + 1)})
                                    + "\n" for i in range(48)))
            write_tiny_chat_gguf(shared / "tiny.part", n_layers=1).rename(model)  # one layer: half the compiling
    return model, data


def write_config(path: Path, tiny, **over) -> Path:
    model, data = tiny
    cfg = {
        "name": "t", "seed": 0, "method": "lora", "model": {"name": str(model)},
        "task": {"name": "jsonl", "path": str(data), "max_len": 48, "n_train": 32, "n_val": 4,
                 "n_eval_generate": 2, "max_new_tokens": 4},
        "lora": {"rank": 2, "alpha": 4},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01, "warmup_steps": 1},
        "train": {"steps": 5, "batch_size": 4, "log_every": 1, "checkpoint_every": 2, "eval_batches": 1},
    }
    return write_yaml_config(path, cfg, over)


def summary(out: Path, run: str) -> dict:
    return json.loads((out / "t" / run / "summary.json").read_text())


def sweep(cfg: Path, out: Path, *extra) -> int:
    return cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out), *extra])


# ranks, seeds and dropout rates, three runs (zip keeps the test short)
GRID = {"lora.rank": [1, 4, 4], "seed": [0, 0, 1], "lora.dropout": [0.0, 0.1, 0.0]}


@pytest.fixture(scope="module")
def seq(shared, tiny):
    """GRID's runs one after another, the reference of the fused runs: made once a session; its output folder."""
    out = shared / "seq"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker waits for this one's runs instead of repeating them
        if not (shared / "seq.done").exists():
            assert sweep(write_config(shared / "s.yaml", tiny, sweep=GRID, sweep_mode="zip"), out) == 0
            (shared / "seq.done").touch()
    return out


def test_a_fused_sweep_writes_what_the_runs_alone_write(tmp_path, tiny, seq):
    fus = write_config(tmp_path / "f.yaml", tiny, sweep={**GRID, "fused": True}, sweep_mode="zip")
    assert sweep(fus, tmp_path / "fus") == 0
    names = [n for n, _ in config.load_sweep(fus)]
    assert names == ["lora_drop0_r1_s0", "lora_drop0.1_r4_s0", "lora_drop0_r4_s1"]
    for name in names:
        a, b = summary(seq, name), summary(tmp_path / "fus", name)
        for k in ("train_loss", "val_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), (name, k)
        assert b["config_hash"] == a["config_hash"] and b["status"] == "finished"
        assert b["fused_group"]["compilations"] == 1 and b["fused_group"]["members"] == names
        assert b["rouge1"] == pytest.approx(a["rouge1"]) and b["samples"] == a["samples"]
        files = lambda root, name=name: sorted(p.relative_to(root / "t" / name).as_posix()  # noqa: E731
                                               for p in (root / "t" / name).rglob("*") if p.is_file())
        assert files(tmp_path / "fus") == files(seq)
        lines = (tmp_path / "fus" / "t" / name / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(x)["step"] for x in lines]
        assert steps == [1, 2, 3, 4, 5]
        adapter = json.loads((tmp_path / "fus" / "t" / name / "adapter" / "lora_jax_adapter.json").read_text())
        ranks = {e["rank"] for e in adapter["adapters"].values()}
        scales = {e["scale"] for e in adapter["adapters"].values()}
        assert ranks == {b["rank"]} and scales == {4 / b["rank"]}  # its true rank, not the group's padded one
        ref = json.loads((seq / "t" / name / "adapter" / "lora_jax_adapter.json").read_text())
        assert [{k: e[k] for k in ("rank", "scale", "dropout")} for e in adapter["adapters"].values()] == [
            {k: e[k] for k in ("rank", "scale", "dropout")} for e in ref["adapters"].values()]
    assert not (tmp_path / "fus" / "t" / fused.FOLDER).exists()  # the group's checkpoints go once all are written
    # A second invocation skips the finished members.
    mtime = (tmp_path / "fus" / "t" / names[0] / "summary.json").stat().st_mtime_ns
    assert sweep(fus, tmp_path / "fus") == 0
    assert (tmp_path / "fus" / "t" / names[0] / "summary.json").stat().st_mtime_ns == mtime


def test_a_diverging_member_is_marked_failed_and_the_other_finishes_as_alone(tmp_path, tiny):
    over = {"optim.grad_clip": None, "optim.name": "sgd", "optim.weight_decay": 0.0}
    # (the losses do not depend on generation: the run alone skips it, the group decodes with a member failed)
    alone = write_config(tmp_path / "a.yaml", tiny, **over, **{"optim.lr": 1e-3, "task.n_eval_generate": 0})
    group = write_config(tmp_path / "g.yaml", tiny, **over, sweep={"optim.lr": [1e30, 1e-3], "fused": True})
    assert sweep(alone, tmp_path / "alone") == 0
    assert sweep(group, tmp_path / "group") == 1  # a run failed
    bad, good = (summary(tmp_path / "group", n) for n, _ in config.load_sweep(group))
    assert bad["status"] == "failed" and "loss became" in bad["reason"]
    assert not (tmp_path / "group" / "t" / bad["run"] / "adapter").exists()
    ref = summary(tmp_path / "alone", "lora")
    assert good["status"] == "finished"
    for k in ("train_loss", "val_loss"):
        assert good[k] == pytest.approx(ref[k], rel=1e-4), k


def test_a_group_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path, tiny):
    over = {"train.steps": 40, "train.checkpoint_every": 5, "task.n_eval_generate": 0}
    cfg = write_config(tmp_path / "c.yaml", tiny, **over, sweep={"lora.rank": [1, 2], "fused": True})
    assert sweep(cfg, tmp_path / "ref") == 0
    out = tmp_path / "killed"
    metrics = out / "t" / "lora_r2" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "lora_jax.cli", "sweep", str(cfg), "--quiet", "--output-dir",
                             str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    killed = False
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait()
    assert killed, "the group finished before it could be killed; make it longer"
    assert list((out / "t" / fused.FOLDER).glob("*/ckpt"))
    assert not (out / "t" / "lora_r1" / "summary.json").exists()
    assert sweep(cfg, out) == 0
    for name in ("lora_r1", "lora_r2"):
        got, ref = summary(out, name), summary(tmp_path / "ref", name)
        assert got["resumed_from_step"] and got["resumed_from_step"] >= 10
        for k in ("train_loss", "val_loss"):
            assert got[k] == pytest.approx(ref[k], rel=1e-6), (name, k)
        steps = [json.loads(x)["step"] for x in (out / "t" / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 41)), "each step logged exactly once after the resume"


def test_same_batches_member_of_the_shared_seed_equals_its_run_alone_and_the_data_order_is_recorded(tmp_path, tiny,
                                                                                                   seq):
    # The runs alone are GRID's (``seq``): lora_drop0_r1_s0 and lora_drop0_r4_s1 (generation and checkpoints do not
    # change the losses, so the group skips them).
    over = {"task.n_eval_generate": 0, "train.checkpoint_every": 0}
    grid = {"lora.rank": [1, 4], "seed": [0, 1], "fused": True, "fused_batches": "same"}
    group = write_config(tmp_path / "g.yaml", tiny, **over, sweep=grid, sweep_mode="zip")
    assert sweep(group, tmp_path / "g") == 0
    ref, first, second = summary(seq, "lora_drop0_r1_s0"), summary(tmp_path / "g", "lora_r1_s0"), summary(
        tmp_path / "g", "lora_r4_s1")
    for k in ("train_loss", "val_loss"):
        assert first[k] == pytest.approx(ref[k], rel=1e-4), k  # its seed is the shared data seed
    for s in (first, second):
        assert s["fused_group"]["batches"] == "same" and s["fused_group"]["data_seed"] == 0
        assert s["fused_group"]["compilations"] == 1
    # The same sweep with each member's own data order: the member of seed 0 trained on its own order already and
    # is kept; the member of seed 1 did not, and trains again (alone, the only one left), now on seed 1's order:
    # it is then GRID's run of rank 4 and seed 1.
    kept = (tmp_path / "g" / "t" / "lora_r1_s0" / "summary.json").stat().st_mtime_ns
    assert sweep(group, tmp_path / "g", "--set", "sweep.fused_batches=own") == 0
    assert (tmp_path / "g" / "t" / "lora_r1_s0" / "summary.json").stat().st_mtime_ns == kept
    again, alone = summary(tmp_path / "g", "lora_r4_s1"), summary(seq, "lora_drop0_r4_s1")
    assert again.get("fused_group") is None and again["train_loss"] != second["train_loss"]
    for k in ("train_loss", "val_loss"):
        assert again[k] == pytest.approx(alone[k], rel=1e-4), k


def test_a_finished_run_counts_only_for_the_data_order_it_trained_on(tmp_path, tiny):
    from lora_jax.runner.sweep import finished_summary

    (name, cfg), = config.load_sweep(write_config(tmp_path / "c.yaml", tiny, seed=1))
    run = tmp_path / "run"
    run.mkdir()
    s = {"status": "finished", "seed": 1, "config_hash": config.config_hash(cfg)}
    (run / "summary.json").write_text(json.dumps(s))
    assert finished_summary(run, cfg) is not None and finished_summary(run, cfg, data_seed=0) is None
    (run / "summary.json").write_text(json.dumps({**s, "fused_group": {"batches": "same", "data_seed": 0}}))
    assert finished_summary(run, cfg) is None and finished_summary(run, cfg, data_seed=0) is not None


def test_groups_are_the_runs_that_differ_only_in_per_member_keys(tmp_path, tiny):
    cfg = write_config(tmp_path / "c.yaml", tiny,
                       sweep={"method": ["base", "lora", "qlora"], "lora.rank": [1, 2], "optim.lr": [1e-3, 3e-3]})
    units = fused.group_runs(config.load_sweep(cfg))
    assert [[n for n, _ in u] for u in units] == [
        ["base"],
        ["lora_r1_lr0.001", "lora_r1_lr0.003", "lora_r2_lr0.001", "lora_r2_lr0.003"],
        ["qlora_r1_lr0.001", "qlora_r1_lr0.003", "qlora_r2_lr0.001", "qlora_r2_lr0.003"],
    ]
    steps = write_config(tmp_path / "d.yaml", tiny, sweep={"train.steps": [2, 3]})
    assert all(len(u) == 1 for u in fused.group_runs(config.load_sweep(steps)))
    drop = write_config(tmp_path / "e.yaml", tiny, sweep={"lora.dropout": [0.0, 0.1], "lora.rank": [1, 2]})
    assert len(fused.group_runs(config.load_sweep(drop))) == 1  # dropout is a traced per-member value


def test_rank_buckets_make_one_group_per_bucket_and_plan_shows_them(tmp_path, tiny, capsys):
    ranks = {"lora.rank": [1, 2, 3, 8, 12, 16]}
    cfg = write_config(tmp_path / "c.yaml", tiny, sweep={**ranks, "fused": True, "rank_buckets": [2, 4, 8]})
    units = fused.group_runs(config.load_sweep(cfg), rank_buckets=[2, 4, 8])
    assert [[n for n, _ in u] for u in units] == [["lora_r1", "lora_r2"], ["lora_r3"], ["lora_r8"],
                                                  ["lora_r12", "lora_r16"]]
    assert len(fused.group_runs(config.load_sweep(cfg))) == 1  # without buckets: one group padded to 16
    assert cli.main(["plan", str(cfg), "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "fused groups: 2 (each one compiled program), batches: own, rank buckets 2/4/8" in out
    assert "2 runs, ranks 1/2 padded to 2 (bucket r<=2)" in out and "ranks 12/16 padded to 16 (bucket r>8)" in out
    assert "trained alone: lora_r3 lora_r8" in out


def test_plan_shows_the_fused_groups(tmp_path, tiny, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny, sweep={"lora.rank": [1, 4], "seed": [0, 1], "fused": True})
    assert cli.main(["plan", str(cfg), "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "fused groups: 1" in out and "4 runs, ranks 1/1/4/4 padded to 4" in out
    rows = fused.plan_groups(config.load_sweep(cfg), compile_cost=True)
    assert rows[0]["step_args_mb"] > 0 and rows[0]["padded_rank"] == 4
    same = fused.plan_groups(config.load_sweep(cfg), compile_cost=True, batches="same")
    assert same[0]["batches"] == "same" and same[0]["group"] != rows[0]["group"]
    assert same[0]["step_args_mb"] < rows[0]["step_args_mb"]  # one batch read instead of one per member


def test_sweep_fused_must_be_a_bool_and_can_be_set_from_the_shell(tmp_path, tiny):
    bad = write_config(tmp_path / "c.yaml", tiny, sweep={"lora.rank": [1, 2], "fused": "yes"})
    with pytest.raises(ConfigError, match="sweep.fused: expected bool"):
        config.load_sweep(bad)
    good = write_config(tmp_path / "d.yaml", tiny, sweep={"lora.rank": [1, 2]})
    raw = config.load_raw(good, ["sweep.fused=true"])
    assert config.expand.sweep_options(raw) == {"fused": True, "fused_batches": "own", "rank_buckets": ()}
    assert len(config.load_sweep(good, ["sweep.fused=true"])) == 2
    raw = config.load_raw(good, ["sweep.fused_batches=same", "sweep.rank_buckets=[8, 16]"])
    assert config.expand.sweep_options(raw) == {"fused": False, "fused_batches": "same", "rank_buckets": [8, 16]}
    for over, words in [("sweep.fused_batches=shared", "sweep.fused_batches: must be own or same"),
                        ("sweep.rank_buckets=[16, 8]", "sweep.rank_buckets: must be ranks >= 1 in ascending order"),
                        ("sweep.rank_buckets=[0.5]", "sweep.rank_buckets: must be ranks >= 1"),
                        ("sweep.rank_buckets=8", "sweep.rank_buckets: expected list")]:
        with pytest.raises(ConfigError, match=words):
            config.load_sweep(good, [over])


def hand_adapter(model: Path, folder: Path, rank: int, seed: int) -> str:
    """An adapter folder with large random B (it changes what the tiny model says)."""
    from lora_jax import lora
    from lora_jax.io import adapters
    from lora_jax.models import registry

    params, _, _ = registry.load_model(str(model), dequantize=True)
    rule = lora.LoraRule(pattern=r"layers/\d+/(attn/(q|v)_proj|mlp/down_proj)/kernel", rank=rank, alpha=8)
    adapted = jax.tree.map(
        lambda x: dataclasses.replace(x, lora_b=2.0 * jax.random.normal(jax.random.key(seed), x.lora_b.shape))
        if lora.is_lora(x) else x,
        lora.init(jax.random.key(seed), params, [rule]), is_leaf=lora.is_lora)  # fmt: skip
    return str(adapters.save_adapter(folder, adapted, rules=[rule]))


def test_generate_side_by_side_answers_each_prompt_with_each_adapter(tmp_path, tiny, capsys):
    model = str(tiny[0])
    adapters = [hand_adapter(tiny[0], tmp_path / f"a{r}", r, seed) for r, seed in ((1, 8), (4, 9))]
    args = ["generate", "--model", model, "--prompt", "add 3 and 4", "--prompt", "hi", "--max-new-tokens", "5"]
    alone = []
    for a in adapters:
        assert cli.main([*args, "--adapter", a]) == 0
        alone.append(capsys.readouterr().out.splitlines())
    assert alone[0] != alone[1]  # the adapters answer differently: the comparison below can fail
    assert cli.main([*args, "--adapter", adapters[0], "--adapter", adapters[1], "--side-by-side"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"== {adapters[0]}", *alone[0], f"== {adapters[1]}", *alone[1]]


def test_benchmark_quick_run_reports_equal_members_and_one_compilation(tmp_path):
    import fused_sweep

    res = fused_sweep.main(["--quick", "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == res
    assert res["all_finished"] and res["runs"] == ["lora_r1_s0", "lora_r2_s0"]
    assert res["max_member_rel_diff"] <= 1e-4
    assert res["compiles"] == {"sequential": 2, "fused": 1, "fused_groups": 1}
    assert res["fused_over_sequential_wall"] == res["fused_wall_s"][0] / res["sequential_wall_s"][0]


@pytest.mark.parametrize("extra, over, words", [
    (["--ray", "local"], {}, "cannot run on Ray yet"),
    ([], {"mesh": {"fsdp": -1}}, "does not run on a device mesh yet"),
])
def test_a_fused_sweep_where_it_cannot_run_yet_is_refused_before_anything_is_written(tmp_path, tiny, capsys, extra,
                                                                                     over, words):
    cfg = write_config(tmp_path / "f.yaml", tiny, sweep={"lora.rank": [1, 2], "fused": True}, **over)
    assert sweep(cfg, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
