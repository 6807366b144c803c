"""DoRA and QDoRA against PEFT (PyTorch CPU): forward, gradients of every trainable tensor, init, export, import."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import TOKENS, load_torch, peft_trained, rel, torch_logits
from peft_layers import ALPHA, D_IN, D_OUT, R, node_from, our_grads, peft_linear, torch_grads

from lora_jax import lora, paths, quant
from lora_jax.errors import LoraError
from lora_jax.io import peft as io_peft
from lora_jax.methods import dora
from lora_jax.models import llama


@pytest.mark.parametrize("custom_vjp", [True, False])
def test_forward_and_every_gradient_match_peft(custom_vjp):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(D_OUT, D_IN)).astype(np.float32) * 0.3
    model, layer = peft_linear(w, use_dora=True, init_lora_weights=False)
    x = rng.normal(size=(5, D_IN)).astype(np.float32)
    cot = rng.normal(size=(5, D_OUT)).astype(np.float32)
    with torch.no_grad():  # a trained magnitude, not the init one, so its gradient is not special
        layer.lora_magnitude_vector["default"].weight.mul_(torch.tensor(1.0 + 0.1 * rng.normal(size=D_OUT),
                                                                        dtype=torch.float32))
    ref_y, ref_g = torch_grads(model, layer, x, cot)
    node = lora.with_custom_vjp({"w": node_from(layer)}, custom_vjp)["w"]
    y, g = our_grads(node, x, cot)
    assert rel(y, ref_y) <= 1e-5
    assert rel(x @ w.T, ref_y) > 1e-3  # the adapter changed the output
    for k in ("lora_a", "lora_b", "lora_magnitude"):
        assert rel(g[k], ref_g[k]) <= 1e-5, k


def test_dropout_formula_is_peft_s():
    """With dropout, PEFT's DoRA is ``x W0 + (g-1) x' W0 + g s x' A B``; our node with the same mask agrees."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
    a, b = rng.normal(size=(D_IN, R)).astype(np.float32), rng.normal(size=(R, D_OUT)).astype(np.float32)
    m = rng.uniform(1, 2, size=D_OUT).astype(np.float32)
    node = dora.DoraWeight(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), 0.5, dropout=0.5,
                           dropout_key=jax.random.key(3), lora_magnitude=jnp.asarray(m))
    x = rng.normal(size=(6, D_IN)).astype(np.float32)
    xd = np.asarray(node._adapter_input(jnp.asarray(x)))
    assert not np.allclose(xd, x)
    g = m / np.linalg.norm(w + 0.5 * a @ b, axis=0)
    want = x @ w + (g - 1) * (xd @ w) + g * 0.5 * (xd @ a @ b)
    np.testing.assert_allclose(np.asarray(jnp.asarray(x) @ node), want, rtol=1e-5, atol=1e-5)


def test_init_magnitude_is_peft_s_and_model_unchanged():
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    w = rng.normal(size=(D_OUT, D_IN)).astype(np.float32)
    _, layer = peft_linear(w, use_dora=True, init_lora_weights=False)
    ours = dora.to_dora({"w": lora.LoraWeight(jnp.asarray(w.T), *(node_from(layer).lora_a, node_from(layer).lora_b),
                                              ALPHA / R)})["w"]
    np.testing.assert_allclose(ours.lora_magnitude, layer.lora_magnitude_vector["default"].weight.detach().numpy(),
                               rtol=1e-6)
    p = dora.init(jax.random.key(0), {"w": jnp.asarray(w.T)}, [lora.LoraRule(pattern="w", rank=R)])
    x = jnp.asarray(rng.normal(size=(3, D_IN)).astype(np.float32))
    np.testing.assert_allclose(x @ p["w"], x @ w.T, rtol=1e-5, atol=1e-6)


def test_trainable_split_holds_the_magnitude():
    p = dora.init(jax.random.key(0), {"w": jnp.ones((8, 6))}, [lora.LoraRule(pattern="w", rank=2)])
    t, _ = paths.split(p)
    assert t["w"].lora_magnitude is not None and t["w"].base is None
    assert sorted(p for p, _ in paths.leaves_with_paths(t)) == ["w/lora_a", "w/lora_b", "w/lora_magnitude"]


def test_qdora_matches_peft_on_the_dequantized_base():
    pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
    q = quant.quantize({"w": jnp.asarray(w)}, [quant.QuantRule(pattern="w", format="nf4", block_size=4)])["w"]
    wq = np.asarray(lora.dense(q))
    model, layer = peft_linear(wq.T, use_dora=True, init_lora_weights=False)
    x = rng.normal(size=(5, D_IN)).astype(np.float32)
    cot = rng.normal(size=(5, D_OUT)).astype(np.float32)
    ref_y, ref_g = torch_grads(model, layer, x, cot)
    y, g = our_grads(node_from(layer, base=q), x, cot)
    assert rel(y, ref_y) <= 1e-5
    for k in ref_g:
        assert rel(g[k], ref_g[k]) <= 1e-5, k


