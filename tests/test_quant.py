"""Tests for lora_jax.quant: codecs, packing, double quantization, QLoRA training."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax import lora, paths, quant, train
from lora_jax.models import llama

NF4_PAPER = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip

FOUR_BIT = ("int4", "int4_asym", "nf4", "fp4")


@pytest.fixture(scope="module")
def gaussian():
    return jax.random.normal(jax.random.key(1), (1024, 512), jnp.float32)


@jax.jit
def _rel_mse(q, w):
    return jnp.mean((q.dequantize() - w) ** 2) / jnp.mean(w**2)


def rel_mse(q, w):
    """Relative MSE ``mean((w - dequantize(q))^2) / mean(w^2)`` of a round trip."""
    return float(_rel_mse(q, w))


# ----------------------------------------------------------------------------
# Tables and packing


def test_nf4_table_is_the_papers():
    np.testing.assert_allclose(quant.NF4_VALUES, NF4_PAPER, rtol=0, atol=1e-7)
    q = quant.from_codes("nf4", np.tile(np.arange(16)[:, None], (2, 3)), np.ones((1, 3)), block_size=32)
    np.testing.assert_array_equal(q.dequantize()[:16, 0], quant.NF4_VALUES)


def test_fp4_is_e2m1():
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    np.testing.assert_array_equal(quant.FP4_VALUES, mags + [-m for m in mags])


def test_pack_unpack_exact_for_all_code_pairs():
    a, b = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    codes = np.stack([a.ravel(), b.ravel()])  # rows 0 and 1: every pair of codes
    packed = quant.pack_nibbles(codes)
    assert packed.dtype == jnp.uint8 and packed.shape == (1, 256)
    assert packed.nbytes == codes.size // 2
    np.testing.assert_array_equal(quant.unpack_nibbles(packed), codes)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_codes_are_packed_and_flat_blocks_survive(fmt):
    w = jnp.zeros((64, 96)).at[:, 1].set(3.0).at[:, 2].set(-0.5).at[:32, 3].set(1e-30)
    q = quant.quantize_weight(w, fmt, block_size=32)
    n = 64 * 96
    assert q.codes.nbytes == (n // 2 if fmt in FOUR_BIT else n)
    assert q.codes.dtype == (jnp.uint8 if fmt in FOUR_BIT else jnp.int8)
    assert q.scales.shape == (2, 96)
    deq = q.dequantize()
    assert np.all(np.isfinite(deq))
    np.testing.assert_allclose(deq, w, rtol=1e-6, atol=0)  # zero blocks exact, constant blocks to an ulp


def test_pack_rejects_odd_rows():
    with pytest.raises(ValueError, match=r"even number of rows, got shape \(3, 2\)"):
        quant.pack_nibbles(np.zeros((3, 2), np.uint8))


# ----------------------------------------------------------------------------
# Quantization error


def test_relative_mse_bands_and_order(gaussian):
    err = {f: rel_mse(quant.quantize_weight(gaussian, f, block_size=64), gaussian) for f in quant.FORMATS}
    # Measured on N(0, 1) at block 64: nf4 0.0085, int4 (-7..7) 0.0116, fp4 0.0112,
    # int4_asym 0.0080, int8 4e-5.
    assert 0.0080 < err["nf4"] < 0.0090
    assert 0.0110 < err["int4"] < 0.0122
    assert 0.0105 < err["fp4"] < 0.0118
    assert 0.0075 < err["int4_asym"] < 0.0085
    assert err["int8"] < 1e-4
    assert err["nf4"] < err["int4"] and err["nf4"] < err["fp4"]


def test_error_grows_with_block_size(gaussian):
    # nf4 on N(0, 1): 0.0076, 0.0085, 0.0091, 0.0097 at blocks 32..256; 0.0114 per channel (block 1024).
    errs = [rel_mse(quant.quantize_weight(gaussian, "nf4", block_size=b), gaussian) for b in (32, 64, 128, 256, None)]
    assert errs == sorted(errs) and errs[0] < errs[-1]


@pytest.mark.parametrize("fmt", FOUR_BIT)
def test_double_quant_adds_under_one_percent(gaussian, fmt):
    plain = rel_mse(quant.quantize_weight(gaussian, fmt), gaussian)
    dq = quant.quantize_weight(gaussian, fmt, double_quant=True)
    assert dq.scales.dtype == jnp.int8 and dq.scale_scales.shape == (1024 // 64, 2)
    assert rel_mse(dq, gaussian) < 1.01 * plain


# ----------------------------------------------------------------------------
# Bits per parameter


def test_bits_per_param_exact():
    big = jax.ShapeDtypeStruct((4096, 11008), jnp.float32)

    def bits(**kw):
        return quant.footprint(jax.eval_shape(lambda w: quant.quantize_weight(w, "nf4", **kw), big)).bits_per_param

    assert bits(block_size=64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125
    assert bits(block_size=64) == 4.5
    assert quant.footprint(jax.eval_shape(lambda w: quant.quantize_weight(w, "int8"), big)).bits_per_param == 8.5
    asym = jax.eval_shape(lambda w: quant.quantize_weight(w, "int4_asym", block_size=32), big)
    assert quant.footprint(asym).bits_per_param == 6.0  # llama.cpp Q4_1 with fp32 d and m


def test_footprint_counts_the_stored_bytes():
    q = quant.quantize_weight(jnp.ones((1024, 512)), "nf4", double_quant=True)
    fp = quant.footprint(q)
    assert fp.n_params == 1024 * 512
    assert fp.constant_bytes == 4
    assert fp.nbytes == 1024 * 512 * 4.126953125 / 8 + 4
    assert fp.bits_per_param == 4.126953125


def test_footprint_of_a_qlora_tree():
    params = {"dense": {"kernel": jnp.ones((256, 64)), "bias": jnp.zeros(64, jnp.bfloat16)}}
    params = quant.quantize(params, [quant.QuantRule(pattern=".*kernel")])
    params = lora.init(jax.random.key(0), params, [lora.LoraRule(pattern=".*kernel", rank=4)])
    fp = quant.footprint(params)
    base = 256 * 64 // 2 + (256 // 64) * 64 * 4
    factors = (256 * 4 + 4 * 64) * 4
    assert fp == quant.Footprint(
        n_params=256 * 64 + 256 * 4 + 4 * 64 + 64, nbytes=base + factors + 64 * 2, constant_bytes=0
    )
    assert quant.footprint({"w": jnp.ones((8, 8))}).bits_per_param == 32.0


# ----------------------------------------------------------------------------
# Exact import (from_codes)


def _reference(codes, scales, offsets, bs):
    y = codes.astype(np.float32) * np.repeat(scales, bs, axis=0)
    return y if offsets is None else y + np.repeat(offsets, bs, axis=0)


@pytest.mark.parametrize(
    "fmt,lo,hi", [("int4", -8, 7), ("int4_asym", 0, 15), ("int8", -128, 127), ("nf4", 0, 15), ("fp4", 0, 15)]
)
def test_from_codes_round_trips_exactly(fmt, lo, hi):
    rng = np.random.default_rng(0)
    bs, d_in, d_out = 32, 128, 48
    codes = rng.integers(lo, hi + 1, size=(d_in, d_out))
    codes[:2, 0] = [lo, hi]
    scales = rng.standard_normal((d_in // bs, d_out)).astype(np.float16).astype(np.float32)  # GGUF's fp16 d
    offsets = -np.abs(rng.standard_normal(scales.shape)).astype(np.float16).astype(np.float32)
    offsets = offsets if fmt == "int4_asym" else None
    q = quant.from_codes(fmt, codes, scales, offsets=offsets, block_size=bs)
    if fmt in ("nf4", "fp4"):
        table = quant.NF4_VALUES if fmt == "nf4" else quant.FP4_VALUES
        want = table[codes] * np.repeat(scales, bs, axis=0)
    else:
        want = _reference(codes, scales, offsets, bs)
    np.testing.assert_array_equal(q.dequantize(), want)
    ids = np.array([[0, 1, 33], [127, 64, 2]])
    np.testing.assert_array_equal(q[ids], want[ids])
    np.testing.assert_array_equal(q.T.dequantize(), want.T)
    np.testing.assert_array_equal(q.T[np.array([0, 47, 5])], want.T[[0, 47, 5]])


def test_from_codes_llama_cpp_q4_0_block():
    # One Q4_0 block: x = d * (q - 8) with unsigned nibbles q.
    q_nibbles = np.arange(32) % 16
    d = np.float32(np.float16(0.0123))
    qt = quant.from_codes("int4", (q_nibbles - 8)[:, None], np.array([[d]]), block_size=32)
    np.testing.assert_array_equal(qt.dequantize()[:, 0], d * (q_nibbles - 8).astype(np.float32))


def test_from_codes_errors():
    with pytest.raises(ValueError, match=r"codes must lie in -8..7, got values in -9..0"):
        quant.from_codes("int4", np.array([[-9], [0]]), np.ones((1, 1)), block_size=2)
    with pytest.raises(ValueError, match=r"scales must have shape .* = \(2, 3\) .* got \(1, 3\)"):
        quant.from_codes("int8", np.zeros((64, 3), int), np.ones((1, 3)), block_size=32)
    with pytest.raises(ValueError, match="offsets are required for 'int4_asym'"):
        quant.from_codes("int4_asym", np.zeros((32, 1), int), np.ones((1, 1)), block_size=32)
    with pytest.raises(ValueError, match="fmt must be one of"):
        quant.from_codes("q4_k", np.zeros((32, 1), int), np.ones((1, 1)), block_size=32)
    with pytest.raises(ValueError, match=r"2-D integer array"):
        quant.from_codes("int8", np.zeros((32, 1)), np.ones((1, 1)), block_size=32)


# ----------------------------------------------------------------------------
# QTensor surface


def test_qtensor_is_a_pytree_of_arrays():
    q = quant.quantize_weight(jnp.ones((128, 256)), "int4_asym", double_quant=True, dtype=jnp.bfloat16)
    names = [paths.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(q)]
    assert names == ["codes", "scales", "offsets", "scale_scales", "scale_mean"]
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(q))
    q2 = jax.tree.map(lambda x: x, q)
    assert q2.shape == (128, 256) and q2.dtype == jnp.bfloat16 and q2.ndim == 2
    assert jax.tree.structure(q2) == jax.tree.structure(q)
    assert lora.is_node(q) and lora.dense(q).dtype == jnp.bfloat16


def test_validation_prints_shapes():
    q = quant.quantize_weight(jnp.ones((64, 8)), "nf4", block_size=32)
    with pytest.raises(ValueError, match=r"(?s)scales +got \(1, 8\) float32 +expected \(2, 8\) float32 +<-- mismatch"):
        dataclasses.replace(q, scales=q.scales[:1])
    with pytest.raises(ValueError, match=r"block_size=48 must be a positive int dividing d_in=64"):
        dataclasses.replace(q, block_size=48)


@pytest.mark.parametrize("block_axis", [0, 1])
def test_row_gather_and_transpose(block_axis):
    w = np.asarray(jax.random.normal(jax.random.key(2), (128, 64)))
    q = quant.quantize_weight(w, "nf4", block_size=32, double_quant=True, block_axis=block_axis)
    dense = np.asarray(q.dequantize())
    assert q.shape == (128, 64) and q.transposed == (block_axis == 1)
    ids = np.array([[0, 1, 2], [127, 64, -1]])
    np.testing.assert_array_equal(q[ids], dense[ids])
    np.testing.assert_array_equal(q[5], dense[5])
    np.testing.assert_array_equal(q[1:3], dense[1:3])
    np.testing.assert_array_equal(q.T.dequantize(), dense.T)
    assert np.mean((dense - w) ** 2) < 0.01


def test_matmul_and_grad_match_dense():
    w = jax.random.normal(jax.random.key(3), (64, 32))
    q = quant.quantize_weight(w, "nf4", block_size=32, double_quant=True)
    dense = q.dequantize()
    x = jax.random.normal(jax.random.key(4), (2, 5, 64))

    def f(x, w):
        return jnp.sum(jnp.sin(x @ w))

    @jax.jit
    def both(x, q, dense):
        gw = jax.grad(f, argnums=1, allow_int=True)(x, q)
        return (
            x @ q,
            x @ dense,
            x[..., :32] @ q.T,
            x[..., :32] @ dense.T,
            jax.grad(f)(x, q),
            jax.grad(f)(x, dense),
            gw,
        )

    yq, yd, tq, td, gq, gd, gw = both(x, q, dense)
    np.testing.assert_allclose(yq, yd, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tq, td, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gq, gd, rtol=1e-5, atol=2e-5)
    # Integer children get float0 cotangents, float children zeros: the weight is frozen.
    assert gw.codes.dtype == jax.dtypes.float0
    assert not np.any(np.asarray(gw.scales))
    np.testing.assert_allclose(np.asarray(x) @ q, yq, rtol=1e-6, atol=1e-6)  # numpy defers to __rmatmul__


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("transposed", [False, True])
def test_qlora_layer_matches_lora_on_the_dequantized_weight(dropout, transposed):
    # A LoRA weight on a quantized base runs one fused op (quant.qlora_matmul);
    # its value and gradients are those of the same LoRA weight on the dense base.
    w = jax.random.normal(jax.random.key(3), (64, 32))
    q = quant.quantize_weight(w, "nf4", block_size=32, double_quant=True, block_axis=1 if transposed else 0)
    rule = lora.LoraRule(pattern="kernel", rank=4, alpha=8, dropout=dropout)
    node = lora.init(jax.random.key(0), {"kernel": q}, [rule])["kernel"]
    node = dataclasses.replace(node, lora_b=jax.random.normal(jax.random.key(1), node.lora_b.shape))  # B != 0
    node = lora.with_dropout_keys({"kernel": node}, jax.random.key(7))["kernel"]
    ref = dataclasses.replace(node, base=q.dequantize())
    x = jax.random.normal(jax.random.key(4), (2, 5, 64))

    def f(x, a, b, n):
        return jnp.sum(jnp.sin(x @ dataclasses.replace(n, lora_a=a, lora_b=b)))

    @jax.jit
    def both(x, node, ref):
        grad = jax.value_and_grad(f, argnums=(0, 1, 2))
        return grad(x, node.lora_a, node.lora_b, node), grad(x, ref.lora_a, ref.lora_b, ref), x @ node, x @ ref

    (lq, gq), (ld, gd), yq, yd = both(x, node, ref)
    assert yq.shape == (2, 5, 32)
    np.testing.assert_allclose(yq, yd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lq, ld, rtol=1e-5)
    for a, b in zip(gq, gd):  # dx, dA, dB (sums of up to 64 terms of size ~50: float32 rounding)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    if dropout:  # the dropout mask reached the adapter: turning it off changes the output
        plain = dataclasses.replace(node, dropout_key=None)
        assert not np.allclose(x @ plain, yq, atol=1e-3)


def test_bfloat16_compute():
    q = quant.quantize_weight(jnp.ones((64, 32)), "nf4", dtype=jnp.bfloat16)
    x = jnp.ones((3, 64), jnp.bfloat16)
    assert (x @ q).dtype == jnp.bfloat16
    assert jax.grad(lambda x: jnp.sum(x @ q).astype(jnp.float32))(x).dtype == jnp.bfloat16
    node = lora.init(jax.random.key(0), {"kernel": q}, [lora.LoraRule(pattern="kernel", rank=2)])["kernel"]
    assert node.lora_a.dtype == jnp.bfloat16 and (x @ node).dtype == jnp.bfloat16


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int4_asym"])
def test_bfloat16_dequantize_is_the_float32_value_rounded_once(fmt):
    """The bf16 decode computes code value x scale in float32 and rounds once (no bf16 table or scale)."""
    w = jax.random.normal(jax.random.key(4), (128, 40))
    q16 = quant.quantize_weight(w, fmt, block_size=32, double_quant=True, dtype=jnp.bfloat16)
    q32 = dataclasses.replace(q16, compute_dtype=jnp.float32)
    want = np.asarray(q32.dequantize()).astype(jnp.bfloat16)  # numpy's own float32 -> bfloat16 rounding
    np.testing.assert_array_equal(np.asarray(q16.dequantize()), want)
    np.testing.assert_array_equal(np.asarray(q16.T.dequantize()), want.T)


# ----------------------------------------------------------------------------
# quantize(params, rules) and its errors


def test_quantize_rules_first_match_wins():
    params = {"a": {"kernel": jnp.ones((64, 32))}, "b": {"kernel": jnp.ones((64, 32))}, "norm": jnp.ones(32)}
    out = quant.quantize(
        params, [quant.QuantRule(pattern="a/.*", format="int8"), quant.QuantRule(pattern=".*kernel", block_size=32)]
    )
    assert out["a"]["kernel"].format == "int8" and out["b"]["kernel"].block_size == 32
    assert out["norm"] is params["norm"]


def test_quantize_rejects_indivisible_dims():
    params = {"down": {"kernel": jnp.ones((100, 64))}}
    with pytest.raises(ValueError, match=r"'down/kernel'.*shape \(100, 64\) has d_in=100.*block_size=64"):
        quant.quantize(params, [quant.QuantRule(pattern=".*kernel")])
    q = quant.quantize(params, [quant.QuantRule(pattern=".*kernel", block_size=None)])  # per channel
    assert q["down"]["kernel"].block_size == 100


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_rejects_non_finite(bad):
    params = {"layers": [{"q_proj": {"kernel": jnp.ones((64, 8)).at[3, 2].set(bad)}}]}
    with pytest.raises(ValueError, match=r"'layers/0/q_proj/kernel'.*(1 NaN and 0 inf|0 NaN and 1 inf)"):
        quant.quantize(params, [quant.QuantRule(pattern=".*kernel")])


def test_quantize_errors():
    params = {"norm": {"scale": jnp.ones(64)}, "w": {"kernel": jnp.ones((64, 8))}}
    with pytest.raises(ValueError, match=r"'norm/scale'.*only 2-D kernels"):
        quant.quantize(params, [quant.QuantRule(pattern="norm/scale")])
    with pytest.raises(ValueError, match="matches no leaf"):
        quant.quantize(params, [quant.QuantRule(pattern=".*q_proj.*")])
    with pytest.raises(ValueError, match="format must be one of"):
        quant.QuantRule(pattern=".*", format="nf3")
    with pytest.raises(ValueError, match="block_size must be a positive int or None"):
        quant.QuantRule(pattern=".*", block_size=0)
    with pytest.raises(ValueError, match="dtype must be a float dtype"):
        quant.QuantRule(pattern=".*", dtype=jnp.int8)
    with pytest.raises(ValueError, match="at least one QuantRule"):
        quant.quantize(params, [])
    with pytest.raises(TypeError, match="must be QuantRule instances"):
        quant.quantize(params, [lora.LoraRule(pattern=".*", rank=1)])
    with pytest.raises(ValueError, match="only float weights"):
        quant.quantize({"k": jnp.ones((64, 8), jnp.int32)}, [quant.QuantRule(pattern="k")])
    done = quant.quantize(params, [quant.QuantRule(pattern=".*kernel")])
    with pytest.raises(ValueError, match="already a QTensor"):
        quant.quantize(done, [quant.QuantRule(pattern=".*kernel")])
    with pytest.raises(ValueError, match="block_axis must be 0 or 1"):
        quant.quantize_weight(jnp.ones((64, 8)), block_axis=2)
    with pytest.raises(ValueError, match=r"odd d_in=33"):
        quant.quantize_weight(jnp.ones((33, 8)), "nf4", block_size=None)


# ----------------------------------------------------------------------------
# QLoRA on a tiny Llama

CFG = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
PROJ = r".*(q|k|v|o|gate|up|down)_proj/kernel"
DENSE_SHAPES = {(64, 64), (64, 32), (64, 128), (128, 64)}  # every projection kernel; nothing else is 2-D


@pytest.fixture(scope="module")
def qlora_params():
    params = llama.init(jax.random.key(0), CFG)
    rules = [
        quant.QuantRule(pattern=PROJ, format="nf4", block_size=32, double_quant=True),
        quant.QuantRule(pattern="embed", format="int8", block_size=32, block_axis=1),  # tied: gathered and x @ .T
    ]
    qparams = quant.quantize(params, rules)
    return params, lora.init(jax.random.key(1), qparams, [lora.LoraRule(pattern=PROJ, rank=4)])


def _batch():
    return {"tokens": jax.random.randint(jax.random.key(2), (2, 12), 0, CFG.vocab_size)}


def _loss(params, batch):
    return llama.loss(params, batch, CFG)


def test_qlora_composition(qlora_params):
    params, qlora = qlora_params
    nodes = lora.nodes(qlora)
    assert len(nodes) == 7 * CFG.n_layers
    assert all(isinstance(n.base, quant.QTensor) and n.base.double_quant for _, n in nodes)
    # At init (B = 0) the QLoRA model is the dequantized base model.
    assert isinstance(qlora["embed"], quant.QTensor) and qlora["embed"].transposed
    deq = jax.tree.map(lambda x: lora.dense(x.base if lora.is_lora(x) else x), qlora, is_leaf=lora.is_node)
    apply = jax.jit(llama.apply, static_argnums=2)
    tokens = _batch()["tokens"]
    logits = apply(qlora, tokens, CFG)
    np.testing.assert_allclose(logits, apply(deq, tokens, CFG), rtol=1e-5, atol=1e-5)
    ref = apply(params, tokens, CFG)
    rel = float(jnp.sqrt(jnp.mean((logits - ref) ** 2) / jnp.mean(ref**2)))
    assert 0.01 < rel < 0.2  # NF4 changes the model a little, not a lot


def test_qlora_train_step_updates_only_adapters(qlora_params):
    _, qlora = qlora_params
    tx = optax.sgd(0.1)  # optax.adam's bias correction breaks under strict dtype promotion
    state = train.init_state(qlora, tx, jax.random.key(3))
    frozen_before = [(p, np.asarray(x)) for p, x in paths.leaves_with_paths(state.frozen)]
    trainable_before = [(p, np.asarray(x)) for p, x in paths.leaves_with_paths(state.trainable)]
    assert any(p.endswith("/base/codes") for p, _ in frozen_before)
    step = train.make_train_step(_loss, tx)
    batch = _batch()
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert step.cache_size() == 1  # no recompilation after the first step
    for (p, before), (_, after) in zip(frozen_before, paths.leaves_with_paths(state.frozen), strict=True):
        assert after.dtype == before.dtype and np.array_equal(np.asarray(after), before), p
    for (p, before), (_, after) in zip(trainable_before, paths.leaves_with_paths(state.trainable), strict=True):
        assert lora.is_factor_path(p)
        assert not np.array_equal(np.asarray(after), before), f"{p} did not change"


def _dense_residuals(fn, trainable):
    vjp = jax.eval_shape(lambda t: jax.vjp(fn, t)[1], trainable)  # residual shapes, nothing computed
    return [
        (x.shape, x.dtype)
        for x in jax.tree.leaves(vjp)
        if jnp.issubdtype(x.dtype, jnp.floating) and tuple(x.shape) in DENSE_SHAPES | {s[::-1] for s in DENSE_SHAPES}
    ]


def test_backward_keeps_no_dense_weight(qlora_params):
    _, qlora = qlora_params
    trainable, frozen = paths.split(qlora)
    batch = _batch()

    def packed(t):
        return _loss(paths.combine(t, frozen), batch)[0]

    def dequantized_in_graph(t):  # the control: dense weights computed inside the differentiated function
        p = paths.combine(t, frozen)
        p = jax.tree.map(
            lambda x: dataclasses.replace(x, base=lora.dense(x.base)) if lora.is_lora(x) else x, p, is_leaf=lora.is_lora
        )
        return _loss(p, batch)[0]

    # Layer 0 q/k/v read only the frozen embedding, so no dx (and no residual) is needed there.
    assert len(_dense_residuals(dequantized_in_graph, trainable)) == 7 * CFG.n_layers - 3
    assert _dense_residuals(packed, trainable) == []


# fp32 bytes of one layer's seven projection kernels (CFG's shapes)
DENSE_LAYER_BYTES = 4 * sum(a * b for a, b in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])


def _at_depth(n_layers):
    """CFG with ``n_layers`` layers: its config, dense params, and params with NF4 projections."""
    cfg = dataclasses.replace(CFG, n_layers=n_layers)
    dense = llama.init(jax.random.key(0), cfg)
    return cfg, dense, quant.quantize(dense, [quant.QuantRule(pattern=PROJ, block_size=32, double_quant=True)])


def _scratch_bytes(fn, *args):
    """XLA's temporary (scratch) bytes of ``fn`` compiled for ``args``."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_compiled_backward_keeps_no_dense_weight_per_layer():
    # XLA would merge the backward's re-dequantization with the forward's (CSE) and keep
    # every dense weight from the forward to the backward pass; the scratch of the
    # compiled gradient would then grow per layer by a layer's dense weights more than
    # LoRA on dense weights does (the activations kept are the same).
    temp = {}
    for n_layers in (2, 4):
        cfg, dense, quantized = _at_depth(n_layers)
        for name, base in (("lora", dense), ("qlora", quantized)):
            trainable, frozen = paths.split(lora.init(jax.random.key(1), base, [lora.LoraRule(pattern=PROJ, rank=4)]))
            grad = jax.grad(lambda t, f, b, cfg=cfg: llama.loss(paths.combine(t, f), b, cfg)[0])
            temp[name, n_layers] = _scratch_bytes(grad, trainable, frozen, _batch())
    per_layer = {name: (temp[name, 4] - temp[name, 2]) / 2 for name in ("lora", "qlora")}
    assert per_layer["qlora"] - per_layer["lora"] < DENSE_LAYER_BYTES / 2, (per_layer, DENSE_LAYER_BYTES)


