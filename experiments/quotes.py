"""Every number that ``experiments/README.md`` quotes, computed from the stored file it comes from.

    python experiments/quotes.py            # finding | what | file | value, one line per quoted number

``tests/test_experiments.py`` checks that the README's table quotes each value exactly as
written here (and quotes nothing else in back-ticks in its "ours" column), so the table cannot
drift from the stored results. Standard library only: no JAX, no training code.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent


class Quote(NamedTuple):
    """One quoted number: the table row (finding id), what it is, the file it is read from, the text as quoted."""

    row: str
    what: str
    file: str
    value: str


def rows(rel: str) -> list[dict]:
    """The rows of a stored CSV under ``experiments/``."""
    with open(HERE / rel, newline="") as fh:
        return list(csv.DictReader(fh))


def sci(x: float) -> str:
    """``0.00874`` -> ``8.74e-3`` (three significant digits, the README's style)."""
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant}e{int(exp)}"


def pm(xs: list[float], fmt: Callable[[float], str]) -> str:
    """Mean +- sample std over seeds, as ``m ± s``."""
    return f"{fmt(statistics.fmean(xs))} ± {fmt(statistics.stdev(xs))}"


def rank_plateau() -> list[Quote]:
    f = "rank_plateau/results/results.csv"
    rs = rows(f)
    lora = {int(r["rank"]): float(r["val_loss"]) for r in rs if r["method"] == "lora"}
    base = next(float(r["val_loss"]) for r in rs if r["method"] == "base")
    seeds = {r["seed"] for r in rs if r["method"] == "lora"}
    out = [Quote("rank_plateau", f"val loss r={k}", f, f"{lora[k]:.4f}") for k in (1, 4, 64)]
    out += [Quote("rank_plateau", "val loss base", f, f"{base:.4f}"),
            Quote("rank_plateau", "max - min val loss over r=1..64", f,
                  f"{max(lora.values()) - min(lora.values()):.4f}"),
            Quote("rank_plateau", "seeds", f, f"{len(seeds)} seed")]
    return out


def subspace() -> list[Quote]:
    f = "subspace_similarity/phi_summary.csv"
    rs = rows(f)
    out = []
    for proj in ("q_proj", "v_proj"):
        phi = [float(r["phi11_A"]) for r in rs if r["proj"] == proj]
        init = [float(r["phi11_A_init"]) for r in rs if r["proj"] == proj]
        out += [Quote("subspace_similarity", f"{proj} mean phi(1,1)", f, f"{statistics.fmean(phi):.2f}"),
                Quote("subspace_similarity", f"{proj} layers with phi(1,1) > 0.5", f,
                      f"{sum(p > 0.5 for p in phi)}/{len(phi)}"),
                Quote("subspace_similarity", f"{proj} mean phi(1,1) of the initial A's", f,
                      f"{statistics.fmean(init):.3f}")]
    fr = "rank_plateau/results/results.csv"  # the r = 8 and r = 64 runs whose adapters were compared
    seeds = {r["seed"] for r in rows(fr) if r["run"] in ("lora_r8", "lora_r64")}
    return out + [Quote("subspace_similarity", "seeds of the r = 8 and r = 64 runs", fr, f"{len(seeds)} seed")]


def summarization() -> list[Quote]:
    f = "summarization_base_full_lora/results/results.csv"
    r1 = {r["method"]: float(r["rouge1"]) for r in rows(f)}
    seeds = {r["seed"] for r in rows(f)}
    return [Quote("summarization", "ROUGE-1 base", f, f"{r1['base']:.3f}"),
            Quote("summarization", "ROUGE-1 gain LoRA", f, f"+{r1['lora'] - r1['base']:.3f}"),
            Quote("summarization", "ROUGE-1 gain full", f, f"+{r1['full'] - r1['base']:.3f}"),
            Quote("summarization", "seeds", f, f"{len(seeds)} seed")]


