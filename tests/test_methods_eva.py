"""EVA: PCA against PEFT's IncrementalPCA, the ranks, inputs from a forward pass, PEFT's EVA, export both ways."""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import TOKENS, load_torch, rel, torch_logits

from lora_jax import lora
from lora_jax.errors import LoraError
from lora_jax.io import peft as io_peft
from lora_jax.methods import eva, pissa
from lora_jax.models import llama


def test_pca_matches_peft_incremental_pca_on_one_batch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.utils.incremental_pca import IncrementalPCA

    x = np.random.default_rng(0).normal(size=(200, 12)) * np.linspace(3, 0.5, 12)
    ref = IncrementalPCA(n_components=6).partial_fit(torch.tensor(x, dtype=torch.float64))  # one batch, as a hook
    comps, ratio = eva.pca(x)
    np.testing.assert_allclose(ratio[:6], ref.explained_variance_ratio_.numpy(), rtol=1e-8)
    signs = np.sign(np.sum(comps[:6] * ref.components_.numpy(), axis=1))
    np.testing.assert_allclose(comps[:6] * signs[:, None], ref.components_.numpy(), atol=1e-8)


def test_rank_distribution_takes_the_largest_ratios():
    ratios = {"a": np.array([0.5, 0.3, 0.1]), "b": np.array([0.4, 0.35, 0.05]), "c": np.array([0.2, 0.01])}
    assert eva.rank_distribution(ratios, 4) == {"a": 2, "b": 2, "c": 0}
    assert eva.rank_distribution(ratios, 5) == {"a": 2, "b": 2, "c": 1}


def test_init_from_a_forward_pass():
    cfg = llama.LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32)
    params = llama.init(jax.random.key(0), cfg)
    rules = [lora.LoraRule(pattern=r"layers/\d+/attn/(q|v)_proj/kernel", rank=2, alpha=4)]
    paths = [f"layers/{i}/attn/{m}_proj/kernel" for i in range(2) for m in "qv"]
    batches = [jax.random.randint(jax.random.key(i), (2, 8), 0, 64) for i in range(2)]
    inputs = eva.collect_inputs(lambda p, t: llama.apply(p, t, cfg), params, batches, paths)
    assert {k: v.shape for k, v in inputs.items()} == {p: (32, 16) for p in paths}  # 2 batches x 2 x 8 tokens
    np.testing.assert_array_equal(inputs["layers/0/attn/q_proj/kernel"], inputs["layers/0/attn/v_proj/kernel"])
    p = eva.init(params, rules, inputs)
    nodes = dict(lora.nodes(p))
    assert sum(n.rank for n in nodes.values()) <= 8 and all(n.scale == 2.0 for n in nodes.values())
    tokens = batches[0]
    np.testing.assert_allclose(llama.apply(p, tokens, cfg), llama.apply(params, tokens, cfg), atol=1e-5)
    n = nodes["layers/1/attn/q_proj/kernel"]
    comps, _ = eva.pca(inputs["layers/1/attn/q_proj/kernel"])
    np.testing.assert_allclose(np.abs(np.asarray(n.lora_a).T), np.abs(comps[: n.rank]), atol=1e-5)


def test_bad_inputs():
    w = {"a": jnp.ones((8, 4))}
    with pytest.raises(LoraError, match="no inputs for 'a'"):
        eva.init(w, [lora.LoraRule(pattern="a", rank=2)], {})
    with pytest.raises(LoraError, match="width 5"):
        eva.init(w, [lora.LoraRule(pattern="a", rank=2)], {"a": np.ones((10, 5))})
    with pytest.raises(LoraError, match="rho must be >= 1"):
        eva.init(w, [lora.LoraRule(pattern="a", rank=2)], {"a": np.ones((10, 8))}, rho=0.5)


def test_collect_inputs_drops_padding_with_the_attention_mask():
    cfg = llama.LlamaConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    params = llama.init(jax.random.key(0), cfg)
    path = "layers/0/mlp/down_proj/kernel"
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 8), 1, 64))
    mask = np.array([[1] * 8, [1] * 5 + [0] * 3])
    padded = eva.collect_inputs(lambda p, t: llama.apply(p, t, cfg, attention_mask_BT=mask), params, [tokens],
                                [path], masks=[mask])[path]
    alone = [eva.collect_inputs(lambda p, t: llama.apply(p, t, cfg), params, [t], [path])[path]
             for t in (tokens[:1], tokens[1:, :5])]  # each example without padding
    assert padded.shape == (13, 32)
    np.testing.assert_allclose(padded, np.concatenate(alone), atol=1e-5)


