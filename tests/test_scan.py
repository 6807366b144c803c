"""Stacked layers under lax.scan: same numbers as the unrolled model for plain, LoRA and QLoRA params;
remat policies; lora.init on stacked kernels; adapter files, generation and the runner with stacked params."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import adapters, generate, lora, paths, quant, train
from lora_jax.errors import ConfigError, LoraError
from lora_jax.models import llama
from lora_jax.models.stacking import n_layers, per_layer_dropout_keys, stack_layers, unstack_layers

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, qkv_bias=True)
SEVEN = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
QRULES = [lj.QuantRule(pattern=SEVEN, format="nf4", block_size=32, double_quant=True)]


def with_random_b(params, seed=7):
    """B away from zero, so the adapters change the model."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=lora.is_lora)
    out = [dataclasses.replace(x, lora_b=0.3 * jax.random.normal(jax.random.key(seed + i), x.lora_b.shape))
           if lora.is_lora(x) else x for i, x in enumerate(leaves)]
    return treedef.unflatten(out)


@pytest.fixture(scope="module")
def base():
    p = llama.init(jax.random.key(0), CFG)
    p["embed"] = p["embed"] * 8
    return p


@pytest.fixture(scope="module")
def batch():
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, CFG.vocab_size)
    mask = jnp.ones((2, 24)).at[1, :5].set(0)
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": mask.at[1, 5].set(0)}


def variant(base, kind):
    if kind == "plain":
        return base
    p = quant.quantize(base, QRULES) if kind == "qlora" else base
    return with_random_b(lora.init(jax.random.key(2), p, [lj.LoraRule(pattern=SEVEN, rank=4, alpha=8)]))


def grads_of(params, batch, **kw):
    """Loss and gradient: of the LoRA factors where there are adapters, else of every weight."""
    is_plain = not lora.nodes(params)
    t, f = paths.split(params, paths.everything if is_plain else paths.is_trainable_leaf)

    def loss(t):
        return llama.loss(paths.combine(t, f), batch, CFG, **kw)[0]

    return jax.jit(jax.value_and_grad(loss))(t)


@pytest.mark.parametrize("kind", ["plain", "lora", "qlora"])
def test_scanned_layers_equal_unrolled_loss_and_gradients(base, batch, kind):
    params = variant(base, kind)
    stacked = stack_layers(params)
    jaxpr = str(jax.make_jaxpr(lambda p: llama.loss(p, batch, CFG)[0])(stacked))
    assert "scan[" in jaxpr and "scan[" not in str(jax.make_jaxpr(lambda p: llama.loss(p, batch, CFG)[0])(params))
    loss_u, g_u = grads_of(params, batch)
    loss_s, g_s = grads_of(stacked, batch)
    assert abs(float(loss_s) - float(loss_u)) <= 1e-5 * abs(float(loss_u))
    g_s = unstack_layers(g_s)
    assert jax.tree.structure(g_s) == jax.tree.structure(g_u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_s, g_u)


def test_stacking_lora_and_qtensor_leaves_gives_a_leading_layer_axis(base):
    params = variant(base, "qlora")
    stacked = stack_layers(params)
    node = stacked["layers"]["attn"]["q_proj"]["kernel"]
    assert node.lora_a.shape == (3, 32, 4) and node.lora_b.shape == (3, 4, 32)
    q = node.base
    assert q.codes.shape == (3, 16, 32) and q.scales.shape == (3, 1, 32) and q.scale_mean.shape == (3,)
    assert q.stored_shape == (32, 32) and n_layers(stacked) == 3
    assert stack_layers(stacked) is stacked and unstack_layers(params) is params  # idempotent
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), params)
    # Counting sees every layer's elements in either layout.
    assert lora.count(stacked) == lora.count(params)
    assert quant.footprint(stacked) == quant.footprint(params)


def test_layers_that_differ_cannot_stack(base):
    ranks = [lj.LoraRule(pattern=r"layers/0/attn/q_proj/kernel", rank=2),
             lj.LoraRule(pattern=r"layers/\d+/attn/q_proj/kernel", rank=4)]
    with pytest.raises(LoraError, match=r"layer 1 attn/q_proj/kernel: LoraWeight\(rank=4.*layer 0 attn/q_proj/kernel: "
                                        r"LoraWeight\(rank=2"):
        stack_layers(lora.init(jax.random.key(0), base, ranks))
    some = [lj.LoraRule(pattern=r"layers/[01]/attn/q_proj/kernel", rank=2)]
    with pytest.raises(LoraError, match=r"layer 2 attn/q_proj/kernel: array \(32, 32\).*run such a model unrolled"):
        stack_layers(lora.init(jax.random.key(0), base, some))


