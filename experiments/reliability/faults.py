"""Kill a tiny `lora-jax sweep` with SIGKILL at random moments and check that re-running it loses nothing.

    python experiments/reliability/faults.py --kills 10 --seed 0 > experiments/reliability/results/faults.json

A first sweep fills a JAX compilation cache that every later process shares
(so each process of the experiment does the same work: load, compile from the
cache, train, evaluate, write). Then one uninterrupted sweep, the reference,
is timed. Then the same sweep
runs in another folder and is killed with SIGKILL after a delay drawn
uniformly from (0, reference duration) with the seed; the command is started
again, killed again after a new delay, and so on, until it completes on its
own (then a fresh folder starts, until ``--kills`` kills have landed). Each
completed folder is checked against the reference:

- ``runs_rerun``: a run whose ``summary.json`` said finished after some kill
  and was written again later (finished runs must be skipped);
- ``metric_mismatches``: a final metric that differs from the reference
  (train/val loss, perplexity, parameter counts, base bytes, status), or a
  metrics line (loss, grad norm, lr, val loss) that does;
- ``missing_metrics``: a metric the reference has that is missing or null
  (step time, tokens/s, wall time, peak memory included);
- ``row_errors``: results.csv not one row per run; ``torn_lines``: a metrics
  line that does not parse or a step logged twice or not at all;
  ``leftovers``: a checkpoint folder, lock file or temporary file left behind.

Prints one JSON object; exits 1 if any count is not zero.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

EQUAL = ["status", "steps", "trainable_params", "total_params", "base_bytes", "train_loss", "val_loss", "val_ppl"]
PRESENT = ["step_time_s", "tokens_per_s", "wall_s", "peak_rss_mb"]
LINE_KEYS = ["loss", "grad_norm", "lr", "val_loss"]


def write_config(d: Path, steps: int, ranks: list[int]) -> Path:
    """A tiny sweep: the base model and LoRA at ``ranks`` on a 2-layer random Llama."""
    from tiny_models import write_tiny_chat_gguf

    model = write_tiny_chat_gguf(d / "tiny.gguf")
    cfg = {
        "name": "faults", "seed": 0, "method": "lora", "model": {"name": str(model)},
        "task": {"name": "python-docs-lm", "max_len": 32, "n_train": 32, "n_val": 8},
        "lora": {"rank": 2, "alpha": 4, "dropout": 0.1}, "optim": {"name": "adamw", "lr": 3e-3},
        "train": {"steps": steps, "batch_size": 2, "log_every": 1, "checkpoint_every": 2, "eval_every": 3,
                  "eval_batches": 1},
        "sweep": {"method": ["base", "lora"], "lora.rank": ranks},
    }
    path = d / "faults.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lora_jax.cli", "sweep", str(cfg), "--quiet", "--output-dir", str(out)]


def finished_runs(sweep_dir: Path) -> dict[str, str]:
    """Run name -> SHA-256 of its summary.json, for runs whose summary says finished."""
    out = {}
    for p in sweep_dir.glob("*/summary.json"):
        data = p.read_bytes()
        try:
            if json.loads(data).get("status") == "finished":
                out[p.parent.name] = hashlib.sha256(data).hexdigest()
        except json.JSONDecodeError:
            pass
    return out


def read_lines(path: Path) -> tuple[list[dict], int]:
    rows, torn = [], 0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return rows, torn


def compare(ref: Path, got: Path, steps: int) -> dict[str, int]:
    """Count the differences between a completed folder and the reference (see the module docstring)."""
    counts = dict.fromkeys(["metric_mismatches", "missing_metrics", "row_errors", "torn_lines", "leftovers"], 0)
    with open(ref / "results.csv", newline="") as f:
        runs = [r["run"] for r in csv.DictReader(f)]
    with open(got / "results.csv", newline="") as f:
        counts["row_errors"] += [r["run"] for r in csv.DictReader(f)] != runs
    for run in runs:
        a = json.loads((ref / run / "summary.json").read_text())
        b = json.loads((got / run / "summary.json").read_text()) if (got / run / "summary.json").exists() else {}
        counts["metric_mismatches"] += sum(b.get(k) != a.get(k) for k in EQUAL if k in b)
        counts["missing_metrics"] += sum(b.get(k) is None for k in EQUAL + PRESENT if a.get(k) is not None)
        if a.get("steps"):
            ra, _ = read_lines(ref / run / "metrics.jsonl")
            rb, torn = read_lines(got / run / "metrics.jsonl")
            counts["torn_lines"] += torn + ([r.get("step") for r in rb] != list(range(1, steps + 1)))
            counts["metric_mismatches"] += sum(
                x.get(k) != y.get(k) for x, y in zip(ra, rb, strict=False) for k in LINE_KEYS
            )
    counts["leftovers"] = sum(1 for p in got.rglob("*") if p.name in ("ckpt", ".lora-jax.lock") or p.suffix == ".tmp")
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs that must land before the sweep completes")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    ap.add_argument("--steps", type=int, default=8, help="train steps per LoRA run")
    ap.add_argument("--ranks", default="1,2", help="LoRA ranks of the sweep (comma-separated); plus the base")
    ap.add_argument("--workdir", help="where the sweeps go (default: a temporary folder, removed)")
    a = ap.parse_args(argv)
    t_start = time.time()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="lora_jax_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {"JAX_COMPILATION_CACHE_DIR": str(work / "jax_cache"), **os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cfg = write_config(work, a.steps, [int(r) for r in a.ranks.split(",")])
    warm = subprocess.run(command(cfg, work / "warm"), cwd=ROOT, env=env, capture_output=True, text=True)
    if warm.returncode != 0:
        print(warm.stderr[-3000:], file=sys.stderr)
        return 1
    t0 = time.time()
    ref = subprocess.run(command(cfg, work / "ref"), cwd=ROOT, env=env, capture_output=True, text=True)
    reference_s = time.time() - t0
    if ref.returncode != 0:
        print(ref.stderr[-3000:], file=sys.stderr)
        return 1
    rng = random.Random(a.seed)
    totals = dict.fromkeys(["runs_rerun", "metric_mismatches", "missing_metrics", "row_errors", "torn_lines",
                            "leftovers"], 0)
    kills, starts, episodes, kill_delays = 0, 0, 0, []
    while kills < a.kills:
        episodes += 1
        out = work / f"faulted_{episodes}"
        seen: dict[str, str] = {}  # runs observed finished after a kill, and their summary's hash
        while True:
            delay = rng.uniform(0, reference_s) if kills < a.kills else None
            starts += 1
            proc = subprocess.Popen(command(cfg, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            try:
                _, err = proc.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.kill()  # SIGKILL
                proc.communicate()
                kills += 1
                kill_delays.append(round(delay, 2))
                for run, digest in finished_runs(out / "faults").items():
                    seen.setdefault(run, digest)
                continue
            if proc.returncode != 0:
                print(err[-3000:], file=sys.stderr)
                return 1
            break  # completed on its own
        now = finished_runs(out / "faults")
        totals["runs_rerun"] += sum(now.get(run) != digest for run, digest in seen.items())
        for k, v in compare(work / "ref" / "faults", out / "faults", a.steps).items():
            totals[k] += v
    with open(work / "ref" / "faults" / "results.csv", newline="") as f:
        runs = len(list(csv.DictReader(f)))
    print(json.dumps({"kills": kills, **totals, "seed": a.seed, "runs": runs, "steps": a.steps,
                      "episodes": episodes, "starts": starts, "reference_s": round(reference_s, 2),
                      "kill_delays_s": kill_delays, "wall_s": round(time.time() - t_start, 1)}, indent=1))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(totals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