EVA_TARGETS = r"layers/\d+/(attn/q_proj|attn/o_proj|mlp/down_proj)/kernel"  # inputs all distinct: no rank ties


@pytest.fixture(scope="module")
def eva_pair(hf_llama):
    """PEFT's EVA (``initialize_lora_eva_weights``) and ours on one batch of 8 x 16 tokens, two rows padded.

    r=8, rho=5: each layer offers 40 components. PEFT's IncrementalPCA uses ``torch.svd_lowrank`` with
    ``q = 2 * 40``, which is at least every d_in here (48, 80), so its PCA is exact, not randomized; with one
    batch PEFT fits it twice (its convergence check) and the components are those of that batch.
    """
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    d, params, config, _ = hf_llama
    tokens = np.random.default_rng(0).integers(1, 96, size=(8, 16))
    mask = np.ones_like(tokens)
    mask[1, 11:], mask[5, 13:] = 0, 0  # padding: dropped by both
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "down_proj"],
                          init_lora_weights="eva", eva_config=peft.EvaConfig(rho=5), task_type="CAUSAL_LM")
    model = peft.get_peft_model(load_torch(d), cfg)
    batch = {"input_ids": torch.tensor(tokens), "attention_mask": torch.tensor(mask)}
    peft.initialize_lora_eva_weights(model, dataloader=[batch], show_progress_bar=False)
    rules = [lora.LoraRule(pattern=EVA_TARGETS, rank=8, alpha=16)]
    paths = [p for p, _ in lora.nodes(lora.init(jax.random.key(0), params, rules))]
    apply = lambda p, t: llama.apply(p, t, config, attention_mask_BT=jnp.asarray(mask))  # noqa: E731
    inputs = eva.collect_inputs(apply, params, [jnp.asarray(tokens)], paths, masks=[mask])
    return model.eval(), eva.init(params, rules, inputs, rho=5)


def _peft_factors(model) -> dict[str, tuple[np.ndarray, float]]:
    """``{our kernel path: (lora_A (r, d_in), scaling)}`` of a PEFT model's LoRA layers."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = io_peft.kernel_path(name.removeprefix("base_model.model."), "llama")
            out[path] = (module.lora_A["default"].weight.detach().numpy(), float(module.scaling["default"]))
    return out


def test_matches_peft_eva_ranks_and_components(eva_pair):
    model, ours = eva_pair
    theirs, nodes = _peft_factors(model), dict(lora.nodes(ours))
    ranks = {p: n.rank for p, n in nodes.items()}
    assert {p: a.shape[0] for p, (a, _) in theirs.items()} == ranks  # the same redistribution (rank 0: unadapted)
    assert sum(ranks.values()) == 8 * 6 and len(set(ranks.values())) > 1  # the budget moved between layers
    for p, (a, scaling) in theirs.items():
        mine = np.asarray(nodes[p].lora_a).T
        signs = np.sign(np.sum(mine * a, axis=1))  # principal components are defined up to sign
        np.testing.assert_allclose(mine * signs[:, None], a, atol=1e-5, err_msg=p)
        assert nodes[p].scale == pytest.approx(scaling)  # alpha / r, PEFT's adjust_scaling_factors


def _perturbed(params, seed):
    rng = np.random.default_rng(seed)
    return pissa.map_nodes(params, lambda path, n: dataclasses.replace(
        n, lora_b=n.lora_b + jnp.asarray(0.05 * rng.normal(size=n.lora_b.shape), jnp.float32)))


def test_eva_export_loads_in_peft_and_peft_eva_imports_back(tmp_path, hf_llama, eva_pair):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    d, params, config, _ = hf_llama
    model, ours = eva_pair
    trained = _perturbed(ours, 1)  # a trained adapter: B != 0
    want = np.asarray(llama.apply(trained, jnp.asarray(TOKENS), config))
    out = io_peft.export_peft(tmp_path / "ours", trained, base_model_name_or_path=str(d))
    loaded = peft.PeftModel.from_pretrained(load_torch(d), str(out)).eval()
    assert rel(want, torch_logits(loaded)) <= 1e-5
    assert {p: a.shape[0] for p, (a, _) in _peft_factors(loaded).items()} == {p: n.rank for p, n in lora.nodes(ours)}
    theirs = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = io_peft.import_peft(tmp_path / "theirs", params, "llama")
    assert {p: n.rank for p, n in lora.nodes(back)} == {p: a.shape[0] for p, (a, _) in _peft_factors(theirs).items()}
    assert rel(llama.apply(back, jnp.asarray(TOKENS), config), torch_logits(theirs)) <= 1e-5
