"""The experiment runner: one run, a sweep of runs, stored results, resume.

A sweep writes plain files only::

    runs/<sweep>/results.csv            one row per run (rewritten atomically after each run)
    runs/<sweep>/figures/               made by lora_jax.plots from the files above
    runs/<sweep>/<run>/config.yaml      the resolved config of the run
    runs/<sweep>/<run>/metrics.jsonl    step, loss, lr, tokens/s; eval metrics
    runs/<sweep>/<run>/summary.json     final metrics, sizes, time, versions, status
    runs/<sweep>/<run>/adapter/         the trained LoRA factors (safetensors + JSON)
    runs/<sweep>/<run>/ckpt/            orbax train-state checkpoints (deleted when finished)

Re-running a sweep skips the runs whose ``summary.json`` says ``finished`` for
the same config hash, and resumes an interrupted run from its last checkpoint:
the data position is a pure function of the step and the dropout keys of the
step, so the resumed run computes what an uninterrupted one would have.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import config as _config
from lora_jax import data as _data
from lora_jax import hostmem
from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax import train as _train
from lora_jax.io.files import atomic_write

RESULT_COLUMNS = [
    "run", "method", "rank", "alpha", "seed", "quant_format", "quant_block_size", "status", "reason",
    "steps", "trainable_params", "total_params", "base_bytes", "base_bits_per_param",
    "step_time_s", "tokens_per_s", "peak_rss_mb", "wall_s",
    "train_loss", "val_loss", "val_ppl", "rouge1", "rouge2", "rougeL", "exact_match", "config_hash",
]


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (see :func:`lora_jax.hostmem.release`)."""
    hostmem.release()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported.

    Freed memory is handed back to the OS first (:func:`release_freed_memory`),
    so the new peak measures what the following work holds.
    """
    release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last :func:`reset_peak_rss` (else since the process began)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """The commit of the code this process runs (read once), with ``+dirty`` for local changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import flax

    import lora_jax

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jax.lib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "lora_jax": lora_jax.__version__,
            "numpy": np.__version__}


def make_lr_schedule(o: _config.OptimConfig, steps: int):
    """Linear warm-up from 0, then constant, cosine or linear decay to 0."""
    decay = max(1, steps - o.warmup_steps)
    if o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.lr, decay)
    elif o.schedule == "linear":
        main = optax.linear_schedule(o.lr, 0.0, decay)
    else:
        main = optax.constant_schedule(o.lr)
    if not o.warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), main], [o.warmup_steps])


def make_optimizer(o: _config.OptimConfig, steps: int) -> optax.GradientTransformation:
    """The optax transformation a config asks for: schedule, clipping, optimizer, LoRA+."""
    sched = make_lr_schedule(o, steps)

    def make(learning_rate):
        if o.name == "adamw":
            return optax.adamw(learning_rate, b1=o.betas[0], b2=o.betas[1], weight_decay=o.weight_decay)
        if o.name == "adam":
            return optax.adam(learning_rate, b1=o.betas[0], b2=o.betas[1])
        return optax.sgd(learning_rate)

    if o.lora_plus_ratio:
        from lora_jax import optim

        tx = optim.lora_plus(make, sched, ratio=o.lora_plus_ratio)
    else:
        tx = make(sched)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip else tx


@dataclass
class LoadedModel:
    """A model loaded once and shared by the runs of a sweep."""

    name: str
    params: Any
    config: Any
    tokenizer: Any
    fingerprint: str = ""


_MODEL_CACHE: dict[tuple[str, str], LoadedModel] = {}


def load_model(m: _config.ModelConfig) -> LoadedModel:
    """Load (or reuse) the float weights of a model; GGUF blocks are dequantized."""
    key = (m.name, m.dtype)
    if key not in _MODEL_CACHE:
        from lora_jax.io.hashing import base_hash
        from lora_jax.models import registry

        params, cfg, tok = registry.load_model(m.name, dequantize=True, dtype=jnp.dtype(m.dtype))
        _MODEL_CACHE.clear()  # keep one model in memory at a time
        _MODEL_CACHE[key] = LoadedModel(m.name, params, cfg, tok, base_hash(params))
    return _MODEL_CACHE[key]


