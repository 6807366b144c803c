"""``lora-jax plan``: what each run of a sweep will cost, before anything trains.

For every run: trainable / frozen parameter counts, the bytes of the frozen base
(packed for QLoRA), and, from XLA's compiled train step, the FLOPs per step,
the memory the step needs (arguments, outputs and temporaries) and the compile
time. With a ``mesh:`` in the config the step is compiled for that mesh (from
shapes; nothing is placed) and the bytes are per device.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import config as _config
from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax import quant as _quant
from lora_jax import train as _train
from lora_jax.runner import build as _build


def _abstract_batch(cfg: _config.ExperimentConfig) -> dict:
    shape = (cfg.train.batch_size, cfg.task.max_len)
    return {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32),
            "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32)}


def plan_run(name: str, cfg: _config.ExperimentConfig, *, compile_cost: bool = True) -> dict[str, Any]:
    """Counts, base bytes and (optionally) XLA cost of one run's train step.

    The parameters are built as the run builds them (:func:`lora_jax.runner.build.build_params`).
    """
    model = _build.load_model(cfg.model)
    params = _build.build_params(cfg, model)
    counts = _lora.count(params)
    base = _quant.footprint(jax.tree.map(lambda x: x.base if _lora.is_lora(x) else x, params, is_leaf=_lora.is_node))
    trainable = {"base": 0, "full": counts.total}.get(cfg.method, counts.trainable)
    row: dict[str, Any] = {"run": name, "method": cfg.method,
                           "rank": cfg.lora.rank if cfg.method in ("lora", "qlora") else None,
                           "trainable": trainable, "frozen": counts.total - trainable,
                           "base_mb": base.nbytes / 1e6, "base_bits": base.bits_per_param}
    if compile_cost and cfg.method != "base":
        tx = _build.make_optimizer(cfg.optim, cfg.train.steps)
        filt = _paths.everything if cfg.method == "full" else _paths.is_trainable_leaf
        state = _train.init_state(params, tx, jax.random.key(0), filt)
        shardings, batch = None, _abstract_batch(cfg)
        if cfg.mesh.sizes():
            state, batch, shardings, row["mesh"] = _on_mesh(cfg, state, batch)
        step = _train.make_train_step(_build.loss_fn(model.config), tx, shardings=shardings)
        t0 = time.perf_counter()
        compiled = step.jitted.lower(state.trainable, state.opt_state, state.frozen, state.key, state.step,
                                       batch).compile()
        row["compile_s"] = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        mem = compiled.memory_analysis()
        row["gflop_per_step"] = float(cost.get("flops", float("nan"))) / 1e9
        if mem is not None:
            row["step_args_mb"] = mem.argument_size_in_bytes / 1e6
            row["step_temp_mb"] = mem.temp_size_in_bytes / 1e6
            row["step_out_mb"] = mem.output_size_in_bytes / 1e6
    return row


def _on_mesh(cfg: _config.ExperimentConfig, state: _train.TrainState, batch: dict):
    """The state and batch as shapes on the config's mesh (nothing placed), the shardings and the mesh's name."""
    from lora_jax import sharding

    mesh = sharding.make_mesh(cfg.mesh.sizes())
    shardings = sharding.state_shardings(state, mesh)

    def abstract(x, s):
        return None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    leaves, treedef = jax.tree.flatten(state, is_leaf=lambda x: x is None)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: x is None)
    state = treedef.unflatten([abstract(x, s) for x, s in zip(leaves, shards, strict=True)])
    sharding.check_batch(cfg.train.batch_size, mesh)
    batch = {k: abstract(v, sharding.batch_sharding(mesh, len(v.shape))) for k, v in batch.items()}
    return state, batch, shardings, "x".join(str(mesh.shape[a]) for a in mesh.axis_names)


def plan(config_path, overrides=(), *, compile_cost: bool = True) -> list[dict[str, Any]]:
    """Plan every run of a config's sweep."""
    return [plan_run(name, cfg, compile_cost=compile_cost) for name, cfg in _config.load_sweep(config_path, overrides)]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`plan` rows."""
    cols = ["run", "method", "rank", "trainable", "frozen", "base_mb", "base_bits", "mesh", "gflop_per_step",
            "step_args_mb", "step_temp_mb", "compile_s"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)