def quantization() -> list[Quote]:
    fp, fe = "quantization_error/perplexity.csv", "quantization_error/results.csv"
    ppl = {r["weights"]: float(r["perplexity"]) for r in rows(fp)}
    err = {(r["source"], r["scope"], r["format"], r["block_size"]): r for r in rows(fe)}
    all7 = lambda fmt, bs="64": err["smollm2", "all 7 projections", fmt, bs]  # noqa: E731
    normal = lambda fmt, bs: err["normal", "N(0,1) 1536x1536", fmt, bs]  # noqa: E731
    out = [Quote("quant_nf4", "perplexity fp32 (the GGUF's Q4_1 weights)", fp,
                 f"{ppl['fp32 (GGUF Q4_1 dequantized)']:.2f}")]
    for fmt in ("nf4", "fp4", "int4"):
        out += [Quote("quant_nf4", f"perplexity {fmt} block 64", fp, f"{ppl[f'{fmt} block 64']:.2f}"),
                Quote("quant_nf4", f"rel. MSE {fmt} block 64, 210 matrices", fe, sci(float(all7(fmt)["rel_mse"])))]
    out += [Quote("quant_dq", "bits/param nf4+dq block 64 (footprint)", fe,
                  f"{float(all7('nf4+dq')['bits_per_param']):.3f}"),
            Quote("quant_dq", "bits/param nf4 block 64", fe, f"{float(all7('nf4')['bits_per_param']):.1f}"),
            Quote("quant_dq", "rel. MSE nf4+dq block 64", fe, sci(float(all7("nf4+dq")["rel_mse"]))),
            Quote("quant_dq", "perplexity nf4+dq block 64", fp, f"{ppl['nf4 block 64 + double quant']:.2f}"),
            Quote("quant_dq", "perplexity nf4 block 64", fp, f"{ppl['nf4 block 64']:.2f}")]
    for fmt in ("nf4", "fp4", "int4"):
        out.append(Quote("quant_normal32", f"N(0,1) rel. MSE {fmt} block 32", fe,
                         sci(float(normal(fmt, "32")["rel_mse"]))))
    for fmt in ("fp4", "int4"):
        out.append(Quote("quant_normal32", f"N(0,1) rel. MSE {fmt} block 64", fe,
                         sci(float(normal(fmt, "64")["rel_mse"]))))
    return out


def rslora() -> list[Quote]:
    f = "rslora_gradient_scale/runs.csv"
    rs = rows(f)
    by = {(r["scaling"], int(r["rank"]), r["seed"]): r for r in rs}
    seeds = sorted({r["seed"] for r in rs})
    top = max(int(r["rank"]) for r in rs)
    out = []
    for scaling in ("alpha/r", "alpha/sqrt(r)"):
        for col, what in (("grad_b_norm", "||dL/dB|| ratio"), ("adam_dw_norm", "||dW_Adam|| ratio")):
            ratio = [float(by[scaling, top, s][col]) / float(by[scaling, 1, s][col]) for s in seeds]
            out.append(Quote("rslora", f"{scaling}: {what} r={top} / r=1", f, pm(ratio, lambda x: f"{x:.3g}")))
        for opt in ("adam", "sgd"):
            for rank in (1, top):
                d = [float(by[scaling, rank, s][f"{opt}_dloss_linear"]) for s in seeds]
                out.append(Quote("rslora", f"{scaling}: first-order loss change <G, dW>, first {opt} step, r={rank}",
                                 f, pm(d, lambda x: f"{x:.4f}")))
    out.append(Quote("rslora", "seeds", f, f"{len(seeds)} seeds"))
    return out


def loftq_pissa() -> list[Quote]:
    f, fb = "loftq_pissa_init/summary.csv", "benchmarks/results/methods.json"
    s = {r["init"]: r for r in rows(f)}
    out = [Quote("loftq_pissa", f"median per-matrix error ratio to QLoRA, {n}", f,
                 f"{float(s[n]['median_ratio_to_qlora']):.3f}") for n in ("loftq_T1", "qpissa")]
    t5 = json.loads((HERE / fb).read_text())["loftq"]["T5"]["median_ratio"]
    out.append(Quote("loftq_pissa", "median per-matrix error ratio to QLoRA, LoftQ T=5 (benchmark)", fb, f"{t5:.3f}"))
    out.append(Quote("loftq_pissa", "median per-matrix error, QLoRA", f,
                     f"{float(s['qlora']['median_rel_error']):.4f}"))
    for n in ("qlora", "loftq_T1", "qpissa"):
        out.append(Quote("loftq_pissa", f"step-0 val perplexity, {n}", f, f"{float(s[n]['ppl_mean']):.2f}"))
    r = s["qpissa_niter4"]
    out.append(Quote("loftq_pissa", "step-0 val perplexity, QPiSSA niter=4 (3 seeds)", f,
                     f"{float(r['ppl_mean']):.2f} ± {float(r['ppl_std']):.2f}"))
    fp32 = next(float(x["perplexity"]) for x in rows("loftq_pissa_init/step0.csv") if x["init"].startswith("fp32"))
    out.append(Quote("loftq_pissa", "step-0 val perplexity, fp32", "loftq_pissa_init/step0.csv", f"{fp32:.2f}"))
    return out


SOURCES = (rank_plateau, subspace, summarization, quantization, rslora, loftq_pissa)


def quotes() -> list[Quote]:
    """All quoted numbers, finding by finding."""
    return [q for source in SOURCES for q in source()]


def main() -> int:
    for q in quotes():
        print(f"{q.row} | {q.what} | experiments/{q.file} | {q.value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
