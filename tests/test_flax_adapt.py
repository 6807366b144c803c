"""LoRA on third-party flax.linen and flax.nnx models written without LoRA in mind."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax import flax_adapt as fa
from lora_jax import lora, optim
from lora_jax.lora import LoraRule

D, HEADS, HEAD_DIM = 4, 2, 3

# ----------------------------------------------------------------------------
# Models, unaware of LoRA


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x_BTD):
        q_BTNH = nn.DenseGeneral((HEADS, HEAD_DIM), name="q")(x_BTD)
        v_BTNH = nn.Einsum((D, HEADS, HEAD_DIM), "btd,dnh->btnh", name="v")(x_BTD)
        h_BTNH = jnp.tanh(q_BTNH) * v_BTNH
        o_BTD = nn.DenseGeneral(D, axis=(-2, -1), name="o")(h_BTNH)
        p_BTD = nn.Einsum((HEADS, HEAD_DIM, D), "btnh,nhd->btd", name="p")(h_BTNH)
        return x_BTD + nn.Dense(D, name="mlp")(jnp.tanh(o_BTD + p_BTD))


class LinenModel(nn.Module):
    def setup(self):
        self.blocks = [LinenBlock() for _ in range(2)]
        self.head = nn.Dense(2)

    def __call__(self, x_BTD):
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return self.head(x_BTD)


class NnxBlock(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.q = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
        self.v = nnx.Einsum("btd,dnh->btnh", (D, HEADS, HEAD_DIM), (HEADS, HEAD_DIM), rngs=rngs)
        self.o = nnx.LinearGeneral((HEADS, HEAD_DIM), D, axis=(-2, -1), rngs=rngs)
        self.p = nnx.Einsum("btnh,nhd->btd", (HEADS, HEAD_DIM, D), rngs=rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x_BTD):
        h_BTNH = jnp.tanh(self.q(x_BTD)) * self.v(x_BTD)
        return x_BTD + self.mlp(jnp.tanh(self.o(h_BTNH) + self.p(h_BTNH)))


class NnxModel(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([NnxBlock(rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(D, 2, rngs=rngs)

    def __call__(self, x_BTD):
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return self.head(x_BTD)


LINEN_RULES = [
    LoraRule(pattern=r".*/(o|p)/kernel", rank=2, alpha=4.0, in_dims=2),
    LoraRule(pattern=r".*kernel", rank=2, alpha=4.0),
]
NNX_RULES = [LoraRule(pattern=r".*kernel", rank=2, alpha=4.0)]


@functools.partial(jax.jit, static_argnums=0, static_argnames="einsum_str")
def _apply(model, params, *args, **kwargs):
    """``linen_apply`` under jit (one compiled program per model, shared by the tests)."""
    return fa.linen_apply(model, {"params": params}, *args, **kwargs)


@functools.partial(jax.jit, static_argnums=0, static_argnames="einsum_str")
def _base_apply(model, params, *args, **kwargs):
    return model.apply({"params": params}, *args, **kwargs)


@nnx.jit
def _call(model, *args):
    return model(*args)


def _x(seed=1, shape=(2, 3, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def _perturb_b(params, key, std=0.5):
    """Give every B a random value so the adapters do something."""
    flat, treedef = jax.tree.flatten(params, is_leaf=lora.is_node)
    out = []
    for i, x in enumerate(flat):
        if lora.is_lora(x):
            x = dataclasses.replace(x, lora_b=std * jax.random.normal(jax.random.fold_in(key, i), x.lora_b.shape))
        out.append(x)
    return treedef.unflatten(out)


@pytest.fixture(scope="module")
def linen_setup():
    model = LinenModel()
    x = _x()
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    adapted = lora.init(jax.random.key(7), params, LINEN_RULES)
    return model, params, adapted, x


# ----------------------------------------------------------------------------
# linen


def test_linen_targets_every_layer_kind(linen_setup):
    _, _, adapted, _ = linen_setup
    found = {p: (n.in_ndim, n.shape) for p, n in lora.nodes(adapted)}
    assert found["blocks_0/q/kernel"] == (1, (D, HEADS, HEAD_DIM))
    assert found["blocks_1/o/kernel"] == (2, (HEADS, HEAD_DIM, D))
    assert found["blocks_1/p/kernel"] == (2, (HEADS, HEAD_DIM, D))
    assert found["blocks_0/v/kernel"] == (1, (D, HEADS, HEAD_DIM))
    assert len(found) == 11


def test_linen_equals_base_at_init_bit_for_bit(linen_setup):
    model, params, adapted, x = linen_setup
    np.testing.assert_array_equal(_apply(model, adapted, x), _base_apply(model, params, x))


def test_linen_equals_merged_after_update(linen_setup):
    model, params, adapted, x = linen_setup
    adapted = _perturb_b(adapted, jax.random.key(3))
    y = _apply(model, adapted, x)
    y_merged = _base_apply(model, lora.merge(adapted), x)
    assert not np.allclose(y, _base_apply(model, params, x))
    np.testing.assert_allclose(y, y_merged, rtol=1e-5, atol=1e-6)


def test_linen_jit_training_changes_only_adapters(linen_setup):
    model, params, adapted, x = linen_setup
    target = jnp.sin(jnp.arange(2 * 3 * 2, dtype=jnp.float32)).reshape(2, 3, 2)
    trainable, frozen = lj.split(adapted)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(trainable)
    assert optim.state_size(opt_state) == lora.count(adapted).trainable

    def loss_fn(t):
        y = _apply(model, lj.combine(t, frozen), x)
        return jnp.mean((y - target) ** 2)

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(loss_fn)(t)
        updates, s = tx.update(g, s, t)
        return optax.apply_updates(t, updates), s, loss

    losses = []
    t = trainable
    for _ in range(5):
        t, opt_state, loss = step(t, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    trained = lj.combine(t, frozen)
    for (path, new), (_, old) in zip(lora.nodes(trained), lora.nodes(adapted), strict=True):
        np.testing.assert_array_equal(new.base, old.base, err_msg=path)
        assert not np.array_equal(new.lora_a, old.lora_a), path
        assert not np.array_equal(new.lora_b, old.lora_b), path
    base_leaves = jax.tree.leaves(
        jax.tree.map(lambda n: n.base if lora.is_lora(n) else n, trained, is_leaf=lora.is_node)
    )
    for new, old in zip(base_leaves, jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(new, old)


def test_linen_dropout_follows_dropout_key(key):
    model = nn.Dense(3)
    x = _x(shape=(8, 5))
    params = lora.init(key, jax.jit(model.init)(key, x)["params"], [LoraRule(pattern="kernel", rank=2, dropout=0.5)])
    params = _perturb_b(params, jax.random.key(1))
    y_eval = _apply(model, params, x)
    np.testing.assert_allclose(y_eval, _base_apply(model, lora.merge(params), x), rtol=1e-5, atol=1e-6)
    y1 = _apply(model, lora.with_dropout_keys(params, jax.random.key(2)), x)
    y2 = _apply(model, lora.with_dropout_keys(params, jax.random.key(2)), x)
    y3 = _apply(model, lora.with_dropout_keys(params, jax.random.key(3)), x)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, y_eval) and not np.allclose(y1, y3)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FakeQuant:
    """A stand-in quantized leaf: int8 codes times one scale."""

    codes: jax.Array
    step: jax.Array

    shape = property(lambda self: self.codes.shape)
    dtype = property(lambda self: jnp.dtype(jnp.float32))

    def dequantize(self):
        return self.codes.astype(jnp.float32) * self.step


def test_linen_dequantizes_base_weights(key):
    model = nn.Sequential((nn.Dense(4), nn.Dense(2)))
    x = _x(shape=(3, 5))
    params = jax.jit(model.init)(key, x)["params"]
    quant = jax.tree.map(lambda w: FakeQuant(jnp.round(w * 8).astype(jnp.int8), jnp.float32(1 / 8)), params)
    adapted = lora.init(key, quant, [LoraRule(pattern="layers_0/kernel", rank=2)])
    assert isinstance(adapted["layers_0"]["kernel"].base, FakeQuant)
    dense = jax.tree.map(lambda q: q.dequantize(), quant, is_leaf=lora.is_node)
    np.testing.assert_array_equal(_apply(model, adapted, x), _base_apply(model, dense, x))


def test_linen_passes_other_collections_and_method(key):
    class WithStats(nn.Module):
        @nn.compact
        def __call__(self, x):
            count = self.variable("stats", "count", jnp.zeros, (), jnp.int32)
            count.value += 1
            return nn.Dense(2)(x)

        def double(self, x):
            return 2 * self(x)

    model = WithStats()
    x = _x(shape=(3, 5))
    variables = jax.jit(model.init)(key, x)
    params = _perturb_b(lora.init(key, variables["params"], [LoraRule(pattern=".*kernel", rank=2)]), key)
    y, state = fa.linen_apply(
        model, {"params": params, "stats": variables["stats"]}, x, method="double", mutable=["stats"]
    )
    merged = {"params": lora.merge(params), "stats": variables["stats"]}
    y_merged, _ = model.apply(merged, x, method="double", mutable=["stats"])
    np.testing.assert_allclose(y, y_merged, rtol=1e-5)
    assert int(state["stats"]["count"]) == 2


# -- linen errors -------------------------------------------------------------


def test_linen_requires_variables_with_params(linen_setup):
    model, _, adapted, x = linen_setup
    with pytest.raises(ValueError, match=r"linen_apply\(model, \{'params': params\}, x\)"):
        fa.linen_apply(model, adapted, x)


def test_linen_in_dims_mismatch_names_path_and_fix(key, linen_setup):
    model, params, _, x = linen_setup
    params = lora.init(key, params, [LoraRule(pattern=".*kernel", rank=2)])
    with pytest.raises(ValueError, match=r"blocks_0/o/kernel.*in_dims=2"):
        _apply(model, params, x)


def _einsum_model(spec, shape):
    return nn.Einsum(shape, spec, use_bias=False)


@pytest.mark.parametrize(
    "spec, x_shape, k_shape, match",
    [
        ("btd,ndh->btnh", (2, 3, 4), (2, 4, 3), "must be the kernel's leading axes"),
        ("btnd,dn->btn", (2, 3, 2, 4), (4, 2), "also index the input"),
        ("btd,dk->bt", (2, 3, 4), (4, 5), "the input does not have"),
        ("btd,dd->btd", (2, 3, 4), (4, 4), "repeats a letter"),
        ("bd,...d->b...", (2, 4), (3, 4), "ellipsis in the kernel"),
    ],
)
def test_linen_einsum_errors(key, spec, x_shape, k_shape, match):
    model = _einsum_model(spec, k_shape)
    x = jnp.ones(x_shape)
    params = lora.init(key, jax.jit(model.init)(key, x)["params"], [LoraRule(pattern="kernel", rank=1)])
    with pytest.raises(ValueError, match=match):
        _apply(model, params, x)


def test_linen_einsum_with_ellipsis_and_call_time_string(key):
    model = nn.Einsum((4, 2, 3), use_bias=False)
    x = _x(shape=(2, 5, 4))
    spec = "...d,dnh->...hn"
    params = model.init(key, x, spec)["params"]
    params = _perturb_b(lora.init(key, params, [LoraRule(pattern="kernel", rank=2)]), key)
    np.testing.assert_allclose(
        _apply(model, params, x, einsum_str=spec),
        _base_apply(model, lora.merge(params), x, einsum_str=spec),
        rtol=1e-5,
    )


def test_linen_rejects_batch_dims(key):
    model = nn.DenseGeneral(3, batch_dims=(0,))
    x = jnp.ones((2, 4))
    params = lora.init(key, jax.jit(model.init)(key, x)["params"], [LoraRule(pattern="kernel", rank=1)])
    with pytest.raises(ValueError, match="batch_dims"):
        _apply(model, params, x)


def test_linen_rejects_lora_weight_in_unsupported_module(key):
    class Raw(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3))

    x = jnp.ones((2, 4))
    params = lora.init(key, jax.jit(Raw().init)(key, x)["params"], [LoraRule(pattern="kernel", rank=1)])
    with pytest.raises(TypeError, match=r"'kernel' is a LoRA weight of a Raw module"):
        fa.linen_apply(Raw(), {"params": params}, x)


def test_linen_rejects_stacked_kernels(key):
    model = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True})(3)
    x = jnp.ones((2, 4))
    params = lora.init(key, jax.jit(model.init)(key, x)["params"], [LoraRule(pattern="kernel", rank=1)])
    with pytest.raises(ValueError, match="lifted transforms"):
        _apply(model, params, x)


# ----------------------------------------------------------------------------
# nnx


def _lora_layers(model):
    return {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, fa.LoraLayer)}


def test_nnx_wraps_every_layer_kind():
    model = fa.nnx_lora(NnxModel(rngs=nnx.Rngs(0)), NNX_RULES, rngs=nnx.Rngs(1))
    layers = _lora_layers(model)
    assert len(layers) == 11
    assert type(model.blocks[0].v.base) is nnx.Einsum
    assert layers["blocks/1/o"].in_ndim == 2 and layers["blocks/1/o"].lora_a.shape == (HEADS * HEAD_DIM, 2)
    assert layers["blocks/1/p"].in_ndim == 2 and layers["blocks/1/p"].lora_b.shape == (2, D)
    assert layers["blocks/0/q"].lora_b.shape == (2, HEADS * HEAD_DIM)
    assert layers["head"].scale == 2.0 and not np.any(layers["head"].lora_b[...])


def test_nnx_equals_base_at_init_bit_for_bit():
    x = _x()
    base = NnxModel(rngs=nnx.Rngs(0))
    model = fa.nnx_lora(NnxModel(rngs=nnx.Rngs(0)), NNX_RULES, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(_call(model, x), _call(base, x))


def _perturb_nnx(model, key):
    for i, layer in enumerate(_lora_layers(model).values()):
        layer.lora_b[...] = 0.5 * jax.random.normal(jax.random.fold_in(key, i), layer.lora_b.shape)


def test_nnx_equals_merged_after_update():
    x = _x()
    model = fa.nnx_lora(NnxModel(rngs=nnx.Rngs(0)), NNX_RULES, rngs=nnx.Rngs(1))
    _perturb_nnx(model, jax.random.key(2))
    y = _call(model, x)
    # reference: a fresh copy of the model with kernels from lora.merge
    reference = NnxModel(rngs=nnx.Rngs(0))
    ref_layers = dict(("/".join(map(str, p)), m) for p, m in nnx.iter_modules(reference))
    for path, layer in _lora_layers(model).items():
        ref_layers[path].kernel[...] = lora.merge(layer.node())
    assert not np.allclose(y, _call(NnxModel(rngs=nnx.Rngs(0)), x))
    np.testing.assert_allclose(y, _call(reference, x), rtol=1e-5, atol=1e-6)
    # nnx_merge: plain modules again, same function
    merged = fa.nnx_merge(nnx.clone(model))
    assert not _lora_layers(merged) and type(merged.blocks[1].o) is nnx.LinearGeneral
    np.testing.assert_allclose(_call(merged, x), y, rtol=1e-5, atol=1e-6)
    assert _lora_layers(model)  # the original keeps its adapters


def test_nnx_training_changes_only_adapters():
    x = _x()
    target = jnp.sin(jnp.arange(2 * 3 * 2, dtype=jnp.float32)).reshape(2, 3, 2)
    model = fa.nnx_lora(NnxModel(rngs=nnx.Rngs(0)), NNX_RULES, rngs=nnx.Rngs(1))
    before = jax.tree.map(jnp.copy, nnx.state(model))
    opt = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=fa.LoraParam)
    n_adapter = sum(m.lora_a.size + m.lora_b.size for m in _lora_layers(model).values())
    assert n_adapter == sum(v.size for v in jax.tree.leaves(nnx.state(model, fa.LoraParam)))
    assert optim.state_size(nnx.state(opt.opt_state)) == n_adapter

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return jnp.mean((m(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, fa.LoraParam))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(5)]
    assert losses[-1] < losses[0]
    after = nnx.state(model)
    for (path, old), (_, new) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after), strict=True):
        if path[-1] in ("lora_a", "lora_b"):
            assert not np.array_equal(old[...], new[...]), path
        else:
            np.testing.assert_array_equal(old[...], new[...], err_msg=str(path))


def test_nnx_dropout_train_and_eval():
    x = _x(shape=(8, D))
    model = fa.nnx_lora(
        nnx.Linear(D, 3, rngs=nnx.Rngs(0)), [LoraRule(pattern="kernel", rank=2, dropout=0.5)], rngs=nnx.Rngs(1)
    )
    model.lora_b[...] = jax.random.normal(jax.random.key(2), model.lora_b.shape)
    y1, y2 = _call(model, x), _call(model, x)
    assert not np.allclose(y1, y2)
    model.eval()
    merged = lora.merge(model.node())
    np.testing.assert_allclose(_call(model, x), x @ merged + model.base.bias[...], rtol=1e-5, atol=1e-6)


def test_nnx_shared_layer_is_wrapped_once_everywhere():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(D, D, rngs=rngs)
            self.b = self.a
            self.plain = nnx.data([nnx.Linear(D, D, rngs=rngs)])

    model = fa.nnx_lora(Tied(nnx.Rngs(0)), [LoraRule(pattern=".*kernel", rank=1)], rngs=0)
    assert isinstance(model.a, fa.LoraLayer) and model.b is model.a
    assert isinstance(model.plain[0], fa.LoraLayer)
    merged = fa.nnx_merge(model)
    assert type(merged.a) is nnx.Linear and merged.b is merged.a and type(merged.plain[0]) is nnx.Linear


def test_nnx_einsum_call_time_string():
    layer = nnx.Einsum("bi,ijk->bjk", (D, 2, 3), rngs=nnx.Rngs(0))
    model = fa.nnx_lora(layer, [LoraRule(pattern="kernel", rank=2)], rngs=1)
    model.lora_b[...] = jnp.ones(model.lora_b.shape)
    x = _x(shape=(5, 7, D))
    spec = "...i,ijk->...kj"
    expected = jnp.einsum(spec, x, lora.merge(model.node()))
    np.testing.assert_allclose(model(x, spec), expected, rtol=1e-5, atol=1e-6)


# -- nnx errors ---------------------------------------------------------------


def test_nnx_needs_rules():
    with pytest.raises(ValueError, match="at least one LoraRule"):
        fa.nnx_lora(NnxModel(rngs=nnx.Rngs(0)), [], rngs=0)


def test_nnx_rule_matching_nothing_lists_paths():
    with pytest.raises(ValueError, match=r"matches no leaf(.|\n)*blocks/0/q/kernel"):
        fa.nnx_lora(NnxModel(rngs=nnx.Rngs(0)), [LoraRule(pattern=".*q_proj/kernel", rank=1)], rngs=0)


def test_nnx_rejects_adapting_twice():
    model = fa.nnx_lora(NnxModel(rngs=nnx.Rngs(0)), NNX_RULES, rngs=0)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        fa.nnx_lora(model, NNX_RULES, rngs=0)


def test_nnx_in_dims_must_agree_with_layer():
    with pytest.raises(ValueError, match=r"blocks/0/o/kernel.*set in_dims=2"):
        fa.nnx_lora(NnxModel(rngs=nnx.Rngs(0)), [LoraRule(pattern=".*/o/kernel", rank=1, in_dims=3)], rngs=0)


def test_nnx_rank_checked_as_lora_init():
    with pytest.raises(ValueError, match="larger than min"):
        fa.nnx_lora(NnxModel(rngs=nnx.Rngs(0)), [LoraRule(pattern="head/kernel", rank=3)], rngs=0)


def test_nnx_rejects_batch_axis():
    layer = nnx.LinearGeneral(D, 3, batch_axis={0: 2}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="batch_axis"):
        fa.nnx_lora(layer, [LoraRule(pattern="kernel", rank=1)], rngs=0)


def test_nnx_rejects_einsum_with_trailing_contraction():
    layer = nnx.Einsum("btd,ndh->btnh", (2, D, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="must be the kernel's leading axes"):
        fa.nnx_lora(layer, [LoraRule(pattern="kernel", rank=1)], rngs=0)


def test_nnx_einsum_call_contracting_other_axes():
    layer = nnx.Einsum("bi,ijk->bjk", (D, 2, 3), rngs=nnx.Rngs(0))
    model = fa.nnx_lora(layer, [LoraRule(pattern="kernel", rank=1)], rngs=0)
    with pytest.raises(ValueError, match="contracts 2 input axis"):
        model(jnp.ones((5, D, 2)), "bij,ijk->bk")


def test_nnx_layer_in_tuple_cannot_be_replaced():
    class InTuple(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.data((nnx.Linear(D, D, rngs=rngs),))

    with pytest.raises(TypeError, match=r"'layers/0'.*tuple"):
        fa.nnx_lora(InTuple(nnx.Rngs(0)), [LoraRule(pattern=".*kernel", rank=1)], rngs=0)