@pytest.mark.parametrize("remat", ["full", "dots", True])
@pytest.mark.parametrize("layout", ["unrolled", "stacked"])
def test_remat_policies_keep_loss_and_gradients(base, batch, remat, layout):
    params = variant(base, "lora")
    params = stack_layers(params) if layout == "stacked" else params
    ref_loss, ref = grads_of(params, batch, remat=False)
    loss, g = grads_of(params, batch, remat=remat)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, ref)
    # The policy is in the program: checkpointed layers, with the dots policy where asked for.
    jaxpr = str(jax.make_jaxpr(lambda p: llama.loss(p, batch, CFG, remat=remat)[0])(params))
    policies = re.findall(r"policy=(\w+)", jaxpr)
    assert policies and set(policies) == {"DotsSaveable" if remat == "dots" else "None"}
    assert "remat" not in str(jax.make_jaxpr(lambda p: llama.loss(p, batch, CFG)[0])(params))


def test_remat_offload_is_refused_on_cpu_and_unknown_names_are_errors(base, batch):
    with pytest.raises(ConfigError, match="on the CPU they live in host memory already"):
        llama.loss(base, batch, CFG, remat="offload")
    with pytest.raises(ConfigError, match="train.remat: unknown value 'some'"):
        llama.loss(base, batch, CFG, remat="some")
    from lora_jax.config import TrainConfig

    assert TrainConfig(remat=True).remat == "full" and TrainConfig(remat=False).remat == "none"
    with pytest.raises(ConfigError, match="train.remat: unknown value 'dot'"):
        TrainConfig(remat="dot")


def test_lora_init_on_stacked_kernels_is_explicit(base):
    stacked = stack_layers(base)
    path = "layers/attn/q_proj/kernel"
    with pytest.raises(LoraError, match=r"\(3, 32, 32\), a kernel under a stacked 'layers' node.*stacked_axes=1"):
        lora.init(jax.random.key(0), stacked, [lj.LoraRule(pattern=path, rank=4)])
    with pytest.raises(LoraError, match=r"written for the paths of single layers \(it matches 'layers/0/attn/"):
        lora.init(jax.random.key(0), stacked, [lj.LoraRule(pattern=SEVEN, rank=4)])
    with pytest.raises(LoraError, match=r"written for the paths of single layers \(it matches 'layers/0/attn/q_proj"):
        lora.init(jax.random.key(0), stacked, [lj.LoraRule(pattern=r"layers/0/attn/q_proj/kernel", rank=4)])
    adapted = lora.init(jax.random.key(0), stacked, [lj.LoraRule(pattern=path, rank=4, stacked_axes=1)])
    node = adapted["layers"]["attn"]["q_proj"]["kernel"]
    assert node.lora_a.shape == (3, 32, 4) and node.lora_b.shape == (3, 4, 32)
    a = np.asarray(node.lora_a)
    assert np.abs(a).max() <= 1 / np.sqrt(32) and np.abs(a).max() > 0.5 / np.sqrt(32)  # kaiming over d_in=32, not 3
    assert not np.allclose(a[0], a[1])  # each layer its own factors
    # The scanned model with these adapters equals the unrolled model with the same factors per layer.
    adapted = with_random_b(adapted)
    tokens = jax.random.randint(jax.random.key(5), (1, 16), 0, CFG.vocab_size)
    np.testing.assert_allclose(llama.apply(adapted, tokens, CFG), llama.apply(unstack_layers(adapted), tokens, CFG),
                               rtol=1e-5, atol=1e-5)


def test_lora_init_with_stacked_axes_on_a_stacked_quantized_base(base):
    stacked = stack_layers(quant.quantize(base, QRULES))
    rule = lj.LoraRule(pattern="layers/mlp/down_proj/kernel", rank=2, stacked_axes=1)
    node = lora.init(jax.random.key(0), stacked, [rule])["layers"]["mlp"]["down_proj"]["kernel"]
    assert node.lora_a.shape == (3, 64, 2) and node.lora_b.shape == (3, 2, 32)
    with pytest.raises(LoraError, match=r"of shape \(3, 64, 32\), a kernel under a stacked 'layers' node"):
        lora.init(jax.random.key(0), stacked, [dataclasses.replace(rule, stacked_axes=0)])


