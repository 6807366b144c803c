"""Smoke tests of the benchmark scripts on a tiny shape, so they cannot silently rot.

Timings are not checked here (benchmarks print them); what is checked is that
every peer builds and trains one step, and that all frameworks start from the
same loss on the same weights and tokens.
"""

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax.models import llama  # noqa: E402

CFG = peers.model_config(tiny=True)
TOKENS = peers.tokens(CFG, 2, 32)


@pytest.fixture(scope="module")
def weights():
    return peers.weights(CFG)


@pytest.fixture(scope="module")
def reference(weights):
    """Our model's loss on the shared weights: float, and with the seven projections in NF4 + double quant."""
    params = jax.tree.map(jnp.asarray, weights)
    batch = {"tokens": jnp.asarray(TOKENS)}
    q = lj.quantize(params, [lj.QuantRule(pattern=peers.ALL_SEVEN, format="nf4", block_size=64, double_quant=True)])
    return float(llama.loss(params, batch, CFG)[0]), float(llama.loss(q, batch, CFG)[0])


@pytest.mark.parametrize("setup", [s for s in peers.SETUPS if not s.endswith("_bf16")])
def test_every_peer_trains_one_step_from_the_same_loss(setup, weights, reference):
    step = peers.build(setup, weights, CFG)
    first, second = step(TOKENS), step(TOKENS)
    dense, nf4 = reference
    if setup.endswith("qlora"):
        # Same NF4 codes and blocks everywhere; the double-quantized scales differ by scheme
        # (bitsandbytes: dynamic 8-bit code; qwix: none), which moves the loss by ~1e-5..1e-4.
        assert abs(first - nf4) < 1e-3, (setup, first, nf4)
        assert abs(first - dense) > abs(first - nf4), "the quantized peer must see the quantization error"
    else:
        assert abs(first - dense) < 1e-4, (setup, first, dense)
    assert math.isfinite(second) and second != first, "the step did not update anything"


@pytest.mark.parametrize("setup", [s for s in peers.SETUPS if s.endswith("_bf16")])
def test_bf16_rows_run(setup, weights, reference):
    step = peers.build(setup, weights, CFG)
    first = step(TOKENS)
    assert abs(first - reference["qlora" in setup]) < 0.05  # bf16 weights and activations
    step(TOKENS, block=False)  # the pipelined loop: dispatch, then wait once
    assert math.isfinite(step.wait()) and step.wait() != first


def assert_quotient(ratio: float, num: float, den: float, half_ulp: float = 5e-5) -> None:
    """``ratio`` (rounded to 4 decimals) is ``num / den`` for times that rounded to ``num`` and ``den``."""
    lo, hi = (num - half_ulp) / (den + half_ulp), (num + half_ulp) / (den - half_ulp)
    assert lo - half_ulp <= ratio <= hi + half_ulp, (ratio, num, den)


def _args(**kw):
    import argparse

    return argparse.Namespace(**{"tiny": True, "batch": 2, "seq": 32, "rank": 8, "alpha": 16, "reps": 3, **kw})


def _round(**times):
    """One made-up round of peers.py: each setup's blocked time, pipelined twice that."""
    return {s: {"blocked": t, "pipelined": 2 * t, "compile_s": 1.0, "initial_loss": 3.0, "peak_rss_mb": 100.0,
                "step_peak_rss_mb": 90.0, "process_imported": []} for s, t in times.items()}  # fmt: skip


def test_peers_ratios_are_medians_of_the_per_round_ratios(monkeypatch):
    """Timings made up: the reported ratio is the median of per-round quotients, not a quotient of medians."""
    monkeypatch.setattr(peers, "describe", dict)
    rounds = [_round(ours_lora=1.0, ours_full=2.0, ours_lora_bf16=5.0, peft_lora=4.0, peft_lora_bf16=1.0),
              _round(ours_lora=2.0, ours_full=1.0, ours_lora_bf16=1.0, peft_lora=4.0, peft_lora_bf16=8.0),
              _round(ours_lora=9.0, ours_full=3.0, ours_lora_bf16=9.0, peft_lora=3.0, peft_lora_bf16=3.0)]
    out = peers.summarize(rounds, _args())
    assert out["step_s"]["blocked"]["ours_lora"] == 2.0 and out["step_s"]["pipelined"]["ours_full"] == 4.0
    assert out["ours_lora_over_ours_full_blocked"] == 2.0  # median of 0.5, 2 and 3 (the medians' quotient is 1)
    assert out["ours_lora_over_ours_full_pipelined"] == 2.0
    # best against best, per round: min(1, 5)/min(4, 1) = 1, min(2, 1)/min(4, 8) = 0.25, 9/3 = 3 -> median 1
    assert out["ours_lora_best_over_peft_lora_best_blocked"] == 1.0
    assert out["targets_met"]["ours_lora_best_over_peft_lora_best_blocked"] is False  # target 0.8
    assert "ours_qlora_best_over_peft_qlora_best_blocked" not in out  # only ratios of setups that ran
    assert out["tokens_per_s"]["ours_lora"] == 2 * 32 / 2.0
    assert out["step_s_range"]["blocked"]["ours_lora"] == [1.0, 9.0]


