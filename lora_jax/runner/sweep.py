"""A sweep of runs: run (or resume, or skip) each, one row per run in ``results.csv``, figures.

A sweep writes plain files only::

    runs/<sweep>/results.csv            one row per run (rewritten atomically after each run)
    runs/<sweep>/figures/               made by lora_jax.plots from the files above
    runs/<sweep>/<run>/config.yaml      the resolved config of the run
    runs/<sweep>/<run>/metrics.jsonl    step, loss, lr, tokens/s; eval metrics
    runs/<sweep>/<run>/events.out.tfevents.lora-jax   the same as TensorBoard scalars (lora_jax.tracking)
    runs/<sweep>/<run>/summary.json     final metrics, sizes, time, versions, status
    runs/<sweep>/<run>/adapter/         the trained LoRA factors (safetensors + JSON)
    runs/<sweep>/<run>/ckpt/            orbax train-state checkpoints (deleted when finished)

Re-running a sweep skips the runs whose ``summary.json`` says ``finished`` for
the same config hash, and resumes an interrupted run from its last checkpoint:
the data position is a pure function of the step and the dropout keys of the
step, so the resumed run computes what an uninterrupted one would have. A
process killed at any moment leaves nothing that a re-run trips over: files
are replaced atomically (the temporary files of a killed write are removed when
the next run takes the folder's lock), the two latest checkpoints are kept (a damaged latest one falls
back to the one before), metrics lines after the restored checkpoint are
dropped, a finished run's leftover ``ckpt/`` is removed, and the lock file of a
dead process is taken over.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax

from lora_jax import config as _config
from lora_jax import lora as _lora
from lora_jax import tracking
from lora_jax.config.expand import sweep_options
from lora_jax.errors import ConfigError
from lora_jax.io.files import atomic_write, locked
from lora_jax.runner import build as _build
from lora_jax.runner.evaluate import evaluate
from lora_jax.runner.loop import train_run
from lora_jax.runner.telemetry import git_commit, peak_rss_mb, reset_peak_rss, versions

RESULT_COLUMNS = [
    "run", "method", "lora_method", "rank", "alpha", "seed", "quant_format", "quant_block_size", "status", "reason",
    "steps", "trainable_params", "total_params", "base_bytes", "base_bits_per_param",
    "step_time_s", "tokens_per_s", "peak_rss_mb", "wall_s",
    "train_loss", "val_loss", "val_ppl", "rouge1", "rouge2", "rougeL", "exact_match", "config_hash",
]


def run_one(run_name: str, cfg: _config.ExperimentConfig, run_dir: Path, *, quiet: bool = False,
            trained: Any = None) -> dict:
    """Run (or resume, or skip when finished) one configuration; return its summary.

    ``trained``: a member of a fused group (:class:`lora_jax.runner.fused.MemberResult`), trained and
    evaluated with its group; its files are written here as a run of its own would write them.
    """
    run_dir = Path(run_dir)
    chash = _config.config_hash(cfg)
    summary_path = run_dir / "summary.json"
    old = finished_summary(run_dir, cfg)
    if old is not None:
        if (run_dir / "ckpt").exists():  # killed after its summary was written, before this was removed
            shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
        return old
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", _config.to_yaml(cfg))
    t0 = time.time()
    rss_is_per_run = reset_peak_rss()
    model = _build.load_model(cfg.model)
    ctx = _build.prepare(cfg, model) if trained is None else trained.ctx
    from lora_jax import quant

    fp = quant.footprint(ctx.params)
    counts = _lora.count(ctx.params)
    status: dict[str, Any] = {"status": "finished", "reason": None, "step_time_s": None, "tokens_per_s": None,
                              "train_loss": None, "resumed_from_step": None}
    params = ctx.params
    if trained is not None:
        params, status = trained.params, trained.status
    elif cfg.method != "base":
        params, status = train_run(ctx, run_dir, quiet=quiet)
    ev = {} if status["status"] != "finished" else dict(trained.evaluation) if trained else evaluate(ctx, params)
    samples = ev.pop("samples", [])
    if cfg.method in ("lora", "qlora") and status["status"] == "finished":
        from lora_jax import adapters
        from lora_jax.methods import select

        saved, rules = select.for_saving(cfg.lora, ctx.params, params, _build.lora_rules(cfg.lora))
        adapters.save_adapter(run_dir / "adapter", saved, base_model_id=cfg.model.name,
                              base_hash=model.fingerprint, rules=rules)
    trainable = counts.total if cfg.method == "full" else (0 if cfg.method == "base" else counts.trainable)
    base_fp = quant.footprint(jax.tree.map(lambda x: x.base if _lora.is_lora(x) else x, ctx.params,
                                           is_leaf=_lora.is_node))
    summary = {
        "run": run_name, "method": cfg.method, "lora_method": lora_method(cfg), "seed": cfg.seed, **status,
        "rank": cfg.lora.rank if cfg.method in ("lora", "qlora") else None,
        "alpha": (cfg.lora.alpha or cfg.lora.rank) if cfg.method in ("lora", "qlora") else None,
        "quant_format": cfg.quant.format if cfg.method == "qlora" else None,
        "quant_block_size": cfg.quant.block_size if cfg.method == "qlora" and cfg.quant.format != "gguf" else None,
        "steps": cfg.train.steps if cfg.method != "base" else 0,
        "trainable_params": trainable, "total_params": counts.total,
        "base_bytes": base_fp.nbytes, "base_bits_per_param": round(base_fp.bits_per_param, 4),
        "params_bytes": fp.nbytes,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_scope": "run" if rss_is_per_run else "process",
        "wall_s": time.time() - t0, **ev, "samples": samples,
        "attention": _build.attention_used(cfg, model),
        "config_hash": chash, "data": ctx.info, "versions": versions(), "git_commit": git_commit(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].platform}",
        **({} if trained is None else trained.extra),
    }
    atomic_write(summary_path, json.dumps(summary, indent=1, default=str) + "\n")
    tracking.log_run(run_name, cfg, run_dir, summary)
    if status["status"] == "finished" and (run_dir / "ckpt").exists():
        shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
    return summary


def lora_method(cfg: _config.ExperimentConfig) -> str | None:
    """The run's ``lora.method`` for its summary and ``results.csv`` (``None`` for ``base`` and ``full``)."""
    return cfg.lora.method if cfg.method in ("lora", "qlora") else None


