"""LoftQ and QPiSSA against plain QLoRA at init: per-matrix error ||W - (Q + s*A@B)||_F / ||W||_F and step-0 perplexity.

SmolLM2-135M-Instruct (fp32 = its GGUF Q4_1 weights dequantized), the seven
projections of every third layer (0, 3, ..., 27: 70 matrices; the target set of
``experiments/benchmarks/methods.py`` thinned to fit a shared machine; the other
layers stay fp32), NF4 at block 64 without double quantization (4 bits), LoRA
rank 16, alpha 16 (scale 1). Four inits, each built by the library on the model:

* ``qlora``: ``lora.init`` on ``quant.quantize(W)``: B = 0, so the model is ``Q(W)``;
* ``loftq_T1``: ``methods.loftq.init_with_report`` with one alternating step (T = 1);
* ``qpissa``: ``methods.pissa.init`` (full SVD) with ``quant_rules``: ``Q(W - s*A@B) + s*A@B``;
* ``qpissa_niter4``: the same with PEFT's fast randomized SVD (``pissa_niter_4``), seeds 0, 1, 2
  (the only random init here: QLoRA's A is random but B = 0 hides it; the full SVDs are deterministic).

LoftQ with T = 5 is not rerun here (632 s on this machine for the 210 matrices): its
per-model summary (all 210 matrices) is the stored benchmark
``experiments/benchmarks/results/methods.json``
(key ``loftq.T5``), quoted beside these numbers. lora-jax has no 2-bit format
(``lora_jax.quant.FORMATS``: int4, int4_asym, nf4, fp4, int8), so the 2-bit
setting of the LoftQ and PiSSA papers is not measured.

    python experiments/loftq_pissa_init/init_error.py       # one CPU thread, see README for the time
    python experiments/loftq_pissa_init/init_error.py --plot-only        # the figure from per_matrix.csv

Writes next to this file: ``run.json`` (commit, config and its hash, written
first), ``per_matrix.csv`` (init, seed, matrix, rel_error), ``step0.csv``
(init, seed, val nll, perplexity, tokens), ``summary.csv`` and ``figures/init_error.{png,pdf}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import runinfo  # noqa: E402

runinfo.one_thread()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

LAYERS = "0|3|6|9|12|15|18|21|24|27"  # every third layer: the budget of a shared 2-core machine
# benchmarks/train_step.ALL_SEVEN restricted to those layers (the other 20 layers stay fp32)
TARGETS = rf"layers/({LAYERS})/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
INITS = ("qlora", "loftq_T1", "qpissa", "qpissa_niter4")
CONFIG = {"model": "smollm2-135m", "targets": TARGETS, "format": "nf4", "block_size": 64, "double_quant": False,
          "rank": 16, "alpha": 16.0, "inits": list(INITS), "random_init_seeds": [0, 1, 2], "pissa_niter": 4,
          "eval": {"task": "python-docs-lm", "split": "val", "tokens": 1024, "window": 256, "stride": 256}}


def rel_errors(floats: dict, adapted) -> dict[str, float]:
    """``||W - (Q + s*A@B)||_F / ||W||_F`` per adapted matrix, from the nodes the library built."""
    import jax.numpy as jnp

    from lora_jax import lora

    out = {}
    for path, node in lora.nodes(adapted):
        w = floats[path]
        approx = lora.dense(node.base).astype(jnp.float32) + node.scale * (node.lora_a @ node.lora_b)
        out[path] = float(jnp.linalg.norm(w - approx) / jnp.linalg.norm(w))
    return out


def build(name: str, seed: int, params):
    """The adapted params of one init (and LoftQ's own report, else None)."""
    import jax

    from lora_jax import lora, quant
    from lora_jax.methods import loftq, pissa

    rules = [lora.LoraRule(pattern=TARGETS, rank=CONFIG["rank"], alpha=CONFIG["alpha"])]
    qrules = [quant.QuantRule(pattern=TARGETS, format=CONFIG["format"], block_size=CONFIG["block_size"],
                              double_quant=CONFIG["double_quant"])]
    key = jax.random.key(seed)
    if name == "qlora":
        return lora.init(key, quant.quantize(params, qrules), rules), None
    if name == "loftq_T1":
        return loftq.init_with_report(key, params, rules, qrules, steps=1)
    niter = CONFIG["pissa_niter"] if name == "qpissa_niter4" else None
    return pissa.init(key, params, rules, method="pissa", niter=niter, quant_rules=qrules), None


def run(out: Path) -> None:
    from lora_jax import metrics, paths
    from lora_jax.data import get_task
    from lora_jax.models import registry

    info = runinfo.start(out, CONFIG)
    t0 = time.time()
    params, cfg, tok = registry.load_model(CONFIG["model"], dequantize=True)
    floats = dict(paths.leaves_with_paths(params))
    ev = CONFIG["eval"]
    text = "\n\n".join(d.text for d in get_task(ev["task"]).examples(ev["split"]))
    ids = tok.encode(text)[: ev["tokens"]]
    base = metrics.perplexity(params, cfg, ids, ev["window"], ev["stride"], batch_size=4)
    step0 = [{"init": "fp32 (no quantization)", "seed": "", "nll": base.nll, "perplexity": base.perplexity,
              "n_tokens": base.n_tokens}]
    per_matrix, loftq_report = [], {}
    for name in INITS:
        for seed in (CONFIG["random_init_seeds"] if name == "qpissa_niter4" else [0]):
            t = time.time()
            adapted, report = build(name, seed, params)
            errs = rel_errors(floats, adapted)
            loftq_report = report or loftq_report
            per_matrix += [{"init": name, "seed": seed, "matrix": p, "rel_error": e} for p, e in errs.items()]
            r = metrics.perplexity(adapted, cfg, ids, ev["window"], ev["stride"], batch_size=4)
            step0.append({"init": name, "seed": seed, "nll": r.nll, "perplexity": r.perplexity,
                          "n_tokens": r.n_tokens})
            print(json.dumps({**step0[-1], "median_rel_error": statistics.median(errs.values()),
                              "s": round(time.time() - t, 1)}), file=sys.stderr, flush=True)
            del adapted
    # LoftQ's own report (loftq_error, qlora_error) per matrix against the errors measured here from the nodes.
    mine = {(r["init"], r["matrix"]): r["rel_error"] for r in per_matrix}
    checks = {"loftq_T1": max(abs(mine["loftq_T1", p] - e) for p, (e, _) in loftq_report.items()),
              "qlora": max(abs(mine["qlora", p] - q) for p, (_, q) in loftq_report.items())}
    write_csv(out / "per_matrix.csv", per_matrix, ("init", "seed", "matrix", "rel_error"))
    write_csv(out / "step0.csv", step0, ("init", "seed", "nll", "perplexity", "n_tokens"))
    write_csv(out / "summary.csv", summarize(per_matrix, step0), SUMMARY_COLS)
    runinfo.finish(out, info, wall_s=round(time.time() - t0, 1), max_abs_diff_vs_library_report=checks)


SUMMARY_COLS = ("init", "n_seeds", "median_rel_error", "mean_rel_error", "median_ratio_to_qlora", "q1_ratio_to_qlora",
                "q3_ratio_to_qlora", "helped_fraction", "ppl_mean", "ppl_std", "nll_mean", "nll_std")


def write_csv(path: Path, rows: list[dict], cols) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(cols))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: Path) -> list[dict]:
    def num(v):
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as fh:
        return [{k: (v if k in ("init", "matrix") else num(v)) for k, v in r.items()} for r in csv.DictReader(fh)]


