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


# ----------------------------------------------------------------------------
# bf16 products: float32 accumulation forward and backward


def _bf16(key, *shape):
    return _rand(key, *shape).astype(jnp.bfloat16)


def _assert_rounded_once(got, x, w):
    """``got`` is the exact product of the bf16 values ``x @ w`` rounded once to bf16, up to fp32 summation error."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    exact = x64 @ w64
    bound = 2**-8 * np.abs(exact) + 2**-20 * (np.abs(x64) @ np.abs(w64))  # half a bf16 ulp (<= 2^-8 relative) + fp32
    assert got.dtype == jnp.bfloat16
    excess = np.abs(np.asarray(got, np.float64) - exact) - bound
    assert excess.max() <= 0, excess.max()


def test_bf16_matmul_rounds_once_forward_and_backward():
    x, w = _bf16(10, 3, 70, 256), _bf16(11, 256, 48)  # K = 256: bf16 partial sums would drift
    _assert_rounded_once(_kernels.matmul(x, w), x, w)
    g = _bf16(12, 3, 70, 48)
    dx, dw = jax.vjp(_kernels.matmul, x, w)[1](g)
    _assert_rounded_once(dx, g, np.asarray(w, np.float32).T)
    x2, g2 = np.asarray(x, np.float32).reshape(-1, 256), np.asarray(g, np.float32).reshape(-1, 48)
    _assert_rounded_once(dw, x2.T, g2)  # 210 rows summed


def test_bf16_matmul_fallbacks():
    x, w = _rand(13, 4, 8), _rand(14, 8, 3)
    _close(_kernels.matmul(x, w), x @ w)  # float32: plain @
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    t = jax.jvp(lambda x: _kernels.matmul(x, wb, custom_vjp=False), (xb,), (xb,))[1]  # forward mode
    _close(t.astype(jnp.float32), (xb @ wb).astype(jnp.float32), 1e-2)


def test_bf16_low_rank_gradients_equal_the_exact_products():
    """The bf16 backward (factors contracted on their own axes, narrow_t for the row contractions) is the product."""
    x, a, b, g = _bf16(20, 300, 64), _bf16(21, 64, 8), _bf16(22, 8, 48), _bf16(23, 300, 48)
    scale = 2.0  # a power of two: the scaled residual is exact
    y, vjp = jax.vjp(lambda x, a, b: _kernels.low_rank(x, a, b, scale), x, a, b)
    dx, da, db = vjp(g)
    x64, a64, b64, g64 = (np.asarray(t, np.float64) for t in (x, a, b, g))
    h64, dh64 = (x64 @ a64) * scale, (g64 @ b64.T) * scale
    for got, (p, q) in [(y, (h64, b64)), (dx, (dh64, a64.T)), (da, (x64.T, dh64)), (db, (h64.T, g64))]:
        assert got.dtype == jnp.bfloat16 and got.shape == (p.shape[0], q.shape[1])
        exact, mag = p @ q, np.abs(p) @ np.abs(q)
        bound = 2**-8 * np.abs(exact) + 2**-7 * mag  # the result and one rounded bf16 intermediate
        assert (np.abs(np.asarray(got, np.float64) - exact) <= bound).all()
    assert _kernels.narrow_t(g).tolist() == g.T.tolist()  # exact


def _tiny_bf16_steps(n_layers):
    """Lowered bf16 LoRA and QLoRA train steps of a tiny Llama: ``[(quantized, lowered), ...]`` and the config."""
    import optax

    from lora_jax import train
    from lora_jax.models import llama

    cfg = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=64)
    params = llama.init(jax.random.key(0), cfg, dtype=jnp.bfloat16)
    target = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    out = []
    for quantized in (False, True):
        rules = [quant.QuantRule(pattern=target, format="nf4", block_size=16, dtype=jnp.bfloat16)]
        p = quant.quantize(params, rules) if quantized else params
        p = lora.init(jax.random.key(2), p, [lora.LoraRule(pattern=target, rank=4)])
        tx = optax.adamw(1e-3)
        state = train.init_state(p, tx, jax.random.key(3))
        step = train.make_train_step(lambda p, b: llama.loss(p, b, cfg), tx)
        out.append((quantized, jax.jit(step).lower(state, {"tokens": tokens})))
    return out, cfg


def test_every_bf16_dot_of_a_bf16_lora_and_qlora_step_accumulates_in_float32():
    """XLA:CPU takes its bf16 GEMM path only for bf16 x bf16 -> f32 dots; a bf16-output dot is its slow path."""
    import re

    steps, cfg = _tiny_bf16_steps(2)
    for quantized, lowered in steps:
        hlo = lowered.as_text()
        dots = re.findall(r"stablehlo.dot_general.*?:\s*\((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)", hlo)
        assert dots, "no dot found in the lowered step"
        rank2 = lambda t: t.count("x") == 2  # tensor<AxBxbf16>: a weight, a factor or a flattened activation
        bf16_in = [d for d in dots if "bf16" in d[0] and "bf16" in d[1] and (rank2(d[0]) or rank2(d[1]))]
        assert len(bf16_in) > 7 * cfg.n_layers, (quantized, len(bf16_in))  # the projections at least
        slow = [d for d in bf16_in if "bf16" in d[2]]  # (attention's batched einsums are not counted)
        assert not slow, f"bf16-output dots (quantized={quantized}): {slow[:3]}"


def test_no_projection_dot_of_the_compiled_bf16_step_runs_in_float32():
    """XLA:CPU runs a bf16 dot in float32 (converting both operands) unless its left operand is contracted on
    its last axis in row-major layout: ``g @ w.T`` with a transposed copy, ``h.T @ g`` with a transposed small
    factor, ``x.T @ dh`` all end up as float32 dots in the compiled program, though the lowered one is bf16."""
    import re

    steps, cfg = _tiny_bf16_steps(1)
    for quantized, lowered in steps:
        hlo = lowered.compile().as_text()
        types = dict(re.findall(r"%([\w.\-]+) = (\w+\[[\d,]*\])", hlo))  # instruction -> dtype[shape]
        dots = [(types[a], types[b]) for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]
        weighty = [d for d in dots if any(t.count(",") == 1 for t in d)]  # a 2-D operand: not attention's einsums
        assert len(weighty) > 4 * 7 * cfg.n_layers, (quantized, len(weighty))  # forward and backward of each adapter
        f32 = [d for d in weighty if not all(t.startswith("bf16[") for t in d)]
        assert not f32, f"float32 dots in the compiled bf16 step (quantized={quantized}): {f32[:4]}"
