"""The jit-compiled train step: what changes, what does not, no recompilation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import lora, paths, train
from lora_jax.models import llama

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, qkv_bias=True)
SEVEN = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"


def loss_fn(p, b):
    return llama.loss(p, b, CFG)


@pytest.fixture(scope="module")
def setup():
    params = llama.init(jax.random.key(0), CFG)
    # Embeddings (tied with the output head) at std 0.16 instead of 0.02: a frozen
    # head that small caps how confident any adapter can make the logits.
    params["embed"] = params["embed"] * 8
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, CFG.vocab_size)
    mask = jnp.ones((4, 16), jnp.float32).at[:, :4].set(0.0)
    return params, {"tokens": tokens, "loss_mask": mask}


def snapshot(tree):
    return [(p, np.asarray(x).copy()) for p, x in paths.leaves_with_paths(tree)]


def test_three_steps_change_only_a_and_b(setup):
    params, batch = setup
    adapted = lora.init(jax.random.key(2), params, [lj.LoraRule(pattern=SEVEN, rank=4, alpha=8, dropout=0.1)])
    tx = optax.adamw(1e-2)
    state = train.init_state(adapted, tx, jax.random.key(3))
    before_frozen = snapshot(state.frozen)
    before_train = snapshot(state.trainable)
    step = train.make_train_step(loss_fn, tx)
    for _ in range(3):
        state, metrics = step(state, batch)
    assert int(state.step) == 3
    for (p, a), (_, b) in zip(before_frozen, snapshot(state.frozen)):
        np.testing.assert_array_equal(a, b, err_msg=p)
    changed = [not np.array_equal(a, b) for (_, a), (_, b) in zip(before_train, snapshot(state.trainable))]
    assert len(changed) == 28 and all(changed)
    # A gradient exists only for the trainable half: the grads tree has A/B leaves alone.
    assert optax.tree_utils.tree_size(state.opt_state) == 2 * lora.count(state.params).trainable + 1


def test_no_recompilation_on_the_second_step(setup):
    params, batch = setup
    adapted = lora.init(jax.random.key(2), params, [lj.LoraRule.all_linear(2)])
    tx = optax.adam(1e-3)
    step = train.make_train_step(loss_fn, tx)
    state = train.init_state(adapted, tx, jax.random.key(0))
    state, _ = step(state, batch)
    assert step.cache_size() == 1
    for _ in range(2):
        state, _ = step(state, batch)
    assert step.cache_size() == 1
    # A batch of another shape gets its own executable; the first shape's is kept.
    shorter = jax.tree.map(lambda x: x[:, :-1], batch)
    state, _ = step(state, shorter)
    state, _ = step(state, batch)
    assert step.cache_size() == 2


def test_ahead_of_time_step_compiles_once_per_signature_and_matches_the_pure_step(setup):
    params, batch = setup
    adapted = lora.init(jax.random.key(2), params, [lj.LoraRule.all_linear(2, dropout=0.1)])
    tx = optax.adam(1e-3)
    step = train.make_train_step(loss_fn, tx)
    aot = train.ahead_of_time(step)
    s1 = s2 = train.init_state(adapted, tx, jax.random.key(0))
    s2 = jax.tree.map(jnp.copy, s2)
    for _ in range(2):
        s1, m1 = step(s1, batch)
        s2, m2 = aot(s2, batch)
    assert aot.cache_size() == 1 and int(s2.step) == 2
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1.trainable, s2.trainable)
    aot(s2, jax.tree.map(lambda x: x[:, :-1], batch))
    assert aot.cache_size() == 2


def _two_adapter_sets(setup):
    """Two states on one frozen base that differ in A's init and in their dropout keys."""
    params, batch = setup
    rules = [lj.LoraRule(pattern=SEVEN, rank=4, alpha=8, dropout=0.1)]
    tx = optax.adamw(1e-2)
    states = [train.init_state(lora.init(jax.random.key(10 + i), params, rules), tx, jax.random.key(20 + i))
              for i in range(2)]
    return states, tx, batch


def _assert_trees_close(a, b):
    # Batched matmuls sum in another order; Adam's normalisation makes that visible near 1e-5.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=5e-5), a, b)


def test_step_under_vmap_over_two_adapter_sets_equals_two_separate_steps(setup):
    states, tx, batch = _two_adapter_sets(setup)
    step = train.make_train_step(loss_fn, tx, donate=False)
    axes = train.TrainState(step=None, trainable=0, frozen=None, opt_state=0, key=0)
    stacked = states[0]._replace(
        **{f: jax.tree.map(lambda *x: jnp.stack(x), *(getattr(s, f) for s in states))
           for f in ("trainable", "opt_state", "key")}
    )
    vstep = jax.vmap(step, in_axes=(axes, None), out_axes=(axes, 0))
    for _ in range(2):
        stacked, vm = vstep(stacked, batch)
        states, ms = zip(*(step(s, batch) for s in states))
    for i, (s, m) in enumerate(zip(states, ms)):
        _assert_trees_close(jax.tree.map(lambda x, i=i: x[i], stacked.trainable), s.trainable)
        np.testing.assert_allclose(vm["loss"][i], m["loss"], rtol=1e-5)
    assert not np.allclose(vm["loss"][0], vm["loss"][1])  # the two sets really differ


