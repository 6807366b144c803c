"""Fused sweeps: the runs of a sweep that can share one compiled program train as one group.

Runs share a program when their configs differ only in the keys of
:data:`PER_MEMBER` (seed, rank, alpha, dropout, rsLoRA, init, learning rate and
its schedule, weight decay): same model, task, method (``lora`` or ``qlora``),
quantization, targets, optimizer, steps and batch shape. With
``sweep.rank_buckets`` (ascending ranks, e.g. ``[8, 16, 32, 64]``) a group
also shares its rank bucket (the smallest bucket >= rank; ranks above the
last share one more), so a rank-1 member is not padded to rank 64. A group is
trained by :mod:`lora_jax.members` as one vmapped program: one compilation,
the base read once per step, each member with its own rank (padded to the
group's largest and masked), scale, learning rate, weight decay, dropout rate,
PRNG keys and data order: its seed's (``sweep.fused_batches: own``, the
default), or with ``same`` the order of the group's first run's seed for every
member, one batch read per step for all (recorded as ``fused_group.data_seed``
in each summary). Each member computes what its own run computes (trained on
its data order); the loss and adapter match a run trained alone up to float
rounding.

Every member gets its run folder with the same files as a run of its own
(``config.yaml``, ``metrics.jsonl``, ``summary.json`` with a ``fused_group``
entry, ``adapter/`` at its true rank). A member whose loss turns non-finite
is frozen and marked failed; the others go on. The group's checkpoints live in
``<sweep>/.fused/<group>/ckpt`` until every member is written: a group killed
at any moment resumes from its last checkpoint, and members already finished
are not trained again. Evaluation is fused too: the validation loss of every
member in one vmapped program, and the generations of all members in one
batch (each row with its member's adapter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import config as _config
from lora_jax import data as _data
from lora_jax import members as _members
from lora_jax.io.files import atomic_write
from lora_jax.runner import build as _build
from lora_jax.runner.evaluate import generation_prompts, generation_scores, loss_metrics, val_batches
from lora_jax.runner.loop import Cadence, restart_metrics, step_line, step_times, stop_on_sigint, sync
from lora_jax.runner.sweep import finished_summary, run_one

__all__ = ["FOLDER", "PER_MEMBER", "MemberResult", "bucket_label", "evaluate_members", "group_id", "group_key",
           "group_runs", "plan_groups", "run_group"]

FOLDER = ".fused"
"""The folder of a sweep that holds the fused groups' checkpoints while they train."""

PER_MEMBER = ("seed", "lora.rank", "lora.alpha", "lora.dropout", "lora.rslora", "lora.init", "optim.lr",
              "optim.weight_decay", "optim.warmup_steps", "optim.schedule")
"""The config keys in which the members of one fused group may differ."""


class MemberResult(NamedTuple):
    """A member trained and evaluated with its group, for :func:`lora_jax.runner.sweep.run_one` to write."""

    ctx: Any
    params: Any
    status: dict
    evaluation: dict
    extra: dict


def bucket_label(rank: int, rank_buckets: Sequence[int]) -> str:
    """The rank bucket of ``rank``: ``<=b`` for the smallest bucket ``b >= rank``, ``>last`` above all, ``""`` without.

    Examples:
      >>> [bucket_label(r, [8, 16]) for r in (1, 8, 9, 64)], bucket_label(4, [])
      (['<=8', '<=8', '<=16', '>16'], '')
    """
    if not rank_buckets:
        return ""
    return next((f"<={b}" for b in rank_buckets if rank <= b), f">{rank_buckets[-1]}")


