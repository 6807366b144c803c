"""Stacked adapter members: a fused step computes what each run computes alone (ranks, seeds, dropout rates,
shared batches); masks; NaN; per-row adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import generate, lora, members, quant, train
from lora_jax.config import OptimConfig
from lora_jax.errors import GenerateError, LoraError
from lora_jax.models import llama
from lora_jax.runner import build

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
TARGETS = r".*(q|v|down)_proj/kernel"
STEPS = 30


@pytest.fixture(scope="module")
def base():
    return llama.init(jax.random.key(0), CFG)


def loss(p, b):
    return llama.loss(p, b, CFG, attention="dot_product")  # the quickest to compile; all attentions match


def batch_at(seed: int, step: int) -> dict:
    """Each seed its own data order, as the runner's batch_at gives each run."""
    r = np.random.default_rng(1000 * seed + step)
    return {"tokens": jnp.asarray(r.integers(0, 64, (2, 16)), jnp.int32),
            "loss_mask": jnp.ones((2, 16), jnp.float32), "attention_mask": jnp.ones((2, 16), jnp.int32)}


VAL = batch_at(99, 0)


def adapted(base, rank: int, seed: int, alpha=8.0, dropout=0.0):
    return lora.init(jax.random.fold_in(jax.random.key(seed), 1), base,
                     [lora.LoraRule(pattern=TARGETS, rank=rank, alpha=alpha, dropout=dropout)])


ALONE_STEPS = {}  # one train step per (optimizer config, steps): the runs alone of one shape share its compilation


def alone(params, seed: int, opt: OptimConfig, steps: int = STEPS, data_seed=None):
    """The run trained by itself with the runner's optax chain: train losses, validation loss, params.

    ``data_seed``: the seed of its data order (default: ``seed``, as the runner's runs have it).
    """
    tx = build.make_optimizer(opt, steps)
    state = train.init_state(params, tx, jax.random.fold_in(jax.random.key(seed), 2))
    if (opt, steps) not in ALONE_STEPS:
        ALONE_STEPS[opt, steps] = train.make_train_step(loss, tx)
    step_fn = ALONE_STEPS[opt, steps]
    losses = []
    for i in range(steps):
        state, m = step_fn(state, batch_at(seed if data_seed is None else data_seed, i))
        losses.append(float(m["loss"]))
    return np.array(losses), float(loss(state.params, VAL)[0]), state.params


FUSED_STEPS = {}  # one fused step per optimizer: groups of one shape share its compilation


def fused(trees, seeds, opts, steps: int = STEPS, grad_clip=1.0, optimizer="adamw", tamper=None, data_seed=None):
    """The group trained as one; ``data_seed``: every member reads that seed's batches (``shared_batch``)."""
    m = members.stack(trees)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 2) for s in seeds])
    state = members.init_state(m, keys, optimizer=optimizer)
    if tamper is not None:
        state = state._replace(trainable=tamper(state.trainable))
    shared = data_seed is not None
    if (optimizer, grad_clip, shared) not in FUSED_STEPS:
        FUSED_STEPS[optimizer, grad_clip, shared] = members.make_fused_step(loss, optimizer=optimizer,
                                                                            grad_clip=grad_clip, shared_batch=shared)
    step = FUSED_STEPS[optimizer, grad_clip, shared]
    compiled = step.cache_size()
    scheds = [build.make_lr_schedule(o, steps) for o in opts]
    wd = [o.weight_decay for o in opts]
    losses = []
    for i in range(steps):
        if shared:
            b = batch_at(data_seed, i)  # one batch, no member axis
        else:
            b = jax.tree.map(lambda *xs: jnp.stack(xs), *[batch_at(s, i) for s in seeds])
        state, metrics = step(state, members.hyper(m, [float(s(i)) for s in scheds], wd), b)
        losses.append(np.asarray(metrics["loss"]))
    final = m._replace(trainable=state.trainable, frozen=state.frozen)
    return np.array(losses), final, state, step.cache_size() - compiled


def check_equal_to_runs_alone(base, grid, opt, steps: int = STEPS):
    """Train ``grid`` (``(rank, seed)`` or ``(rank, seed, dropout)``) fused and each alone; return the fused losses."""
    grid = [(*g, 0.0)[:3] for g in grid]
    trees = [adapted(base, r, s, dropout=d) for r, s, d in grid]
    f_losses, final, _, compiled = fused(trees, [s for _, s, _ in grid], [opt] * len(grid), steps=steps)
    assert compiled <= 1  # one compilation serves the grid, learning rates changing every step included
    for _, node in lora.nodes(final.trainable):  # padded positions start at zero and stay there
        for k, (r, _, _) in enumerate(grid):
            assert not np.any(np.asarray(node.lora_a[k, :, r:])) and not np.any(np.asarray(node.lora_b[k, r:]))
    for k, (r, s, d) in enumerate(grid):
        losses, val, params = alone(trees[k], s, opt, steps=steps)
        np.testing.assert_allclose(f_losses[:, k], losses, rtol=1e-4, err_msg=f"train loss of rank {r}, seed {s}")
        mine = members.unstack(final, k, like=trees[k])
        node = lora.nodes(mine)[0][1]
        assert node.rank == r and node.scale == pytest.approx(8.0 / r)  # the true rank, the member's own scale
        assert node.dropout == d and lora.nodes(members.unstack(final, k))[0][1].dropout == pytest.approx(d)
        assert float(loss(mine, VAL)[0]) == pytest.approx(val, rel=1e-4), (r, s)  # validation loss
    return f_losses


