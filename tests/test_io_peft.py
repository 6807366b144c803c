"""PEFT folders against peft and transformers: export, import, rank/alpha patterns, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import (
    MIXED_RULES,
    TOKENS,
    bert_hidden,
    hf_bert_folder,
    load_torch,
    peft_trained,
    rel,
    torch_logits,
    train_here,
)
from safetensors.numpy import load_file, save_file
from tiny_adapters import tiny_base

from lora_jax import lora, paths
from lora_jax.errors import CheckpointError
from lora_jax.io import peft as io_peft
from lora_jax.models import bert, export_hf, llama, load_hf


def test_export_peft_matches_peft_model(tmp_path, hf_llama):
    peft = pytest.importorskip("peft")
    d, params, config, _ = hf_llama
    trained = train_here(params, config, MIXED_RULES)
    ours = np.asarray(llama.apply(lora.merge(trained), jnp.asarray(TOKENS), config))
    assert rel(ours, llama.apply(params, jnp.asarray(TOKENS), config)) > 1e-3  # the adapter changed something
    out = io_peft.export_peft(tmp_path / "peft", trained, base_model_name_or_path=str(d), model_kind="llama")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is False
    assert cfg["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 2, r"model\.layers\.0\.mlp\.down_proj": 3,
                                   r"model\.layers\.1\.mlp\.down_proj": 3}  # fmt: skip
    assert cfg["alpha_pattern"][r"model\.layers\.0\.self_attn\.q_proj"] == 3
    assert cfg["alpha_pattern"][r"model\.layers\.1\.mlp\.down_proj"] == 1.5
    assert cfg["target_modules"] == ["down_proj", "lm_head", "q_proj", "v_proj"]
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 48)
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (48, 3)
    model = peft.PeftModel.from_pretrained(load_torch(d), str(out)).eval()
    assert rel(ours, torch_logits(model)) <= 1e-4
    back = io_peft.import_peft(out, params, "llama")  # and back again
    np.testing.assert_allclose(llama.apply(back, jnp.asarray(TOKENS), config), ours, rtol=1e-5, atol=1e-5)


def test_export_peft_rslora_and_partial_targets(tmp_path, hf_llama):
    peft = pytest.importorskip("peft")
    d, params, config, _ = hf_llama
    rules = [lora.LoraRule(pattern=r"layers/1/mlp/(gate|up)_proj/kernel", rank=2, alpha=3, rslora=True)]
    trained = train_here(params, config, rules, steps=2)
    out = io_peft.export_peft(tmp_path / "peft", trained, base_model_name_or_path=str(d))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["lora_alpha"] == 3
    assert cfg["target_modules"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    model = peft.PeftModel.from_pretrained(load_torch(d), str(out)).eval()
    ours = llama.apply(lora.merge(trained), jnp.asarray(TOKENS), config)
    assert rel(ours, torch_logits(model)) <= 1e-4


def test_import_peft_trained_by_peft(tmp_path, hf_llama):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    d, params, config, _ = hf_llama
    lcfg = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"up_proj": 2},
        alpha_pattern={"v_proj": 2}, lora_dropout=0.0, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = peft_trained(d, lcfg, tmp_path / "peft")
    theirs = torch_logits(model)
    adapted = io_peft.import_peft(tmp_path / "peft", params)  # model_kind inferred
    q = adapted["layers"][0]["attn"]["q_proj"]["kernel"]
    v = adapted["layers"][1]["attn"]["v_proj"]["kernel"]
    up = adapted["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert (q.rank, q.scale, v.scale, up.rank, up.scale) == (4, 1.5, 0.5, 2, 3.0)
    ours = llama.apply(adapted, jnp.asarray(TOKENS), config)
    assert rel(ours, theirs) <= 1e-4
    assert rel(ours, llama.apply(params, jnp.asarray(TOKENS), config)) > 1e-3


def test_bert_peft_both_ways_and_merged(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model_cls = hf_bert_folder(tmp_path / "base")
    params, config, _ = load_hf.load(tmp_path / "base", tokenizer=False)
    tokens = TOKENS % 50
    # ours -> PEFT: every linear role, so 'dense' modules must be listed by full name (BertModel has pooler.dense)
    adapted = lora.init(jax.random.key(0), params, [lora.LoraRule.all_linear(2, alpha=5)])
    adapted = jax.tree.map(
        lambda x: lora.LoraWeight(x.base, x.lora_a, 0.1 * jnp.ones_like(x.lora_b), x.scale) if lora.is_lora(x) else x,
        adapted, is_leaf=lora.is_lora,
    )  # fmt: skip
    out = io_peft.export_peft(tmp_path / "peft", adapted, base_model_name_or_path="tiny-bert", model_kind="bert")
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert "encoder.layer.0.attention.self.query" in targets and "dense" not in targets
    assert "base_model.model.encoder.layer.1.intermediate.dense.lora_A.weight" in load_file(
        str(out / "adapter_model.safetensors")
    )
    model = peft.PeftModel.from_pretrained(model_cls.from_pretrained(str(tmp_path / "base")), str(out)).eval()
    ours = bert.apply(adapted, jnp.asarray(tokens), config=config)
    assert rel(ours, bert_hidden(model, tokens)) <= 1e-4
    # PEFT -> ours
    torch.manual_seed(1)
    pm = peft.get_peft_model(
        model_cls.from_pretrained(str(tmp_path / "base")),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]),
    )
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    pm.eval().save_pretrained(str(tmp_path / "from_peft"))
    imported = io_peft.import_peft(tmp_path / "from_peft", params)
    assert len(lora.nodes(imported)) == 4
    assert rel(bert.apply(imported, jnp.asarray(tokens), config=config), bert_hidden(pm, tokens)) <= 1e-4
    # merged
    export_hf.export_merged_hf(tmp_path / "merged", adapted, config)
    merged = model_cls.from_pretrained(str(tmp_path / "merged")).eval()
    assert rel(ours, bert_hidden(merged, tokens)) <= 1e-4


# ----------------------------------------------------------------------------
# PEFT errors (no torch needed: folders written by hand)


def _peft_dir(d: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["model.layers.0.self_attn.q_proj"]}
    merged = {k: v for k, v in {**base, **(config or {})}.items() if v is not ...}  # ... drops a key
    (d / "adapter_config.json").write_text(json.dumps(merged))
    if tensors is None:
        tensors = {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 32), np.float32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, 2), np.float32),
        }
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def test_import_hand_written_peft(tmp_path):
    params = tiny_base()
    adapted = io_peft.import_peft(_peft_dir(tmp_path / "p", {"use_rslora": True}), params, "llama")
    (path, node), = lora.nodes(adapted)  # fmt: skip
    assert path == "layers/0/attn/q_proj/kernel" and node.scale == pytest.approx(4 / np.sqrt(2))
    assert adapted["layers"][1]["attn"]["q_proj"]["kernel"] is params["layers"][1]["attn"]["q_proj"]["kernel"]


def _random_peft_factors(rng, modules: dict[str, tuple[int, int]], r: int) -> dict[str, np.ndarray]:
    """PEFT tensors with random values: lora_A ``(r, d_in)`` and lora_B ``(d_out, r)`` per module."""
    out = {}
    for m, (d_in, d_out) in modules.items():
        out[f"base_model.model.{m}.lora_A.weight"] = rng.normal(size=(r, d_in)).astype(np.float32)
        out[f"base_model.model.{m}.lora_B.weight"] = rng.normal(size=(d_out, r)).astype(np.float32)
    return out


def test_import_random_nonsquare_peft_factors_matches_peft_in_torch(tmp_path):
    """Random factors (no value or shape symmetry to hide a swap or a missing transpose), checked against PEFT."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    params = tiny_base()
    attn = "model.layers.0.self_attn"
    modules = {f"{attn}.q_proj": (32, 32), f"{attn}.k_proj": (32, 16)}  # k_proj: 32 -> 16 (2 kv heads)
    tensors = _random_peft_factors(np.random.default_rng(0), modules, r=3)
    d = _peft_dir(tmp_path / "p", {"r": 3, "lora_alpha": 5, "lora_dropout": 0.1,
                                   "target_modules": ["q_proj", "k_proj"], "layers_to_transform": [0]},
                     tensors)  # fmt: skip
    adapted = io_peft.import_peft(d, params, "llama")
    nodes = dict(lora.nodes(adapted))
    assert sorted(nodes) == ["layers/0/attn/k_proj/kernel", "layers/0/attn/q_proj/kernel"]
    # PEFT's definition: W_torch (out, in) + (alpha / r) * lora_B @ lora_A; our kernel is (in, out).
    for role in ("q_proj", "k_proj"):
        node = nodes[f"layers/0/attn/{role}/kernel"]
        assert node.dropout == pytest.approx(0.1) and node.scale == pytest.approx(5 / 3)
        a, b = (tensors[f"base_model.model.{attn}.{role}.lora_{f}.weight"] for f in "AB")
        want = np.asarray(params["layers"][0]["attn"][role]["kernel"]) + (5 / 3 * b.astype(np.float64) @ a).T
        np.testing.assert_allclose(np.asarray(lora.merge(adapted)["layers"][0]["attn"][role]["kernel"]), want,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip

    # The same folder read by PEFT onto torch Linear layers holding the same base weights.
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = torch.nn.Linear(32, 32, bias=False), torch.nn.Linear(32, 16, bias=False)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.model.layers[0].self_attn = Attn()

    base = Tiny()
    with torch.no_grad():
        for role in ("q_proj", "k_proj"):
            w = np.asarray(params["layers"][0]["attn"][role]["kernel"]).T
            getattr(base.model.layers[0].self_attn, role).weight.copy_(torch.from_numpy(w.copy()))
    theirs = peft.PeftModel.from_pretrained(base, str(d)).eval().base_model.model.model.layers[0].self_attn
    x = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    with torch.no_grad():
        for role in ("q_proj", "k_proj"):
            ref = getattr(theirs, role)(torch.from_numpy(x)).numpy()
            ours = np.asarray(jnp.asarray(x) @ adapted["layers"][0]["attn"][role]["kernel"])
            assert rel(ours, ref) <= 1e-5, role


@pytest.mark.parametrize(
    ("config", "tensors", "match"),
    [
        ({"peft_type": "IA3"}, None, "peft_type='IA3'; only LORA adapters are read"),
        ({"use_dora": True}, None, r"use_dora=true, so each module needs a lora_magnitude_vector"),
        ({"bias": "all"}, None, "bias='all' is not supported"),
        ({"modules_to_save": ["lm_head"]}, None, r"modules_to_save=\['lm_head'\] is not supported"),
        ({"rank_pattern": {"q_proj": 3}}, None,
         r"rank_pattern\['q_proj'\]=3 disagrees with the tensors: module 'model.layers.0.self_attn.q_proj' has rank 2"),
        ({"r": 4}, None, "r=4 disagrees with the tensors: module 'model.layers.0.self_attn.q_proj' has rank 2"),
        ({"r": ...}, None, "r is missing; PEFT writes it with every LoRA adapter"),
        ({"lora_alpha": ...}, None, "lora_alpha is missing; PEFT writes it with every LoRA adapter"),
        ({"r": 0}, None, "r=0; a rank must be a whole number >= 1"),
        ({"r": "2"}, None, "r='2'; a rank must be a whole number >= 1"),
        ({"lora_alpha": float("nan")}, None, "lora_alpha=nan; lora_alpha must be a finite number"),
        ({"alpha_pattern": {"q_proj": float("inf")}}, None,
         r"alpha_pattern\['q_proj'\]=inf; lora_alpha must be a finite number"),
        ({"lora_dropout": 1.5}, None, r"lora_dropout=1.5; it must be a number in \[0, 1\)"),
        # target_modules against the tensors (PEFT's semantics; the tiny base has two layers)
        ({"target_modules": ["q_proj"]}, None,
         r"target_modules=\['q_proj'\] selects module 'model.layers.1.self_attn.q_proj' "
         r"\(layers/1/attn/q_proj/kernel\), but adapter_model.safetensors has no lora_A/lora_B for it"),
        ({"target_modules": ["v_proj"]}, None,
         r"target_modules=\['v_proj'\] does not select module 'model.layers.0.self_attn.q_proj', but "
         "adapter_model.safetensors holds its factors"),
        ({"target_modules": r".*\.k_proj"}, None, "does not select module 'model.layers.0.self_attn.q_proj'"),
        ({"target_modules": "all-linear"}, None, "selects module 'model.layers.0.self_attn.k_proj'"),
        ({"target_modules": ["q_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]}, None,
         "does not select module 'model.layers.0.self_attn.q_proj'"),
        ({"target_modules": "(unclosed"}, None, r"target_modules='\(unclosed' is not a valid regular expression"),
        ({"target_modules": 3}, None, "target_modules=3: expected a list of module names or a regex string"),
        ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 32), np.float32)},
         "has lora_A but not both lora_A and lora_B"),
        ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": np.ones((2, 64), np.float32)},
         "is not a LoRA factor"),
        ({}, {"base_model.model.model.norm.lora_A.weight": np.ones((2, 32), np.float32),
              "base_model.model.model.norm.lora_B.weight": np.ones((32, 2), np.float32)},
         "module 'model.norm' has no counterpart in the built-in llama model"),
        ({}, {"base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": np.ones((2, 32), np.float32),
              "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": np.ones((32, 2), np.float32)},
         "adapter path 'layers/5/attn/q_proj/kernel' is not in the base params"),
        ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 48), np.float32),
              "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, 2), np.float32)},
         r"q_proj -> layers/0/attn/q_proj/kernel': factors A \(48, 2\) and B \(2, 32\) do not fit the base weight"),
        ({}, {}, "no LoRA tensors"),
    ],
)  # fmt: skip
def test_import_peft_errors(tmp_path, config, tensors, match):
    d = _peft_dir(tmp_path / "p", config, tensors)
    with pytest.raises(CheckpointError, match=match):
        io_peft.import_peft(d, tiny_base(), "llama")


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj"], "layers_to_transform": [0]},
        {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
        {"target_modules": r"model\.layers\.0\.self_attn\.q_proj"},
        {"target_modules": ["q_proj"], "exclude_modules": r".*layers\.1\..*"},
        {"target_modules": ["layers.0.self_attn.q_proj", "c_attn"]},  # c_attn: another architecture
    ],
)
def test_import_peft_accepts_target_modules_that_select_exactly_the_tensors(tmp_path, config):
    adapted = io_peft.import_peft(_peft_dir(tmp_path / "p", config), tiny_base(), "llama")
    (path, node), = lora.nodes(adapted)  # fmt: skip
    assert path == "layers/0/attn/q_proj/kernel" and node.scale == 2.0


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj", "down_proj"]},
        {"target_modules": ["model.layers.1.self_attn.v_proj", "mlp.up_proj"]},
        {"target_modules": ["q_proj"], "layers_to_transform": [1]},
        {"target_modules": ["k_proj", "gate_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
        {"target_modules": r".*\.(q|v)_proj"},
        {"target_modules": r"model\.layers\.1\.mlp\..*"},
        {"target_modules": ["q_proj", "up_proj"], "exclude_modules": ["model.layers.0.mlp.up_proj"]},
        {"target_modules": ["o_proj"], "exclude_modules": r".*\.1\.self_attn\.o_proj"},
        {"target_modules": None},  # PEFT's default for Llama: q_proj and v_proj
    ],
)
def test_targeted_agrees_with_peft(config):
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    theirs_config = peft.LoraConfig(**config)
    if theirs_config.target_modules is None:  # PEFT fills the default in when it wraps a model
        theirs_config.target_modules = {"q_proj", "v_proj"}
    select = io_peft.targeted(config, "llama")
    names = [io_peft.hf_module_name(p, "llama") for p, _ in paths.leaves_with_paths(tiny_base())]
    names = [n for n in names if n]
    assert len(names) == 14
    ours = {n for n in names if select(n)}
    assert ours == {n for n in names if check_target_module_exists(theirs_config, n)}
    assert ours  # each case selects something


