"""Combining and aligning adapters of other methods: VeRA combines exactly; DoRA: combine refuses, align keeps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import adapters, lora
from lora_jax.errors import LoraError
from lora_jax.methods import dora, pissa, vera

BASE = {"q": jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32),
        "v": jnp.asarray(np.random.default_rng(1).normal(size=(8, 12)), jnp.float32)}
X = {"q": jnp.asarray(np.random.default_rng(2).normal(size=(3, 16)), jnp.float32),
     "v": jnp.asarray(np.random.default_rng(3).normal(size=(3, 8)), jnp.float32)}


def _trained(params, seed):
    """Every trainable vector and factor moved off its init (B, lambda_b, m are not at their init values)."""
    rng = np.random.default_rng(seed)
    noise = lambda x: x + jnp.asarray(0.3 * rng.normal(size=np.shape(x)), jnp.float32)  # noqa: E731

    def move(path, n):
        if vera.is_vera(n):
            return dataclasses.replace(n, vera_lambda_d=noise(n.vera_lambda_d), vera_lambda_b=noise(n.vera_lambda_b))
        n = dataclasses.replace(n, lora_a=noise(n.lora_a), lora_b=noise(n.lora_b))
        return dataclasses.replace(n, lora_magnitude=noise(n.lora_magnitude)) if dora.is_dora(n) else n

    return pissa.map_nodes(params, move)


def _out(params, k):
    return np.asarray(X[k] @ params[k])


def test_vera_adapters_combine_to_the_weighted_sum_of_their_updates():
    rules = [lora.LoraRule(pattern="q|v", rank=2)]
    trees = [_trained(vera.init(jax.random.key(i), BASE, rules), i + 1) for i in range(2)]  # two shared pairs
    trees.append(_trained(lora.init(jax.random.key(2), BASE, [lora.LoraRule(pattern="q", rank=3, alpha=6)]), 3))
    weights = [0.5, -1.0, 2.0]
    both = adapters.combine(trees, weights)
    for k in "qv":
        base = np.asarray(X[k] @ BASE[k])
        want = base + sum(w * (_out(t, k) - base) for w, t in zip(weights, trees, strict=True))  # each one's forward
        np.testing.assert_allclose(_out(both, k), want, rtol=1e-5, atol=1e-5)
        assert not vera.is_vera(both[k])
    assert both["q"].rank == 2 + 2 + 3 and both["v"].rank == 4


def test_combine_refuses_dora_with_a_clear_error():
    plain = _trained(lora.init(jax.random.key(0), BASE, [lora.LoraRule(pattern="q|v", rank=2)]), 1)
    with_dora = _trained(dora.init(jax.random.key(1), BASE, [lora.LoraRule(pattern="v", rank=2)]), 2)
    with pytest.raises(LoraError, match=r"combine: 'v' of adapter 1 is a DoRA weight; a weighted sum of DoRA "
                                        r"updates .* is not a low-rank update.*lora\.merge\(adapter_i\)"):
        adapters.combine([plain, with_dora], [0.5, 0.5])


def test_align_keeps_dora_and_vera_adapters_computing_what_they_computed():
    trees = [_trained(lora.init(jax.random.key(0), BASE, [lora.LoraRule(pattern="q", rank=2, alpha=4)]), 1),
             _trained(dora.init(jax.random.key(1), BASE, [lora.LoraRule(pattern="q|v", rank=3)]), 2),
             _trained(vera.init(jax.random.key(2), BASE, [lora.LoraRule(pattern="v", rank=2)]), 3)]
    aligned = adapters.align(trees)
    assert len({jax.tree.structure(t) for t in aligned}) == 1  # one compiled forward runs them all
    assert all(dora.is_dora(t[k]) and t[k].rank == 3 for t in aligned for k in "qv")
    for before, after in zip(trees, aligned, strict=True):
        for k in "qv":
            np.testing.assert_allclose(_out(after, k), _out(before, k), rtol=1e-5, atol=1e-5)