def test_each_member_ends_as_its_run_alone_ranks_1_4_16_seeds_0_1(base):
    opt = OptimConfig(lr=3e-3, weight_decay=0.05, warmup_steps=3, schedule="cosine", grad_clip=1.0)
    check_equal_to_runs_alone(base, [(r, s) for r in (1, 4, 16) for s in (0, 1)], opt)


def test_a_qlora_group_ends_as_its_runs_alone(base):
    # member 0 with adapter dropout: its traced rate goes through the quantized base's fused matmul too
    qbase = quant.quantize(base, [quant.QuantRule(pattern=TARGETS, format="nf4", block_size=32)])
    check_equal_to_runs_alone(qbase, [(1, 0, 0.1), (4, 1)], OptimConfig(lr=3e-3, weight_decay=0.01))


def test_members_of_different_dropout_rates_end_as_their_runs_alone_with_one_compilation(base):
    # The members differ only in dropout: the traced rate must matter (their losses part) and each member must draw
    # the masks its run alone (static rate) draws. (A rank-1 member with dropout: the QLoRA test.)
    opt = OptimConfig(lr=3e-3, weight_decay=0.01)
    f_losses = check_equal_to_runs_alone(base, [(4, 0, 0.0), (4, 0, 0.3)], opt, steps=8)
    assert not np.allclose(f_losses[:, 0], f_losses[:, 1])
    other = [adapted(base, 4, 0, dropout=d) for d in (0.5, 0.1)]
    *_, compiled = fused(other, [0, 0], [opt] * 2, steps=1)
    assert compiled == 0  # other rates, the same program


def test_a_shared_batch_member_ends_as_its_run_alone_on_that_data_order(base):
    # fused_batches: same. Every member reads data seed 0's batches (one batch, no member axis): the member of seed 0
    # is its run alone; the member of seed 1 is the run of seed 1 (its init and keys) on seed 0's data order.
    opt = OptimConfig(lr=3e-3, weight_decay=0.01)
    grid = [(1, 0), (4, 1)]
    trees = [adapted(base, r, s) for r, s in grid]
    shared, final, _, _ = fused(trees, [0, 1], [opt, opt], steps=8, data_seed=0)
    for k, (r, s) in enumerate(grid):
        losses, val, _ = alone(trees[k], s, opt, steps=8, data_seed=0)
        np.testing.assert_allclose(shared[:, k], losses, rtol=1e-4, err_msg=f"rank {r}, seed {s}")
        assert float(loss(members.unstack(final, k), VAL)[0]) == pytest.approx(val, rel=1e-4)
    own, *_ = fused(trees, [0, 1], [opt, opt], steps=8)  # each its own data order: only member 1 changes
    np.testing.assert_allclose(own[:, 0], shared[:, 0], rtol=1e-5)
    assert not np.allclose(own[:, 1], shared[:, 1])


def test_masked_rank_positions_are_ignored_and_never_updated_whatever_they_hold(base):
    # Garbage in the padded columns of A and rows of B: the forward pass must not see it (the losses equal the
    # runs alone), and AdamW with weight decay must leave it as it is (updates are masked, not just gradients).
    grid = [(1, 0), (4, 1)]
    opt = OptimConfig(lr=3e-3, weight_decay=0.5)
    trees = [adapted(base, r, s) for r, s in grid]

    def tamper(t):
        def fill(x):
            if not lora.is_lora(x):
                return x
            pad = ~members.rank_masks(jnp.asarray(1), 4)  # member 0 has rank 1 of 4
            a = x.lora_a.at[0].set(jnp.where(pad, 7.0, x.lora_a[0]))
            b = x.lora_b.at[0].set(jnp.where(pad[:, None], -3.0, x.lora_b[0]))
            return lora.LoraWeight(x.base, a, b, x.scale, x.in_ndim, x.dropout)
        return jax.tree.map(fill, t, is_leaf=lora.is_node)

    clean, _, _, _ = fused(trees, [0, 1], [opt, opt], steps=6)
    f_losses, final, _, compiled = fused(trees, [0, 1], [opt, opt], steps=6, tamper=tamper)
    assert compiled == 0  # the same program as the clean group
    np.testing.assert_allclose(f_losses, clean, rtol=1e-6)
    for _, node in lora.nodes(final.trainable):
        assert np.all(np.asarray(node.lora_a[0, :, 1:]) == 7.0)
        assert np.all(np.asarray(node.lora_b[0, 1:]) == -3.0)
        assert np.any(np.asarray(node.lora_b[0, :1]) != 0.0)  # the rank-1 part did train


