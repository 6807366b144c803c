"""PiSSA and OLoRA against PEFT: init (factors, residual), forward and gradients, QPiSSA, conversion to plain LoRA."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import TOKENS, load_torch, rel, torch_logits
from peft_layers import ALPHA, D_IN, D_OUT, R, node_from, our_grads, peft_linear, tensor, torch_grads

from lora_jax import lora, quant
from lora_jax.errors import LoraError
from lora_jax.io import peft as io_peft
from lora_jax.methods import pissa
from lora_jax.models import llama


def _w(seed=0):
    return np.random.default_rng(seed).normal(size=(D_OUT, D_IN)).astype(np.float32)  # torch layout (out, in)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_init_matches_peft(method):
    w = _w()
    _, layer = peft_linear(w, init_lora_weights=method)
    a, b, res = pissa.factors(jax.random.key(0), jnp.asarray(w.T), R, ALPHA / R, method)
    assert rel(res, layer.base_layer.weight.detach().numpy().T) <= 1e-5  # the same residual base
    pa, pb = tensor(layer, "lora_A"), tensor(layer, "lora_B")
    assert rel(a @ b, pa @ pb) <= 1e-5
    signs = np.sign(np.sum(np.asarray(a) * pa, axis=0))  # singular vectors are defined up to sign
    assert rel(np.asarray(a) * signs, pa) <= 1e-4 and rel(np.asarray(b) * signs[:, None], pb) <= 1e-4
    assert rel(res, w.T) > 1e-2  # the principal part moved out


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_forward_and_gradients_match_peft(method):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    model, layer = peft_linear(_w(1), init_lora_weights=method)
    with torch.no_grad():  # a trained adapter, not the init one
        layer.lora_B["default"].weight.add_(torch.tensor(0.1 * rng.normal(size=(D_OUT, R)), dtype=torch.float32))
    x, cot = rng.normal(size=(5, D_IN)).astype(np.float32), rng.normal(size=(5, D_OUT)).astype(np.float32)
    ref_y, ref_g = torch_grads(model, layer, x, cot)
    y, g = our_grads(node_from(layer), x, cot)
    assert rel(y, ref_y) <= 1e-5
    assert set(g) == set(ref_g) == {"lora_a", "lora_b"}
    for k in g:
        assert rel(g[k], ref_g[k]) <= 1e-5, k


def test_model_unchanged_at_init_and_fast_svd_close_to_full():
    u, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(64, 64)))
    v, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(48, 48)))
    w = jnp.asarray((u[:, :48] * (0.7 ** np.arange(48))) @ v.T, jnp.float32)  # decaying spectrum
    rules = [lora.LoraRule(pattern="w", rank=4, alpha=8)]
    full = pissa.init(jax.random.key(0), {"w": w}, rules)
    fast = pissa.init(jax.random.key(0), {"w": w}, rules, niter=8)
    np.testing.assert_allclose(lora.merge(full)["w"], w, atol=1e-5)
    np.testing.assert_allclose(lora.merge(fast)["w"], w, atol=1e-5)
    err_full, err_fast = (float(jnp.linalg.norm(p["w"].base)) for p in (full, fast))
    assert err_fast <= err_full * 1.01  # the randomized SVD finds the same principal subspace here
    rough = pissa.init(jax.random.key(0), {"w": w}, rules, niter=0)
    assert float(jnp.linalg.norm(rough["w"].base)) > err_full * 1.5  # no iterations: visibly worse


def test_qpissa_quantizes_the_residual_and_beats_plain_qlora():
    w = jnp.asarray(np.random.default_rng(4).standard_t(3, size=(128, 64)).astype(np.float32))  # heavy tails
    qr = [quant.QuantRule(pattern="w", format="nf4", block_size=64)]
    p = pissa.init(jax.random.key(0), {"w": w}, [lora.LoraRule(pattern="w", rank=8)], quant_rules=qr)
    assert isinstance(p["w"].base, quant.QTensor)
    qlora_err = float(jnp.linalg.norm(w - lora.dense(quant.quantize({"w": w}, qr)["w"])))
    assert float(jnp.linalg.norm(w - lora.merge(p)["w"])) < qlora_err


def test_bad_inputs():
    w = {"w": jnp.ones((8, 6))}
    with pytest.raises(LoraError, match="takes none"):
        pissa.init(jax.random.key(0), w, [lora.LoraRule(pattern="w", rank=2)], method="olora", niter=2)
    with pytest.raises(LoraError, match="method must be one of"):
        pissa.init(jax.random.key(0), w, [lora.LoraRule(pattern="w", rank=2)], method="svd")
    q = quant.quantize({"w": jnp.ones((64, 8))}, [quant.QuantRule(pattern="w")])
    with pytest.raises(LoraError, match="needs the float weight"):
        pissa.init(jax.random.key(0), q, [lora.LoraRule(pattern="w", rank=2)])
    with pytest.raises(LoraError, match="no initial adapter"):
        pissa.to_plain_lora(lora.init(jax.random.key(0), w, [lora.LoraRule(pattern="w", rank=2)]), w)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_plain_lora_export_works_on_the_untouched_base(tmp_path, hf_llama, method):
    peft = pytest.importorskip("peft")
    d, params, config, _ = hf_llama
    rules = [lora.LoraRule(pattern=r"layers/\d+/(attn/q_proj|mlp/up_proj)/kernel", rank=4, alpha=8)]
    initial = pissa.init(jax.random.key(0), params, rules, method=method)
    rng = np.random.default_rng(5)
    trained = pissa.map_nodes(initial, lambda p, n: dataclasses.replace(
        n, lora_b=n.lora_b + jnp.asarray(0.05 * rng.normal(size=n.lora_b.shape), jnp.float32)))
    ours = np.asarray(llama.apply(trained, jnp.asarray(TOKENS), config))
    assert rel(ours, llama.apply(params, jnp.asarray(TOKENS), config)) > 1e-3
    plain = pissa.to_plain_lora(trained, initial, params)
    assert plain["layers"][0]["attn"]["q_proj"]["kernel"].rank == 8
    np.testing.assert_allclose(llama.apply(plain, jnp.asarray(TOKENS), config), ours, rtol=1e-4, atol=1e-4)
    out = io_peft.export_peft(tmp_path / "peft", plain, base_model_name_or_path=str(d))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    model = peft.PeftModel.from_pretrained(load_torch(d), str(out)).eval()  # the untouched base
    assert rel(ours, torch_logits(model)) <= 1e-4


def test_peft_converted_pissa_adapter_imports(tmp_path, hf_llama):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    d, params, config, _ = hf_llama
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    model = peft.get_peft_model(load_torch(d), peft.LoraConfig(**cfg))
    model.save_pretrained(str(tmp_path / "init"))  # PEFT's recipe: keep the initial adapter ...
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "conv"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    back = io_peft.import_peft(tmp_path / "conv", params, "llama")  # ... and read the plain-LoRA conversion
    assert back["layers"][0]["attn"]["q_proj"]["kernel"].rank == 8
    assert rel(llama.apply(back, jnp.asarray(TOKENS), config), torch_logits(model)) <= 1e-4
