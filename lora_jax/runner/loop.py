"""The training loop of one run: checkpoints, metrics lines, progress, resume, NaN handling, the mesh."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax

from lora_jax import data as _data
from lora_jax import paths as _paths
from lora_jax import train as _train
from lora_jax.io import hashing
from lora_jax.io.files import atomic_write
from lora_jax.runner.build import RunContext, loss_fn, make_lr_schedule, make_optimizer
from lora_jax.runner.evaluate import evaluate


def read_jsonl(path: Path, max_step: int | None = None) -> list[dict]:
    """The JSON-object lines of a metrics file up to ``max_step`` (a torn last line is skipped)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill
            if not isinstance(r, dict):
                continue
            if max_step is None or r.get("step", 0) <= max_step:
                rows.append(r)
    return rows


def restart_metrics(path: Path, start: int) -> list[dict]:
    """The metrics lines of ``path`` up to step ``start`` (a restored checkpoint's); the file keeps only those."""
    kept = read_jsonl(path, max_step=start)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When a training loop evaluates, writes a metrics line and checkpoints (the ``train:`` section's ``*_every``).

    Examples:
      >>> c = Cadence(steps=10, log_every=4, eval_every=5, checkpoint_every=0)
      >>> [d for d in range(1, 11) if c.evaluate(d)], [d for d in range(1, 11) if c.log(d, evaluated=c.evaluate(d))]
      ([5], [4, 5, 8, 10])
      >>> [d for d in range(1, 11) if c.checkpoint(d, stopping=d == 3)]
      [3, 10]
    """

    steps: int
    log_every: int = 1
    eval_every: int = 0
    checkpoint_every: int = 0

    @classmethod
    def of(cls, train_cfg: Any) -> Cadence:
        """The cadence of a ``train:`` section."""
        return cls(train_cfg.steps, train_cfg.log_every, train_cfg.eval_every, train_cfg.checkpoint_every)

    def evaluate(self, done: int) -> bool:
        """Whether to evaluate after step ``done`` (the last step's evaluation is the run's final one)."""
        return bool(self.eval_every) and done % self.eval_every == 0 and done < self.steps

    def log(self, done: int, *, evaluated: bool = False) -> bool:
        """Whether step ``done`` writes its metrics line (every ``log_every``, the last, and evaluated steps)."""
        return done % max(1, self.log_every) == 0 or done == self.steps or evaluated

    def checkpoint(self, done: int, *, stopping: bool = False) -> bool:
        """Whether to checkpoint after step ``done`` (every ``checkpoint_every``, or only the last; on a stop)."""
        return done % (self.checkpoint_every or self.steps) == 0 or done == self.steps or stopping


def step_line(done: int, loss: float, lr: float, grad_norm: float, tokens: int, dt: float, *,
              compiled: bool) -> dict:
    """The metrics line of step ``done`` (``compiled``: the process's first step, whose time includes compiling)."""
    rec = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "time_s": dt}
    if compiled:
        rec["includes_compile"] = True
    return rec


def sync(*files) -> None:
    """Flush and fsync ``files``: metrics lines reach the disk before the checkpoint that makes them final."""
    for f in files:
        f.flush()
        os.fsync(f.fileno())


def _progress(total: int, desc: str, quiet: bool, initial: int = 0):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True)


class StopRequest:
    """Whether Ctrl-C asked the training loop to stop at the next step boundary (see :func:`stop_on_sigint`)."""

    requested = False


