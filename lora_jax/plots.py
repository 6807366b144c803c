"""Paper-ready figures from the stored results of a sweep.

Reads only plain files (``results.csv`` and each run's ``metrics.jsonl``) and
imports neither JAX nor any training code, so figures can be regenerated on any
machine from a copied ``runs/<sweep>/`` folder::

    lora-jax plot runs/quickstart

Each figure is written as PNG (for a quick look) and PDF (for a paper) into
``runs/<sweep>/figures/``. Where a configuration was run with several seeds,
the mean is drawn with a band of one standard deviation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from lora_jax.errors import DataError
from lora_jax.io.files import atomic_write
from lora_jax.io.names import unsafe_component

# Metric column -> (axis label, higher is better)
METRICS = {
    "val_loss": ("validation loss (nats/token)", False),
    "val_ppl": ("validation perplexity", False),
    "rouge1": ("ROUGE-1 F1", True),
    "rouge2": ("ROUGE-2 F1", True),
    "rougeL": ("ROUGE-L F1", True),
    "exact_match": ("exact match", True),
}


# The numeric columns the figures read (other columns are passed through as they are).
NUMERIC_COLUMNS = {*METRICS, "rank", "seed", "trainable_params", "step_time_s", "peak_rss_mb", "base_bytes"}


def read_results(sweep_dir: str | os.PathLike) -> list[dict]:
    """Rows of ``results.csv`` with numbers parsed (empty cells become ``None``).

    Raises:
      FileNotFoundError: no ``results.csv`` in ``sweep_dir``.
      DataError: the file has no runs, lacks the ``run`` or ``status`` column, a
        row has more or fewer cells than the header, a run is listed twice, a
        run name is not one plain folder name (``/``, ``..``, an absolute path,
        NUL: :func:`lora_jax.io.names.unsafe_component`), or a numeric column holds text (the
        message names the line and column).
    """
    path = Path(sweep_dir) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results.csv here; run `lora-jax sweep CONFIG` first")
    rows, seen = [], {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        missing = {"run", "status"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: the header lacks {sorted(missing)}; it is not a lora-jax results.csv")
        for row in reader:
            line = reader.line_num
            if None in row or None in row.values():
                raise DataError(f"{path}:{line}: the row has {'more' if None in row else 'fewer'} cells than the "
                                "header; rewrite the file with `lora-jax sweep CONFIG` (finished runs are not rerun)")
            bad = unsafe_component(row["run"])
            if bad:
                raise DataError(f"{path}:{line}: run {row['run']!r} {bad}; a run is a folder inside the sweep, so "
                                "its name is one plain folder name: restore the name the sweep wrote")
            if row["run"] in seen:
                raise DataError(f"{path}:{line}: run {row['run']!r} is listed again (first on line {seen[row['run']]})")
            seen[row["run"]] = line
            parsed = {k: _num(v) for k, v in row.items()}
            for k, v in parsed.items():
                if isinstance(v, str) and k in NUMERIC_COLUMNS:
                    raise DataError(f"{path}:{line}: column {k!r} holds {v!r} where a number is expected")
            rows.append(parsed)
    if not rows:
        raise DataError(f"{path}: no runs listed; run `lora-jax sweep CONFIG` first")
    return rows


def _num(v):
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except ValueError:
        return v
    return int(x) if x.is_integer() and "." not in v and "e" not in v.lower() else x


def _finished(rows):
    return [r for r in rows if r.get("status") == "finished"]


def _mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _save(fig, out_dir: Path, name: str, written: list[Path]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        p = out_dir / f"{name}.{ext}"
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150, bbox_inches="tight")
        atomic_write(p, buf.getvalue(), fsync=False)
        written.append(p)


def _by_rank(rows, metric, method="lora"):
    groups = defaultdict(list)
    for r in rows:
        if r.get("method") == method and r.get("rank") is not None and r.get(metric) is not None:
            groups[int(r["rank"])].append(r[metric])
    ranks = sorted(groups)
    stats = [_mean_std(groups[k]) for k in ranks]
    return ranks, [m for m, _ in stats], [s for _, s in stats]


def seeds_label(rows, metric: str, method: str) -> str:
    """``"1 seed, no band"`` or ``"mean of n seeds, band: 1 std"``, n the fewest runs behind any point of a curve."""
    counts = defaultdict(int)
    for r in rows:
        if r.get("method") == method and r.get("rank") is not None and r.get(metric) is not None:
            counts[int(r["rank"])] += 1
    n = min(counts.values(), default=0)
    return "1 seed, no band" if n <= 1 else f"mean of {n} seeds, band: 1 std"


def _reference_lines(ax, rows, metric):
    styles = {"base": ("base model", "0.4", "--"), "full": ("full fine-tuning", "tab:red", ":")}
    for method, (label, color, ls) in styles.items():
        m, s = _mean_std([r.get(metric) for r in rows if r.get("method") == method])
        if m is not None:
            ax.axhline(m, color=color, ls=ls, label=label)
            if s:
                ax.axhspan(m - s, m + s, color=color, alpha=0.12, lw=0)


def _rank_axis(ax, ranks):
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r (log2 scale)")
    ax.grid(True, alpha=0.3)


def metric_vs_rank(rows, out_dir: Path, written: list[Path]) -> None:
    for metric, (label, _) in METRICS.items():
        for method in ("lora", "qlora"):
            ranks, means, stds = _by_rank(rows, metric, method)
            if not ranks:
                continue
            fig = Figure(figsize=(4.8, 3.4))
            ax = fig.subplots()
            name = method.upper() if method == "qlora" else "LoRA"
            ax.plot(ranks, means, "o-", color="tab:blue", label=f"{name} ({seeds_label(rows, metric, method)})")
            lo = [m - (s or 0) for m, s in zip(means, stds)]
            hi = [m + (s or 0) for m, s in zip(means, stds)]
            ax.fill_between(ranks, lo, hi, color="tab:blue", alpha=0.2, lw=0)
            _reference_lines(ax, rows, metric)
            _rank_axis(ax, ranks)
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
            ax.set_title(f"{label} vs rank", fontsize=10)
            _save(fig, out_dir, f"{metric}_vs_rank" + ("" if method == "lora" else f"_{method}"), written)


def params_vs_rank(rows, out_dir: Path, written: list[Path]) -> None:
    ranks, means, _ = _by_rank(rows, "trainable_params")
    if not ranks:
        return
    fig = Figure(figsize=(4.8, 3.4))
    ax = fig.subplots()
    ax.plot(ranks, means, "o-", label="LoRA (A and B)")
    full, _ = _mean_std([r.get("trainable_params") for r in rows if r.get("method") == "full"])
    if full:
        ax.axhline(full, color="tab:red", ls=":", label="full fine-tuning")
    _rank_axis(ax, ranks)
    ax.set_yscale("log")
    ax.set_ylabel("trainable parameters (count, log scale)")
    ax.legend(fontsize=8)
    _save(fig, out_dir, "trainable_params_vs_rank", written)


def cost_vs_rank(rows, out_dir: Path, written: list[Path]) -> None:
    ranks, t_mean, t_std = _by_rank(rows, "step_time_s")
    m_ranks, m_mean, _ = _by_rank(rows, "peak_rss_mb")  # rows may lack one of the two columns
    if not ranks:
        return
    fig = Figure(figsize=(8.4, 3.2), layout="constrained")  # keeps the right panel's y label off the left panel
    a1, a2 = fig.subplots(1, 2)
    a1.errorbar(ranks, t_mean, yerr=[s or 0 for s in t_std], fmt="o-", capsize=3)
    _reference_lines(a1, rows, "step_time_s")
    a1.set_ylabel("train step time (s, median)")
    _rank_axis(a1, ranks)
    a2.plot(m_ranks, m_mean, "o-", color="tab:green")
    _reference_lines(a2, rows, "peak_rss_mb")
    a2.set_ylabel("peak resident memory (MB)")
    _rank_axis(a2, m_ranks or ranks)
    for a in (a1, a2):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    _save(fig, out_dir, "cost_vs_rank", written)


def methods_vs_rank(rows, out_dir: Path, written: list[Path]) -> None:
    """``{metric}_by_method``: the metric against rank, one line per ``lora_method`` (sweeps with two or more)."""
    runs = [r for r in rows if r.get("method") in ("lora", "qlora") and r.get("lora_method") and r.get("rank")]
    if len({r["lora_method"] for r in runs}) < 2:
        return
    cmap = matplotlib.colormaps["tab10"]
    keys = sorted({(str(r["lora_method"]), str(r["method"])) for r in runs})
    for metric, (label, _) in METRICS.items():
        fig = Figure(figsize=(4.8, 3.4))
        ax = fig.subplots()
        all_ranks: set[int] = set()
        for i, (lm, method) in enumerate(keys):
            ranks, means, stds = _by_rank([r for r in runs if r["lora_method"] == lm], metric, method)
            if not ranks:
                continue
            all_ranks.update(ranks)
            ax.plot(ranks, means, "o-", color=cmap(i % 10), label=lm + (" (QLoRA)" if method == "qlora" else ""))
            ax.fill_between(ranks, [m - (s or 0) for m, s in zip(means, stds)],
                            [m + (s or 0) for m, s in zip(means, stds)], color=cmap(i % 10), alpha=0.15, lw=0)
        if not all_ranks:
            continue
        _reference_lines(ax, rows, metric)
        _rank_axis(ax, sorted(all_ranks))
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.set_title(f"{label} vs rank, by adapter method", fontsize=10)
        _save(fig, out_dir, f"{metric}_by_method", written)


def read_metrics(run_dir: Path) -> list[dict]:
    """The JSON lines of a run's ``metrics.jsonl`` (a torn last line is skipped)."""
    out = []
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def loss_curves(rows, sweep_dir: Path, out_dir: Path, written: list[Path]) -> None:
    fig = Figure(figsize=(5.2, 3.6))
    ax = fig.subplots()
    drawn = 0
    runs = sorted((r for r in rows if r.get("method") in ("lora", "qlora", "full")),
                  key=lambda r: (str(r.get("method")), r.get("rank") or 0, r.get("seed") or 0))
    cmap = matplotlib.colormaps["viridis"]
    for i, r in enumerate(runs):
        pts = [(m["step"], m["loss"]) for m in read_metrics(sweep_dir / str(r["run"])) if "loss" in m]
        if not pts:
            continue
        steps, losses = zip(*pts)
        label = f"{r['method']} r={r['rank']}" if r.get("method") != "full" else "full"
        if r.get("seed") not in (None, 0):
            label += f" seed {r['seed']}"
        ax.plot(steps, losses, color=cmap(i / max(1, len(runs) - 1)), label=label, lw=1.2)
        drawn += 1
    if not drawn:
        return
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, out_dir, "loss_curves", written)


