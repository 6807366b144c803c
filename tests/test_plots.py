"""Figures come from stored files alone and leave the host process's matplotlib settings as they were."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["run", "method", "rank", "seed", "status", "trainable_params", "step_time_s", "val_loss"]


def _sweep_dir(tmp_path: Path) -> Path:
    """A hand-written sweep folder: two LoRA ranks and the base model, with loss curves."""
    rows = [
        {"run": "base", "method": "base", "rank": "", "seed": 0, "status": "finished", "val_loss": 3.0},
        {"run": "lora_r1", "method": "lora", "rank": 1, "seed": 0, "status": "finished", "trainable_params": 10,
         "step_time_s": 0.5, "val_loss": 2.5},
        {"run": "lora_r4", "method": "lora", "rank": 4, "seed": 0, "status": "finished", "trainable_params": 40,
         "step_time_s": 0.6, "val_loss": 2.4},
    ]
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    with open(sweep / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    for r in rows[1:]:
        (sweep / r["run"]).mkdir()
        lines = [json.dumps({"step": s, "loss": 3.0 - 0.1 * s}) for s in range(1, 6)]
        (sweep / r["run"] / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return sweep


def test_figures_leave_pyplot_and_the_backend_alone(tmp_path):
    sweep = _sweep_dir(tmp_path)
    code = (
        "import sys, matplotlib\n"
        "matplotlib.rcParams['backend'] = 'svg'\n"
        "from lora_jax import plots\n"
        "files = plots.make_all(sys.argv[1])\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert 'jax' not in sys.modules\n"
        "print(len(files))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(sweep)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = {p.name for p in (sweep / "figures").iterdir()}
    assert int(r.stdout) == len(names) >= 6
    assert {"val_loss_vs_rank.png", "val_loss_vs_rank.pdf", "loss_curves.png", "trainable_params_vs_rank.pdf"} <= names


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text.splitlines()[0] + "\n", "no runs listed"),
        (lambda text: text.replace("lora_r4,lora,4", "lora_r1,lora,4"), "run 'lora_r1' is listed again"),
        (lambda text: text.replace(",2.4\n", ",2.4,extra\n"), "more cells than the header"),
        (lambda text: text.replace(",2.4\n", "\n"), "fewer cells than the header"),
        (lambda text: text.replace(",2.4\n", ",about two\n"), "column 'val_loss' holds 'about two'"),
        (lambda text: text.replace("run,", "name,", 1), "lacks ['run']"),
        (lambda text: text.replace("lora_r4,", "../../up,"), "sweep/results.csv:4: run '../../up' has a path"),
        (lambda text: text.replace("lora_r4,", "a/b,"), "run 'a/b' has a path separator or '..'"),
        (lambda text: text.replace("lora_r4,", "..,"), "run '..' has a path separator"),
        (lambda text: text.replace("lora_r4,", "/etc,"), "run '/etc' is an absolute path"),
        (lambda text: text.replace("lora_r4,", "a\0b,"), r"run 'a\x00b' holds a NUL character"),
        (lambda text: text.replace("lora_r4,", ","), "run '' is empty"),
    ],
)
def test_a_damaged_results_csv_names_the_problem(tmp_path, edit, message):
    from lora_jax import plots
    from lora_jax.errors import DataError

    sweep = _sweep_dir(tmp_path)
    csv_path = sweep / "results.csv"
    csv_path.write_text(edit(csv_path.read_text()))
    with pytest.raises(DataError, match=re.escape(message)):
        plots.make_all(sweep)
    assert not (sweep / "figures").exists()


def test_two_panel_cost_figure_keeps_the_right_panels_label_off_the_left_panel(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from lora_jax import plots

    rows = [{"run": f"lora_r{r}", "method": "lora", "rank": r, "seed": 0, "status": "finished",
             "step_time_s": 1.9 + 0.01 * r, "peak_rss_mb": 2100.0 + 30 * r} for r in (1, 2, 4, 8, 16, 64)]
    figs = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out_dir, name, written: figs.setdefault(name, fig))
    plots.cost_vs_rank(rows, tmp_path, [])
    fig = figs["cost_vs_rank"]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    left, right = fig.axes
    label = right.yaxis.label.get_window_extent(renderer)
    assert not label.overlaps(left.get_tightbbox(renderer))
    assert not any(label.overlaps(t.get_window_extent(renderer)) for t in right.get_yticklabels() if t.get_text())


def test_rank_curves_say_how_many_seeds_stand_behind_each_point():
    from lora_jax import plots

    one = [{"method": "lora", "rank": r, "seed": 0, "val_loss": 2.0} for r in (1, 4)]
    three = [{**x, "seed": s} for x in one for s in (0, 1, 2)]
    assert plots.seeds_label(one, "val_loss", "lora") == "1 seed, no band"
    assert plots.seeds_label(three, "val_loss", "lora") == "mean of 3 seeds, band: 1 std"
    assert plots.seeds_label(three + [{"method": "lora", "rank": 16, "seed": 0, "val_loss": 2.0}], "val_loss",
                             "lora") == "1 seed, no band"  # the fewest seeds of any point
