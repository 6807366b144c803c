"""experiments/README.md quotes the stored results exactly: no hand-copied number can drift from its file.

Each number of the findings table's "ours" column is written in back-ticks; ``experiments/quotes.py``
computes every quoted number from the stored CSV/JSON it comes from. The tests hold both directions:
every computed value appears in its row, and every back-ticked value of a row is one of its computed
values. They also pin the corrections the audit asked for (the double-quantization bits come from the
library's footprint, not a hand formula).
"""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import quotes  # noqa: E402

COLUMNS = ("finding", "paper", "ours", "verdict")


def findings_table(text: str) -> dict[str, dict[str, str]]:
    """``{finding id: {column: cell}}`` from the table whose header is ``| finding | paper | ours | verdict |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"\|\s*finding\s*\|\s*paper\s*\|\s*ours\s*\|\s*"
                                                                     r"verdict\s*\|", line.strip()))
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS), f"a row of the findings table has {len(cells)} cells: {line}"
        key = re.sub(r"[`*]", "", cells[0]).split()[0]
        table[key] = dict(zip(COLUMNS, cells))
    return table


README = (EXPERIMENTS / "README.md").read_text()
TABLE = findings_table(README)
QUOTES = quotes.quotes()


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


@pytest.mark.parametrize("q", QUOTES, ids=[f"{q.row}:{q.what}" for q in QUOTES])
def test_the_table_quotes_each_stored_number_as_computed(q):
    assert q.row in TABLE, f"finding {q.row!r} has no row in experiments/README.md"
    assert q.value in backticked(TABLE[q.row]["ours"]), (
        f"{q.row}: {q.what} is {q.value} in experiments/{q.file}; the README's 'ours' cell says "
        f"{backticked(TABLE[q.row]['ours'])}")


@pytest.mark.parametrize("row", sorted(TABLE))
def test_every_backticked_number_of_a_row_comes_from_a_stored_file(row):
    allowed = {q.value for q in QUOTES if q.row == row}
    assert allowed, f"finding {row!r} has no quotes in experiments/quotes.py"
    extra = [v for v in backticked(TABLE[row]["ours"]) if v not in allowed]
    assert not extra, f"{row}: {extra} are quoted but not computed from a stored file by experiments/quotes.py"


def test_every_row_cites_the_paper_and_says_the_seed_count():
    for row, cells in TABLE.items():
        assert re.search(r"(table|tab\.|fig\.|figure|sec\.|eq\.|theorem)", cells["paper"], re.I), row
        assert re.search(r"\d+ seeds?|deterministic", cells["ours"]), f"{row}: say how many seeds (or why none)"


def test_double_quantization_bits_are_the_library_footprint_not_a_hand_formula():
    """QLoRA's NF4 + DQ at block 64: 4 + 8/64 + 32/(64*256) = 4.127 bits where d_out is a multiple of 256."""
    rows = [r for r in quotes.rows("quantization_error/results.csv") if r["format"] == "nf4+dq"]
    normal = next(r for r in rows if r["source"] == "normal")  # 1536 columns: six full groups of 256
    assert float(normal["bits_per_param"]) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert all(float(r["bits_per_param"]) > 4.125 for r in rows)


def test_int4_beats_fp4_on_the_normal_matrix_at_block_32_as_the_readme_says():
    q = {x.what: x.value for x in QUOTES if x.row == "quant_normal32"}
    assert float(q["N(0,1) rel. MSE int4 block 32"]) < float(q["N(0,1) rel. MSE fp4 block 32"])
    assert "Int4 beats FP4" in TABLE["quant_normal32"]["verdict"]


def test_sci_and_pm_format_as_the_readme_writes_numbers():
    assert quotes.sci(0.00874104) == "8.74e-3"
    assert quotes.sci(0.0102244) == "1.02e-2"
    assert quotes.pm([1.0, 2.0, 3.0], lambda x: f"{x:.2f}") == "2.00 ± 1.00"


def test_a_drifted_number_is_caught(tmp_path):
    """The check itself: a README whose table quotes a changed value fails the comparison."""
    q = next(x for x in QUOTES if x.row == "rank_plateau")
    drifted = README.replace(f"`{q.value}`", "`9.9999`", 1)
    assert q.value not in backticked(findings_table(drifted)[q.row]["ours"])


def _mean_std(xs):
    import statistics

    return statistics.fmean(xs), statistics.stdev(xs)


def test_rslora_summary_is_the_mean_and_std_of_its_stored_runs():
    runs = quotes.rows("rslora_gradient_scale/runs.csv")
    summary = quotes.rows("rslora_gradient_scale/summary.csv")
    assert len({r["seed"] for r in runs}) >= 3
    for s in summary:
        sel = [r for r in runs if r["scaling"] == s["scaling"] and r["rank"] == s["rank"]]
        assert int(s["n_seeds"]) == len(sel) >= 3
        m, sd = _mean_std([float(r["grad_b_norm"]) for r in sel])
        assert float(s["grad_b_norm_mean"]) == pytest.approx(m, rel=1e-4)
        assert float(s["grad_b_norm_std"]) == pytest.approx(sd, rel=1e-3, abs=1e-9)
        m, sd = _mean_std([float(r["adam_dloss_linear"]) for r in sel])
        assert float(s["adam_dloss_linear_mean"]) == pytest.approx(m, rel=1e-4, abs=1e-9)


