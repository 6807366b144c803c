"""LoftQ: the alternating steps against an independent numpy loop, the error report, init on a tree, bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, quant
from lora_jax.errors import LoraError
from lora_jax.methods import loftq


def _w(seed=0, shape=(128, 48)):
    return np.random.default_rng(seed).standard_t(4, size=shape).astype(np.float32) * 0.05


def _numpy_loftq(w, rank, steps, fmt):
    """PEFT's loftq_init loop in numpy (quantizer: ours, dequantized), scale 1."""
    deq = lambda x: np.asarray(lora.dense(quant.quantize_weight(jnp.asarray(x), fmt, block_size=64)))  # noqa: E731
    res = w
    for _ in range(steps):
        q = deq(res)
        u, s, vh = np.linalg.svd((w - q).astype(np.float64), full_matrices=False)
        lr = (u[:, :rank] * s[:rank]) @ vh[:rank]
        res = w - lr
    return q, lr


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("fmt", ["nf4", "int4", "fp4"])
def test_matches_an_independent_loop_and_beats_plain_qlora(steps, fmt):
    w = _w()
    m = loftq.init_matrix(jax.random.key(0), w, rank=8, scale=2.0, steps=steps, format=fmt)
    q_ref, lr_ref = _numpy_loftq(w, 8, steps, fmt)
    np.testing.assert_allclose(np.asarray(lora.dense(m.q)), q_ref, atol=1e-6)
    np.testing.assert_allclose(2.0 * np.asarray(m.a @ m.b), lr_ref, atol=2e-5)  # the scale is divided out
    norm = np.linalg.norm(w)
    assert m.error == pytest.approx(np.linalg.norm(w - q_ref - lr_ref) / norm, rel=1e-4)
    assert m.qlora_error == pytest.approx(np.linalg.norm(w - _numpy_loftq(w, 8, 1, fmt)[0]) / norm, rel=1e-5)
    assert m.error < m.qlora_error


def test_init_on_a_tree_reports_every_matrix():
    params = {"a": {"kernel": jnp.asarray(_w(1))}, "b": {"kernel": jnp.asarray(_w(2, (64, 64)))},
              "norm": jnp.ones(48)}
    qrules = [quant.QuantRule(pattern=".*kernel", format="nf4", block_size=64)]
    p, report = loftq.init_with_report(jax.random.key(0), params, [lora.LoraRule(pattern=".*kernel", rank=4)], qrules,
                                       steps=2)
    assert sorted(report) == ["a/kernel", "b/kernel"]
    for path in report:
        node = p[path.split("/")[0]]["kernel"]
        assert isinstance(node.base, quant.QTensor)
        w = params[path.split("/")[0]]["kernel"]
        err = float(jnp.linalg.norm(w - lora.merge(p)[path.split("/")[0]]["kernel"]) / jnp.linalg.norm(w))
        assert err == pytest.approx(report[path][0], rel=1e-4) and report[path][0] < report[path][1]


def test_bad_inputs():
    params = {"a": {"kernel": jnp.asarray(_w(1))}, "b": {"kernel": jnp.asarray(_w(2))}}
    rules = [lora.LoraRule(pattern=".*kernel", rank=4)]
    with pytest.raises(LoraError, match="steps \\(loftq_iter\\) must be an int >= 1, got 0"):
        loftq.init(jax.random.key(0), params, rules, [quant.QuantRule(pattern=".*kernel")], steps=0)
    with pytest.raises(LoraError, match="'b/kernel' is adapted but not quantized"):
        loftq.init(jax.random.key(0), params, rules, [quant.QuantRule(pattern="a/kernel")])
