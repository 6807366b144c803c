"""Perplexity of SmolLM2-135M-Instruct on the Python reference documentation.

Prints one JSON object. The text is the installed CPython's ``pydoc_data.topics``:
the topic texts joined in sorted-key order with blank lines between them,
tokenized with the model's own tokenizer (from the GGUF), of which the first
``--tokens`` tokens are scored (8192 by default, a few minutes on 2 CPU cores).
Scoring is :func:`lora_jax.metrics.perplexity`, Hugging Face's sliding-window
recipe: windows of ``--window`` tokens every ``--stride`` tokens, each token
scored once.

    python experiments/benchmarks/perplexity.py
    python experiments/benchmarks/perplexity.py --tokens 1024 --window 256 --stride 128   # smoke run

Keys:
  perplexity, nll             exp(mean NLL) and mean NLL (nats per token)
  n_tokens, n_windows         scored tokens and forward windows
  text_chars, text_tokens     size of the whole joined text
  weights                     "fp32" (GGUF blocks dequantized) or "quantized" (exact QTensor leaves)
  seconds, tokens_per_s       wall time of the scoring (compilation included)
"""

from __future__ import annotations

import argparse
import json
import platform
import pydoc_data.topics
import sys
import time

import jax

from lora_jax import metrics
from lora_jax.models import registry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--quantized", action="store_true", help="score with the exact QTensor leaves")
    args = ap.parse_args()

    params, cfg, tok = registry.load_model("smollm2-135m", dequantize=not args.quantized)
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok.encode(text)
    t = time.perf_counter()
    r = metrics.perplexity(params, cfg, ids[: args.tokens], args.window, args.stride, batch_size=args.batch_size)
    dt = time.perf_counter() - t
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct (GGUF Q4_1)",
                "weights": "quantized" if args.quantized else "fp32",
                "text": "pydoc_data.topics, sorted keys, joined by blank lines",
                "python": platform.python_version(),
                "text_chars": len(text),
                "text_tokens": len(ids),
                "prefix_tokens": min(args.tokens, len(ids)),
                "window": args.window,
                "stride": args.stride,
                "perplexity": round(r.perplexity, 4),
                "nll": round(r.nll, 5),
                "n_tokens": r.n_tokens,
                "n_windows": r.n_windows,
                "seconds": round(dt, 1),
                "tokens_per_s": round(r.n_windows * args.window / dt, 1),
                "jax": jax.__version__,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