def test_import_peft_file_errors(tmp_path):
    params = tiny_base()
    with pytest.raises(FileNotFoundError, match="no such PEFT adapter folder"):
        io_peft.import_peft(tmp_path / "nope", params)
    d = _peft_dir(tmp_path / "p")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing PEFT adapter weights"):
        io_peft.import_peft(d, params)
    (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # would unpickle to 1; must never be opened
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin: pickle adapter weights are refused"):
        io_peft.import_peft(d, params)
    d = _peft_dir(tmp_path / "q")
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: truncated or corrupted safetensors file"):
        io_peft.import_peft(d, params)
    (d / "adapter_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: not valid JSON"):
        io_peft.import_peft(d, params)
    (d / "adapter_config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: expected a JSON object, got list"):
        io_peft.import_peft(d, params)
    (d / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json: missing"):
        io_peft.import_peft(d, params)
    with pytest.raises(ValueError, match=r"model_kind must be one of \('llama', 'bert'\), got 'gpt2'"):
        io_peft.import_peft(d, params, "gpt2")
    save_file({"x": np.zeros(2, np.int32)}, str(f))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    with pytest.raises(CheckpointError, match="tensor 'x' has dtype I32; LoRA factors must be floats"):
        io_peft.import_peft(d, params)


def test_export_peft_errors(tmp_path):
    params = tiny_base()
    with pytest.raises(ValueError, match="export_peft: params hold no LoRA weight"):
        io_peft.export_peft(tmp_path, params, base_model_name_or_path="x")
    emb = lora.init(jax.random.key(0), params, [lora.LoraRule(pattern="embed", rank=2)])
    with pytest.raises(ValueError, match=r"'embed' has no llama module in PEFT's naming \(PEFT's embedding LoRA"):
        io_peft.export_peft(tmp_path, emb, base_model_name_or_path="x")
    multi = {"layers": [{"attn": {"q_proj": {"kernel": jnp.ones((4, 8, 32))}}}]}
    multi = lora.init(jax.random.key(0), multi, [lora.LoraRule(pattern=".*kernel", rank=2, in_dims=2)])
    with pytest.raises(ValueError, match="has in_ndim=2; PEFT Linear layers need in_ndim=1"):
        io_peft.export_peft(tmp_path, multi, base_model_name_or_path="x")


def test_module_names():
    assert io_peft.hf_module_name("layers/1/mlp/down_proj/kernel", "bert") == "encoder.layer.1.output.dense"
    assert io_peft.hf_module_name("lm_head", "llama") == "lm_head" and io_peft.hf_module_name("lm_head", "bert") is None
    assert io_peft.kernel_path("bert.encoder.layer.2.attention.self.key", "bert") == "layers/2/attn/k_proj/kernel"
    assert io_peft.kernel_path("layers.3.self_attn.o_proj", "llama") == "layers/3/attn/o_proj/kernel"