def _task(cfg: _config.ExperimentConfig):
    t = cfg.task
    if t.name in ("jsonl", "text"):
        return _data.get_task(t.name, train=t.path)
    return _data.get_task(t.name)


def _cap(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


def _chat_format(tokenizer):
    return tokenizer.apply_chat_template if getattr(tokenizer, "is_chatml", False) else None


@dataclass
class RunContext:
    """Everything a run builds before its first step."""

    cfg: _config.ExperimentConfig
    model: LoadedModel
    task: Any
    train_data: dict | None
    val_data: dict
    params: Any
    info: dict = field(default_factory=dict)


def _prepare(cfg: _config.ExperimentConfig, model: LoadedModel) -> RunContext:
    task = _task(cfg)
    fmt = _chat_format(model.tokenizer)
    T = cfg.task.max_len
    split_val = "val" if "val" in task.splits() else task.splits()[-1]
    val = _cap(task.tokenize_split(split_val, model.tokenizer, fmt, T), cfg.task.n_val)
    pad_id = getattr(model.tokenizer, "pad_id", None) or 0
    train_data = None
    if cfg.method != "base":
        tr = _cap(task.tokenize_split("train", model.tokenizer, fmt, T), cfg.task.n_train)
        if len(tr) < cfg.train.batch_size:
            raise ValueError(f"task {cfg.task.name!r}: {len(tr)} training examples, fewer than "
                             f"train.batch_size={cfg.train.batch_size}")
        train_data = _data.pad_examples(tr, T, pad_id=pad_id)
    params = model.params
    if cfg.method == "qlora":
        from lora_jax import quant

        params = quant.quantize(params, cfg.quant.to_rules(cfg.model.dtype))
    if cfg.method in ("lora", "qlora"):
        _config.check_against_model(cfg, {p: tuple(x.shape) for p, x in
                                          _paths.leaves_with_paths(model.params)})
        params = _lora.init(jax.random.fold_in(jax.random.key(cfg.seed), 1), params, cfg.lora.to_rules())
    info = {"task": task.info(), "dataset_hash": task.dataset_hash, "n_val": len(val),
            "n_train": None if train_data is None else int(train_data["tokens"].shape[0])}
    return RunContext(cfg, model, task, train_data, _data.pad_examples(val, T, pad_id=pad_id), params, info)


def _loss_fn(model_cfg):
    from lora_jax.models import llama

    return lambda p, b: llama.loss(p, b, model_cfg)


def evaluate(ctx: RunContext, params, *, quiet: bool = True) -> dict[str, float]:
    """Validation loss and perplexity; ROUGE / exact match from greedy generations."""
    loss_fn = _loss_fn(ctx.model.config)
    eval_step = _train.make_eval_step(loss_fn)
    t, f = _paths.split(params)
    total = n = 0.0
    for i, batch in enumerate(_data.eval_batches(ctx.val_data, ctx.cfg.train.batch_size)):
        if ctx.cfg.train.eval_batches and i >= ctx.cfg.train.eval_batches:
            break
        m = eval_step(t, f, batch)
        total += float(m["loss"]) * float(m["n_tokens"])
        n += float(m["n_tokens"])
    out = {"val_loss": total / max(n, 1.0)}
    out["val_ppl"] = math.exp(min(out["val_loss"], 700.0))
    k = ctx.cfg.task.n_eval_generate
    if k and hasattr(ctx.task, "score"):
        from lora_jax import generate

        tok = ctx.model.tokenizer
        fmt = _chat_format(tok)
        split = "val" if "val" in ctx.task.splits() else ctx.task.splits()[-1]
        examples = ctx.task.examples(split)[:k]
        prompts = []
        for ex in examples:
            tz = ctx.task.tokenize(ex, tok, fmt, ctx.cfg.task.max_len)
            prompts.append(list(tz.ids[: tz.prompt_len]))
        preds = []
        bs = max(1, ctx.cfg.train.batch_size * 2)
        for s in range(0, len(prompts), bs):
            g = generate.generate(params, ctx.model.config, prompts[s : s + bs],
                                  max_new_tokens=ctx.cfg.task.max_new_tokens, stop_ids=tok.stop_ids,
                                  pad_id=getattr(tok, "pad_id", None) or 0)
            preds += [tok.decode(r, skip_special_tokens=True).strip() for r in g.rows()]
        scores = ctx.task.score(preds, [ctx.task.reference(ex) for ex in examples])
        out.update({k2: float(v) for k2, v in scores.items() if k2 != "n"})
        out["samples"] = [{"reference": ctx.task.reference(ex), "prediction": p} for ex, p in zip(examples[:5], preds)]
    return out


def _read_jsonl(path: Path, max_step: int | None = None) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill
            if max_step is None or r.get("step", 0) <= max_step:
                rows.append(r)
    return rows


def _progress(total: int, desc: str, quiet: bool, initial: int = 0):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True)