def group_key(cfg: _config.ExperimentConfig, rank_buckets: Sequence[int] = ()) -> str | None:
    """What a run must share with the others of its fused group (a hash), or ``None`` if it cannot be fused.

    Examples:
      >>> from lora_jax.config import ExperimentConfig, LoraConfig
      >>> a, b = ExperimentConfig(lora=LoraConfig(rank=1)), ExperimentConfig(lora=LoraConfig(rank=16), seed=3)
      >>> group_key(a) == group_key(b), group_key(ExperimentConfig(method="full"))
      (True, None)
      >>> group_key(a, rank_buckets=[8, 16]) == group_key(b, rank_buckets=[8, 16])  # buckets <=8 and <=16
      False
    """
    if cfg.method not in ("lora", "qlora") or cfg.lora.method != "lora" or cfg.optim.lora_plus_ratio:
        return None
    r = dataclasses.replace
    neutral = r(cfg, seed=0, lora=r(cfg.lora, rank=1, alpha=None, dropout=0.0, rslora=False, init="kaiming"),
                optim=r(cfg.optim, lr=1.0, weight_decay=0.0, warmup_steps=0, schedule="constant"))
    return _config.config_hash(neutral) + bucket_label(cfg.lora.rank, rank_buckets)


def group_runs(runs: list[tuple[str, Any]], *, rank_buckets: Sequence[int] = ()) -> list[list[tuple[str, Any]]]:
    """Split a sweep's runs into units: fused groups (two runs or more) and single runs, in sweep order.

    With ``rank_buckets`` a group holds the runs of one rank bucket (:func:`bucket_label`).
    """
    units: list[list] = []
    by_key: dict[str, list] = {}
    for run in runs:
        key = group_key(run[1], rank_buckets)
        if key is None:
            units.append([run])
        elif key in by_key:
            by_key[key].append(run)
        else:
            by_key[key] = [run]
            units.append(by_key[key])
    return units


def group_id(runs: list[tuple[str, Any]], batches: str = "own") -> str:
    """A short stable name of a group of runs (their names and config hashes, and ``batches`` when ``same``)."""
    text = json.dumps([[name, _config.config_hash(cfg)] for name, cfg in runs] + ([batches] * (batches != "own")))
    return "g" + hashlib.sha256(text.encode()).hexdigest()[:12]


def run_group(runs: list[tuple[str, Any]], sweep_dir: Path, *, quiet: bool = False, batches: str = "own") -> list[dict]:
    """Train (or resume, or skip) a fused group; write every member's run folder; return the summaries.

    ``batches``: ``own`` (each member its seed's data order) or ``same`` (every
    member the order of ``runs[0]``'s seed, one batch per step for all). A
    member counts as finished only when its summary records that data order;
    one trained on another is trained again.
    """
    sweep_dir = Path(sweep_dir)
    data_seed = runs[0][1].seed if batches == "same" else None
    done = {name: finished_summary(sweep_dir / name, cfg, data_seed=data_seed) for name, cfg in runs}
    todo = [(n, c) for n, c in runs if done[n] is None]
    for name, _ in todo:  # e.g. finished on another data order: its summary is written again, after training
        (sweep_dir / name / "summary.json").unlink(missing_ok=True)
    if todo:
        # a checkpoint of the whole group (killed while its members were written) or of the unfinished ones
        train = next((m for m in (runs, todo) if (sweep_dir / FOLDER / group_id(m, batches) / "ckpt").exists()), todo)
        if len(train) == 1 and data_seed in (None, train[0][1].seed):
            done[train[0][0]] = run_one(*train[0], sweep_dir / train[0][0], quiet=quiet)
        else:
            finished = {n for n, s in done.items() if s is not None}
            done.update(_train_group(train, sweep_dir, quiet=quiet, data_seed=data_seed, finished=finished))
    return [done[n] for n, _ in runs]


