"""LoRA nodes: init conventions, forward without materializing, merge, counts, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import lora
from lora_jax.models import llama

CFG = llama.LlamaConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
SEVEN = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"


def perturb_b(params, key, std=0.05):
    """Give every B a random value so the adapters do something."""
    flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=lora.is_node)
    out = []
    for i, x in enumerate(flat):
        if lora.is_lora(x):
            x = x.__class__(x.base, x.lora_a, std * jax.random.normal(jax.random.fold_in(key, i), x.lora_b.shape),
                            x.scale, x.in_ndim, x.dropout)
        out.append(x)
    return treedef.unflatten(out)


@pytest.fixture(scope="module")
def model():
    params = llama.init(jax.random.key(1), CFG)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, CFG.vocab_size)
    return params, tokens


def test_output_equals_base_at_init_bit_for_bit(model):
    params, tokens = model
    adapted = lora.init(jax.random.key(3), params, [lj.LoraRule(pattern=SEVEN, rank=4, alpha=8)])
    assert len(lora.nodes(adapted)) == 14
    base = llama.apply(params, tokens, CFG)
    np.testing.assert_array_equal(llama.apply(adapted, tokens, CFG), base)
    f = jax.jit(lambda p, t: llama.apply(p, t, CFG))
    np.testing.assert_array_equal(f(adapted, tokens), f(params, tokens))


def test_merged_equals_unmerged_and_unmerge_inverts(model):
    params, tokens = model
    rules = [lj.LoraRule(pattern=SEVEN, rank=4, alpha=8), lj.LoraRule(pattern="embed", rank=2)]
    adapted = perturb_b(lora.init(jax.random.key(3), params, rules), jax.random.key(4))
    out = llama.apply(adapted, tokens, CFG)
    merged = lj.merge(adapted)
    assert not any(lora.is_lora(x) for x in jax.tree.leaves(merged, is_leaf=lora.is_node))
    ref = llama.apply(merged, tokens, CFG)
    assert float(jnp.max(jnp.abs(out - llama.apply(params, tokens, CFG)))) > 1e-3  # adapters matter
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    trainable, _ = lj.split(adapted)
    back = lj.unmerge(merged, trainable)
    for (_, a), (_, b) in zip(lora.nodes(adapted), lora.nodes(back)):
        np.testing.assert_allclose(b.base, a.base, rtol=0, atol=2e-7 * float(jnp.max(jnp.abs(a.base))) + 1e-7)
        assert b.lora_a is a.lora_a and b.scale == a.scale


def test_kaiming_and_gaussian_init_and_zero_b(key):
    w = jnp.ones((512, 64))
    n = lora.init(key, {"w": w}, [lj.LoraRule(pattern="w", rank=8)])["w"]
    bound = 1 / math.sqrt(512)
    assert n.lora_a.shape == (512, 8) and n.lora_b.shape == (8, 64)
    assert float(jnp.abs(n.lora_a).max()) <= bound
    assert abs(float(jnp.std(n.lora_a)) - bound / math.sqrt(3)) < 0.05 * bound
    assert not jnp.any(n.lora_b)
    g = lora.init(key, {"w": w}, [lj.LoraRule(pattern="w", rank=8, init="gaussian")])["w"]
    assert abs(float(jnp.std(g.lora_a)) - 1 / 8) < 0.01


def test_scale_alpha_over_r_and_rslora():
    assert lj.LoraRule(pattern="w", rank=8, alpha=16).scale == 2.0
    assert lj.LoraRule(pattern="w", rank=8).scale == 1.0
    assert lj.LoraRule(pattern="w", rank=8, alpha=16, rslora=True).scale == pytest.approx(16 / math.sqrt(8))


def test_scale_and_init_bound_match_peft():
    """PEFT (on PyTorch) is the reference for alpha/r, rsLoRA and the kaiming bound of A."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    for rs in (False, True):
        net = torch.nn.Sequential(torch.nn.Linear(512, 64))
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], use_rslora=rs)
        m = peft.get_peft_model(net, cfg)
        layer = m.base_model.model[0]
        assert lj.LoraRule(pattern="w", rank=8, alpha=16, rslora=rs).scale == pytest.approx(layer.scaling["default"])
    a_peft = layer.lora_A["default"].weight.detach().numpy()  # (r, d_in)
    assert np.abs(layer.lora_B["default"].weight.detach().numpy()).max() == 0
    ours = lora.init(jax.random.key(0), {"w": jnp.ones((512, 64))}, [lj.LoraRule(pattern="w", rank=8)])["w"].lora_a
    # Both draw U(-1/sqrt(d_in), 1/sqrt(d_in)): same bound, same spread.
    assert np.abs(a_peft).max() == pytest.approx(float(jnp.abs(ours).max()), rel=0.01)
    assert np.std(a_peft) == pytest.approx(float(jnp.std(ours)), rel=0.05)


