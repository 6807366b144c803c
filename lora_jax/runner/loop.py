"""The training loop of one run: checkpoints, metrics lines, progress, resume, NaN handling."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax

from lora_jax import data as _data
from lora_jax import paths as _paths
from lora_jax import train as _train
from lora_jax.io.files import atomic_write
from lora_jax.runner.build import RunContext, loss_fn, make_lr_schedule, make_optimizer
from lora_jax.runner.evaluate import evaluate


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
    step_fn = _train.ahead_of_time(_train.make_train_step(loss_fn(ctx.model.config, cfg), tx))
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
    if not losses and kept:
        # Resumed after the last step (killed during the final evaluation or while writing the
        # summary): the numbers of the steps come from the metrics lines they wrote.
        losses = [r["loss"] for r in kept if "loss" in r]
        times = [r["time_s"] for r in kept if "time_s" in r and r.get("step", 0) > 1]  # step 1 compiled
    status["step_time_s"] = statistics.median(times) if times else None
    status["tokens_per_s"] = tok_per_step / status["step_time_s"] if times else None
    status["train_loss"] = losses[-1] if losses else None
    return state.params, status