def test_step_inside_scan_over_three_batches_equals_three_calls(setup):
    (state, _), tx, batch = _two_adapter_sets(setup)
    batches = jax.tree.map(lambda x: jnp.stack([jnp.roll(x, i, axis=1) for i in range(3)]), batch)
    step = train.make_train_step(loss_fn, tx, donate=False)
    scanned, scanned_metrics = jax.jit(lambda s, b: jax.lax.scan(step, s, b))(state, batches)
    losses = []
    for i in range(3):
        state, m = step(state, jax.tree.map(lambda x, i=i: x[i], batches))
        losses.append(m["loss"])
    assert int(scanned.step) == int(state.step) == 3
    np.testing.assert_allclose(scanned_metrics["loss"], losses, rtol=1e-5)
    _assert_trees_close(scanned.trainable, state.trainable)
    _assert_trees_close(scanned.opt_state, state.opt_state)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_loss_falls_when_overfitting_one_batch(setup, mode):
    params, batch = setup
    if mode == "lora":
        params = lora.init(jax.random.key(2), params, [lj.LoraRule(pattern=SEVEN, rank=8, alpha=16)])
        trainable = paths.is_trainable_leaf
    else:
        trainable = paths.everything
    tx = optax.adam(1e-2)
    state = train.init_state(params, tx, jax.random.key(0), trainable)
    step = train.make_train_step(loss_fn, tx)
    losses = []
    for _ in range(60):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    # From above the uniform-guess loss ln(64) = 4.16 to well below it.
    assert losses[0] > 4.16 and losses[-1] < 0.3 * losses[0], losses
    assert float(m["n_tokens"]) == 4 * 12


def test_eval_step_matches_loss(setup):
    params, batch = setup
    adapted = lora.init(jax.random.key(2), params, [lj.LoraRule.all_linear(2, dropout=0.5)])
    # Non-zero B, so the adapters change the loss; evaluation applies no dropout.
    adapted = jax.tree.map(
        lambda x: dataclasses.replace(x, lora_b=jax.random.normal(jax.random.key(4), x.lora_b.shape))
        if lora.is_lora(x) else x,
        adapted, is_leaf=lora.is_lora)
    t, f = lj.split(adapted)
    m = train.make_eval_step(loss_fn)(t, f, batch)
    np.testing.assert_allclose(m["loss"], loss_fn(lj.merge(adapted), batch)[0], rtol=1e-5)
    assert abs(float(m["loss"]) - float(loss_fn(params, batch)[0])) > 1e-2


def test_init_state_without_adapters_is_an_error(setup):
    params, _ = setup
    with pytest.raises(ValueError, match="no trainable leaf"):
        train.init_state(params, optax.adam(1e-3), jax.random.key(0))


def test_pure_jax_function_unaware_of_lora_is_adapted_and_trained():
    """A model written with `@` only: LoRA nodes slot in through __rmatmul__."""

    def mlp(params, x):
        h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
        return h @ params["out"]["kernel"]

    k = jax.random.split(jax.random.key(0), 4)
    params = {"hidden": {"kernel": jax.random.normal(k[0], (8, 32)) / 3, "bias": jnp.zeros(32)},
              "out": {"kernel": jax.random.normal(k[1], (32, 2)) / 6}}
    x = jax.random.normal(k[2], (64, 8))
    y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)

    def loss(p, batch):
        return jnp.mean((mlp(p, batch[0]) - batch[1]) ** 2), {}

    adapted = lora.init(k[3], params, [lj.LoraRule(pattern=".*kernel", rank=2, alpha=4)])
    np.testing.assert_array_equal(mlp(adapted, x), mlp(params, x))
    tx = optax.adam(3e-2)
    state = train.init_state(adapted, tx, k[3])
    step = train.make_train_step(loss, tx)
    first = None
    for _ in range(100):
        state, m = step(state, (x, y))
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < 0.6 * first
    np.testing.assert_array_equal(state.frozen["hidden"]["kernel"].base, params["hidden"]["kernel"])


