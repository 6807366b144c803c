"""Generation benchmark: SmolLM2-135M-Instruct, lora-jax KV-cache decoding vs transformers.

Prints one JSON object. Both sides decode greedily with the same fp32 weights
(the GGUF's Q4_1/Q8_0 blocks dequantized once), 128 new tokens per row with no
early stop, at batch 1 and batch 8 (eight different chat prompts, left-padded).
torch runs with ``torch.set_num_threads(2)``; XLA uses the machine's cores (2 on
the reference machine). On a shared machine torch's two OpenMP threads stall
whenever another process holds a core, so a one-thread run of transformers is
measured too, as a control, and ``ours_over_best_hf_tokens_per_s`` compares
against the fastest transformers configuration of the run. Timings are medians over interleaved repetitions
(ours, HF, ours, HF, ...) in this one process; compilation is excluded (one
warm-up call per shape) and reported separately.

    python experiments/benchmarks/generate.py              # full run (a few minutes)
    python experiments/benchmarks/generate.py --reps 1 --new-tokens 16   # smoke run

Keys:
  load_s, load_dequantized_s   seconds to load the GGUF (exact QTensor leaves / fp32), tokenizer included
  compile_s_b1, compile_s_b8   first-call time minus a steady-state call (XLA compilation)
  ours_tokens_per_s_b{1,8}     generated tokens per second (rows x new tokens / wall time)
  hf_tokens_per_s_b{1,8}       the same for transformers' ``generate`` with its default attention (sdpa)
  hf_eager_tokens_per_s_b{1,8} the same with ``attn_implementation="eager"``
  ours_over_hf_tokens_per_s    median of per-pair time ratios at batch 1, against the default (sdpa)
  ours_over_hf_eager_tokens_per_s   the same against eager attention (``..._b8`` keys for batch 8)
  hf_eager_1thread_tokens_per_s_b{1,8}, ours_over_hf_eager_1thread_tokens_per_s   eager, torch.set_num_threads(1)
  ours_over_best_hf_tokens_per_s    batch 1, against the fastest of the three transformers configurations
  ours_quantized_tokens_per_s_b1    ours with the exact Q4_1/Q8_0 QTensor leaves (dequantized per step)
  same_tokens_b1               whether ours and HF (sdpa) produced the same 128 greedy tokens at batch 1

Neither side stops at the end-of-turn token (HF: ``generation_config.eos_token_id = None``),
so every row generates exactly ``--new-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lora_jax import generate as gen  # noqa: E402
from lora_jax.models import llama, load_gguf, registry  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child in two sentences.",
    "List three prime numbers greater than 100.",
    "What does the Python function zip do?",
    "Give me a name for a grey cat.",
    "Why is the sky blue? Answer briefly, please, in simple words.",
    "Translate 'good morning' into German.",
]


def hf_model(params, cfg: llama.LlamaConfig, directory: str):
    """transformers' LlamaForCausalLM holding our arrays, through the library's merged HF export."""
    import transformers

    from lora_jax.models import export_hf

    export_hf.export_merged_hf(directory, params, cfg)
    return transformers.LlamaForCausalLM.from_pretrained(directory, torch_dtype="float32").eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    n_new = args.new_tokens
    path = registry.resolve("smollm2-135m")[1]

    load_q, load_f = [], []
    for _ in range(2):
        t = time.perf_counter()
        qparams, cfg, tok = load_gguf.load(path)
        jax.block_until_ready(qparams)
        load_q.append(time.perf_counter() - t)
        t = time.perf_counter()
        params, cfg, tok = load_gguf.load(path, dequantize=True)
        jax.block_until_ready(params)
        load_f.append(time.perf_counter() - t)

    chats = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    model = hf_model(params, cfg, tempfile.mkdtemp(prefix="lora_jax_hf_"))
    pad = tok.pad_id

    def ours(p, prompts):
        return gen.generate(p, cfg, prompts, max_new_tokens=n_new, pad_id=pad).tokens

    model.generation_config.eos_token_id = None  # both sides: exactly n_new tokens per row

    def hf(prompts, attn="sdpa", n=None, threads=2):
        torch.set_num_threads(threads)
        model.set_attn_implementation(attn)
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n or n_new, do_sample=False, pad_token_id=pad)
        return out[:, width:].numpy()

    def timed(f, *a):
        t = time.perf_counter()
        out = f(*a)
        return time.perf_counter() - t, out

    result = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", "new_tokens": n_new, "reps": args.reps}
    result["load_s"] = round(statistics.median(load_q), 3)
    result["load_dequantized_s"] = round(statistics.median(load_f), 3)
    for b in (1, 8):
        prompts = chats[:b]
        first, _ = timed(ours, params, prompts)
        second, _ = timed(ours, params, prompts)
        result[f"compile_s_b{b}"] = round(first - second, 2)
        hf(prompts, "sdpa", 4), hf(prompts, "eager", 4)  # warm-up
        hf_runs = {"hf": ("sdpa", 2), "hf_eager": ("eager", 2), "hf_eager_1thread": ("eager", 1)}
        t_ours, times, ratios = [], {k: [] for k in hf_runs}, {k: [] for k in hf_runs}
        for _ in range(args.reps):
            a, out_ours = timed(ours, params, prompts)
            t_ours.append(a)
            for k, (attn, threads) in hf_runs.items():
                h, out = timed(hf, prompts, attn, None, threads)
                if k == "hf":
                    out_hf = out
                times[k].append(h)
                ratios[k].append(h / a)
        sfx = "" if b == 1 else f"_b{b}"
        result[f"ours_tokens_per_s_b{b}"] = round(b * n_new / statistics.median(t_ours), 2)
        for k in hf_runs:
            result[f"{k}_tokens_per_s_b{b}"] = round(b * n_new / statistics.median(times[k]), 2)
            result[f"ours_over_{k}_tokens_per_s" + sfx] = round(statistics.median(ratios[k]), 3)
        best = min(hf_runs, key=lambda k: statistics.median(times[k]))
        result["ours_over_best_hf_tokens_per_s" + sfx] = round(statistics.median(ratios[best]), 3)
        result["best_hf" + sfx] = "{} attention, {} thread(s)".format(*hf_runs[best])
        if b == 1:
            result["same_tokens_b1"] = bool(np.array_equal(out_ours, out_hf))
            result["answer_b1"] = tok.decode(out_ours[0], skip_special_tokens=False)[:80]
    timed(ours, qparams, chats[:1])  # compile
    tq = [timed(ours, qparams, chats[:1])[0] for _ in range(args.reps)]
    result["ours_quantized_tokens_per_s_b1"] = round(n_new / statistics.median(tq), 2)
    result["env"] = {
        "jax": jax.__version__,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