def finished_summary(run_dir: Path, cfg: _config.ExperimentConfig, data_seed: int | None = None) -> dict | None:
    """The ``summary.json`` of ``run_dir`` if it records this config's run as finished, else ``None``.

    The run must also have trained on the data order of ``data_seed`` (default:
    its own seed); a fused member of ``sweep.fused_batches: same`` records its
    group's as ``fused_group.data_seed``.
    """
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    trained_on = (old.get("fused_group") or {}).get("data_seed", old.get("seed", cfg.seed))
    ours = old.get("config_hash") == _config.config_hash(cfg) and old.get("status") == "finished"
    return old if ours and trained_on == (cfg.seed if data_seed is None else data_seed) else None


def run_recorded(name: str, cfg: _config.ExperimentConfig, run_dir: Path, *, quiet: bool = False) -> dict:
    """:func:`run_one`, except that a run that raises is recorded as failed in its ``summary.json``."""
    try:
        return run_one(name, cfg, run_dir, quiet=quiet)
    except Exception as e:  # one broken run must not end the sweep
        return record_failed(name, cfg, run_dir, e)


def record_failed(name: str, cfg: _config.ExperimentConfig, run_dir: Path, error: Exception) -> dict:
    """Write (and return) the ``summary.json`` of a run that raised ``error``, and say so on stderr."""
    s = {"run": name, "method": cfg.method, "lora_method": lora_method(cfg), "seed": cfg.seed, "status": "failed",
         "reason": f"{type(error).__name__}: {error}", "config_hash": _config.config_hash(cfg)}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(run_dir) / "summary.json", json.dumps(s, indent=1) + "\n")
    print(f"  run {name} failed: {s['reason']}", file=sys.stderr, flush=True)
    return s