def quant_formats(rows, out_dir: Path, written: list[Path]) -> None:
    groups = defaultdict(list)
    for r in rows:
        if r.get("method") in ("lora", "qlora") and r.get("val_loss") is not None:
            key = "fp32 LoRA" if r["method"] == "lora" else f"QLoRA {r.get('quant_format')}"
            groups[key].append(r)
    if len(groups) < 2 or not any(k.startswith("QLoRA") for k in groups):
        return
    names = sorted(groups, key=lambda k: (k != "fp32 LoRA", k))
    fig = Figure(figsize=(8.4, 3.2), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    for ax, col, label in ((a1, "val_loss", METRICS["val_loss"][0]), (a2, "base_bytes", "base weights (MB)")):
        stats = [_mean_std([r.get(col) for r in groups[n]]) for n in names]
        scale = 1e6 if col == "base_bytes" else 1.0
        ax.bar(range(len(names)), [(m or 0) / scale for m, _ in stats],
               yerr=[(s or 0) / scale for _, s in stats], capsize=3, color="tab:purple")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    _save(fig, out_dir, "quant_formats", written)


def make_all(sweep_dir: str | os.PathLike) -> list[Path]:
    """Regenerate every figure of a sweep from its stored files.

    Args:
      sweep_dir: ``runs/<sweep>``, holding ``results.csv`` and one folder per run.

    Returns:
      The files written (PNG and PDF of each figure).
    """
    sweep_dir = Path(sweep_dir)
    rows = _finished(read_results(sweep_dir))
    out_dir = sweep_dir / "figures"
    written: list[Path] = []
    metric_vs_rank(rows, out_dir, written)
    params_vs_rank(rows, out_dir, written)
    cost_vs_rank(rows, out_dir, written)
    loss_curves(rows, sweep_dir, out_dir, written)
    quant_formats(rows, out_dir, written)
    methods_vs_rank(rows, out_dir, written)
    return written
