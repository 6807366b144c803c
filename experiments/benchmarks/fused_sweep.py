"""A fused sweep against the same runs one after another: wall time, equality, compilations.

The quickstart grid extended to ranks {1, 4, 16} x seeds {0, 1} (six LoRA runs of
SmolLM2-135M, ``configs/fused_sweep.yaml``), run as ``lora-jax sweep`` in a fresh
process each, sequentially (``--set sweep.fused=false``) and fused, alternating
(A B A B ...) for ``--reps`` rounds. Wall time includes model loading,
compilation, training, evaluation (validation loss and ROUGE generations) and
writing the run folders: what a user waits for. Compilations are counted from
JAX's compilation log (``JAX_LOG_COMPILES=1``) of each process.

    python experiments/benchmarks/fused_sweep.py             # the real grid (about 15 minutes on 2 cores)
    python experiments/benchmarks/fused_sweep.py --quick     # a tiny random model, seconds: a smoke run

Keys:
  fused_over_sequential_wall    median over rounds of fused wall / sequential wall
  sequential_wall_s, fused_wall_s   per round
  max_member_rel_diff           max over runs of |fused - sequential| / |sequential|, train_loss and val_loss
  member_rel_diff               per run: {train_loss, val_loss}
  compiles                      train-step compilations per process: {"sequential": runs, "fused": groups}
  compile_s                     seconds of XLA compilation (all programs) per process, first round
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "fused_sweep.yaml"
COMPILED = re.compile(r"Finished XLA compilation of jit\((\w+)\) in ([0-9.eE+-]+) sec")


def quick_config(folder: Path) -> tuple[Path, list[str]]:
    """A tiny random model (one layer) and a config of two ranks, a few steps, no generations (the smoke run)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_tiny_chat_gguf

    model = write_tiny_chat_gguf(folder / "tiny.gguf", n_layers=1)
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add {i} and {i + 1}", "completion": str(2 * i + 1)}) + "\n"
                            for i in range(32)))
    overrides = [f"model.name={model}", "task.name=jsonl", f"task.path={data}", "task.max_len=48",
                 "task.n_train=16", "task.n_val=4", "task.n_eval_generate=0",
                 "train.steps=3", "train.eval_batches=1", "optim.warmup_steps=1", "sweep.lora.rank=[1, 2]",
                 "sweep.seed=[0]"]
    return CONFIG, overrides


def run_sweep(config: Path, overrides: list[str], out: Path, fused: bool) -> dict:
    """One ``lora-jax sweep`` in its own process; its wall time and the compilations in its log."""
    cmd = [sys.executable, "-m", "lora_jax.cli", "sweep", str(config), "--quiet", "--output-dir", str(out)]
    for o in [*overrides, f"sweep.fused={'true' if fused else 'false'}"]:
        cmd += ["--set", o]
    env = {**os.environ, "JAX_LOG_COMPILES": "1", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({'fused' if fused else 'sequential'}):\n{proc.stderr[-4000:]}")
    compiled = COMPILED.findall(proc.stderr)
    return {"wall_s": wall, "train_steps_compiled": sum(name in ("train_step", "fused_train_step")
                                                        for name, _ in compiled),
            "compile_s": sum(float(s) for _, s in compiled)}


def summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random model, a few steps: a smoke run")
    ap.add_argument("--reps", type=int, default=1, help="rounds of (sequential, fused)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for both modes (e.g. train.steps=10 on a busy machine); recorded")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config, overrides = quick_config(tmp) if args.quick else (CONFIG, [])
        overrides += args.overrides
        rounds = []
        for r in range(args.reps):
            rounds.append({mode: run_sweep(config, overrides, tmp / f"{mode}{r}", mode == "fused")
                           for mode in ("sequential", "fused")})
        name = "fused_sweep"
        seq, fus = summaries(tmp / "sequential0" / name), summaries(tmp / "fused0" / name)
    diffs = {run: {k: abs(fus[run][k] - s[k]) / abs(s[k]) for k in ("train_loss", "val_loss")}
             for run, s in seq.items()}
    res = {
        "model": "tiny random Llama (quick)" if args.quick else "SmolLM2-135M-Instruct (GGUF Q4_1, fp32 weights)",
        "runs": sorted(seq), "steps": next(iter(seq.values()))["steps"], "overrides": args.overrides,
        "sequential_wall_s": [r["sequential"]["wall_s"] for r in rounds],
        "fused_wall_s": [r["fused"]["wall_s"] for r in rounds],
        "fused_over_sequential_wall": statistics.median(r["fused"]["wall_s"] / r["sequential"]["wall_s"]
                                                        for r in rounds),
        "max_member_rel_diff": max(max(d.values()) for d in diffs.values()),
        "member_rel_diff": diffs,
        "compiles": {"sequential": rounds[0]["sequential"]["train_steps_compiled"],
                     "fused": rounds[0]["fused"]["train_steps_compiled"],
                     "fused_groups": len({s["fused_group"]["id"] for s in fus.values()})},
        "compile_s": {m: rounds[0][m]["compile_s"] for m in ("sequential", "fused")},
        "all_finished": all(s["status"] == "finished" for s in [*seq.values(), *fus.values()]),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