def train_run(ctx: RunContext, run_dir: Path, *, quiet: bool = False) -> tuple[Any, dict]:
    """Train one run with checkpoints; return the final params and a status dict."""
    from lora_jax.io import state as ckpt

    cfg = ctx.cfg
    steps = cfg.train.steps
    tx = make_optimizer(cfg.optim, steps)
    trainable = _paths.everything if cfg.method == "full" else _paths.is_trainable_leaf
    state = _train.init_state(ctx.params, tx, jax.random.fold_in(jax.random.key(cfg.seed), 2), trainable)
    step_fn = _train.make_train_step(_loss_fn(ctx.model.config), tx)
    ckpt_dir = run_dir / "ckpt"
    every = cfg.train.checkpoint_every or steps
    base_id = f"{cfg.model.name}:{cfg.method}"
    restored = ckpt.restore_train_state(ckpt_dir, state, base_id=base_id) if ckpt_dir.exists() else None
    start = 0
    if restored is not None:
        state, _extra = restored
        start = int(state.step)
    metrics_path = run_dir / "metrics.jsonl"
    kept = _read_jsonl(metrics_path, max_step=start)  # drop lines written after the checkpoint
    atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    sched = make_lr_schedule(cfg.optim, steps)
    bar = _progress(steps, run_dir.name, quiet, initial=start)
    times, losses = [], []
    status = {"status": "finished", "reason": None}
    tok_per_step = cfg.train.batch_size * cfg.task.max_len
    with open(metrics_path, "a") as mf:
        for step in range(start, steps):
            batch = _data.batch_at(ctx.train_data, step, batch_size=cfg.train.batch_size, seed=cfg.seed)
            t0 = time.perf_counter()
            state, m = step_fn(state, batch)
            loss = float(m["loss"])
            dt = time.perf_counter() - t0
            if step > start:  # the first step of a process includes compilation
                times.append(dt)
            losses.append(loss)
            if not math.isfinite(loss):
                status = {"status": "failed", "reason": f"loss became {loss} at step {step + 1}"}
                break
            rec = {"step": step + 1, "loss": loss, "lr": float(sched(step)), "grad_norm": float(m["grad_norm"]),
                   "tokens_per_s": tok_per_step / dt, "time_s": dt}
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < steps:
                ev = evaluate(ctx, state.params)
                rec.update({k: v for k, v in ev.items() if k != "samples"})
            if (step + 1) % max(1, cfg.train.log_every) == 0 or step + 1 == steps or "val_loss" in rec:
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
            if (step + 1) % every == 0 or step + 1 == steps:
                mf.flush()
                os.fsync(mf.fileno())
                ckpt.save_train_state(ckpt_dir, state, base_id=base_id, extra={"data_step": step + 1})
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_per_step / dt:,.0f}")
                bar.update(1)
    if bar is not None:
        bar.close()
    status["step_time_s"] = statistics.median(times) if times else None
    status["tokens_per_s"] = tok_per_step / status["step_time_s"] if times else None
    status["train_loss"] = losses[-1] if losses else None
    return state.params, status