@contextlib.contextmanager
def stop_on_sigint():
    """While the block runs, a first Ctrl-C (SIGINT) only sets ``requested`` on the yielded flag.

    The loop checks the flag after each step, so it stops at a step boundary
    with a state it may save. A second Ctrl-C raises ``KeyboardInterrupt`` at
    once. The previous handler is restored on exit. Outside the main thread,
    or when SIGINT is ignored (a background job), nothing is installed.
    """
    flag = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train_run(ctx: RunContext, run_dir: Path, *, quiet: bool = False) -> tuple[Any, dict]:
    """Train one run with checkpoints; return the final params and a status dict.

    A run resumes from the latest good checkpoint in ``run_dir/ckpt`` (a
    damaged latest step falls back to the one before, with a warning), and
    drops the metrics lines written after it. Ctrl-C stops after the current
    step: that step is checkpointed, the metrics lines are flushed, and
    ``KeyboardInterrupt`` is raised with a message naming the step.
    """
    from lora_jax.io import state as ckpt

    cfg = ctx.cfg
    steps = cfg.train.steps
    tx = make_optimizer(cfg.optim, steps)
    trainable = _paths.everything if cfg.method == "full" else _paths.is_trainable_leaf
    state = _train.init_state(ctx.params, tx, jax.random.fold_in(jax.random.key(cfg.seed), 2), trainable)
    state, shard_batch, shardings = place_on_mesh(cfg, state)
    step_fn = _train.ahead_of_time(_train.make_train_step(loss_fn(ctx.model.config, cfg), tx, shardings=shardings))
    ckpt_dir = run_dir / "ckpt"
    cadence = Cadence.of(cfg.train)
    base_id = f"{cfg.model.name}:{cfg.method}"
    base_hash = hashing.base_hash(state.frozen)  # once: every save records it, a restore checks it
    restored = None
    if ckpt_dir.exists():
        restored = ckpt.restore_train_state(ckpt_dir, state, base_id=base_id, fallback=True, base_hash=base_hash)
    start = 0
    if restored is not None:
        state, _extra = restored
        start = int(state.step)
        ckpt.delete_steps_after(ckpt_dir, start)  # damaged steps the fallback skipped: their numbers come again
    metrics_path = run_dir / "metrics.jsonl"
    kept = restart_metrics(metrics_path, start)  # drop lines written after the checkpoint
    sched = make_lr_schedule(cfg.optim, steps)
    bar = _progress(steps, run_dir.name, quiet, initial=start)
    times, first, losses = [], [], []
    status = {"status": "finished", "reason": None, "resumed_from_step": start if restored is not None else None}
    tok_per_step = cfg.train.batch_size * cfg.task.max_len
    done = start
    with open(metrics_path, "a") as mf, stop_on_sigint() as stop:
        for step in range(start, steps):
            batch = shard_batch(_data.batch_at(ctx.train_data, step, batch_size=cfg.train.batch_size, seed=cfg.seed))
            t0 = time.perf_counter()
            state, m = step_fn(state, batch)
            loss = float(m["loss"])
            dt = time.perf_counter() - t0
            done = step + 1
            (times if step > start else first).append(dt)  # the first step of a process includes compilation
            losses.append(loss)
            if not math.isfinite(loss):
                status = {**status, "status": "failed", "reason": f"loss became {loss} at step {done}"}
                break
            rec = step_line(done, loss, float(sched(step)), float(m["grad_norm"]), tok_per_step, dt,
                            compiled=step == start)
            if cadence.evaluate(done):
                ev = evaluate(ctx, state.params)
                rec.update({k: v for k, v in ev.items() if k != "samples"})
            if cadence.log(done, evaluated="val_loss" in rec):
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
            if cadence.checkpoint(done, stopping=stop.requested):
                sync(mf)
                ckpt.save_train_state(ckpt_dir, state, base_id=base_id, extra={"data_step": done}, base_hash=base_hash)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_per_step / dt:,.0f}")
                bar.update(1)
            if stop.requested:
                break
    if bar is not None:
        bar.close()
    if stop.requested:
        raise KeyboardInterrupt(f"run {run_dir.name} stopped after step {done} of {steps}; its checkpoint of "
                                f"step {done} is in {ckpt_dir}")
    status.update(step_times(kept, times, first, tok_per_step))
    # Resumed after the last step (killed during the final evaluation or while writing the summary):
    # the loss of the last step comes from the metrics line it wrote.
    losses = losses or [r["loss"] for r in kept if "loss" in r]
    status["train_loss"] = losses[-1] if losses else None
    return state.params, status


def place_on_mesh(cfg, state: _train.TrainState):
    """Shard ``state`` over the config's ``mesh:`` (:mod:`lora_jax.sharding`); no mesh: nothing changes.

    Returns ``(state, shard_batch, shardings)``: the placed state, a function
    that places each batch, and the state's shardings for the train step
    (``None`` without a mesh).
    """
    sizes = cfg.mesh.sizes()
    if not sizes:
        return state, lambda batch: batch, None
    from lora_jax import sharding

    mesh = sharding.make_mesh(sizes)
    shardings = sharding.state_shardings(state, mesh)
    return sharding.place(state, shardings), lambda batch: sharding.shard_batch(batch, mesh), shardings


def step_times(kept: list[dict], times: list[float], first: list[float], tok_per_step: int) -> dict:
    """Median step time and tokens/s over the steps of this process and the metrics lines kept from earlier ones.

    The first step of each process (``first``; its line says ``includes_compile``)
    includes compilation and counts only when no other step time is known.
    """
    compiled = [r.get("includes_compile", r.get("step") == 1) for r in kept]
    clean = [r["time_s"] for r, c in zip(kept, compiled) if "time_s" in r and not c] + times
    if not clean:
        clean = [r["time_s"] for r, c in zip(kept, compiled) if "time_s" in r and c] + first
    med = statistics.median(clean) if clean else None
    return {"step_time_s": med, "tokens_per_s": tok_per_step / med if med else None}
