"""QLoRA on Gemma 3 270M's own K-quant base against LoRA on the same base dequantized to fp32.

Both runs train the same adapters (rank 16 on the seven projections of every
layer) with Adam on the same batch; the QLoRA step dequantizes the GGUF's
Q4_K / Q6_K / Q5_0 / Q8_0 codes inside the step, the LoRA step multiplies
dense fp32 weights. The steps are timed side by side (A B A B ...), medians
reported, compile time apart; the target is ``qlora_over_lora <= 1.25``.

    python experiments/benchmarks/gemma3_step.py [--quick] [--out FILE]

Prints one JSON object (and writes it to ``--out``; default
``experiments/benchmarks/results/gemma3_step.json``). ``--quick`` uses a tiny
batch and two timed steps (for the smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax.models import gemma3, load_gguf, registry

RULES = [lj.LoraRule(pattern=r"layers/\d+/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel", rank=16, alpha=32)]


def make(params, cfg, tx):
    """A train state with fresh adapters and a step function over ``params``."""
    adapted = lj.lora.init(jax.random.key(0), params, RULES)
    step = lj.train.make_train_step(lambda p, b: gemma3.loss(p, b, cfg), tx)
    return lj.train.init_state(adapted, tx, jax.random.key(1)), step


def timed(step, state, batch):
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    return state, time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gemma3_step.json"))
    a = ap.parse_args(argv)
    batch_size, seq, steps = (1, 16, 2) if a.quick else (2, 128, 6)
    path = registry.resolve("gemma3-270m")[1]
    kq, cfg, _ = load_gguf.load(path, tokenizer=False)
    dense, _, _ = load_gguf.load(path, tokenizer=False, dequantize=True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (batch_size, seq)), jnp.int32)
    batch = {"tokens": tokens}
    tx = optax.adam(1e-4)
    runs = {"qlora": make(kq, cfg, tx), "lora": make(dense, cfg, tx)}
    states, compile_s, times = {}, {}, {k: [] for k in runs}
    for name, (state, step) in runs.items():
        states[name], compile_s[name] = timed(step, state, batch)
    for _ in range(steps):
        for name, (_, step) in runs.items():
            states[name], dt = timed(step, states[name], batch)
            times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "benchmark": "gemma3_step", "quick": a.quick, "batch": batch_size, "seq_len": seq, "timed_steps": steps,
        "backend": jax.default_backend(), "qlora_step_s": med["qlora"], "lora_step_s": med["lora"],
        "qlora_over_lora": med["qlora"] / med["lora"], "compile_s": compile_s, "target": 1.25,
        "footprint_bits_per_param": {"qlora_base": lj.quant.footprint(kq).bits_per_param,
                                     "lora_base": lj.quant.footprint(dense).bits_per_param},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