def run_one(run_name: str, cfg: _config.ExperimentConfig, run_dir: Path, *, quiet: bool = False) -> dict:
    """Run (or resume, or skip when finished) one configuration; return its summary."""
    run_dir = Path(run_dir)
    chash = _config.config_hash(cfg)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        old = json.loads(summary_path.read_text())
        if old.get("config_hash") == chash and old.get("status") == "finished":
            return old
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", _config.to_yaml(cfg))
    t0 = time.time()
    rss_is_per_run = reset_peak_rss()
    model = load_model(cfg.model)
    ctx = _prepare(cfg, model)
    from lora_jax import quant

    fp = quant.footprint(ctx.params)
    counts = _lora.count(ctx.params)
    status: dict[str, Any] = {"status": "finished", "reason": None, "step_time_s": None, "tokens_per_s": None,
                              "train_loss": None}
    params = ctx.params
    if cfg.method != "base":
        params, status = train_run(ctx, run_dir, quiet=quiet)
    ev = evaluate(ctx, params) if status["status"] == "finished" else {}
    samples = ev.pop("samples", [])
    if cfg.method in ("lora", "qlora") and status["status"] == "finished":
        from lora_jax import adapters

        adapters.save_adapter(run_dir / "adapter", params, base_model_id=cfg.model.name,
                              base_hash=model.fingerprint, rules=cfg.lora.to_rules())
    trainable = counts.total if cfg.method == "full" else (0 if cfg.method == "base" else counts.trainable)
    base_fp = quant.footprint(jax.tree.map(lambda x: x.base if _lora.is_lora(x) else x, ctx.params,
                                           is_leaf=_lora.is_node))
    summary = {
        "run": run_name, "method": cfg.method, "seed": cfg.seed, **status,
        "rank": cfg.lora.rank if cfg.method in ("lora", "qlora") else None,
        "alpha": (cfg.lora.alpha or cfg.lora.rank) if cfg.method in ("lora", "qlora") else None,
        "quant_format": cfg.quant.format if cfg.method == "qlora" else None,
        "quant_block_size": cfg.quant.block_size if cfg.method == "qlora" else None,
        "steps": cfg.train.steps if cfg.method != "base" else 0,
        "trainable_params": trainable, "total_params": counts.total,
        "base_bytes": base_fp.nbytes, "base_bits_per_param": round(base_fp.bits_per_param, 4),
        "params_bytes": fp.nbytes,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_scope": "run" if rss_is_per_run else "process",
        "wall_s": time.time() - t0, **ev, "samples": samples,
        "config_hash": chash, "data": ctx.info, "versions": _versions(), "git_commit": _git_commit(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {jax.devices()[0].platform}",
    }
    atomic_write(summary_path, json.dumps(summary, indent=1, default=str) + "\n")
    if status["status"] == "finished" and (run_dir / "ckpt").exists():
        shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
    return summary


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


def run_sweep(config_path: str | os.PathLike, overrides=(), *, quiet: bool = False, plots: bool = True,
              output_dir: str | None = None) -> Path:
    """Run every run of a config's sweep (skipping finished ones); write results and figures.

    Returns:
      The sweep folder ``<output_dir>/<name>``.
    """
    _git_commit()  # record the code as it was when the sweep started
    runs = _config.load_sweep(config_path, overrides)
    first = runs[0][1]
    sweep_dir = Path(output_dir or first.output_dir) / first.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for k, (name, cfg) in enumerate(runs, 1):
        if not quiet:
            print(f"[{k}/{len(runs)}] {name}", file=sys.stderr, flush=True)
        try:
            s = run_one(name, cfg, sweep_dir / name, quiet=quiet)
        except Exception as e:  # one broken run must not end the sweep
            s = {"run": name, "method": cfg.method, "seed": cfg.seed, "status": "failed",
                 "reason": f"{type(e).__name__}: {e}", "config_hash": _config.config_hash(cfg)}
            atomic_write(sweep_dir / name / "summary.json", json.dumps(s, indent=1) + "\n")
            print(f"  run {name} failed: {s['reason']}", file=sys.stderr, flush=True)
        summaries.append(s)
        write_results(sweep_dir, summaries)
        if not quiet and s.get("status") == "finished":
            shown = {k2: s.get(k2) for k2 in ("val_loss", "rouge1", "rougeL", "step_time_s") if s.get(k2) is not None}
            print("  " + ", ".join(f"{k2}={v:.4g}" for k2, v in shown.items()), file=sys.stderr, flush=True)
    if plots:
        from lora_jax import plots as _plots

        _plots.make_all(sweep_dir)
    return sweep_dir