def test_count_matches_the_lora_literature(key):
    p = lora.init(key, {"w": jnp.ones((512, 64))}, [lj.LoraRule(pattern="w", rank=8)])
    c = lora.count(p)
    assert (c.trainable, c.frozen, c.total, c.adapted) == (4608, 32768, 37376, 32768)
    assert round(100 * c.reduction, 1) == 85.9


def test_gradient_of_the_adapter_matches_plain_autodiff(key):
    """The hand-written backward of the low-rank product equals JAX's own."""
    ks = jax.random.split(key, 4)
    x = jax.random.normal(ks[0], (3, 5, 16))
    a = jax.random.normal(ks[1], (16, 4))
    b = jax.random.normal(ks[2], (4, 8))
    w = jax.random.normal(ks[3], (16, 8))
    node = lora.LoraWeight(w, a, b, 0.5)

    def ours(x, a, b):
        return jnp.sum(jnp.sin(x @ lora.LoraWeight(w, a, b, 0.5)))

    def ref(x, a, b):
        return jnp.sum(jnp.sin(x @ w + 0.5 * (x @ a) @ b))

    for g1, g2 in zip(jax.grad(ours, (0, 1, 2))(x, a, b), jax.grad(ref, (0, 1, 2))(x, a, b)):
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x @ node, x @ w + 0.5 * (x @ a) @ b, rtol=1e-5, atol=1e-5)