def toy_group(lrs, seeds, steps=6):
    """Linear regression through one LoRA weight (nothing normalizes a blow-up away), SGD, one member per lr."""
    w0 = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
    trees = [lora.init(jax.random.key(k), w0, [lora.LoraRule(pattern="w", rank=2)]) for k in seeds]
    m = members.stack(trees)
    state = members.init_state(m, jnp.stack([jax.random.key(k) for k in seeds]), optimizer="sgd")
    step = members.make_fused_step(lambda p, b: (jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2), {}), optimizer="sgd")
    losses = []
    for i in range(steps):
        r = np.random.default_rng(i)
        b = {"x": jnp.asarray(r.normal(size=(4, 16)), jnp.float32),
             "y": jnp.asarray(r.normal(size=(4, 8)), jnp.float32)}
        b = jax.tree.map(lambda x: jnp.stack([x] * len(lrs)), b)
        state, metrics = step(state, members.hyper(m, lrs, [0.0] * len(lrs)), b)
        losses.append(np.asarray(metrics["loss"]))
    return np.array(losses), state


def test_a_diverging_member_is_frozen_and_failed_and_the_others_do_not_notice():
    with_it, state = toy_group([1e-2, 1e30, 3e-2], [0, 1, 2])
    without, _ = toy_group([1e-2, 3e-2], [0, 2])
    failed_at = np.asarray(state.opt_state[1])
    assert failed_at[0] == 0 and failed_at[2] == 0 and failed_at[1] > 0
    assert not np.isfinite(with_it[failed_at[1] - 1, 1])
    np.testing.assert_allclose(with_it[:, [0, 2]], without, rtol=1e-6)
    assert np.all(np.diff(without[:, 0]) != 0)  # the others do train
    frozen = np.asarray(state.trainable["w"].lora_b[1])
    assert np.all(np.isfinite(frozen))  # kept at its last finite value, not overwritten with inf/NaN


def random_adapters(base, ranks):
    trees = []
    for k, r in enumerate(ranks):
        p = adapted(base, r, k)
        trees.append(jax.tree.map(lambda x, k=k: lora.LoraWeight(
            x.base, x.lora_a, 0.5 * jax.random.normal(jax.random.key(10 + k), x.lora_b.shape), x.scale, x.in_ndim)
            if lora.is_lora(x) else x, p, is_leaf=lora.is_node))
    return trees


def test_per_row_adapters_generate_what_each_adapter_generates_alone(base):
    trees = random_adapters(base, (1, 4))
    m = members.stack(trees)
    prompts, index = [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [1, 0, 1]
    out = generate.generate(m, CFG, prompts, adapter_index=index, max_new_tokens=6, stop_ids=(5,))
    rows = out.rows()
    for k, tree in enumerate(trees):  # each adapter alone, on its rows, in one batch of its own
        mine = [p for p, i in zip(prompts, index, strict=True) if i == k]
        alone = generate.generate(tree, CFG, mine, max_new_tokens=6, stop_ids=(5,)).rows()
        assert [r for r, i in zip(rows, index, strict=True) if i == k] == alone
    assert generate.generate(trees[0], CFG, prompts[:2], max_new_tokens=6, stop_ids=(5,)).rows() != rows[:2]


def test_stack_and_per_row_generation_refuse_what_they_cannot_do(base):
    a = adapted(base, 2, 0)
    other = lora.init(jax.random.key(0), base, [lora.LoraRule(pattern=r".*q_proj/kernel", rank=2)])
    with pytest.raises(LoraError, match="member 1's adapters differ from member 0's"):
        members.stack([a, other])
    with pytest.raises(LoraError, match="no LoRA node"):
        members.stack([a, base])
    with pytest.raises(LoraError, match="no tree given"):
        members.stack([])
    with pytest.raises(LoraError, match="r_max=1 is below"):
        members.stack([a], r_max=1)
    m = members.stack([a, a])
    with pytest.raises(GenerateError, match="needs adapter_index"):
        generate.generate(m, CFG, [[1, 2]], max_new_tokens=2)
    with pytest.raises(GenerateError, match="outside 0..1"):
        generate.generate(m, CFG, [[1, 2]], adapter_index=[2], max_new_tokens=2)
    with pytest.raises(GenerateError, match="one per prompt"):
        generate.generate(m, CFG, [[1, 2]], adapter_index=[0, 1], max_new_tokens=2)
    with pytest.raises(GenerateError, match="needs several adapters"):
        generate.generate(a, CFG, [[1, 2]], adapter_index=[0], max_new_tokens=2)
    with pytest.raises(GenerateError, match="drop the weights"):
        members.side_by_side(base, [("x", 0.5)])
    with pytest.raises(LoraError, match="not fused"):
        members.make_fused_step(loss, optimizer="lion")


def test_the_readme_fused_sweeps_code_runs(capsys):
    from test_readme import python_blocks

    blocks = python_blocks("Fused sweeps")
    assert blocks, "the section lost its code block"
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)
    assert capsys.readouterr().out.strip() == "(2, 4) 1"
