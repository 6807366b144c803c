"""The custom VJPs of lora_jax._kernels equal plain autodiff; the plain fallback supports forward mode."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import _kernels, lora, quant


def _rand(key, *shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def operands():
    x, a, b = _rand(0, 6, 32), _rand(1, 32, 4), _rand(2, 4, 16)
    q = quant.quantize_weight(_rand(3, 32, 16), "nf4", block_size=16, double_quant=True)
    return x, a, b, q


def test_low_rank_value_and_gradients_equal_plain_autodiff(operands):
    x, a, b, _ = operands
    scale = 0.75

    def loss(custom):
        return lambda x, a, b: jnp.sum(jnp.sin(_kernels.low_rank(x, a, b, scale, custom_vjp=custom)))

    _close(_kernels.low_rank(x, a, b, scale), ((x @ a) * scale) @ b)
    got = jax.grad(loss(True), argnums=(0, 1, 2))(x, a, b)
    want = jax.grad(loss(False), argnums=(0, 1, 2))(x, a, b)
    for g, w in zip(got, want, strict=True):
        _close(g, w)


def test_qmatmul_value_and_input_gradient_equal_plain_autodiff(operands):
    x, _, _, q = operands
    _close(_kernels.qmatmul(x, q), x @ q.dequantize())
    got = jax.grad(lambda x: jnp.sum(jnp.sin(_kernels.qmatmul(x, q))))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(x @ q.dequantize())))(x)
    _close(got, want)


def test_qlora_value_and_gradients_equal_plain_autodiff(operands):
    x, a, b, q = operands
    xa = x * 0.5  # the adapter's input after dropout differs from the base's input

    def loss(custom):
        return lambda x, xa, a, b: jnp.sum(jnp.sin(_kernels.qlora_matmul(x, xa, q, a, b, 2.0, custom_vjp=custom)))

    _close(_kernels.qlora_matmul(x, xa, q, a, b, 2.0), x @ q.dequantize() + ((xa @ a) * 2.0) @ b)
    got = jax.grad(loss(True), argnums=(0, 1, 2, 3))(x, xa, a, b)
    want = jax.grad(loss(False), argnums=(0, 1, 2, 3))(x, xa, a, b)
    for g, w in zip(got, want, strict=True):
        _close(g, w)


def test_custom_vjp_has_no_forward_mode_which_is_why_the_fallback_exists(operands):
    x, a, b, _ = operands
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: _kernels.low_rank(x, a, b, 1.0), (x,), (x,))


def _lora_node(operands, base):
    x, a, b, _ = operands
    return lora.LoraWeight(base, a, b, 0.5)


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "qlora"])
def test_jvp_through_the_fallback_equals_the_dense_computation(operands, quantized):
    x, a, b, q = operands
    node = _lora_node(operands, q if quantized else q.dequantize())
    plain = lora.with_custom_vjp({"w": node}, False)["w"]
    assert plain.custom_vjp is False and node.custom_vjp is True
    w = lora.merge({"w": node})["w"]  # W0 + s A B, dense
    t = _rand(9, *x.shape)
    y, dy = jax.jit(lambda x, t: jax.jvp(lambda x: x @ plain, (x,), (t,)))(x, t)
    _close(y, x @ w, 1e-4)
    _close(dy, t @ w, 1e-4)  # linear in x: the tangent is t @ W


def test_jvp_through_the_fallback_for_the_factors_matches_finite_differences(operands):
    x, a, b, q = operands
    da = _rand(10, *a.shape)

    def f(a):
        node = lora.with_custom_vjp({"w": lora.LoraWeight(q, a, b, 0.5)}, False)["w"]
        return jnp.sum(jnp.tanh(x @ node))

    _, jvp = jax.jvp(f, (a,), (da,))
    eps = 1e-3
    fd = (f(a + eps * da) - f(a - eps * da)) / (2 * eps)
    np.testing.assert_allclose(float(jvp), float(fd), rtol=2e-2)


def test_fallback_flag_is_static_and_grads_agree_under_jit(operands):
    x, a, b, q = operands

    @functools.partial(jax.jit, static_argnums=2)  # the flag is static: each value is its own trace
    def grads(a, b, custom):
        tree = lora.with_custom_vjp({"w": lora.LoraWeight(q, a, b, 0.5)}, custom)
        return jax.grad(lambda a, b: jnp.sum(jnp.sin(x @ dataclasses.replace(tree["w"], lora_a=a, lora_b=b))),
                        argnums=(0, 1))(a, b)

    for g, w in zip(grads(a, b, True), grads(a, b, False), strict=True):
        _close(g, w)
