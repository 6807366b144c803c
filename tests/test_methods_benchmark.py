"""Smoke run of experiments/benchmarks/methods.py on a tiny model: the JSON has every key, the numbers are sane."""

from __future__ import annotations

import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def test_methods_benchmark_tiny(tmp_path):
    import json

    import methods

    out = methods.main(["--tiny", "--reps", "1", "--out", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(json.dumps(out))
    step = out["step"]
    for m in methods.MODES:
        assert step[f"{m}_step_s"] > 0
    assert math.isfinite(step["dora_over_lora"]) and math.isfinite(step["qdora_over_qlora"])
    lq = out["loftq"]
    assert lq["n_matrices"] == 14  # 2 layers x 7 projections
    for t in ("T1", "T5"):
        assert 0 < lq[t]["median_ratio"] < 1 and lq[t]["below_one"] is True  # LoftQ never worse than Q alone here
    assert lq["T5"]["median_ratio"] <= lq["T1"]["median_ratio"] + 1e-6
