"""Figure for base vs LoRA vs full fine-tuning: ROUGE by method and the training-loss curves.

Reads only the stored files of the sweep (``results.csv`` and each run's
``metrics.jsonl``), by default the copy in ``results/`` next to this file::

    python experiments/summarization_base_full_lora/plot.py [SWEEP_DIR]

Writes ``figures/rouge_by_method.{png,pdf}`` into SWEEP_DIR and prints the
ROUGE gains over the base model as JSON.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
LABELS = {"base": "base (no training)", "lora": "LoRA r=16", "full": "full fine-tuning"}
COLORS = {"base": "0.6", "lora": "tab:blue", "full": "tab:red"}
# The tutorial's numbers (FLAN-T5-base on DialogSum): ROUGE-1 of the original, full and PEFT (LoRA) models.
TUTORIAL = {"base": 0.2334, "full": 0.4216, "lora": 0.4081}


def main(sweep_dir: Path) -> int:
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f) if r["status"] == "finished"}
    methods = [m for m in ("base", "lora", "full") if m in rows]
    metrics = ("rouge1", "rouge2", "rougeL")
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.0), layout="constrained")
    w = 0.26
    for k, m in enumerate(methods):
        ys = [float(rows[m][x]) for x in metrics]
        a1.bar([i + (k - 1) * w for i in range(len(metrics))], ys, width=w, color=COLORS[m], label=LABELS[m])
    a1.set_xticks(range(len(metrics)))
    a1.set_xticklabels(["ROUGE-1", "ROUGE-2", "ROUGE-L"])
    a1.set_ylabel("F1 (64 validation functions)")
    a1.set_title("SmolLM2-135M, code summarization, 1 seed", fontsize=10)
    a1.set_ylim(0, 0.45)
    a1.legend(fontsize=7, ncol=3, loc="upper right")
    a1.grid(True, axis="y", alpha=0.3)

    gains = {m: float(rows[m]["rouge1"]) - float(rows["base"]["rouge1"]) for m in methods if m != "base"}
    paper = {m: TUTORIAL[m] - TUTORIAL["base"] for m in ("lora", "full")}
    xs = range(2)
    # One bar per (source, method), each with its own legend entry, so every swatch matches a bar.
    for x, m in enumerate(("lora", "full")):
        a2.bar(x - 0.18, paper[m], width=0.36, color="0.75", label=None if x else "tutorial: FLAN-T5-base, DialogSum")
        a2.bar(x + 0.18, gains.get(m, 0), width=0.36, color=COLORS[m], label=f"ours, {LABELS[m]}: SmolLM2-135M")
        a2.text(x - 0.18, paper[m] + 0.004, f"+{paper[m]:.3f}", ha="center", fontsize=8)
        a2.text(x + 0.18, gains.get(m, 0) + 0.004, f"+{gains.get(m, 0):.3f}", ha="center", fontsize=8)
    a2.set_xticks(list(xs))
    a2.set_xticklabels(["LoRA", "full fine-tuning"])
    a2.set_ylabel("ROUGE-1 gain over the base model")
    a2.set_ylim(0, 0.26)
    a2.legend(fontsize=7, loc="upper center")
    a2.grid(True, axis="y", alpha=0.3)

    # Training loss is per batch (noisy, and not comparable with a validation loss): draw it alone, and the
    # validation losses as points at the last step, each marked as such.
    for k, m in enumerate(m for m in methods if m != "base"):
        path = sweep_dir / rows[m]["run"] / "metrics.jsonl"
        pts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = [p["step"] for p in pts if "loss" in p]
        a3.plot(steps, [p["loss"] for p in pts if "loss" in p], color=COLORS[m], lw=1,
                label=f"{LABELS[m]}: train (batch)")
        a3.plot([steps[-1] + 2 * k], [float(rows[m]["val_loss"])], "D", color=COLORS[m], ms=6,  # side by side
                label=f"{LABELS[m]}: validation {float(rows[m]['val_loss']):.3f}")
    a3.set_xlabel("optimizer step (4 x 128 tokens)")
    a3.set_ylabel("loss on summary tokens (nats/token)")
    a3.set_title(f"base model, validation: {float(rows['base']['val_loss']):.3f} (off this scale)", fontsize=9)
    a3.legend(fontsize=7)
    a3.grid(True, alpha=0.3)
    out = sweep_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(out / f"rouge_by_method.{ext}", dpi=130, bbox_inches="tight")
    plt.close(fig)
    print(json.dumps({"rouge1_gain": {m: round(g, 4) for m, g in gains.items()},
                      "tutorial_rouge1_gain": {m: round(g, 4) for m, g in paper.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results"))
