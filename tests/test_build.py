"""Tests for lora_jax.runner.build: rules from config sections, checks of a config against model shapes."""

import dataclasses
import re

import pytest

from lora_jax import config as C
from lora_jax.errors import ConfigError
from lora_jax.runner import build

# ----------------------------------------------------------------------------
# Checks against the model's shapes

LLAMA_SHAPES = {
    "embed": (49152, 576),
    "final_norm/scale": (576,),
    **{
        f"layers/{i}/{p}/kernel": s
        for i in range(2)
        for p, s in [
            ("attn/q_proj", (576, 576)),
            ("attn/k_proj", (576, 192)),
            ("attn/v_proj", (576, 192)),
            ("attn/o_proj", (576, 576)),
            ("mlp/gate_proj", (576, 1536)),
            ("mlp/up_proj", (576, 1536)),
            ("mlp/down_proj", (1536, 576)),
        ]  # fmt: skip
    },
    **{f"layers/{i}/attn_norm/scale": (576,) for i in range(2)},
}


def test_check_against_model_accepts_a_fitting_config():
    build.check_against_model(C.ExperimentConfig(method="qlora", lora=C.LoraConfig(rank=192)), LLAMA_SHAPES)
    build.check_against_model(C.ExperimentConfig(method="base", lora=C.LoraConfig(rank=4096)), LLAMA_SHAPES)


def test_check_against_model_names_the_path_and_the_largest_rank():
    cfg = C.ExperimentConfig(lora=C.LoraConfig(rank=256))
    match = (
        r"lora\.rank=256 is too large for 4 of the 14 .*layers/0/attn/k_proj/kernel \(576, 192\) allows at most "
        r"rank 192.*the largest rank every target allows is 192"
    )
    with pytest.raises(ConfigError, match=match):
        build.check_against_model(cfg, LLAMA_SHAPES)


def test_check_against_model_targets_and_blocks():
    with pytest.raises(ConfigError, match=r"lora\.targets: '.*qproj/kernel' matches no parameter.*\n.*q_proj/kernel"):
        build.check_against_model(
            C.ExperimentConfig(lora=C.LoraConfig(targets=r"layers/\d+/attn/qproj/kernel")), LLAMA_SHAPES
        )
    with pytest.raises(ConfigError, match=r"lora\.targets: '.*' matches final_norm/scale of shape \(576,\)"):
        build.check_against_model(C.ExperimentConfig(lora=C.LoraConfig(targets="final_norm/scale")), LLAMA_SHAPES)
    odd = {**LLAMA_SHAPES, "layers/0/mlp/down_proj/kernel": (1540, 576)}
    cfg = C.ExperimentConfig(method="qlora", quant=C.QuantConfig(block_size=32))
    build.check_against_model(cfg, LLAMA_SHAPES)
    match = r"quant\.block_size=32 does not divide d_in \(axis 0\) of 1 of the 14 .* layers/0/mlp/down_proj.*: none"
    with pytest.raises(ConfigError, match=match):
        build.check_against_model(cfg, odd)
    with pytest.raises(ConfigError, match=r"block sizes that divide all: 32, 64;"):  # 576 = 9 * 64
        build.check_against_model(dataclasses.replace(cfg, quant=C.QuantConfig(block_size=128)), LLAMA_SHAPES)
    build.check_against_model(dataclasses.replace(cfg, quant=C.QuantConfig(block_size=0)), odd)


def test_default_targets_match_the_seven_projections():
    hits = [p for p in LLAMA_SHAPES if re.fullmatch(C.DEFAULT_TARGETS, p)]
    assert len(hits) == 7 * 2


# ----------------------------------------------------------------------------
# Rules


def test_to_rules():
    (rule,) = build.lora_rules(C.LoraConfig(rank=4, alpha=8, dropout=0.1, rslora=True, init="gaussian"))
    assert (rule.pattern, rule.rank, rule.alpha, rule.dropout, rule.rslora, rule.init) == (
        C.DEFAULT_TARGETS,
        4,
        8.0,
        0.1,
        True,
        "gaussian",
    )
    assert rule.scale == pytest.approx(8 / 2)
    (qrule,) = build.quant_rules(C.QuantConfig(format="int8", block_size=0, double_quant=False), "bfloat16")
    assert (qrule.format, qrule.block_size, qrule.double_quant, str(qrule.dtype)) == ("int8", None, False, "bfloat16")
