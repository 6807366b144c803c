"""Smoke tests of the benchmark scripts on a tiny shape, so they cannot silently rot.

Timings are not checked here (benchmarks print them); what is checked is that
every peer builds and trains one step, and that all frameworks start from the
same loss on the same weights and tokens.
"""

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


@pytest.mark.parametrize("setup", ["ours_lora_bf16", "peft_lora_bf16"])
def test_bf16_rows_run(setup, weights, reference):
    first = peers.build(setup, weights, CFG)(TOKENS)
    assert abs(first - reference[0]) < 0.05  # bf16 weights and activations


def test_peers_main_writes_json_and_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(peers.hostmem.ENV, "system")  # this test process keeps its allocator
    md = tmp_path / "peers.md"
    res = peers.main(["--tiny", "--reps", "1", "--setups", "ours_lora", "peft_lora", "--markdown", str(md)])
    assert set(res["step_s"]) == {"ours_lora", "peft_lora"}
    assert res["initial_loss_spread_fp32"] < 1e-4
    assert set(res["peak_rss_mb"]) == {"ours_lora", "peft_lora"}
    assert all(v > 50 for v in res["peak_rss_mb"].values())
    assert 0 < res["ours_lora_over_peft_lora"] < 100
    table = md.read_text()
    assert "| ours_lora |" in table and "ours_lora_over_peft_lora" in table


def test_gpu_script_runs_on_cpu_for_ours_and_peft():
    import gpu

    for setup in ("ours_qlora", "peft_lora"):
        out = gpu.main(["--setup", setup, "--shape", "tiny", "--batch", "2", "--seq", "16", "--steps", "1",
                        "--dtype", "float32"])
        assert out["step_s"] > 0 and math.isfinite(out["initial_loss"]) and out["model_tflop"] > 0


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