def test_train_step_loop_ratios_are_medians_of_the_per_round_ratios(monkeypatch):
    import train_step

    rounds = {"blocked": [1.0, 2.0, 4.0], "pipelined": [2.0, 1.0, 3.0], "blocked_faults": [1, 2, 3],
              "pipelined_faults": [4, 5, 6], "malloc_configured": True}  # fmt: skip
    monkeypatch.setattr(train_step, "_child", lambda flags, args, malloc=None: rounds)
    out = train_step.loop_styles(_args())
    for suffix in ("", "_system_malloc"):
        assert out[f"lora_step_s_blocked{suffix}"] == 2.0 and out[f"lora_step_s_pipelined{suffix}"] == 2.0
        assert out[f"pipelined_over_blocked{suffix}"] == 0.75  # median of 2, 0.5 and 0.75
        assert out[f"page_faults_per_step_blocked{suffix}"] == 2
    assert out["malloc_configured"] is True


def test_peers_main_runs_each_setup_in_a_clean_process(tmp_path, capsys):
    md = tmp_path / "peers.md"
    setups = ["ours_lora", "peft_lora", "ours_lora_bf16", "peft_lora_bf16"]
    res = peers.main(["--tiny", "--reps", "1", "--rounds", "1", "--setups", *setups, "--markdown", str(md)])
    for style in peers.STYLES:
        assert set(res["step_s"][style]) == set(setups)
        # a ratio is the quotient of the step times it names (one round: no median across rounds)
        t = res["step_s"][style]
        # (ratios are rounded to 4 decimals, step times to 6)
        ratio = pytest.approx(t["ours_lora"] / t["peft_lora"], rel=1e-3, abs=6e-5)
        assert res[f"ours_lora_over_peft_lora_{style}"] == ratio
        best = min(t["ours_lora"], t["ours_lora_bf16"]) / min(t["peft_lora"], t["peft_lora_bf16"])
        assert res[f"ours_lora_best_over_peft_lora_best_{style}"] == pytest.approx(best, rel=1e-3, abs=6e-5)
    assert res["initial_loss_spread_fp32"] < 1e-4
    assert all(v > 50 for v in res["peak_rss_mb"].values())
    # a PyTorch peer's process never loads JAX or lora-jax; ours never loads PyTorch
    assert res["process_imported"]["peft_lora"] == ["torch"]
    assert "torch" not in res["process_imported"]["ours_lora"]
    assert res["targets_met"] == {f"ours_lora_best_over_peft_lora_best_{style}":
                                  res[f"ours_lora_best_over_peft_lora_best_{style}"] <= 0.8 for style in peers.STYLES}
    table = md.read_text()
    assert "| ours_lora |" in table and "ours_lora_best_over_peft_lora_best_pipelined" in table


def test_gpu_sh_runs_every_setup_on_cpu_with_the_tiny_shape(tmp_path):
    import os
    import subprocess

    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), str(tmp_path), "tiny"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "failed or timed out" not in proc.stdout, proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert [(r["setup"], r["remat"]) for r in rows] == [
        ("ours_lora", False), ("ours_qlora", False), ("peft_lora", False), ("ours_full", False), ("ours_qlora", True)]
    assert "tiny: ours_lora_over_peft_lora" in proc.stdout
    for r in rows:
        assert r["step_s"] > 0 and r["step_s_pipelined"] > 0 and math.isfinite(r["initial_loss"])
        assert r["mfu"] == pytest.approx(r["model_tflop"] / r["step_s"] / r["matmul_tflops"], rel=0.01)


def test_train_step_benchmark_tiny():
    import train_step

    # --malloc system: this test process keeps its allocator; the loop-style children set their own.
    res = train_step.main(["--tiny", "--reps", "1", "--no-rss", "--malloc", "system"])
    assert res["lora_step_s"] > 0 and res["qlora_step_s"] > 0
    assert res["malloc_configured"] == (train_step.hostmem._libc() is not None)
    for suffix in ("", "_system_malloc"):
        assert res[f"lora_step_s_blocked{suffix}"] > 0 and res[f"lora_step_s_pipelined{suffix}"] > 0
        assert np.isfinite(res[f"pipelined_over_blocked{suffix}"])
    assert 4.0 < res["base_bits_per_param"] < 4.6
    # One round: each ratio is the quotient of the two step times it names.
    assert_quotient(res["lora_over_full"], res["lora_step_s"], res["full_step_s"])
    assert_quotient(res["qlora_over_lora"], res["qlora_step_s"], res["lora_step_s"])
    assert np.isfinite(res["lora_mfu"])


def test_scale_script_quick_run_reports_consistent_keys(capsys):
    import json

    import scale

    res = scale.main(["--quick", "--reps", "1"])
    assert json.loads(capsys.readouterr().out) == res
    a, b = res["depths"]
    for prefix in ("", "unrolled_"):
        times = res[f"{prefix}compile_s_depth{a}"], res[f"{prefix}compile_s_depth{b}"]
        assert all(t > 0 for t in times)
        assert math.isclose(res[f"{prefix}compile_s_depth{b}_over_depth{a}"], times[1] / times[0], rel_tol=1e-9)
    assert res["scan_max_rel_loss_diff"] <= 1e-5 and res["attention_max_rel_logit_diff"] <= 1e-5
    assert set(res["remat_temp_bytes"]) == {"none", "full", "dots", "offload"}
    assert res["remat_temp_bytes"]["offload"] is None  # refused on the CPU
    assert set(res["remat_step_s"]) == {"none", "full", "dots"} and all(v > 0 for v in res["remat_step_s"].values())
    assert all(res["remat_temp_bytes"][p] > 0 for p in ("none", "full", "dots"))
    assert res["attention"] == "blocked"
