"""Adapter-method benchmark: DoRA / QDoRA step cost against LoRA / QLoRA, LoftQ's initial error against QLoRA's.

Prints one JSON object (and writes it with --out).

    python experiments/benchmarks/methods.py            # SmolLM2-135M shape and weights
    python experiments/benchmarks/methods.py --tiny     # smoke run (random tiny model, seconds)

Keys:
  step: rank, batch, seq and the median seconds per train step (forward, backward, AdamW) of
    lora, dora, qlora, qdora (NF4 + double quantization, block 64, all seven projections;
    random weights as train_step.py), measured interleaved (lora dora qlora qdora, lora ...);
    dora_over_lora and qdora_over_qlora are medians of the per-round ratios (target <= 1.35).
  loftq: on the model's matrices (SmolLM2-135M's 210 projections from its GGUF, dequantized),
    NF4 block 64, rank 16, per matrix the initial error ||W - (Q + s*A@B)||_F / ||W||_F of LoftQ
    over plain QLoRA's ||W - Q||_F / ||W||_F, for T=1 and T=5: median, quartiles, the fraction of
    matrices it helped (ratio < 1), and `below_one` per T (the acceptance: median < 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from train_step import ALL_SEVEN, init_quantized, model_config, timed

import lora_jax as lj
from lora_jax.methods import dora
from lora_jax.models import llama

MODES = ("lora", "dora", "qlora", "qdora")


def build(mode: str, cfg, rank: int, batch: int, seq: int):
    """Return ``(step_fn, state, batch)`` for one of :data:`MODES`."""
    quantized = mode.startswith("q")
    params = init_quantized(cfg) if quantized else llama.init(jax.random.key(0), cfg)
    rules = [lj.LoraRule(pattern=ALL_SEVEN, rank=rank, alpha=2 * rank)]
    init = dora.init if mode.endswith("dora") else lj.lora.init
    params = init(jax.random.key(1), params, rules)
    tx = optax.adamw(1e-4)
    state = lj.train.init_state(params, tx, jax.random.key(2))
    step = lj.train.make_train_step(lambda p, b: llama.loss(p, b, cfg), tx)
    tokens = jax.random.randint(jax.random.key(3), (batch, seq), 0, cfg.vocab_size)
    return step, state, {"tokens": tokens}


def step_costs(cfg, rank: int, batch: int, seq: int, reps: int) -> dict:
    built = {m: build(m, cfg, rank, batch, seq) for m in MODES}
    states = {}
    compile_s = {}
    for m, (step, state, b) in built.items():
        compile_s[m], (states[m], _) = timed(lambda step=step, state=state, b=b: step(state, b))
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(reps):
        for m, (step, _, b) in built.items():
            dt, (states[m], _) = timed(lambda step=step, m=m, b=b: step(states[m], b))
            times[m].append(dt)
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    return {
        "rank": rank, "batch": batch, "seq": seq, "reps": reps,
        **{f"{m}_step_s": statistics.median(times[m]) for m in MODES},
        **{f"{m}_first_step_s": compile_s[m] for m in MODES},
        "dora_over_lora": ratio("dora", "lora"),
        "qdora_over_qlora": ratio("qdora", "qlora"),
        "target": 1.35,
    }  # fmt: skip


def model_matrices(tiny: bool) -> dict[str, np.ndarray]:
    """The seven projections of every layer: SmolLM2-135M's (dequantized from its GGUF) or a tiny random model's."""
    if tiny:
        params = llama.init(jax.random.key(0), model_config(True))
    else:
        from lora_jax.models import registry

        params, _, _ = registry.load_model("smollm2-135m", dequantize=True)
    return {p: np.asarray(w, np.float32) for p, w in lj.paths.leaves_with_paths(params) if re.fullmatch(ALL_SEVEN, p)}


def loftq_errors(mats: dict[str, np.ndarray], rank: int, steps: tuple[int, ...]) -> dict:
    from lora_jax.methods import loftq

    out: dict = {"n_matrices": len(mats), "format": "nf4", "block_size": 64, "rank": rank}
    ratios: dict[int, list[float]] = {t: [] for t in steps}
    t0 = time.perf_counter()
    for i, w in enumerate(mats.values()):  # one run of max(steps) steps gives the error after each step
        rep = loftq.init_matrix(jax.random.fold_in(jax.random.key(0), i), w, rank=rank, scale=1.0, steps=max(steps),
                                format="nf4", block_size=64)
        for t in steps:
            ratios[t].append(rep.step_errors[t - 1] / rep.qlora_error)
    out["seconds"] = time.perf_counter() - t0
    for t in steps:
        r = np.asarray(ratios[t])
        q1, med, q3 = np.percentile(r, [25, 50, 75])
        out[f"T{t}"] = {"median_ratio": float(med), "q1": float(q1), "q3": float(q3),
                        "helped_fraction": float(np.mean(r < 1)), "max_ratio": float(r.max()),
                        "below_one": bool(med < 1)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, few repetitions (smoke run)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--skip", choices=("step", "loftq"), action="append", default=[])
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    cfg = model_config(args.tiny)
    result: dict = {"tiny": args.tiny, "jax": jax.__version__, "cpus": os.cpu_count(),
                    "load_avg_1m_start": round(os.getloadavg()[0], 2),
                    "note": "ratios are interleaved medians; a load average above the CPU count means a shared machine"}
    if "step" not in args.skip:
        reps = args.reps or (2 if args.tiny else 7)
        result["step"] = step_costs(cfg, 16 if not args.tiny else 4, 4, 128 if not args.tiny else 16, reps)
    if "loftq" not in args.skip:
        result["loftq"] = loftq_errors(model_matrices(args.tiny), 16 if not args.tiny else 4, (1, 5))
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