def summarize(per_matrix: list[dict], step0: list[dict]) -> list[dict]:
    """Per init: the per-matrix error (seeds pooled), its ratio to QLoRA's per matrix, and step-0 perplexity."""
    qlora = {r["matrix"]: r["rel_error"] for r in per_matrix if r["init"] == "qlora"}
    out = []
    for name in INITS:
        rows = [r for r in per_matrix if r["init"] == name]
        errs = [r["rel_error"] for r in rows]
        ratios = sorted(r["rel_error"] / qlora[r["matrix"]] for r in rows)
        ppl = [r["perplexity"] for r in step0 if r["init"] == name]
        nll = [r["nll"] for r in step0 if r["init"] == name]
        q = statistics.quantiles(ratios, n=4)
        out.append({"init": name, "n_seeds": len(ppl), "median_rel_error": statistics.median(errs),
                    "mean_rel_error": statistics.fmean(errs), "median_ratio_to_qlora": statistics.median(ratios),
                    "q1_ratio_to_qlora": q[0], "q3_ratio_to_qlora": q[2],
                    "helped_fraction": sum(x < 1 for x in ratios) / len(ratios),
                    "ppl_mean": statistics.fmean(ppl), "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                    "nll_mean": statistics.fmean(nll), "nll_std": statistics.stdev(nll) if len(nll) > 1 else 0.0})
    return out


def plot(per_matrix: list[dict], step0: list[dict], out_dir: Path) -> None:
    """Left: per-matrix error of each init (box over the 70 matrices); right: step-0 perplexity (std bars)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    a1, a2 = fig.subplots(1, 2, width_ratios=(3, 2))
    labels = {"qlora": "QLoRA", "loftq_T1": "LoftQ T=1", "qpissa": "QPiSSA", "qpissa_niter4": "QPiSSA niter=4"}
    data = [[r["rel_error"] for r in per_matrix if r["init"] == n] for n in INITS]
    a1.boxplot(data, showfliers=True, flierprops={"markersize": 2})
    a1.set_xticks(range(1, len(INITS) + 1), [labels[n] for n in INITS])
    a1.set_ylabel("||W - (Q + sAB)||_F / ||W||_F per matrix")
    a1.set_title("initial error, NF4 block 64, r = 16, 70 matrices", fontsize=10)
    a1.grid(True, axis="y", alpha=0.3)
    base = [r["perplexity"] for r in step0 if str(r["init"]).startswith("fp32")]
    summ = summarize(per_matrix, step0)
    # Points, not bars from zero: the differences are a few tenths on a perplexity of ~18.
    a2.errorbar(range(len(INITS)), [s["ppl_mean"] for s in summ], yerr=[s["ppl_std"] for s in summ], fmt="o",
                capsize=4, color="tab:purple", label="mean (+- std where seeded)")
    for i, s in enumerate(summ):
        a2.annotate(f"{s['ppl_mean']:.2f}" + (f" (n={s['n_seeds']})" if s["n_seeds"] > 1 else ""),
                    (i, s["ppl_mean"]), xytext=(8, 0), textcoords="offset points", va="center", fontsize=8)
    if base:
        a2.axhline(base[0], color="0.3", ls="--", label=f"fp32 base {base[0]:.2f}")
    a2.legend(fontsize=8, loc="lower left")
    a2.set_xticks(range(len(INITS)), [labels[n] for n in INITS], rotation=15)
    a2.set_ylabel("validation perplexity at step 0")
    a2.set_xlim(-0.5, len(INITS) - 0.2)
    a2.grid(True, axis="y", alpha=0.3)
    out_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(out_dir / f"init_error.{ext}", dpi=130)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from the stored CSVs")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    if not args.plot_only:
        run(args.out)
    plot(read_csv(args.out / "per_matrix.csv"), read_csv(args.out / "step0.csv"), args.out / "figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