def test_multi_axis_kernels_fold_to_a_matrix(key):
    """DenseGeneral-style kernels: (D, H, K) contracts 1 axis, (H, K, D) contracts 2."""
    ks = jax.random.split(key, 3)
    params = {"q": jax.random.normal(ks[0], (8, 2, 4)), "o": jax.random.normal(ks[1], (2, 4, 8))}
    rules = [lj.LoraRule(pattern="q", rank=3), lj.LoraRule(pattern="o", rank=3, in_dims=2)]
    p = perturb_b(lora.init(key, params, rules), ks[2])
    assert p["q"].lora_a.shape == (8, 3) and p["q"].lora_b.shape == (3, 8)
    assert p["o"].lora_a.shape == (8, 3) and p["o"].in_shape == (2, 4)
    x = jax.random.normal(ks[2], (5, 8))
    m = lj.merge(p)
    h = lora.contract(x, p["q"])
    np.testing.assert_allclose(h, jnp.einsum("nd,dhk->nhk", x, m["q"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora.contract(h, p["o"]), jnp.einsum("nhk,hkd->nd", h, m["o"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="needs a 2-D weight"):
        x @ p["q"]
    with pytest.raises(ValueError, match="does not match the LoRA weight's input shape"):
        lora.contract(jnp.ones((5, 7)), p["q"])


def test_embedding_lookup_and_tied_transpose(key):
    ks = jax.random.split(key, 2)
    p = perturb_b(lora.init(key, {"embed": jax.random.normal(ks[0], (50, 6))}, [lj.LoraRule(pattern="embed", rank=2)]),
                  ks[1])
    dense = lj.merge(p)["embed"]
    ids = jnp.array([[3, 7, 49], [0, 0, 1]])
    np.testing.assert_allclose(p["embed"][ids], dense[ids], rtol=1e-6, atol=1e-6)
    h = jax.random.normal(ks[1], (4, 6))
    np.testing.assert_allclose(h @ p["embed"].T, h @ dense.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_dropout_applies_only_with_a_key(seed):
    key = jax.random.key(seed)
    w = jnp.zeros((64, 64))
    p = perturb_b(lora.init(key, {"w": w}, [lj.LoraRule(pattern="w", rank=4, dropout=0.5)]), key, std=1.0)
    x = jnp.ones((8, 64))
    no_drop = x @ p["w"]
    np.testing.assert_array_equal(x @ lora.with_dropout_keys(p, None)["w"], no_drop)
    d1 = x @ lora.with_dropout_keys(p, jax.random.key(1))["w"]
    d2 = x @ lora.with_dropout_keys(p, jax.random.key(2))["w"]
    assert not np.allclose(d1, no_drop) and not np.allclose(d1, d2)
    # Inverted dropout keeps the expectation. Output j of a row is sum_i m_i c_ij / keep with
    # c = s * A @ B and m_i ~ Bernoulli(keep), so one sample's variance is (1 - keep) / keep * sum_i c_ij^2:
    # the mean of n samples lies within 6 of its standard deviations of the no-dropout output
    # (a false failure has probability ~1e-9 per entry), for any seed.
    n, keep = 400, 0.5
    samples = jax.vmap(lambda k: x @ lora.with_dropout_keys(p, k)["w"])(jax.random.split(jax.random.key(seed + 10), n))
    node = p["w"]
    c = node.scale * np.asarray(node.lora_a, np.float64) @ np.asarray(node.lora_b, np.float64)
    np.testing.assert_allclose(no_drop, np.ones((8, 64)) @ c, rtol=1e-5, atol=1e-5)
    std = np.sqrt((1 - keep) / keep * (c**2).sum(0) / n)
    z = (np.asarray(samples, np.float64).mean(0) - np.ones((8, 64)) @ c) / std
    assert float(np.abs(z).max()) < 6, float(np.abs(z).max())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank must be a positive int"),
        (dict(rank=-2), "rank must be a positive int"),
        (dict(rank=2.0), "rank must be a positive int"),
        (dict(rank=2, alpha=0), "alpha must be > 0"),
        (dict(rank=2, alpha=-1.0), "alpha must be > 0"),
        (dict(rank=2, dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(rank=2, init="xavier"), "init must be 'kaiming', 'gaussian' or a function"),
        (dict(rank=2, in_dims=0), "in_dims must be an int >= 1"),
    ],
)
def test_bad_rule_values_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lj.LoraRule(pattern="w", **kwargs)


def test_bad_targets_are_rejected(key):
    params = {"w": jnp.ones((6, 4)), "norm": {"scale": jnp.ones(4)}, "ids": jnp.ones((3, 3), jnp.int32),
              "cube": jnp.ones((2, 2, 2))}
    with pytest.raises(ValueError, match=r"rank 5 is larger than min\(d_in, d_out\) = 4 for 'w' of shape \(6, 4\)"):
        lora.init(key, params, [lj.LoraRule(pattern="w", rank=5)])
    with pytest.raises(ValueError, match=r"matched 'norm/scale' of shape \(4,\), which is not a matrix"):
        lora.init(key, params, [lj.LoraRule(pattern="norm/scale", rank=1)])
    with pytest.raises(ValueError, match="matches no leaf"):
        lora.init(key, params, [lj.LoraRule(pattern="attn/.*", rank=1)])
    with pytest.raises(ValueError, match="LoRA needs a float weight"):
        lora.init(key, params, [lj.LoraRule(pattern="ids", rank=1)])
    with pytest.raises(ValueError, match="in_dims=3 leaves no output axis"):
        lora.init(key, params, [lj.LoraRule(pattern="cube", rank=1, in_dims=3)])
    with pytest.raises(ValueError, match="at least one LoraRule"):
        lora.init(key, params, [])
    with pytest.raises(TypeError, match="rules must be LoraRule instances"):
        lora.init(key, params, [{"pattern": "w", "rank": 1}])
    once = lora.init(key, params, [lj.LoraRule(pattern="w", rank=2)])
    with pytest.raises(ValueError, match="already a LoRA weight"):
        lora.init(key, once, [lj.LoraRule(pattern="w", rank=2)])
    bad_init = lambda k, w, r: (jnp.zeros((r, 6)), jnp.zeros((r, 4)))  # noqa: E731
    with pytest.raises(ValueError, match=r"returned A \(2, 6\), B \(2, 4\); expected A \(6, 2\), B \(2, 4\)"):
        lora.init(key, params, [lj.LoraRule(pattern="w", rank=2, init=bad_init)])


def test_init_function_sees_the_base_weight(key):
    """Room for LoftQ-style inits: the init function receives W0."""
    seen = {}

    def svd_init(k, w, r):
        seen["w"] = w
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        return u[:, :r] * s[:r], vt[:r]

    w = jax.random.normal(key, (6, 4))
    p = lora.init(key, {"w": w}, [lj.LoraRule(pattern="w", rank=4, init=svd_init)])
    assert seen["w"] is w
    np.testing.assert_allclose(p["w"].delta_weight(), w, rtol=1e-4, atol=1e-5)


def test_all_linear_skips_head_and_embeddings(model):
    params, _ = model
    p = lora.init(jax.random.key(0), params, [lj.LoraRule.all_linear(2)])
    assert {path.split("/")[-2] for path, _ in lora.nodes(p)} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_all_linear_works_under_strict_dtype_promotion(model):
    params, tokens = model
    p = lora.init(jax.random.key(0), params, [lj.LoraRule.all_linear(2)])
    with jax.numpy_dtype_promotion("strict"):
        llama.apply(p, tokens, CFG)


# ----------------------------------------------------------------------------
# A LoRA weight is not an array: conversions raise a LoraError naming the fixes


@pytest.fixture(scope="module")
def small_node():
    params = lora.init(jax.random.key(0), {"kernel": jnp.ones((4, 3))}, [lj.LoraRule(pattern="kernel", rank=2)])
    return params["kernel"]


@pytest.mark.parametrize(
    "convert",
    [
        lambda w: jnp.asarray(w),
        lambda w: np.asarray(w),
        lambda w: jnp.einsum("ij,jk->ik", jnp.ones((2, 4)), w),
        lambda w: jax.lax.dot_general(jnp.ones((2, 4)), w, (((1,), (0,)), ((), ()))),
        lambda w: jnp.dot(jnp.ones((2, 4)), w),
    ],
    ids=["jnp.asarray", "np.asarray", "einsum", "dot_general", "jnp.dot"],
)
def test_array_conversion_raises_lora_error(small_node, convert):
    from lora_jax.errors import LoraError

    with pytest.raises(LoraError, match="LoRA") as info:
        convert(small_node)
    for fix in ("x @ w", "lora_jax.lora.contract(x, w)", "lora_jax.flax_adapt.linen_apply", "lora_jax.merge(params)"):
        assert fix in str(info.value)


def test_flax_model_apply_on_lora_params_raises_lora_error():
    import flax.linen as nn

    from lora_jax.errors import LoraError

    model = nn.Dense(3)
    variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    adapted = lora.init(jax.random.key(1), variables, [lj.LoraRule(pattern=".*kernel", rank=2)])
    with pytest.raises(LoraError, match="LoRA.*linen_apply"):
        model.apply(adapted, jnp.ones((2, 4)))


def test_array_like_uses_still_work(small_node):
    x = jnp.ones((2, 4))
    assert (x @ small_node).shape == (2, 3)
    assert (np.ones((2, 4), np.float32) @ small_node).shape == (2, 3)
    assert small_node.T.shape == (3, 4) and small_node[jnp.array([0, 1])].shape == (2, 3)
    assert jax.jit(lambda x, w: x @ w)(x, small_node).shape == (2, 3)
    assert jax.vmap(lambda x: x @ small_node)(jnp.ones((5, 2, 4))).shape == (5, 2, 3)
    assert len(jax.tree.leaves(small_node)) == 3


def test_repr_of_a_shape_mapped_tree_shows_the_shapes(model):
    params, _ = model
    adapted = lora.init(jax.random.key(3), params, [lj.LoraRule(pattern=SEVEN, rank=4)])
    text = repr(jax.tree.map(lambda a: a.shape, adapted))
    assert "LoraWeight(base=(32, 32), lora_a=(32, 4), lora_b=(4, 32)" in text
    assert "LoraWeight(base=(32, 64), lora_a=(32, 4), lora_b=(4, 64)" in text


def test_factor_names_live_in_paths_and_lora_re_exports_them():
    from lora_jax import paths

    assert lora.FACTOR_NAMES is paths.FACTOR_NAMES and lora.is_factor_path is paths.is_factor_path
