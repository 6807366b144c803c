"""VeRA against PEFT: forward and gradients of both vectors, export/import of PEFT VeRA folders, shape errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import TOKENS, load_torch, rel, torch_logits
from peft_layers import D_IN, D_OUT, R

from lora_jax import lora, paths
from lora_jax.errors import LoraError
from lora_jax.methods import select, vera
from lora_jax.models import llama


def _peft_vera(w_out_in):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    net = torch.nn.Sequential(torch.nn.Linear(D_IN, D_OUT, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(w_out_in))
    model = peft.get_peft_model(net, peft.VeraConfig(r=R, target_modules=["0"], save_projection=True))
    layer = model.base_model.model[0]
    with torch.no_grad():  # trained vectors (lambda_b = 0 at init would zero lambda_d's gradient)
        layer.vera_lambda_b["default"].copy_(torch.linspace(-1, 1, D_OUT))
        layer.vera_lambda_d["default"].copy_(torch.linspace(0.5, 2, R))
    return model, layer


def test_forward_and_gradients_match_peft():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    model, layer = _peft_vera(rng.normal(size=(D_OUT, D_IN)).astype(np.float32))
    x, cot = rng.normal(size=(5, D_IN)).astype(np.float32), rng.normal(size=(5, D_OUT)).astype(np.float32)
    out = model(torch.tensor(x))
    (out * torch.tensor(cot)).sum().backward()
    node = lora.LoraWeight(jnp.asarray(layer.base_layer.weight.detach().numpy().T), None, None)
    lam_d, lam_b = (getattr(layer, k)["default"].detach().numpy() for k in ("vera_lambda_d", "vera_lambda_b"))
    node = vera.from_shared(node, layer.vera_A["default"].numpy(), layer.vera_B["default"].numpy(), lam_d, lam_b)
    t, f = paths.split({"w": node})

    def loss(t):
        y = jnp.asarray(x) @ paths.combine(t, f)["w"]
        return jnp.sum(y * jnp.asarray(cot)), y

    (_, y), g = jax.value_and_grad(loss, has_aux=True)(t)
    assert rel(y, out.detach().numpy()) <= 1e-5
    assert rel(g["w"].vera_lambda_d, layer.vera_lambda_d["default"].grad.numpy()) <= 1e-5
    assert rel(g["w"].vera_lambda_b, layer.vera_lambda_b["default"].grad.numpy()) <= 1e-5
    assert g["w"].lora_a is None and g["w"].base is None  # the shared matrices stay frozen
    plain = vera.to_plain_lora({"w": node})["w"]
    np.testing.assert_allclose(jnp.asarray(x) @ plain, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora.merge({"w": node})["w"], lora.merge({"w": plain})["w"], rtol=1e-6, atol=1e-6)


def test_init_is_the_base_and_shares_one_pair():
    base = {"q": jnp.ones((8, 4)), "v": jnp.ones((6, 8))}
    p = vera.init(jax.random.key(0), base, [lora.LoraRule(pattern="q|v", rank=2)])
    np.testing.assert_allclose(jnp.ones((1, 8)) @ p["q"], jnp.ones((1, 8)) @ base["q"])
    np.testing.assert_array_equal(p["q"].lora_a[:6], p["v"].lora_a)  # slices of one vera_A (rows = inputs here)
    np.testing.assert_array_equal(p["q"].lora_b, p["v"].lora_b[:, :4])


def test_export_loads_in_peft_and_imports_back(tmp_path, hf_llama):
    peft = pytest.importorskip("peft")
    d, params, config, _ = hf_llama
    p = vera.init(jax.random.key(0), params, [lora.LoraRule(pattern=r"layers/\d+/(attn/q_proj|mlp/down_proj)/kernel",
                                                             rank=4)])
    rng = np.random.default_rng(1)
    p = paths.combine(jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), jnp.float32) * 0.5,
                                   paths.split(p)[0]), paths.split(p)[1])
    ours = np.asarray(llama.apply(p, jnp.asarray(TOKENS), config))
    assert rel(ours, llama.apply(params, jnp.asarray(TOKENS), config)) > 1e-3
    out = vera.export_peft(tmp_path / "v", p, base_model_name_or_path=str(d))
    model = peft.PeftModel.from_pretrained(load_torch(d), str(out)).eval()
    assert rel(ours, torch_logits(model)) <= 1e-5
    model.save_pretrained(str(tmp_path / "theirs"))  # PEFT's own file of the same adapter
    back = vera.import_peft(tmp_path / "theirs", params)
    np.testing.assert_allclose(llama.apply(back, jnp.asarray(TOKENS), config), ours, rtol=1e-5, atol=1e-5)


def test_mismatched_shapes_and_bad_rules_are_errors():
    base = lora.LoraWeight(jnp.ones((8, 6)), None, None)
    with pytest.raises(LoraError, match=r"vera_A needs >= 8 columns"):
        vera.from_shared(base, np.ones((2, 7)), np.ones((6, 2)), np.ones(2), np.ones(6))
    with pytest.raises(LoraError, match=r"shapes do not fit a base of shape \(8, 6\).*lambda_d \(3,\)"):
        vera.VeraWeight(jnp.ones((8, 6)), jnp.ones((8, 2)), jnp.ones((2, 6)), vera_lambda_d=jnp.ones(3),
                        vera_lambda_b=jnp.ones(6))
    with pytest.raises(LoraError, match="every rule needs the same rank"):
        vera.init(jax.random.key(0), {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))},
                  [lora.LoraRule(pattern="a", rank=1), lora.LoraRule(pattern="b", rank=2)])
    with pytest.raises(LoraError, match="takes no alpha"):
        vera.init(jax.random.key(0), {"a": jnp.ones((4, 4))}, [lora.LoraRule(pattern="a", rank=1, alpha=3)])


def test_formats_that_cannot_hold_a_method_refuse_it(tmp_path):
    from lora_jax.io import adapters
    from lora_jax.methods import dora

    base = {"w": jnp.ones((8, 6))}
    d = dora.init(jax.random.key(0), base, [lora.LoraRule(pattern="w", rank=2)])
    with pytest.raises(LoraError, match=r"GGUF cannot hold the DORA adapter at 'w'.*merge it into the base"):
        select.check_exportable(d, "GGUF")
    select.check_exportable(lora.init(jax.random.key(0), base, [lora.LoraRule(pattern="w", rank=2)]), "GGUF")
    v = vera.init(jax.random.key(0), base, [lora.LoraRule(pattern="w", rank=2)])
    with pytest.raises(LoraError, match=r"cannot hold the VERA adapter at 'w'.*to_plain_lora"):
        adapters.save_adapter(tmp_path / "a", v)


def test_counts_and_lora_plus_see_every_trainable_vector():
    import optax

    from lora_jax import optim
    from lora_jax.methods import dora

    base = {"w": jnp.ones((8, 6))}
    v = vera.init(jax.random.key(0), base, [lora.LoraRule(pattern="w", rank=2)])
    assert lora.count(v).trainable == 2 + 6  # lambda_d, lambda_b; not the frozen projections
    d = dora.init(jax.random.key(0), base, [lora.LoraRule(pattern="w", rank=2)])
    assert lora.count(d).trainable == 8 * 2 + 2 * 6 + 6
    tx = optim.lora_plus(optax.sgd, 1.0, ratio=4.0)
    t, _ = paths.split(d)
    grads = jax.tree.map(jnp.ones_like, t)
    updates, _ = tx.update(grads, tx.init(t), t)
    assert float(updates["w"].lora_magnitude[0]) == -4.0 and float(updates["w"].lora_a[0, 0]) == -1.0  # m at B's rate


def test_dora_and_vera_under_scan_equal_unrolled():
    from lora_jax.methods import dora
    from lora_jax.models import stacking

    cfg = llama.LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32)
    params = llama.init(jax.random.key(0), cfg)
    rules = [lora.LoraRule(pattern=r"layers/\d+/(attn/q_proj|mlp/down_proj)/kernel", rank=2, dropout=0.1)]
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
    for init in (dora.init, vera.init):
        p = init(jax.random.key(0), params, rules)
        t, f = paths.split(p)
        p = paths.combine(jax.tree.map(lambda v: v + 0.1, t), f)  # away from the base model
        stacked = lora.with_dropout_keys(stacking.stack_layers(p), jax.random.key(2))  # dropout keys: replace works
        np.testing.assert_allclose(llama.apply(stacking.stack_layers(p), tokens, cfg), llama.apply(p, tokens, cfg),
                                   rtol=1e-5, atol=1e-5)
        assert type(stacked["layers"]["attn"]["q_proj"]["kernel"]) is type(p["layers"][0]["attn"]["q_proj"]["kernel"])