def test_merge_equals_forward_and_unmerge_round_trips():
    rng = np.random.default_rng(4)
    p = dora.init(jax.random.key(0), {"w": jnp.asarray(rng.normal(size=(D_IN, D_OUT)).astype(np.float32))},
                  [lora.LoraRule(pattern="w", rank=R)])
    p = {"w": dataclasses.replace(p["w"], lora_b=jnp.asarray(rng.normal(size=(R, D_OUT)).astype(np.float32)),
                                  lora_magnitude=p["w"].lora_magnitude * 1.3)}
    x = jnp.asarray(rng.normal(size=(3, D_IN)).astype(np.float32))
    merged = lora.merge(p)
    np.testing.assert_allclose(x @ merged["w"], x @ p["w"], rtol=1e-5, atol=1e-5)
    back = dora.unmerge(merged, paths.split(p)[0], dora.merge_norms(p))
    np.testing.assert_allclose(back["w"].base, p["w"].base, rtol=1e-4, atol=1e-5)
    with pytest.raises(LoraError, match="no norm for 'w'"):
        dora.unmerge(merged, p, {})


def test_dora_refuses_what_it_cannot_be():
    p = dora.init(jax.random.key(0), {"w": jnp.ones((8, 6))}, [lora.LoraRule(pattern="w", rank=2)])
    with pytest.raises(LoraError, match="tied output head"):
        _ = p["w"].T
    with pytest.raises(LoraError, match="row lookup"):
        p["w"][jnp.array([0])]
    with pytest.raises(LoraError, match="in_ndim=2"):
        dora.init(jax.random.key(0), {"w": jnp.ones((2, 4, 6))}, [lora.LoraRule(pattern="w", rank=2, in_dims=2)])


def _trained_dora(params, config):
    rules = [lora.LoraRule(pattern=r"layers/\d+/attn/(q|v)_proj/kernel", rank=4, alpha=8),
             lora.LoraRule(pattern=r"layers/1/mlp/down_proj/kernel", rank=2, alpha=3)]
    p = dora.init(jax.random.key(1), params, rules)
    rng = np.random.default_rng(5)

    def perturb(path, x):  # a "trained" adapter: B and m away from their init
        if not dora.is_dora(x):
            return x
        b = jnp.asarray(0.05 * rng.normal(size=x.lora_b.shape).astype(np.float32))
        m = x.lora_magnitude * jnp.asarray(1 + 0.1 * rng.normal(size=x.lora_magnitude.shape).astype(np.float32))
        return dataclasses.replace(x, lora_b=b, lora_magnitude=m)

    flat, treedef = jax.tree_util.tree_flatten_with_path(p, is_leaf=lora.is_node)
    return treedef.unflatten([perturb(paths.path_str(k), x) for k, x in flat])


def test_export_peft_dora_loads_in_peft_and_imports_back(tmp_path, hf_llama):
    peft = pytest.importorskip("peft")
    d, params, config, _ = hf_llama
    trained = _trained_dora(params, config)
    ours = np.asarray(llama.apply(trained, jnp.asarray(TOKENS), config))
    assert rel(ours, llama.apply(params, jnp.asarray(TOKENS), config)) > 1e-3
    out = io_peft.export_peft(tmp_path / "peft", trained, base_model_name_or_path=str(d))
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    model = peft.PeftModel.from_pretrained(load_torch(d), str(out)).eval()
    assert rel(ours, torch_logits(model)) <= 1e-5
    back = io_peft.import_peft(out, params, "llama")
    assert dora.is_dora(back["layers"][0]["attn"]["q_proj"]["kernel"])
    np.testing.assert_allclose(llama.apply(back, jnp.asarray(TOKENS), config), ours, rtol=1e-5, atol=1e-5)


def test_import_dora_trained_by_peft(tmp_path, hf_llama):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    d, params, config, _ = hf_llama
    model = peft_trained(d, peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "up_proj"], use_dora=True,
                                            task_type="CAUSAL_LM"), tmp_path / "theirs")
    back = io_peft.import_peft(tmp_path / "theirs", params, "llama")
    assert rel(llama.apply(back, jnp.asarray(TOKENS), config), torch_logits(model)) <= 1e-5


def test_dora_export_to_gguf_is_a_clear_error(tmp_path):
    from lora_jax.io import gguf_adapter

    cfg = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)
    p = dora.init(jax.random.key(0), llama.init(jax.random.key(0), cfg),
                  [lora.LoraRule(pattern=r"layers/0/attn/q_proj/kernel", rank=2)])
    with pytest.raises(LoraError, match=r"layers/0/attn/q_proj/kernel holds a DoraWeight, which llama.cpp cannot "
                                        r"apply .*merge DoRA"):
        gguf_adapter.export_gguf_adapter(p, cfg, tmp_path / "a.gguf", architecture="llama")
    assert not (tmp_path / "a.gguf").exists()
    from lora_jax.methods import vera

    v = vera.init(jax.random.key(0), llama.init(jax.random.key(0), cfg),
                  [lora.LoraRule(pattern=r"layers/0/attn/q_proj/kernel", rank=2)])
    with pytest.raises(LoraError, match=r"holds a VeraWeight, which llama.cpp cannot apply"):
        gguf_adapter.export_gguf_adapter(v, cfg, tmp_path / "a.gguf", architecture="llama")