def write_results(sweep_dir: Path, summaries: list[dict]) -> Path:
    """Write ``results.csv`` (one row per run) atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for s in summaries:
        w.writerow({k: ("" if s.get(k) is None else s.get(k)) for k in RESULT_COLUMNS})
    path = sweep_dir / "results.csv"
    atomic_write(path, buf.getvalue())
    return path


def failed_runs(sweep_dir: Path) -> list[tuple[str, str]]:
    """``(run, reason)`` of every run that ``results.csv`` records as failed."""
    path = Path(sweep_dir) / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(r.get("run", ""), r.get("reason", "")) for r in csv.DictReader(f) if r.get("status") == "failed"]


def run_sweep(config_path: str | os.PathLike, overrides=(), *, quiet: bool = False, plots: bool = True,
              output_dir: str | None = None, ray: str | None = None, fused: bool = False) -> Path:
    """Run every run of a config's sweep (skipping finished ones); write results and figures.

    Every run is checked against its model and data first
    (:func:`lora_jax.runner.build.validate_runs`), and the sweep folder is held
    with a lock file while the sweep runs, so a second sweep on it stops with a
    clear error instead of interleaving with this one. With ``fused`` (or
    ``sweep: {fused: true}`` in the config) the runs that can share one
    compiled program train as one group (:mod:`lora_jax.runner.fused`).

    With ``ray`` (a cluster address, ``auto`` or ``local``) the runs are Ray
    tasks (:mod:`lora_jax.runner.ray`) that write the same files.

    Returns:
      The sweep folder ``<output_dir>/<name>``.

    Raises:
      ConfigError: problems the configs alone determine, for all runs at once.
      LockedError: another process runs a sweep in the same folder.
    """
    git_commit()  # record the code as it was when the sweep started
    runs = _config.load_sweep(config_path, overrides)
    _build.validate_runs(runs)  # problems the configs alone determine stop here, before any run
    first = runs[0][1]
    sweep_dir = Path(output_dir or first.output_dir) / first.name
    for _, cfg in runs:
        tracking.check_installed(cfg.tracking)
    options = sweep_options(_config.load_raw(config_path, overrides))
    fused = fused or options["fused"]
    if ray is not None and fused:
        raise ConfigError("a fused sweep (sweep.fused / --fused) cannot run on Ray yet: Ray runs one run per task; "
                          "drop --ray to train the groups here, or drop fused to spread the runs over the cluster")
    if fused and any(cfg.mesh.sizes() for _, cfg in runs):
        raise ConfigError("a fused sweep (sweep.fused / --fused) does not run on a device mesh yet (no `member` mesh "
                          "axis): drop the mesh: section to train the groups on one device, or drop fused")
    with locked(sweep_dir, "lora-jax sweep"):
        if ray is not None:
            from lora_jax.runner import ray as _ray

            _ray.run_all(runs, sweep_dir, address=ray, quiet=quiet)
        else:
            _run_all(runs, sweep_dir, quiet=quiet, fused=fused, options=options)
        if plots:
            from lora_jax import plots as _plots

            _plots.make_all(sweep_dir)
    return sweep_dir


def _run_all(runs, sweep_dir: Path, *, quiet: bool, fused: bool = False, options=None) -> None:
    summaries = []
    if fused:
        from lora_jax.runner import fused as _fused
    options = options or sweep_options({})
    units = _fused.group_runs(runs, rank_buckets=options["rank_buckets"]) if fused else [[run] for run in runs]
    for unit in units:
        if not quiet:
            print(f"[{len(summaries) + 1}/{len(runs)}] {' + '.join(n for n, _ in unit)}", file=sys.stderr, flush=True)
        if len(unit) == 1:
            done = [run_recorded(unit[0][0], unit[0][1], sweep_dir / unit[0][0], quiet=quiet)]
        else:
            try:
                done = _fused.run_group(unit, sweep_dir, quiet=quiet, batches=options["fused_batches"])
            except Exception as e:  # one broken group must not end the sweep
                done = [record_failed(name, cfg, sweep_dir / name, e) for name, cfg in unit]
        for s in done:
            summaries.append(s)
            write_results(sweep_dir, summaries)
            if not quiet and s.get("status") == "finished":
                shown = {k2: s.get(k2) for k2 in ("val_loss", "rouge1", "rougeL", "step_time_s")
                         if s.get(k2) is not None}
                print(f"  {s['run']}: " + ", ".join(f"{k2}={v:.4g}" for k2, v in shown.items()), file=sys.stderr,
                      flush=True)