def test_rslora_runs_are_the_totals_of_the_per_matrix_rows():
    import math

    runs = quotes.rows("rslora_gradient_scale/runs.csv")
    per = quotes.rows("rslora_gradient_scale/per_matrix.csv")
    r = next(x for x in runs if x["seed"] == "1" and x["scaling"] == "alpha/sqrt(r)" and x["rank"] == "16")
    sel = [x for x in per if (x["seed"], x["scaling"], x["rank"]) == ("1", "alpha/sqrt(r)", "16")]
    assert len(sel) == 50
    assert float(r["grad_b_norm"]) == pytest.approx(math.sqrt(sum(float(x["grad_b_norm"]) ** 2 for x in sel)), rel=1e-4)
    assert float(r["scale"]) == pytest.approx(8 / math.sqrt(16))


def test_rslora_closed_form_matches_the_library_train_step():
    import json

    checks = json.loads((EXPERIMENTS / "rslora_gradient_scale/check.json").read_text())
    assert len(checks) >= 1
    for c in checks:
        assert c["grad_rel_diff"] < 1e-3 and c["dw_adam_max_rel_diff"] < 1e-2, c


def test_loftq_pissa_summary_is_computed_from_its_stored_per_matrix_errors():
    import statistics

    per = quotes.rows("loftq_pissa_init/per_matrix.csv")
    summary = {r["init"]: r for r in quotes.rows("loftq_pissa_init/summary.csv")}
    qlora = {r["matrix"]: float(r["rel_error"]) for r in per if r["init"] == "qlora"}
    assert len(qlora) == 70
    for init, s in summary.items():
        ratios = [float(r["rel_error"]) / qlora[r["matrix"]] for r in per if r["init"] == init]
        assert float(s["median_ratio_to_qlora"]) == pytest.approx(statistics.median(ratios), rel=1e-4)
    step0 = [r for r in quotes.rows("loftq_pissa_init/step0.csv") if r["init"] == "qpissa_niter4"]
    assert len(step0) == int(summary["qpissa_niter4"]["n_seeds"]) == 3


def test_new_experiments_record_commit_and_config_hash_before_computing():
    import hashlib
    import json

    for folder in ("rslora_gradient_scale", "loftq_pissa_init"):
        info = json.loads((EXPERIMENTS / folder / "run.json").read_text())
        assert re.fullmatch(r"[0-9a-f]{40}", info["commit"]), folder
        digest = hashlib.sha256(json.dumps(info["config"], sort_keys=True).encode()).hexdigest()
        assert info["config_hash"] == digest, folder


def _table_rows(readme: Path, first_cells: set[str]) -> dict[str, list[str]]:
    out = {}
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells and cells[0] in first_cells:
            out[cells[0]] = cells
    return out


def _mean_pm_std(mean: float, std: float) -> str:
    d = 3 if abs(mean) >= 0.1 else 4
    return f"{mean:.{d}f} ± {std:.{d}f}"


def test_rslora_readme_table_is_its_summary_csv():
    summary = {(r["scaling"], r["rank"]): r for r in quotes.rows("rslora_gradient_scale/summary.csv")}
    table = _table_rows(EXPERIMENTS / "rslora_gradient_scale/README.md", {"1", "16", "256"})
    assert sorted(table) == ["1", "16", "256"]
    for rank, cells in table.items():
        want = [_mean_pm_std(float(summary[s, rank][f"{m}_mean"]), float(summary[s, rank][f"{m}_std"]))
                for m in ("grad_b_norm", "adam_dw_norm") for s in ("alpha/r", "alpha/sqrt(r)")]
        assert cells[1:] == want, rank


def test_loftq_pissa_readme_table_is_its_summary_csv():
    summary = {r["init"]: r for r in quotes.rows("loftq_pissa_init/summary.csv")}
    names = {"QLoRA": "qlora", "LoftQ, T = 1": "loftq_T1", "QPiSSA (full SVD)": "qpissa",
             "QPiSSA, niter = 4 (3 seeds)": "qpissa_niter4"}
    table = _table_rows(EXPERIMENTS / "loftq_pissa_init/README.md", set(names))
    assert set(table) == set(names)
    for label, cells in table.items():
        s = summary[names[label]]
        assert cells[1] == f"{float(s['median_rel_error']):.4f}", label
        if names[label] != "qlora":
            q = [float(s[k]) for k in ("median_ratio_to_qlora", "q1_ratio_to_qlora", "q3_ratio_to_qlora")]
            assert cells[2] == f"{q[0]:.3f} ({q[1]:.3f}-{q[2]:.3f})", label
        ppl = f"{float(s['ppl_mean']):.2f}" + (f" ± {float(s['ppl_std']):.2f}" if int(s["n_seeds"]) > 1 else "")
        assert cells[4] == ppl, label