def test_swiglu_gradients_match_autodiff_of_the_plain_expression():
    from jax.test_util import check_grads

    g, u, w = (jax.random.normal(jax.random.key(i), (3, 5, 7)) * 3 for i in range(3))

    def plain(g, u):
        return jnp.sum(jax.nn.silu(g) * u * w)

    def fused(g, u):
        return jnp.sum(llama.swiglu(g, u) * w)

    np.testing.assert_allclose(fused(g, u), plain(g, u), rtol=1e-6)
    for a, b in zip(jax.grad(fused, (0, 1))(g, u), jax.grad(plain, (0, 1))(g, u), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    check_grads(llama.swiglu, (g[0, 0], u[0, 0]), order=1, modes=["rev"])


def test_block_causal_attention_equals_unblocked(monkeypatch):
    """Skipping the causally masked key blocks changes neither the loss nor its gradient."""
    cfg = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    params = llama.init(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, cfg.vocab_size)
    # Left padding: the padded positions see no key at all, so their outputs
    # (unspecified) must not feed the loss; the first real token is no target.
    batch = {"tokens": tokens, "attention_mask": jnp.ones((2, 256)).at[1, :70].set(0)}
    batch["loss_mask"] = batch["attention_mask"].at[1, 70].set(0)
    assert llama.causal_blocks(256) == 4

    def loss_and_grad():
        return jax.jit(jax.value_and_grad(lambda p: llama.loss(p, batch, cfg)[0]))(params)

    blocked = loss_and_grad()
    monkeypatch.setattr(llama, "CAUSAL_BLOCK", 1024)
    assert llama.causal_blocks(256) == 1
    full = loss_and_grad()
    np.testing.assert_allclose(blocked[0], full[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), blocked[1], full[1])


def _identity_adapter(d: int, dropout: float) -> lora.LoraWeight:
    """A zero base with A = B = I: ``x @ w`` is the adapter's input after dropout, so the mask shows."""
    eye = jnp.eye(d)
    return lora.LoraWeight(jnp.zeros((d, d)), eye, eye, 1.0, 1, dropout)


def test_train_step_drops_out_with_a_fresh_mask_per_layer_and_per_step():
    """Dropout in the train step: applied, rescaled by 1/keep, one key per LoRA layer, a new key every step."""
    d, rows, rate = 64, 8, 0.5
    params = {"l0": {"kernel": _identity_adapter(d, rate)}, "l1": {"kernel": _identity_adapter(d, rate)}}
    x = jnp.ones((rows, d))

    def loss(p, x):
        y0, y1 = x @ p["l0"]["kernel"], x @ p["l1"]["kernel"]
        return jnp.mean(y0 + y1), {"y0": y0, "y1": y1}

    tx = optax.sgd(0.0)  # the factors stay I: each step's outputs are its masks
    step = train.make_train_step(loss, tx)
    state = train.init_state(params, tx, jax.random.key(5))
    state, m1 = step(state, x)
    state, m2 = step(state, x)
    n = rows * d
    for m in (m1, m2):
        for y in (np.asarray(m["y0"]), np.asarray(m["y1"])):
            # Inverted dropout: a kept input is scaled by 1/keep, a dropped one is 0.
            assert set(np.unique(y)) <= {0.0, 1 / (1 - rate)}, np.unique(y)
            kept = float(np.mean(y != 0))
            # Binomial(n, 1-rate): 6 standard deviations either side (a false failure has p < 1e-8).
            assert abs(kept - (1 - rate)) < 6 * np.sqrt(rate * (1 - rate) / n), kept
    masks = [np.asarray(m[k]) != 0 for m in (m1, m2) for k in ("y0", "y1")]
    for i in range(4):
        for j in range(i):
            # Two independent masks agree on about half the inputs; shared keys give identical masks.
            agree = float(np.mean(masks[i] == masks[j]))
            assert abs(agree - 0.5) < 6 * np.sqrt(0.25 / n), (i, j, agree)
    # Evaluation applies no dropout at all.
    t, f = lj.split(state.params)
    ev = train.make_eval_step(loss)(t, f, x)
    np.testing.assert_array_equal(ev["y0"], x)
    np.testing.assert_array_equal(ev["y1"], x)


def _remat_eqns(jaxpr) -> int:
    """Number of rematerialised (``jax.checkpoint``) calls in a jaxpr, nested ones included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in ("checkpoint", "remat", "remat2")
        for sub in jax.core.jaxprs_in_params(eqn.params):
            n += _remat_eqns(sub)
    return n


def test_remat_gives_the_loss_and_gradients_of_the_plain_forward(setup):
    params, batch = setup
    adapted = lora.init(jax.random.key(2), params, [lj.LoraRule(pattern=SEVEN, rank=4, alpha=8)])
    adapted = jax.tree.map(  # non-zero B: A gets a gradient too
        lambda x: dataclasses.replace(x, lora_b=0.1 * jax.random.normal(jax.random.key(4), x.lora_b.shape))
        if lora.is_lora(x) else x,
        adapted, is_leaf=lora.is_lora)
    t, f = lj.split(adapted)

    def objective(remat):
        return lambda t: llama.loss(lj.combine(t, f), batch, CFG, remat=remat)[0]

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(objective(r)))(t) for r in (False, True))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(flat0) == 28 and all(float(jnp.abs(g).max()) > 0 for g in flat0)
    for a, b in zip(flat0, flat1, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    # remat=True really rematerialises: one checkpointed call per layer, none without it.
    assert _remat_eqns(jax.make_jaxpr(objective(True))(t).jaxpr) == CFG.n_layers
    assert _remat_eqns(jax.make_jaxpr(objective(False))(t).jaxpr) == 0
