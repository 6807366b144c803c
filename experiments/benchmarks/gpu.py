"""GPU train-step benchmark (bf16): lora-jax LoRA, QLoRA and full fine-tuning next to Hugging Face PEFT.

One setup per process (so peak device memory is that setup's own), called by
``gpu.sh``. Prints one JSON line:

    python experiments/benchmarks/gpu.py --setup ours_lora --shape llama-1b

Setups: ``ours_lora``, ``ours_qlora`` (NF4 + double quant, block 64, bf16
compute; each weight is quantized as it is drawn, so no bf16 copy of the
model ever exists), ``ours_full``, ``peft_lora`` (PEFT on PyTorch, SDPA attention).
Shapes: ``smollm2``, ``llama-1b`` (Llama-3.2-1B), ``llama-8b`` (Llama-3.1-8B; with
``ours_qlora --batch 1 --seq 2048 --remat``: does QLoRA r=16 fit a 24 GB card?), ``tiny``.
Two loops are timed: ``blocked`` (the loss copied to the host after every
step) and ``pipelined`` (``--steps`` steps dispatched, one wait at the end).
Everything in bfloat16 (weights, adapters, AdamW state; PEFT's adapters are kept
in bf16 too, ``autocast_adapter_dtype=False``), rank 16, alpha 32, all seven
projections, random weights, random tokens. MFU = analytic model FLOPs of the
step (see ``train_step.flops``) / step time / a bf16 8192^3 matmul measured in
the same process with the same framework.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import ALL_SEVEN, flops, model_config  # noqa: E402

TORCH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shape(name: str):
    from lora_jax.models import llama

    if name in ("smollm2", "tiny"):
        return model_config(tiny=name == "tiny")
    if name == "llama-1b":  # the Llama-3.2-1B shape (1.24 B parameters, tied embeddings)
        return llama.LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                                 rope_theta=500000.0, tie_embeddings=True)
    if name == "llama-8b":  # the Llama-3.1-8B shape (8.03 B parameters, separate output head)
        return llama.LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                                 rope_theta=500000.0, tie_embeddings=False, max_seq_len=8192)
    raise ValueError(f"unknown shape {name!r}")


def run_ours(setup, cfg, args):
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lj
    from lora_jax.models import llama

    dt = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if setup == "ours_qlora":
        params = init_quantized(cfg, dt)
    else:
        params = llama.init(jax.random.key(0), cfg, dtype=dt)
    if setup == "ours_full":
        trainable = lj.paths.everything
    else:
        params = lj.lora.init(jax.random.key(1), params, [lj.LoraRule(pattern=ALL_SEVEN, rank=args.rank,
                                                                      alpha=2 * args.rank)])
        trainable = lj.paths.is_trainable_leaf
    tx = optax.adamw(1e-4)
    state = lj.train.init_state(params, tx, jax.random.key(2), trainable)
    del params
    train_step = lj.train.make_train_step(lambda p, b: llama.loss(p, b, cfg, remat=args.remat), tx)
    batch = {"tokens": jax.random.randint(jax.random.key(3), (args.batch, args.seq), 0, cfg.vocab_size)}
    box = [state, None]

    def step(block=True):
        box[0], m = train_step(box[0], batch)
        box[1] = m["loss"]
        return float(jax.block_until_ready(box)[1]) if block else None

    n = 8192 if args.shape != "tiny" else 256
    a = jax.random.normal(jax.random.key(5), (n, n), dt)
    b = jax.random.normal(jax.random.key(6), (n, n), dt)
    mm = jax.jit(lambda x, y: x @ y)

    def matmul_s():
        mm(a, b).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(10):
            c = mm(a, b)
        c.block_until_ready()
        return (time.perf_counter() - t0) / 10, n

    def peak_mb():
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20

    return step, matmul_s, peak_mb, f"jax {jax.__version__} on {jax.devices()[0].device_kind}"


def init_quantized(cfg, dtype):
    """Random weights (std 0.02, norms 1) with the seven projections quantized one at a time as drawn."""
    import re

    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from lora_jax.models import llama

    shapes = jax.eval_shape(lambda: llama.init(jax.random.key(0), cfg, dtype=dtype))
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    @functools.partial(jax.jit, static_argnums=(1, 2))  # one compilation per shape, not per leaf
    def draw(key, shape, quantized):
        w = (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        return lj.quant.quantize_weight(w, "nf4", block_size=64, double_quant=True, dtype=dtype) if quantized else w

    out = []
    for i, (path, sds) in enumerate(flat):
        quantized = re.fullmatch(ALL_SEVEN, lj.paths.path_str(path)) is not None
        norm = len(sds.shape) == 1
        out.append(jnp.ones(sds.shape, sds.dtype) if norm else draw(jax.random.key(i), sds.shape, quantized))
    return treedef.unflatten(out)


def run_peft(setup, cfg, args):
    import jax
    import peft
    import torch
    import transformers

    from lora_jax.models import llama
    from lora_jax.models.export_hf import hf_config

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    # The config.json our exporter writes for this shape (abstract params: no weights are made).
    hf, _ = hf_config(jax.eval_shape(lambda: llama.init(jax.random.key(0), cfg)), cfg, args.dtype)
    hf_cfg = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", torch_dtype=dt).to(dev)
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                       target_modules=TORCH_TARGETS),
                                autocast_adapter_dtype=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    tok = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    if args.remat:
        model.gradient_checkpointing_enable()
    last = [None]

    def step(block=True):
        loss = model(input_ids=tok, labels=tok).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last[0] = loss.detach()
        if not block:
            return None
        out = float(last[0])
        sync()
        return out

    n = 8192 if args.shape != "tiny" else 256
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)

    def matmul_s():
        a @ b
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        return (time.perf_counter() - t0) / 10, n

    def peak_mb():
        return torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else 0.0

    return step, matmul_s, peak_mb, f"torch {torch.__version__} peft {peft.__version__} on {dev}"


def sig(x: float) -> float:
    """``x`` to four significant digits."""
    return float(f"{x:.4g}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", required=True, choices=["ours_lora", "ours_qlora", "ours_full", "peft_lora"])
    ap.add_argument("--shape", default="smollm2", choices=["smollm2", "llama-1b", "llama-8b", "tiny"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass")
    args = ap.parse_args(argv)
    cfg = shape(args.shape)
    build = run_peft if args.setup.startswith("peft") else run_ours
    step, matmul_s, peak_mb, where = build(args.setup, cfg, args)
    t0 = time.perf_counter()
    first_loss = step()
    compile_s = time.perf_counter() - t0
    step()  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(block=False)
    step()
    pipelined_s = (time.perf_counter() - t0) / (args.steps + 1)
    mm_t, n = min(matmul_s() for _ in range(3))
    mm_tflops = 2 * n**3 / mm_t / 1e12
    step_s = statistics.median(times)
    mode = "full" if args.setup == "ours_full" else "lora"
    tflop = flops(cfg, args.batch * args.seq, args.seq, args.rank, mode) / 1e12
    out = {
        "setup": args.setup, "shape": args.shape, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
        "remat": args.remat, "step_s": round(step_s, 5), "step_s_pipelined": round(pipelined_s, 5),
        "tokens_per_s": round(args.batch * args.seq / step_s, 1),
        "first_step_s": round(compile_s, 2), "initial_loss": round(first_loss, 4),
        "model_tflop": sig(tflop), "matmul_tflops": sig(mm_tflops), "mfu": sig(tflop / step_s / mm_tflops),
        "peak_device_mb": round(peak_mb(), 1), "runtime": where,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
