"""Train-step benchmark: LoRA vs full fine-tuning vs QLoRA on the SmolLM2-135M shape.

Prints one JSON object. Timings are medians over interleaved repetitions
(LoRA, full, QLoRA, matmul, LoRA, full, QLoRA, matmul, ...) measured in this one
process, so the ratios compare like with like on a noisy shared machine. Peak
memory is measured per mode in a separate process.

    python experiments/benchmarks/train_step.py            # full-size run
    python experiments/benchmarks/train_step.py --tiny     # smoke run (seconds)

Keys:
  lora_step_s, full_step_s   median seconds per step (forward, backward, AdamW update)
  lora_over_full             median of the per-pair ratios
  matmul_gflops              fp32 matmul throughput measured in the same run
  lora_model_gflop           model FLOPs of one LoRA step (analytic; see flops())
  lora_mfu                   lora_model_gflop / lora_step_s / matmul_gflops
  matmul_gflops_model_shapes fp32 matmul throughput on the forward matmuls of this model
                             ((tokens x d_in) @ (d_in x d_out) for the seven projections
                             and the output head, weighted by their FLOPs), same run
  lora_mfu_model_shapes      lora_model_gflop / lora_step_s / matmul_gflops_model_shapes
  xla_lora_gflop             XLA's own cost analysis of the compiled step, for comparison
  qlora_step_s, qlora_over_lora   NF4 + double quantization, block 64, all seven projections
  base_bits_per_param        storage of the quantized matrices (codes + scales)
  <mode>_peak_rss_mb         each mode in its own process, initialisation and compilation included
  <mode>_step_peak_rss_mb    the same process, steady-state train steps only
  qlora_peak_rss_saving_fraction, qlora_step_peak_rss_saving_fraction
                             (lora - qlora) / (fp32 - packed bytes of the quantized matrices)
  lora_step_s_blocked, lora_step_s_pipelined
                             the LoRA step in the two loops users write, each in a child process
                             with the `lora-jax` command's process settings (its allocator choice,
                             see lora_jax.cli.process_settings): blocking on the loss after every
                             step, and dispatching all steps ahead and blocking at the end
  pipelined_over_blocked     median of the per-round ratios of the two
  lora_step_s_{blocked,pipelined}_system_malloc, pipelined_over_blocked_system_malloc
                             the same with the system allocator's defaults (LORA_JAX_MALLOC=system)
  page_faults_per_step_{blocked,pipelined}[_system_malloc]
                             minor page faults per step (median over rounds) in those children
  malloc_configured          whether the command's allocator settings were in effect

The main process applies the command's process settings too (--malloc system: the system's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax import cli, hostmem
from lora_jax.models import llama
from lora_jax.runner.telemetry import peak_rss_mb, reset_peak_rss

ALL_SEVEN = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"


def model_config(tiny: bool) -> llama.LlamaConfig:
    if tiny:
        return llama.LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    return llama.SMOLLM2_135M


def flops(cfg: llama.LlamaConfig, n_tokens: int, seq_len: int, rank: int, mode: str) -> float:
    """Model FLOPs of one train step (matmuls only; elementwise work is not counted).

    Forward: 2 * weights * tokens + attention (QK^T and AV). Backward: the input
    gradients cost as much again, and full fine-tuning adds the weight gradients
    (2 * weights * tokens more). Attention backward is twice its forward.
    LoRA adds its adapters: forward 2 * r * (d_in + d_out) per token and target,
    backward twice that.
    """
    per_tok = llama.matmul_flops_per_token(cfg, seq_len)
    w, attn = per_tok["weights"] * n_tokens, per_tok["attention"] * n_tokens
    if mode == "full":
        return 3 * w + 3 * attn
    c = cfg
    shapes = [(c.dim, c.q_dim), (c.dim, c.kv_dim), (c.dim, c.kv_dim), (c.q_dim, c.dim)]
    shapes += [(c.dim, c.ffn_dim), (c.dim, c.ffn_dim), (c.ffn_dim, c.dim)]
    adapter = 2.0 * rank * sum(a + b for a, b in shapes) * c.n_layers * n_tokens
    return 2 * w + 3 * attn + 3 * adapter


QUANT = dict(format="nf4", block_size=64, double_quant=True)


def init_quantized(cfg) -> dict:
    """Random weights with the seven projections quantized as they are drawn.

    The fp32 copy of one matrix exists at a time, so the process's peak memory
    reflects the 4-bit storage rather than an fp32 model quantized afterwards.
    """
    import re

    from lora_jax import quant

    shapes = jax.eval_shape(lambda: llama.init(jax.random.key(0), cfg))
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, sds) in enumerate(flat):
        w = (0.02 * jax.random.normal(jax.random.fold_in(jax.random.key(0), i), sds.shape)).astype(sds.dtype)
        if sds.shape == (cfg.dim,):
            w = jnp.ones(sds.shape, sds.dtype)
        if re.fullmatch(ALL_SEVEN, lj.paths.path_str(path)):
            w = quant.quantize_weight(w, **QUANT)
        out.append(w)
    return treedef.unflatten(out)


def build(mode: str, cfg, rank: int, batch: int, seq: int):
    """Return (step_fn, state, batch) for mode 'lora', 'qlora' or 'full'."""
    params = init_quantized(cfg) if mode == "qlora" else llama.init(jax.random.key(0), cfg)
    if mode in ("lora", "qlora"):
        params = lj.lora.init(jax.random.key(1), params, [lj.LoraRule(pattern=ALL_SEVEN, rank=rank, alpha=2 * rank)])
        trainable = lj.paths.is_trainable_leaf
    else:
        trainable = lj.paths.everything
    tx = optax.adamw(1e-4)
    state = lj.train.init_state(params, tx, jax.random.key(2), trainable)
    step = lj.train.make_train_step(lambda p, b: llama.loss(p, b, cfg), tx)
    tokens = jax.random.randint(jax.random.key(3), (batch, seq), 0, cfg.vocab_size)
    return step, state, {"tokens": tokens}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0, out


def rss_only(mode: str, args) -> None:
    """Run in a child process: build, compile, run steps; print peak RSS in MB.

    ``peak_rss_mb`` covers the whole process (initialisation and XLA compilation
    included); ``step_peak_rss_mb`` only the steady state: the high-water mark is
    reset after the first (compiling) step and read after two more.
    """
    cfg = model_config(args.tiny)
    step, state, batch = build(mode, cfg, args.rank, args.batch, args.seq)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    whole = peak_rss_mb()
    reset_peak_rss()
    for _ in range(2):
        state, m = step(state, batch)
        jax.block_until_ready(m)
    # VmHWM, not ru_maxrss: a child started by fork + exec inherits the parent's
    # ru_maxrss, so every mode would report the parent's peak.
    print(json.dumps({"peak_rss_mb": max(whole, peak_rss_mb()), "step_peak_rss_mb": peak_rss_mb()}))


def _child(flags: list[str], args, malloc: str | None = None) -> dict:
    """Run this script with ``flags`` in a fresh process; return the JSON of its last line."""
    cmd = [sys.executable, __file__, *flags, "--rank", str(args.rank), "--batch", str(args.batch),
           "--seq", str(args.seq), "--reps", str(args.reps), "--malloc", malloc or args.malloc]
    cmd += ["--tiny"] if args.tiny else []
    env = {k: v for k, v in os.environ.items() if k != hostmem.ENV}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_rss(mode: str, args) -> dict:
    return _child(["--rss-only", mode], args)


def loops_only(args) -> None:
    """Run in a child process: the LoRA step in the two loops users write, interleaved by rounds.

    Each round times ``k`` steps that block on the loss after every step
    (``float(metrics["loss"])``, as a loop that logs it does) and ``k`` steps
    dispatched ahead with one block at the end (the README's loop). Prints
    seconds per step of each round.
    """
    cfg = model_config(args.tiny)
    step, state, batch = build("lora", cfg, args.rank, args.batch, args.seq)
    k = 4 if args.tiny else 5
    state, m = step(state, batch)  # compile
    float(m["loss"])
    rounds = {"blocked": [], "pipelined": [], "blocked_faults": [], "pipelined_faults": []}

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    for _ in range(max(2, args.reps // 3) + 1):  # first round is warm-up
        f0, t0 = faults(), time.perf_counter()
        for _ in range(k):
            state, m = step(state, batch)
            float(m["loss"])
        rounds["blocked"].append((time.perf_counter() - t0) / k)
        rounds["blocked_faults"].append((faults() - f0) / k)
        f0, t0 = faults(), time.perf_counter()
        for _ in range(k):
            state, m = step(state, batch)
        jax.block_until_ready((state, m))
        rounds["pipelined"].append((time.perf_counter() - t0) / k)
        rounds["pipelined_faults"].append((faults() - f0) / k)
    print(json.dumps({**{k: v[1:] for k, v in rounds.items()}, "malloc_configured": hostmem.configured()}))


def loop_styles(args) -> dict:
    """Both loop styles with the command's allocator choice and with the system's, in clean processes."""
    out = {}
    for malloc, suffix in (("cli", ""), ("system", "_system_malloc")):
        r = _child(["--loops-only"], args, malloc)
        out[f"lora_step_s_blocked{suffix}"] = round(statistics.median(r["blocked"]), 4)
        out[f"lora_step_s_pipelined{suffix}"] = round(statistics.median(r["pipelined"]), 4)
        ratio = statistics.median(p / b for p, b in zip(r["pipelined"], r["blocked"]))
        out[f"pipelined_over_blocked{suffix}"] = round(ratio, 4)
        for style in ("blocked", "pipelined"):
            out[f"page_faults_per_step_{style}{suffix}"] = round(statistics.median(r[f"{style}_faults"]))
        if malloc == "cli":
            out["malloc_configured"] = r["malloc_configured"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model, for a smoke run")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10, help="interleaved repetitions after warm-up")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--no-loops", action="store_true", help="skip the loop-style child processes")
    ap.add_argument("--only-loops", action="store_true", help="run only the loop-style child processes")
    ap.add_argument("--malloc", choices=["cli", "system"], default="cli",
                    help="host allocator: the lora-jax command's choice (default) or the system's")
    ap.add_argument("--rss-only", choices=["lora", "full", "qlora"], help=argparse.SUPPRESS)
    ap.add_argument("--loops-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.malloc == "cli":
        cli.process_settings()  # before the first JAX computation, as the command does
    if args.rss_only:
        rss_only(args.rss_only, args)
        return {}
    if args.loops_only:
        loops_only(args)
        return {}
    if args.only_loops:
        result = {"shape": "tiny" if args.tiny else "smollm2-135m", "reps": args.reps, **loop_styles(args)}
        print(json.dumps(result, indent=1))
        return result

    cfg = model_config(args.tiny)
    n_tok = args.batch * args.seq
    n = 1024 if args.tiny else 2048
    a = jax.random.normal(jax.random.key(5), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(6), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    c = cfg
    shape_mult = [((c.dim, c.q_dim), 1), ((c.dim, c.kv_dim), 2), ((c.q_dim, c.dim), 1), ((c.dim, c.ffn_dim), 2),
                  ((c.ffn_dim, c.dim), 1)]
    shape_mult = [((k, nn), m * c.n_layers) for (k, nn), m in shape_mult] + [((c.dim, c.vocab_size), 1)]
    model_mats = [(jax.random.normal(jax.random.key(7), (n_tok, k)), jax.random.normal(jax.random.key(8), (k, nn)), m)
                  for (k, nn), m in shape_mult]

    def model_shape_seconds():
        """Seconds for one pass over the model's forward matmuls (best of 3 per shape)."""
        total = 0.0
        for x, w, m in model_mats:
            total += m * min(timed(lambda x=x, w=w: mm(x, w))[0] for _ in range(3))
        return total

    model_flop = sum(2.0 * n_tok * w.shape[0] * w.shape[1] * m for _, w, m in model_mats)

    runs = {}
    compile_s = {}
    modes = ("lora", "full", "qlora")
    for mode in modes:
        step, state, batch = build(mode, cfg, args.rank, args.batch, args.seq)
        t, (state, _) = timed(lambda step=step, state=state, batch=batch: step(state, batch))  # compile + first step
        compile_s[mode] = t
        runs[mode] = [step, state, batch]
    cost = runs["lora"][0].jitted.lower(
        runs["lora"][1].trainable, runs["lora"][1].opt_state, runs["lora"][1].frozen,
        runs["lora"][1].key, runs["lora"][1].step, runs["lora"][2]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    timed(lambda: mm(a, b))

    times = {m: [] for m in (*modes, "matmul", "model_matmuls")}
    for _ in range(args.reps + 1):  # first round is warm-up
        for mode in modes:
            step, state, batch = runs[mode]
            t, (state, metrics) = timed(lambda step=step, state=state, batch=batch: step(state, batch))
            runs[mode][1] = state
            times[mode].append(t)
        times["matmul"].append(min(timed(lambda: mm(a, b))[0] for _ in range(3)))
        times["model_matmuls"].append(model_shape_seconds())
    times = {k: v[1:] for k, v in times.items()}

    lora_s = statistics.median(times["lora"])
    full_s = statistics.median(times["full"])
    ratio = statistics.median(x / y for x, y in zip(times["lora"], times["full"]))
    qlora_s = statistics.median(times["qlora"])
    q_ratio = statistics.median(x / y for x, y in zip(times["qlora"], times["lora"]))
    from lora_jax import quant

    quantized = [x.base for _, x in lj.lora.nodes(runs["qlora"][1].params)]
    qfp = quant.footprint(quantized)
    fp32_bytes = 4 * qfp.n_params
    gflops = statistics.median(2 * n**3 / t for t in times["matmul"]) / 1e9
    model_gflops = statistics.median(model_flop / t for t in times["model_matmuls"]) / 1e9
    lora_gflop = flops(cfg, n_tok, args.seq, args.rank, "lora") / 1e9
    full_gflop = flops(cfg, n_tok, args.seq, args.rank, "full") / 1e9
    result = {
        "shape": "tiny" if args.tiny else "smollm2-135m",
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "reps": args.reps,
        "lora_step_s": round(lora_s, 4),
        "full_step_s": round(full_s, 4),
        "lora_over_full": round(ratio, 4),
        "matmul_gflops": round(gflops, 1),
        "lora_model_gflop": round(lora_gflop, 2),
        "full_model_gflop": round(full_gflop, 2),
        "lora_mfu": round(lora_gflop / lora_s / gflops, 4),
        "matmul_gflops_model_shapes": round(model_gflops, 1),
        "lora_mfu_model_shapes": round(lora_gflop / lora_s / model_gflops, 4),
        "full_mfu": round(full_gflop / full_s / gflops, 4),
        "xla_lora_gflop": round(float(cost.get("flops", float("nan"))) / 1e9, 2),
        "qlora_step_s": round(qlora_s, 4),
        "qlora_over_lora": round(q_ratio, 4),
        "base_bits_per_param": qfp.bits_per_param,
        "quantized_params": qfp.n_params,
        "quantized_fp32_mb": round(fp32_bytes / 2**20, 1),
        "quantized_packed_mb": round(qfp.nbytes / 2**20, 1),
        "compile_s": {k: round(v, 2) for k, v in compile_s.items()},
        "trainable_params": lj.lora.count(runs["lora"][1].params).trainable,
        "jax": jax.__version__,
        "machine": f"{platform.machine()} {jax.device_count()}x{jax.devices()[0].platform}",
        "threads": len(os.sched_getaffinity(0)),
        "numpy": np.__version__,
    }
    if not args.no_loops:
        result.update(loop_styles(args))
    if not args.no_rss:
        rss = {mode: peak_rss(mode, args) for mode in modes}
        target = (fp32_bytes - qfp.nbytes) / 2**20
        for mode in modes:
            result[f"{mode}_peak_rss_mb"] = round(rss[mode]["peak_rss_mb"], 1)
            result[f"{mode}_step_peak_rss_mb"] = round(rss[mode]["step_peak_rss_mb"], 1)
        for key in ("peak_rss_mb", "step_peak_rss_mb"):
            saved = rss["lora"][key] - rss["qlora"][key]
            result[f"qlora_{key.replace('_mb', '')}_saving_fraction"] = round(saved / target, 3)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
