"""The adapter audit: it passes healthy adapters (LoRA, DoRA, stacked) and catches a filter that trains only A."""

from __future__ import annotations

import functools

import jax
import pytest
from test_sweep import write_config
from tiny_models import write_tiny_chat_gguf

from lora_jax import cli, lora
from lora_jax.methods import audit, dora
from lora_jax.models import llama, stacking

CFG = llama.LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32)
RULES = [lora.LoraRule(pattern=r"layers/\d+/(attn/(q|v)_proj|mlp/down_proj)/kernel", rank=2, alpha=4)]
BATCH = {"tokens": jax.random.randint(jax.random.key(3), (2, 8), 0, 64)}
LOSS = functools.partial(llama.loss, config=CFG)


def _params():
    return llama.init(jax.random.key(0), CFG)


@pytest.mark.parametrize("init", [lora.init, dora.init])
def test_healthy_adapters_pass(init):
    report = lora.audit(LOSS, init(jax.random.key(1), _params(), RULES), BATCH)
    assert report.ok, str(report)
    assert report.n_adapters == 6 and report.traces == 1


def test_only_a_trainable_is_caught():
    params = lora.init(jax.random.key(1), _params(), RULES)
    report = audit.audit(LOSS, params, BATCH, trainable=lambda path, x: path.endswith("/lora_a"))
    assert not report.ok
    text = str(report)
    assert "layers/0/attn/q_proj/kernel/lora_b is not selected by the trainable filter" in text
    assert "layers/0/attn/q_proj/kernel/lora_a gets a zero gradient at step 1" in text
    assert len(report.problems) == 12  # B unselected and A stuck, for each of the 6 adapters


def test_dora_magnitude_left_out_is_caught():
    params = dora.init(jax.random.key(1), _params(), RULES)
    report = audit.audit(LOSS, params, BATCH, trainable=lambda path, x: path.endswith(("/lora_a", "/lora_b")))
    assert [p for p in report.problems if "lora_magnitude is not selected" in p] and len(report.problems) == 6


def test_an_adapter_the_loss_never_reaches_is_caught():
    params = lora.init(jax.random.key(1), _params(), RULES)
    params["layers"][1]["mlp"]["down_proj"]["kernel"] = params["layers"][1]["mlp"]["down_proj"]["kernel"]
    cut = lambda p, b: LOSS({**p, "layers": [p["layers"][0], jax.lax.stop_gradient(p["layers"][1])]}, b)  # noqa: E731
    report = audit.audit(cut, params, BATCH, hot_swap=False)
    assert {p.split(" ")[0] for p in report.problems} == {
        f"layers/1/{m}/kernel/lora_{ab}" for m in ("attn/q_proj", "attn/v_proj", "mlp/down_proj") for ab in "ab"}


def test_stacked_layers_pass():
    params = stacking.stack_layers(lora.init(jax.random.key(1), _params(), RULES))
    assert audit.audit(LOSS, params, BATCH).ok


def test_no_adapters_is_a_problem():
    assert "no adapter node" in audit.audit(LOSS, _params(), BATCH).problems[0]


def test_plan_audit_command(tmp_path, capsys):
    model = write_tiny_chat_gguf(tmp_path / "tiny.gguf")
    cfg = write_config(tmp_path / "c.yaml", model, **{"lora.method": "dora"})
    assert cli.main(["plan", str(cfg), "--no-compile", "--audit"]) == 0
    assert "audit of " in capsys.readouterr().out
