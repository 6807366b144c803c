"""Merged Hugging Face export against transformers: tied and untied Llama, biases, a quantized base, errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import (
    MIXED_RULES,
    TOKENS,
    hf_llama_folder,
    rel,
    torch_logits,
    train_here,
)
from tiny_adapters import CFG, tiny_base

from lora_jax import lora
from lora_jax.models import export_hf, llama, load_hf


def test_merged_export_loads_in_transformers(tmp_path, hf_llama):
    transformers = pytest.importorskip("transformers")
    d, params, config, tok = hf_llama
    trained = train_here(params, config, MIXED_RULES)
    errors = export_hf.export_merged_hf(tmp_path / "merged", trained, config, tok)
    assert errors == {}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    ours = llama.apply(lora.merge(trained), jnp.asarray(TOKENS), config)
    assert rel(ours, torch_logits(model)) <= 1e-4
    again, config2, tok2 = load_hf.load(tmp_path / "merged")
    assert config2 == config and tok2.encode("w3 w4").ids == [3, 4]
    jax.tree.map(np.testing.assert_array_equal, again, lora.merge(trained))


def test_merged_export_tied_llama_with_rope_theta(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_llama_folder(tmp_path / "base", tie=True, rope_theta=5e5)
    params, config, _ = load_hf.load(tmp_path / "base", tokenizer=False)
    adapted = lora.init(jax.random.key(0), params, [lora.LoraRule.all_linear(2)])
    adapted = jax.tree.map(
        lambda x: lora.LoraWeight(x.base, x.lora_a, jnp.full_like(x.lora_b, 0.05), x.scale) if lora.is_lora(x) else x,
        adapted, is_leaf=lora.is_lora,
    )  # fmt: skip
    export_hf.export_merged_hf(tmp_path / "merged", adapted, config, dtype=jnp.float32)
    hf = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert hf["tie_word_embeddings"] is True and hf["rope_parameters"]["rope_theta"] == 5e5
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert rel(llama.apply(adapted, jnp.asarray(TOKENS), config), torch_logits(model)) <= 1e-4


def test_merged_export_of_quantized_base_reports_error(tmp_path, hf_llama):
    quant = pytest.importorskip("lora_jax.quant")
    transformers = pytest.importorskip("transformers")
    d, params, config, _ = hf_llama
    qparams = quant.quantize(params, [quant.QuantRule(pattern=r"layers/\d+/(attn|mlp)/.*kernel", block_size=16)])
    adapted = lora.init(jax.random.key(3), qparams, [lora.LoraRule(pattern=r"layers/\d+/attn/q_proj/kernel", rank=2)])
    adapted["layers"][0]["attn"]["q_proj"]["kernel"] = lora.LoraWeight(
        adapted["layers"][0]["attn"]["q_proj"]["kernel"].base,
        adapted["layers"][0]["attn"]["q_proj"]["kernel"].lora_a,
        jnp.full((2, 48), 0.1),
    )
    errors = export_hf.export_merged_hf(tmp_path / "merged", adapted, config, original_params=params)
    assert len(errors) == 2 * 7 and all(0.01 < e < 0.2 for e in errors.values())  # nf4: about 10% per weight
    node = adapted["layers"][0]["attn"]["q_proj"]["kernel"]
    want = params["layers"][0]["attn"]["q_proj"]["kernel"] + node.delta_weight()
    got = node.base.dequantize() + node.delta_weight()
    expected = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert errors["layers/0/attn/q_proj/kernel"] == pytest.approx(expected, rel=1e-4)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    ours = llama.apply(adapted, jnp.asarray(TOKENS), config)
    assert rel(ours, torch_logits(model)) <= 1e-4
    with pytest.raises(ValueError, match="original_params has no float weight at 'layers/0/attn/k_proj/kernel'"):
        export_hf.export_merged_hf(tmp_path / "m2", adapted, config, original_params={"embed": params["embed"]})


@pytest.mark.parametrize("kind", ["qwen2", "llama-bias"])
def test_merged_export_with_biases(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    config = dataclasses.replace(CFG, qkv_bias=True, tie_embeddings=False)
    params = llama.init(jax.random.key(0), config)
    for i, layer in enumerate(params["layers"]):
        projections = ("q_proj", "k_proj", "v_proj") if kind == "qwen2" else ("q_proj", "k_proj", "v_proj", "o_proj")
        for j, name in enumerate(projections):
            d_out = layer["attn"][name]["kernel"].shape[1]
            layer["attn"][name]["bias"] = 0.1 * jax.random.normal(jax.random.key(10 * i + j), (d_out,))
        if kind == "llama-bias":
            for j, name in enumerate(("gate_proj", "up_proj", "down_proj")):
                d_out = layer["mlp"][name]["kernel"].shape[1]
                layer["mlp"][name]["bias"] = 0.1 * jax.random.normal(jax.random.key(100 + 10 * i + j), (d_out,))
    adapted = lora.init(jax.random.key(1), params, [lora.LoraRule.all_linear(2)])
    export_hf.export_merged_hf(tmp_path, adapted, config)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == ("qwen2" if kind == "qwen2" else "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = TOKENS % CFG.vocab_size
    assert rel(llama.apply(adapted, jnp.asarray(tokens), config), torch_logits(model, tokens)) <= 1e-4


def test_merged_export_errors(tmp_path):
    params = tiny_base()
    with pytest.raises(TypeError, match="config must be a LlamaConfig or BertConfig, got dict"):
        export_hf.export_merged_hf(tmp_path, params, {"vocab_size": 3})
    broken = jax.tree.map(lambda x: x, params)
    del broken["layers"][1]["mlp"]["up_proj"]
    with pytest.raises(ValueError, match="params have no 'layers/1/mlp/up_proj/kernel', which LlamaConfig needs"):
        export_hf.export_merged_hf(tmp_path, broken, CFG)
    extra = jax.tree.map(lambda x: x, params)
    extra["layers"][0]["attn"]["q_proj"]["bias"] = jnp.zeros(32)
    with pytest.raises(ValueError, match=r"params the config does not describe: layers/0/attn/q_proj/bias"):
        export_hf.export_merged_hf(tmp_path, extra, CFG)
    wrong = jax.tree.map(lambda x: x, params)
    wrong["layers"][0]["mlp"]["down_proj"]["kernel"] = jnp.zeros((48, 16))
    with pytest.raises(ValueError, match=r"'layers/0/mlp/down_proj/kernel' has shape \(48, 16\); the config implies"):
        export_hf.export_merged_hf(tmp_path, wrong, CFG)
    o_bias = jax.tree.map(lambda x: x, params)
    o_bias["layers"][0]["attn"]["o_proj"]["bias"] = jnp.zeros(32)
    with pytest.raises(ValueError, match="an o_proj bias without q/k/v biases has no Hugging Face model"):
        export_hf.export_merged_hf(tmp_path, o_bias, CFG)