def test_forward_memory_does_not_grow_with_depth():
    # Quantized weights are jit arguments; each layer's dequantized weights must die
    # with the layer (XLA:CPU would otherwise dequantize all layers up front).
    temp = {}
    for n_layers in (1, 2):
        cfg, _, params = _at_depth(n_layers)
        temp[n_layers] = _scratch_bytes(lambda p, b, cfg=cfg: llama.loss(p, b, cfg)[0], params, _batch())
    assert temp[2] - temp[1] < DENSE_LAYER_BYTES / 4, (temp, DENSE_LAYER_BYTES)


# ----------------------------------------------------------------------------
# bitsandbytes reference


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_nf4_matches_bitsandbytes():
    import torch
    from bitsandbytes import functional as bnbf

    w = np.asarray(jax.random.normal(jax.random.key(5), (256, 96)))  # our kernel (in, out)
    weight = torch.from_numpy(np.ascontiguousarray(w.T))  # torch Linear weight (out, in): blocks run along in
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, state).numpy().T
    q = quant.quantize_weight(jnp.asarray(w), "nf4", block_size=64)
    np.testing.assert_array_equal(q.scales, state.absmax.numpy().reshape(96, 4).T)
    np.testing.assert_allclose(q.dequantize(), ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("dq", [False, True])
def test_eager_numpy_encoding_equals_traced_encoding(fmt, dq):
    """Concrete weights are encoded with numpy, traced ones with jax.numpy: same codes and scales."""
    w = jax.random.normal(jax.random.key(3), (256, 320)) * 0.05
    eager = quant.quantize_weight(w, fmt, block_size=64, double_quant=dq)
    traced = jax.jit(lambda w: quant.quantize_weight(w, fmt, block_size=64, double_quant=dq))(w)
    for name in ("codes", "scales", "offsets", "scale_scales", "scale_mean"):
        a, b = getattr(eager, name), getattr(traced, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6, err_msg=name)


def test_repr_of_a_shape_mapped_qlora_tree_shows_the_shapes():
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 64))}}
    q = quant.quantize(params, [quant.QuantRule(pattern=".*kernel", double_quant=True)])
    adapted = lora.init(jax.random.key(1), q, [lora.LoraRule(pattern=".*kernel", rank=4)])
    text = repr(jax.tree.map(lambda a: a.shape, adapted))
    assert "QTensor(nf4, shape=(128, 64)" in text and "codes=(64, 64)" in text and "scales=(2, 64)" in text
    assert "lora_a=(128, 4), lora_b=(4, 64)" in text