def _train_group(runs, sweep_dir: Path, *, quiet: bool, data_seed: int | None, finished: set[str]) -> dict[str, dict]:
    from lora_jax.io import state as ckpt

    t_start = time.time()
    names, cfgs = [n for n, _ in runs], [c for _, c in runs]
    cfg0, K = cfgs[0], len(runs)
    gid = group_id(runs, "own" if data_seed is None else "same")
    model = _build.load_model(cfg0.model)
    ctx0 = _build.prepare(cfg0, model)
    base = _build.build_base(cfg0, model)
    ctxs = [ctx0] + [dataclasses.replace(ctx0, cfg=c, params=_build.build_params(c, model, base)) for c in cfgs[1:]]
    members = _members.stack([c.params for c in ctxs])
    o, steps, bs = cfg0.optim, cfg0.train.steps, cfg0.train.batch_size
    keys = jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 2) for c in cfgs])
    state = _members.init_state(members, keys, optimizer=o.name, betas=o.betas)
    step_fn = _members.make_fused_step(_build.loss_fn(model.config, cfg0), optimizer=o.name, betas=o.betas,
                                       grad_clip=o.grad_clip, shared_batch=data_seed is not None)
    lrs = np.stack([np.asarray(jax.vmap(_build.make_lr_schedule(c.optim, steps))(jnp.arange(steps))) for c in cfgs])
    wd = jnp.asarray([c.optim.weight_decay for c in cfgs], jnp.float32)
    ckpt_dir = sweep_dir / FOLDER / gid / "ckpt"
    base_id = f"{cfg0.model.name}:{cfg0.method}"
    restored = ckpt.restore_train_state(ckpt_dir, state, base_id=base_id, fallback=True) if ckpt_dir.exists() else None
    start, failed = 0, {}
    if restored is not None:
        state, extra = restored
        start, failed = int(state.step), dict(extra.get("failed", {}))
        ckpt.delete_steps_after(ckpt_dir, start)
    paths = [sweep_dir / n / "metrics.jsonl" for n in names]
    kept = []
    for cfg, path in zip(cfgs, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path.parent / "config.yaml", _config.to_yaml(cfg))
        kept.append(restart_metrics(path, start))
    tok = bs * cfg0.task.max_len
    cadence = Cadence.of(cfg0.train)
    times, first, last = [], [], [None] * K
    bar = None if quiet else _progress(steps, f"fused {gid} ({K} runs)", start)
    with contextlib.ExitStack() as files, stop_on_sigint() as stop:
        mfs = [files.enter_context(open(p, "a")) for p in paths]
        for step in range(start, steps):
            if len(failed) == K:
                break
            if data_seed is None:
                batch = jax.tree.map(lambda *xs: jnp.stack(xs),
                                     *[_data.batch_at(ctx0.train_data, step, batch_size=bs, seed=c.seed) for c in cfgs])
            else:
                batch = _data.batch_at(ctx0.train_data, step, batch_size=bs, seed=data_seed)  # one for all members
            hyper = _members.hyper(members, lrs[:, step], wd)
            t0 = time.perf_counter()
            state, m = step_fn(state, hyper, batch)
            losses, norms = np.asarray(m["loss"]), np.asarray(m["grad_norm"])
            dt = time.perf_counter() - t0
            done = step + 1
            (times if step > start else first).append(dt)
            ev = None
            if cadence.evaluate(done):
                ev = evaluate_members(ctxs, members._replace(trainable=state.trainable, frozen=state.frozen),
                                      list(range(K)))
            for k, name in enumerate(names):
                if name in failed:
                    continue
                if not math.isfinite(float(losses[k])):
                    failed[name] = f"loss became {float(losses[k])} at step {done}"
                    continue
                last[k] = float(losses[k])
                rec = step_line(done, last[k], float(lrs[k, step]), float(norms[k]), tok, dt, compiled=step == start)
                if ev is not None:
                    rec.update({key: v for key, v in ev[k].items() if key != "samples"})
                if cadence.log(done, evaluated=ev is not None):
                    mfs[k].write(json.dumps(rec) + "\n")
            if cadence.checkpoint(done, stopping=stop.requested):
                sync(*mfs)
                ckpt.save_train_state(ckpt_dir, state, base_id=base_id, extra={"data_step": done, "failed": failed})
            if bar is not None:
                bar.update(1)
            if stop.requested:
                break
    if bar is not None:
        bar.close()
    if stop.requested:
        raise KeyboardInterrupt(f"fused group {gid} ({', '.join(names)}) stopped after step {done} of {steps}; its "
                                f"checkpoint is in {ckpt_dir}")
    final = members._replace(trainable=state.trainable, frozen=state.frozen)
    ok = [k for k, n in enumerate(names) if n not in failed]
    evals = evaluate_members(ctxs, final, ok) if ok else {}
    train_wall = time.time() - t_start
    out = {}
    for k, (name, cfg) in enumerate(runs):
        if name in finished:
            continue
        status = {"status": "failed" if name in failed else "finished", "reason": failed.get(name),
                  "resumed_from_step": start if restored is not None else None,
                  **step_times(kept[k], times, first, tok)}
        losses_k = [last[k]] if last[k] is not None else [r["loss"] for r in kept[k] if "loss" in r]
        status["train_loss"] = losses_k[-1] if losses_k else None
        extra = {"fused_group": {"id": gid, "members": names, "padded_rank": members.r_max,
                                 "batches": "own" if data_seed is None else "same",
                                 "data_seed": cfg.seed if data_seed is None else data_seed,
                                 "wall_s": train_wall, "compilations": step_fn.cache_size()},
                 "wall_s": train_wall / K}
        params = _members.unstack(final, k, like=ctxs[k].params) if name not in failed else ctxs[k].params
        result = MemberResult(ctxs[k], params, status, evals.get(k, {}), extra)
        out[name] = run_one(name, cfg, sweep_dir / name, quiet=quiet, trained=result)
    shutil.rmtree(sweep_dir / FOLDER / gid, ignore_errors=True)
    with contextlib.suppress(OSError):
        (sweep_dir / FOLDER).rmdir()  # only when no other group left its checkpoints there
    return out