def test_each_layer_gets_its_own_dropout_key_under_scan(base):
    params = lora.init(jax.random.key(0), base, [lj.LoraRule(pattern=SEVEN, rank=2, dropout=0.5)])
    stacked = lora.with_dropout_keys(stack_layers(params), jax.random.key(1))
    keys = per_layer_dropout_keys(stacked["layers"], 3)["attn"]["q_proj"]["kernel"].dropout_key
    data = np.asarray(jax.random.key_data(keys))
    assert data.shape[0] == 3 and len({d.tobytes() for d in data}) == 3


def test_adapter_from_a_scanned_run_saves_loads_and_generates_like_the_unrolled_model(base, tmp_path):
    rules = [lj.LoraRule(pattern=SEVEN, rank=4, alpha=8, dropout=0.1)]
    stacked = stack_layers(lora.init(jax.random.key(3), base, rules))
    tx = optax.adam(1e-2)
    step = train.make_train_step(lambda p, b: llama.loss(p, b, CFG), tx)
    state = train.init_state(stacked, tx, jax.random.key(4))
    tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, CFG.vocab_size)
    for _ in range(2):
        state, _ = step(state, {"tokens": tokens})
    trained = state.params
    adapters.save_adapter(tmp_path / "a", state.trainable, rules=rules)
    assert "layers/2/mlp/down_proj/kernel" in adapters.read_adapter_config(tmp_path / "a")["adapters"]  # per layer
    on_unrolled = adapters.load_adapter(tmp_path / "a", base)
    on_stacked = lj.io.load(tmp_path / "a", stack_layers(base))
    assert isinstance(on_stacked["layers"], dict) and isinstance(on_unrolled["layers"], list)
    want = llama.apply(trained, tokens, CFG)
    assert float(jnp.max(jnp.abs(want - llama.apply(base, tokens, CFG)))) > 1e-3  # training moved it
    np.testing.assert_allclose(llama.apply(on_unrolled, tokens, CFG), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(llama.apply(on_stacked, tokens, CFG), want, rtol=1e-5, atol=1e-5)
    # Generation (the KV-cache path runs unrolled) gives the same tokens from either layout.
    a = generate.generate(trained, CFG, [[1, 2, 3], [4, 5]], max_new_tokens=6).tokens
    b = generate.generate(on_unrolled, CFG, [[1, 2, 3], [4, 5]], max_new_tokens=6).tokens
    np.testing.assert_array_equal(a, b)


def test_runner_builds_stacked_params_with_model_scan_layers(base, batch):
    from lora_jax.config import ExperimentConfig, LoraConfig, ModelConfig, QuantConfig
    from lora_jax.runner import build

    model = build.LoadedModel("tiny", base, CFG, None)
    quantized = QuantConfig(block_size=32)
    cfg = ExperimentConfig(method="qlora", lora=LoraConfig(rank=4), quant=quantized)
    unrolled = build.build_params(cfg, model)
    stacked = build.build_params(dataclasses.replace(cfg, model=ModelConfig(scan_layers=True)), model)
    assert isinstance(stacked["layers"], dict) and stacked["layers"]["mlp"]["up_proj"]["kernel"].lora_a.shape == (
        3, 32, 4)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), unrolled)
    loss = build.loss_fn(CFG, cfg)
    assert abs(float(loss(stacked, batch)[0]) - float(loss(unrolled, batch)[0])) < 1e-5


def test_peft_and_hf_export_and_peft_import_take_either_layout(base, tmp_path):
    from lora_jax.io import peft as io_peft
    from lora_jax.models.export_hf import export_merged_hf

    adapted = variant(base, "lora")
    stacked = stack_layers(adapted)
    a = io_peft.export_peft(tmp_path / "a", adapted, base_model_name_or_path="tiny")
    b = io_peft.export_peft(tmp_path / "b", stacked, base_model_name_or_path="tiny")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # import onto a stacked base gives the stacked adapted tree, equal to importing onto the unrolled one
    back = io_peft.import_peft(a, stack_layers(base))
    assert isinstance(back["layers"], dict)
    want = stack_layers(io_peft.import_peft(a, base))
    jax.tree.map(np.testing.assert_array_equal, back, want)
    export_merged_hf(tmp_path / "m1", adapted, CFG)
    export_merged_hf(tmp_path / "m2", stacked, CFG)
    assert (tmp_path / "m1" / "model.safetensors").read_bytes() == (tmp_path / "m2" / "model.safetensors").read_bytes()
