"""Quantization error of SmolLM2-135M's projection weights by 4-bit format and block size.

QLoRA (Dettmers et al., 2023) argues that NormalFloat4 (NF4) is the best 4-bit
code for normally distributed weights and beats Int4 and FP4. This script
measures the reconstruction error of every format of :mod:`lora_jax.quant`
(nf4, fp4, int4, int4_asym, int8) at every block size (32, 64, 128, 256 where
it divides ``d_in``, and one block per output channel) on

* the 210 projection kernels of SmolLM2-135M-Instruct (q, k, v, o, gate, up,
  down of 30 layers), read from the GGUF and dequantized to fp32, and
* an N(0, 1) matrix of shape (1536, 1536) (a reference where NF4's premise
  holds exactly),

and, as a downstream check, the perplexity of the model with all seven
projections of every layer replaced by their re-quantized versions (block 64,
no double quantization) on the first 4096 tokens of the Python docs'
validation topics.

    python experiments/quantization_error/quant_error.py            # ~2 min on 2 CPU cores
    python experiments/quantization_error/quant_error.py --no-ppl   # errors only (~1 min)
    python experiments/quantization_error/quant_error.py --bits-only  # only the bits column, from the shapes

Writes ``results.csv`` (errors), ``perplexity.csv`` and ``figures/quant_error.{png,pdf}``
next to this file. Double quantization is off everywhere except the one row
marked ``nf4+dq`` (QLoRA's own setting: NF4, block 64, int8 scales).

Error measures (pooled over all matrices of a scope, float64):
  rel_mse      sum((Q(W) - W)^2) / sum(W^2)
  max_abs_err  max |Q(W) - W| over all entries
  rel_max_err  mean over matrices of max|Q(W) - W| / max|W|
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import quant
from lora_jax.models import registry

HERE = Path(__file__).resolve().parent
FORMATS = ("nf4", "fp4", "int4", "int4_asym", "int8")
BLOCKS = (32, 64, 128, 256, None)  # None: one block per output channel
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projections(params) -> list[tuple[str, np.ndarray]]:
    out = []
    for i, layer in enumerate(params["layers"]):
        for group, names in (("attn", PROJ[:4]), ("mlp", PROJ[4:])):
            for n in names:
                out.append((f"layers/{i}/{group}/{n}/kernel", np.asarray(layer[group][n]["kernel"], np.float32)))
    return out


_CACHE: dict[tuple, tuple[float, float, float, float, quant.Footprint]] = {}


def _matrix_error(name: str, w: np.ndarray, fmt: str, bs: int | None, dq: bool):
    key = (name, fmt, bs, dq)
    if key not in _CACHE:
        qt = quant.quantize_weight(jnp.asarray(w), fmt, block_size=bs, double_quant=dq)
        q = np.asarray(qt.dequantize(), np.float64)
        w64 = w.astype(np.float64)
        d = q - w64
        m = float(np.max(np.abs(d)))
        _CACHE[key] = (float(np.sum(d * d)), float(np.sum(w64 * w64)), m, m / float(np.max(np.abs(w64))),
                       quant.footprint({"w": qt}))
    return _CACHE[key]


def quant_error(mats: list[tuple[str, np.ndarray]], fmt: str, bs: int | None, dq: bool = False) -> dict:
    """Pooled errors of one scope, and its storage bits per weight as :func:`lora_jax.quant.footprint` counts them.

    The footprint counts the codes, the block scales, the offsets (int4_asym) and, with double quantization, the
    int8 scales plus their fp32 second-level scales (one per 256 output columns and block).
    """
    errs = [_matrix_error(n, w, fmt, bs, dq) for n, w in mats]
    fp = quant.Footprint(sum(e[4].n_params for e in errs), sum(e[4].nbytes for e in errs),
                         sum(e[4].constant_bytes for e in errs))
    return {"bits_per_param": round(fp.bits_per_param, 4), "rel_mse": sum(e[0] for e in errs) / sum(e[1] for e in errs),
            "max_abs_err": max(e[2] for e in errs), "rel_max_err": float(np.mean([e[3] for e in errs])),
            "n_matrices": len(mats)}


def footprint_bits(mats: list[tuple[str, np.ndarray]], fmt: str, bs: int | None, dq: bool) -> float:
    """Bits per weight of a scope from the shapes alone (``jax.eval_shape`` of the quantizer, then its footprint)."""
    quantize = lambda x: {"w": quant.quantize_weight(x, fmt, block_size=bs, double_quant=dq)}  # noqa: E731
    fps = [quant.footprint(jax.eval_shape(quantize, jax.ShapeDtypeStruct(w.shape, np.float32))) for _, w in mats]
    return quant.Footprint(sum(f.n_params for f in fps), sum(f.nbytes for f in fps),
                           sum(f.constant_bytes for f in fps)).bits_per_param


def requantized(params, fmt: str, bs: int | None, dq: bool = False):
    """The model with every projection replaced by Q(W) (dense fp32, for a fast forward)."""
    layers = []
    for layer in params["layers"]:
        new = {k: (dict(v) if isinstance(v, dict) else v) for k, v in layer.items()}
        for group, names in (("attn", PROJ[:4]), ("mlp", PROJ[4:])):
            new[group] = dict(layer[group])
            for n in names:
                w = layer[group][n]["kernel"]
                new[group][n] = {**layer[group][n],
                                 "kernel": quant.quantize_weight(w, fmt, block_size=bs, double_quant=dq).dequantize()}
        layers.append(new)
    return {**params, "layers": layers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity check")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from results.csv")
    ap.add_argument("--bits-only", action="store_true",
                    help="recompute only the bits_per_param column of results.csv (shapes only, no quantization)")
    args = ap.parse_args()
    if args.plot_only:
        with open(args.out / "results.csv", newline="") as f:
            rows = [{**r, "rel_mse": float(r["rel_mse"])} for r in csv.DictReader(f)]
        plot(rows, args.out / "figures")
        return 0
    t_start = time.time()
    params, cfg, tok = registry.load_model("smollm2-135m", dequantize=True)
    mats = projections(params)
    rng = np.random.default_rng(0)
    gauss = [("normal(1536,1536)", rng.standard_normal((1536, 1536)).astype(np.float32))]

    rows = []
    if args.bits_only:
        with open(args.out / "results.csv", newline="") as f:
            stored = {(r["source"], r["scope"], r["format"], r["block_size"]): r for r in csv.DictReader(f)}

    def add(source, scope, sel, fmt, bs, dq=False):
        if bs is not None and any(w.shape[0] % bs for _, w in sel):
            return
        if args.bits_only:  # the stored errors, with the bits the library's footprint gives for these shapes
            e = {**stored[source, scope, fmt + ("+dq" if dq else ""), "per-channel" if bs is None else str(bs)]}
            for k in ("source", "scope", "format", "block_size"):
                e.pop(k)
            e["bits_per_param"] = round(footprint_bits(sel, fmt, bs, dq), 4)
            e["rel_mse"] = float(e["rel_mse"])  # for the figure; rewritten as stored (6 significant digits)
        else:
            e = quant_error(sel, fmt, bs, dq)
        rows.append({"source": source, "scope": scope, "format": fmt + ("+dq" if dq else ""),
                     "block_size": "per-channel" if bs is None else bs, **e})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    d576 = [(p, w) for p, w in mats if w.shape[0] == 576]
    down = [(p, w) for p, w in mats if w.shape[0] == 1536]
    for fmt in FORMATS:
        for bs in BLOCKS:
            # The six projections with d_in=576 and down_proj (d_in=1536) separately; "all" where bs divides both.
            if bs is None or 576 % bs == 0:
                add("smollm2", "all 7 projections", mats, fmt, bs)
            add("smollm2", "d_in=576 (q,k,v,o,gate,up)", d576, fmt, bs)
            add("smollm2", "down_proj (d_in=1536)", down, fmt, bs)
            add("normal", "N(0,1) 1536x1536", gauss, fmt, bs)
    add("smollm2", "all 7 projections", mats, "nf4", 64, dq=True)
    add("normal", "N(0,1) 1536x1536", gauss, "nf4", 64, dq=True)
    # Per projection role, block 64 (divides every d_in).
    for n in PROJ:
        sel = [(p, w) for p, w in mats if f"/{n}/" in p]
        for fmt in FORMATS:
            add("smollm2", n, sel, fmt, 64)

    args.out.mkdir(parents=True, exist_ok=True)
    cols = ["source", "scope", "format", "block_size", "bits_per_param", "rel_mse", "max_abs_err", "rel_max_err",
            "n_matrices"]
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    t_err = time.time() - t_start

    ppl_rows = []
    if not (args.no_ppl or args.bits_only):
        from lora_jax import metrics
        from lora_jax.data import get_task

        task = get_task("python-docs-lm")
        text = "\n\n".join(d.text for d in task.examples("val"))
        ids = tok.encode(text)[: args.ppl_tokens]
        variants = [("fp32 (GGUF Q4_1 dequantized)", None, None, False)]
        variants += [(f"{f} block 64", f, 64, False) for f in FORMATS]
        variants += [("nf4 block 64 + double quant", "nf4", 64, True), ("nf4 block 32", "nf4", 32, False),
                     ("int4 block 32", "int4", 32, False), ("fp4 block 32", "fp4", 32, False),
                     ("int4_asym block 32 (= GGUF Q4_1 grid)", "int4_asym", 32, False)]
        for label, fmt, bs, dq in variants:
            p = params if fmt is None else requantized(params, fmt, bs, dq)
            t = time.time()
            r = metrics.perplexity(p, cfg, ids, 256, 256, batch_size=4)
            ppl_rows.append({"weights": label, "format": fmt or "fp32", "block_size": bs or "",
                             "double_quant": dq, "nll": round(r.nll, 5), "perplexity": round(r.perplexity, 4),
                             "n_tokens": r.n_tokens})
            print(json.dumps({**ppl_rows[-1], "s": round(time.time() - t, 1)}), file=sys.stderr, flush=True)
        with open(args.out / "perplexity.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ppl_rows[0]))
            w.writeheader()
            w.writerows(ppl_rows)
    plot(rows, args.out / "figures")
    print(json.dumps({"seconds_errors": round(t_err, 1), "seconds_total": round(time.time() - t_start, 1),
                      "n_rows": len(rows), "jax": jax.__version__}))
    return 0


def plot(rows, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("smollm2", "d_in=576 (q,k,v,o,gate,up)", "SmolLM2 q,k,v,o,gate,up (d_in=576)"),
              ("smollm2", "down_proj (d_in=1536)", "SmolLM2 down_proj (d_in=1536)"),
              ("normal", "N(0,1) 1536x1536", "N(0,1) reference")]
    blocks = ["32", "64", "128", "256", "per-channel"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    below = []  # values under the axis floor, named in a note under the figure
    colors = {"nf4": "tab:blue", "fp4": "tab:orange", "int4": "tab:red", "int4_asym": "tab:purple", "int8": "tab:green"}
    for ax, (src, scope, title) in zip(axes, panels):
        for k, fmt in enumerate(FORMATS):
            xs, ys = [], []
            for j, b in enumerate(blocks):
                hit = [r for r in rows if r["source"] == src and r["scope"] == scope and r["format"] == fmt
                       and str(r["block_size"]) == b]
                if hit:
                    xs.append(j + (k - 2) * 0.16)
                    ys.append(hit[0]["rel_mse"])
            floor = 1e-5
            ax.bar(xs, [max(y, floor) for y in ys], width=0.16, color=colors[fmt], label=fmt)
            for x, y in zip(xs, ys):
                if y < floor:  # int4_asym at block 32 on the GGUF weights: their own Q4_1 grid (see the note)
                    ax.plot([x], [1.25 * floor], marker="v", color=colors[fmt], ms=6)
                    below.append(y)
        if src == "smollm2" and "576" in scope:
            ax.text(2.5, 2e-5, "blocks 128 and 256\ndo not divide d_in = 576", ha="center", fontsize=7, color="0.4")
        ax.set_yscale("log")
        ax.set_ylim(1e-5, 5e-2)
        ax.set_xticks(range(len(blocks)))
        ax.set_xticklabels([b.replace("-", "-\n") for b in blocks])
        ax.set_xlabel("block size (input rows per scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("relative MSE  sum(dW^2)/sum(W^2)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, bbox_to_anchor=(0.5, -0.19))
    if below:
        fig.text(0.5, -0.22, f"\u25bc int4_asym at block 32 on SmolLM2: relative MSE {max(below):.0e}, below the "
                 "axis (the GGUF's weights already sit on that Q4_1 grid)", ha="center", fontsize=8,
                 color=colors["int4_asym"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(out_dir / f"quant_error.{ext}", dpi=130, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