def _progress(total: int, desc: str, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True)


def evaluate_members(ctxs: list, members: _members.Members, ks: list[int]) -> dict[int, dict]:
    """Validation loss and perplexity of every member in one program; generation scores from one batch of all.

    ``ctxs`` are the members' run contexts (one task, one validation set); the
    result holds what :func:`lora_jax.runner.evaluate.evaluate` gives a run
    alone, for the members ``ks``.
    """
    ctx0 = ctxs[0]
    fused_eval = _members.make_fused_eval(_build.loss_fn(ctx0.model.config, ctx0.cfg))
    totals, n = np.zeros(members.size), 0.0
    for batch in val_batches(ctx0):
        m = fused_eval(members.trainable, members.frozen, members.ranks, members.scales, batch)
        loss, count = np.asarray(m["loss"]), np.asarray(m["n_tokens"])
        totals += np.array([float(loss[k]) * float(count[k]) for k in range(members.size)])
        n += float(count[0])
    out = {k: loss_metrics(float(totals[k]), n) for k in ks}
    examples, prompts = generation_prompts(ctx0)
    if examples:
        from lora_jax import generate

        tok = ctx0.model.tokenizer
        preds: dict[int, list[str]] = {k: [] for k in ks}
        bs = max(1, ctx0.cfg.train.batch_size * 2)
        for s in range(0, len(prompts), bs):
            chunk = prompts[s : s + bs]
            g = generate.generate(members, ctx0.model.config, chunk * len(ks),
                                  adapter_index=[k for k in ks for _ in chunk],
                                  max_new_tokens=ctx0.cfg.task.max_new_tokens, stop_ids=tok.stop_ids,
                                  pad_id=getattr(tok, "pad_id", None) or 0)
            rows = g.rows()
            for j, k in enumerate(ks):
                mine = rows[j * len(chunk) : (j + 1) * len(chunk)]
                preds[k] += [tok.decode(r, skip_special_tokens=True).strip() for r in mine]
        for k in ks:
            out[k].update(generation_scores(ctxs[k], examples, preds[k]))
    return out


