"""Scale benchmark: compile time against depth with layers under lax.scan and unrolled; remat policies.

Prints one JSON object. A LoRA train step (``lora_jax.train.make_train_step``,
rank 4 on the seven projections, Adam) of a narrow Llama (dim 64, 4 query / 2 kv
heads, ffn 128, vocab 256) is lowered and compiled at two depths, once with
the layers stacked (``model.scan_layers``) and once unrolled; both programs
then run one step from the same parameters, whose losses are compared.

    python experiments/benchmarks/scale.py            # depths 16 and 64
    python experiments/benchmarks/scale.py --quick    # depths 1 and 2, a smoke run (seconds; no sharding keys)

Keys (``<a>``, ``<b>`` the two depths):
  compile_s_depth<a>, compile_s_depth<b>    lower + compile of the scanned step, seconds (median of
                                            --compile-reps, interleaved; the unrolled ones: one each)
  compile_s_depth<b>_over_depth<a>          their ratio (the target is <= 1.5: independent of depth)
  unrolled_compile_s_depth<a>, ..._depth<b>, unrolled_compile_s_depth<b>_over_depth<a>
                                            the same for the unrolled layer loop
  scan_max_rel_loss_diff     max over depths of |loss_scan - loss_unrolled| / |loss_unrolled| (<= 1e-5)
  attention_max_rel_logit_diff
                             max |logits(dot_product) - logits(blocked)| / max |logits(blocked)| over
                             real tokens, 2 x 128 tokens with right padding on one row (<= 1e-5)
  remat_temp_bytes           {policy: temp bytes of the compiled step} (compiled.memory_analysis())
                             at depth <a> scanned, batch 4 x 128; null where the backend refuses it
  remat_step_s               {policy: median seconds per step}, the same programs, interleaved
  attention                  the attention this backend runs by default (auto)

Sharding keys (8 host CPU devices, each check in a fresh subprocess: mesh_check.py, multihost_check.py):
  mesh_max_rel_loss_diff     max |loss_mesh - loss_1dev| / |loss_1dev| over meshes (8,1,1), (2,4,1), (1,4,2),
                             (1,8,1), LoRA and QLoRA, one SGD step and ten AdamW steps (<= 1e-5)
  fsdp8_frozen_bytes_per_device_over_total
                             per-device argument bytes (XLA's memory analysis) of the frozen QLoRA base on
                             mesh (1,8,1) over its total bytes (<= 0.15)
  multiprocess_loss_rel_diff two processes x 4 devices against one process x 8 devices, three AdamW steps (<= 1e-5)

    python experiments/benchmarks/scale.py --only-mesh --update experiments/benchmarks/results/scale.json
                              # recompute only the sharding keys, keep the others of that file
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax.errors import ConfigError
from lora_jax.models import llama
from lora_jax.models.layers import REMAT
from lora_jax.models.stacking import stack_layers

SEVEN = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"


def model_config(depth: int) -> llama.LlamaConfig:
    """The narrow Llama of this benchmark at ``depth`` layers."""
    return llama.LlamaConfig(vocab_size=256, dim=64, n_layers=depth, n_heads=4, n_kv_heads=2, ffn_dim=128)


def adapted(cfg: llama.LlamaConfig):
    """Random base with LoRA (rank 4, B non-zero so the adapters matter) on the seven projections."""
    params = lj.lora.init(jax.random.key(1), llama.init(jax.random.key(0), cfg), [lj.LoraRule(pattern=SEVEN, rank=4)])
    leaves, treedef = jax.tree.flatten(params, is_leaf=lj.lora.is_lora)
    leaves = [dataclasses.replace(x, lora_b=0.1 * jax.random.normal(jax.random.key(i), x.lora_b.shape))
              if lj.lora.is_lora(x) else x for i, x in enumerate(leaves)]
    return treedef.unflatten(leaves)


def batch_of(cfg, batch: int, seq: int) -> dict:
    tokens = jax.random.randint(jax.random.key(2), (batch, seq), 0, cfg.vocab_size)
    return {"tokens": tokens}


def compiled_step(params, cfg, batch, *, remat="none"):
    """``(seconds to lower and compile, executable, its arguments)`` of one LoRA train step."""
    tx = optax.adam(1e-3)
    step = lj.train.make_train_step(lambda p, b: llama.loss(p, b, cfg, remat=remat), tx, donate=False)
    state = lj.train.init_state(params, tx, jax.random.key(3))
    args = (state.trainable, state.opt_state, state.frozen, state.key, state.step, batch)
    t0 = time.perf_counter()
    exe = step.jitted.lower(*args).compile()
    return time.perf_counter() - t0, exe, args


def depth_rows(depths, batch, seq, reps) -> dict:
    """Compile times (median of ``reps`` interleaved compilations, A B A B; unrolled: one) and the step's loss."""
    out, losses = {}, []
    for layout in ("scan", "unrolled"):
        prefix = "" if layout == "scan" else "unrolled_"
        times = {d: [] for d in depths}
        for r in range(reps if layout == "scan" else 1):
            for d in depths:
                cfg = model_config(d)
                params = adapted(cfg)
                params = stack_layers(params) if layout == "scan" else params
                seconds, exe, args = compiled_step(params, cfg, batch_of(cfg, batch, seq))
                times[d].append(seconds)
                if r == 0:
                    losses.append((layout, d, float(exe(*args)[3]["loss"])))
        for d in depths:
            out[f"{prefix}compile_s_depth{d}"] = statistics.median(times[d])
        a, b = depths
        out[f"{prefix}compile_s_depth{b}_over_depth{a}"] = out[f"{prefix}compile_s_depth{b}"] / out[
            f"{prefix}compile_s_depth{a}"]
    by = {(lay, d): v for lay, d, v in losses}
    out["scan_loss"] = {str(d): by["scan", d] for d in depths}
    out["scan_max_rel_loss_diff"] = max(abs(by["scan", d] - by["unrolled", d]) / abs(by["unrolled", d]) for d in depths)
    return out