def plan_groups(runs: list[tuple[str, Any]], *, compile_cost: bool = True, rank_buckets: Sequence[int] = (),
                batches: str = "own") -> list[dict[str, Any]]:
    """One row per fused group of a sweep: members, ranks, bucket, padded rank, the memory of its fused step.

    ``rank_buckets`` and ``batches`` as ``sweep.rank_buckets`` and ``sweep.fused_batches`` give them.
    """
    rows = []
    for unit in group_runs(runs, rank_buckets=rank_buckets):
        if len(unit) < 2:
            continue
        cfgs = [c for _, c in unit]
        row: dict[str, Any] = {"group": group_id(unit, batches), "runs": len(unit),
                               "members": " ".join(n for n, _ in unit),
                               "ranks": "/".join(str(c.lora.rank) for c in cfgs),
                               "bucket": bucket_label(cfgs[0].lora.rank, rank_buckets),
                               "padded_rank": max(c.lora.rank for c in cfgs), "batches": batches}
        if compile_cost:
            row.update(_fused_step_cost(cfgs, shared_batch=batches == "same"))
        rows.append(row)
    return rows


def _fused_step_cost(cfgs, *, shared_batch: bool) -> dict[str, float]:
    cfg0, K = cfgs[0], len(cfgs)
    model = _build.load_model(cfg0.model)
    base = _build.build_base(cfg0, model)
    members = _members.stack([_build.build_params(c, model, base) for c in cfgs])
    o = cfg0.optim
    state = _members.init_state(members, jnp.stack([jax.random.key(0)] * K), optimizer=o.name, betas=o.betas)
    step = _members.make_fused_step(_build.loss_fn(model.config, cfg0), optimizer=o.name, betas=o.betas,
                                    grad_clip=o.grad_clip, shared_batch=shared_batch)
    shape = (cfg0.train.batch_size, cfg0.task.max_len) if shared_batch else (K, cfg0.train.batch_size,
                                                                             cfg0.task.max_len)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32), "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32),
             "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32)}
    hyper = _members.hyper(members, np.zeros(K), np.zeros(K))
    mem = step.jitted.lower(state.trainable, state.opt_state, state.frozen, state.key, state.step, hyper,
                            batch).compile().memory_analysis()
    if mem is None:
        return {}
    return {"step_args_mb": mem.argument_size_in_bytes / 1e6, "step_temp_mb": mem.temp_size_in_bytes / 1e6}


def print_plan(config_path, overrides=(), *, compile_cost: bool = True, force: bool = False) -> None:
    """Print the fused groups of a sweep (``lora-jax plan``) when it is fused (``sweep.fused`` or ``force``)."""
    from lora_jax.config.expand import sweep_options

    opts = sweep_options(_config.load_raw(config_path, overrides))
    if not (force or opts["fused"]):
        return
    runs = _config.load_sweep(config_path, overrides)
    buckets, batches = opts["rank_buckets"], opts["fused_batches"]
    rows = plan_groups(runs, compile_cost=compile_cost, rank_buckets=buckets, batches=batches)
    grouped = {n for r in rows for n in r["members"].split()}
    print(f"\nfused groups: {len(rows)} (each one compiled program), batches: {batches}"
          + (f", rank buckets {'/'.join(map(str, buckets))}" if buckets else ""))
    for r in rows:
        cost = "".join(f", {k} {r[k]:,.1f}" for k in ("step_args_mb", "step_temp_mb") if k in r)
        bucket = f" (bucket r{r['bucket']})" if r["bucket"] else ""
        print(f"  {r['group']}: {r['runs']} runs, ranks {r['ranks']} padded to {r['padded_rank']}{bucket}{cost}: "
              f"{r['members']}")
    alone = [n for n, _ in runs if n not in grouped]
    if alone:
        print(f"  trained alone: {' '.join(alone)}")