def attention_diff() -> float:
    cfg = model_config(2)
    params = adapted(cfg)
    tokens = batch_of(cfg, 2, 128)["tokens"]
    mask = np.ones((2, 128), np.int32)
    mask[1, 100:] = 0
    kw = {"attention_mask_BT": jnp.asarray(mask)}
    logits = jax.jit(lambda p, a: llama.apply(p, tokens, cfg, attention=a, **kw), static_argnums=1)
    blocked, fused = np.asarray(logits(params, "blocked")), np.asarray(logits(params, "dot_product"))
    real = mask.astype(bool)
    return float(np.max(np.abs(fused[real] - blocked[real])) / np.max(np.abs(blocked[real])))


def remat_rows(depth, batch, seq, reps) -> dict:
    cfg = model_config(depth)
    params = stack_layers(adapted(cfg))
    data = batch_of(cfg, batch, seq)
    temp, exes = {}, {}
    for policy in REMAT:
        try:
            _, exe, args = compiled_step(params, cfg, data, remat=policy)
        except ConfigError as e:  # offload on the CPU
            temp[policy] = None
            print(f"remat {policy}: {e}", file=sys.stderr)
            continue
        mem = exe.memory_analysis()
        temp[policy] = None if mem is None else int(mem.temp_size_in_bytes)
        exes[policy] = (exe, args)
    times = {p: [] for p in exes}
    for exe, args in exes.values():  # warm up
        jax.block_until_ready(exe(*args))
    for _ in range(reps):
        for policy, (exe, args) in exes.items():
            t0 = time.perf_counter()
            jax.block_until_ready(exe(*args))
            times[policy].append(time.perf_counter() - t0)
    return {"remat_temp_bytes": temp, "remat_step_s": {p: statistics.median(t) for p, t in times.items()}}


def mesh_rows() -> dict:
    """The sharding keys, from mesh_check.py and multihost_check.py run as fresh processes."""
    here = Path(__file__).resolve().parent
    out = {}
    for script in ("mesh_check.py", "multihost_check.py"):
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, str(here / script), f"{d}/out.json"], check=True,
                           stdout=subprocess.DEVNULL)
            out[script] = json.loads(Path(f"{d}/out.json").read_text())
    return mesh_keys(out["mesh_check.py"], out["multihost_check.py"])


def mesh_keys(mesh: dict, multi: dict) -> dict:
    """The sharding keys from the JSON of mesh_check.py and multihost_check.py."""
    return {"mesh_max_rel_loss_diff": max(c["loss_rel"] for c in mesh["cases"]),
            "fsdp8_frozen_bytes_per_device_over_total": mesh["fsdp8_frozen_bytes_per_device_over_total"],
            "multiprocess_loss_rel_diff": multi["multiprocess_loss_rel_diff"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="depths 1 and 2, small shapes: a smoke run")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per remat policy")
    ap.add_argument("--compile-reps", type=int, default=3, help="compilations per depth with scan (median)")
    ap.add_argument("--only-mesh", action="store_true", help="compute only the sharding keys")
    ap.add_argument("--update", metavar="JSON", help="merge the keys into this results file (and rewrite it)")
    args = ap.parse_args(argv)
    if args.only_mesh:
        res = json.loads(Path(args.update).read_text()) if args.update else {}
        res.update(mesh_rows())
        return _emit(res, args.update)
    depths = (1, 2) if args.quick else (16, 64)
    res = {"date": datetime.date.today().isoformat(), "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "jax": jax.__version__, "machine": platform.machine(),
           "depths": list(depths), "width": model_config(2).dim, "batch": [2, 64],
           "attention": llama.attention_choice(model_config(2))}
    res.update(depth_rows(depths, 2, 64, 1 if args.quick else args.compile_reps))
    res["attention_max_rel_logit_diff"] = attention_diff()
    res["remat_shape"] = {"depth": depths[0], "batch": [4, 32 if args.quick else 128]}
    res.update(remat_rows(depths[0], 4, 32 if args.quick else 128, 1 if args.quick else args.reps))
    if not args.quick:  # minutes of compilation on 2 cores; tests/test_sharding.py runs the same scripts
        res.update(mesh_rows())
    return _emit(res, args.update)


def _emit(res: dict, path: str | None) -> dict:
    text = json.dumps(res, indent=1)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
