"""Several adapters on one base: specs, switching without recompiling, and exact weighted combinations."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_adapters import CFG, QV, TOKENS, tiny_adapted, tiny_base, tiny_logits

import lora_jax
from lora_jax import adapters, lora
from lora_jax.io import peft as io_peft
from lora_jax.models import llama

# ----------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("a", ("a", 1.0)),
        ("runs/b/adapter:0.5", ("runs/b/adapter", 0.5)),
        ("b:-2", ("b", -2.0)),
        ("b:1e-3", ("b", 0.001)),
        ("C:\\adapters\\x", ("C:\\adapters\\x", 1.0)),
        ("runs/x:y", ("runs/x:y", 1.0)),
        ("runs/a:3:1", ("runs/a:3", 1.0)),
    ],
)
def test_parse_adapter_spec(spec, want):
    assert adapters.parse_adapter_spec(spec) == want


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "adapter spec must be 'DIR' or 'DIR:WEIGHT', got ''"),
        ("b:", "has an empty weight after ':'"),
        (":0.5", "has no folder before ':'"),
        ("b:nan", "the weight must be finite, got 'nan'"),
        ("b:inf", "the weight must be finite"),
    ],
)
def test_parse_adapter_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        adapters.parse_adapter_spec(spec)


# ----------------------------------------------------------------------------
# Switching and combining


def _delta(params, path):
    node = dict(lora.nodes(params)).get(path)
    if node is None:
        return np.zeros(dict(lora_jax.paths.leaves_with_paths(tiny_base()))[path].shape)
    return np.asarray(node.delta_weight(), np.float64)


def test_combine_is_the_exact_weighted_sum():
    a = tiny_adapted(1, [QV])
    b = tiny_adapted(2, [lora.LoraRule(pattern=r"layers/\d+/attn/q_proj/kernel", rank=2, alpha=7, rslora=True)])
    both = adapters.combine([a, b], [0.3, -1.5])
    q = both["layers"][0]["attn"]["q_proj"]["kernel"]
    v = both["layers"][0]["attn"]["v_proj"]["kernel"]
    assert (q.rank, q.scale, q.dropout, v.rank) == (6, 1.0, 0.0, 4)
    for path in ("layers/0/attn/q_proj/kernel", "layers/1/attn/v_proj/kernel"):
        want = 0.3 * _delta(a, path) + -1.5 * _delta(b, path)
        np.testing.assert_allclose(_delta(both, path), want, rtol=1e-5, atol=1e-6)
    one = adapters.combine([a], [1.0])
    np.testing.assert_allclose(tiny_logits(one), tiny_logits(a), rtol=1e-5, atol=1e-5)


def test_switching_aligned_adapters_does_not_recompile():
    a = tiny_adapted(1, [QV])  # q, v rank 4, scale 2
    b = tiny_adapted(2, [lora.LoraRule(pattern=r"layers/\d+/(attn/q|mlp/up)_proj/kernel", rank=2, alpha=5)])  # q, up
    forward = jax.jit(lambda p, t: llama.apply(p, t, CFG))
    forward(a, TOKENS)
    forward(b, TOKENS)
    assert forward._cache_size() == 2  # as they are, the trees differ: a second compilation
    a2, b2 = adapters.align([a, b])
    forward = jax.jit(lambda p, t: llama.apply(p, t, CFG))
    out_a, out_b = forward(a2, TOKENS), forward(b2, TOKENS)
    assert forward._cache_size() == 1
    np.testing.assert_allclose(out_a, tiny_logits(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_b, tiny_logits(b), rtol=1e-5, atol=1e-5)
    assert b2["layers"][0]["attn"]["v_proj"]["kernel"].rank == 4  # zero adapter where b had none
    # Mixing with weights as jit arguments: one compilation for all weights.
    mixed = jax.jit(lambda ads, w, t: llama.apply(adapters.combine(ads, w), t, CFG))
    for w in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.25]):
        out = mixed([a2, b2], jnp.asarray(w), TOKENS)
    assert mixed._cache_size() == 1
    np.testing.assert_allclose(out, tiny_logits(adapters.combine([a, b], [0.5, 0.25])), rtol=1e-5, atol=1e-5)
    # Room for adapters of a larger rank later.
    a8, _ = adapters.align([a, b], rank=8)
    assert a8["layers"][1]["mlp"]["up_proj"]["kernel"].rank == 8


def test_combine_adapters_from_folders_of_both_formats(tmp_path):
    a = tiny_adapted(1, [QV])
    b = tiny_adapted(2, [lora.LoraRule(pattern=r"layers/\d+/attn/q_proj/kernel", rank=2)])
    adapters.save_adapter(tmp_path / "ours", a)
    io_peft.export_peft(tmp_path / "peft", b, base_model_name_or_path="tiny")
    got = adapters.combine_adapters(tiny_base(), [str(tmp_path / "ours"), f"{tmp_path / 'peft'}:0.5"])
    want = tiny_logits(adapters.combine([a, b], [1.0, 0.5]))
    np.testing.assert_allclose(tiny_logits(got), want, rtol=1e-5, atol=1e-5)
    got = adapters.combine_adapters(tiny_base(), [(tmp_path / "peft", 2.0)], model_kind="llama")
    np.testing.assert_allclose(
        _delta(got, "layers/1/attn/q_proj/kernel"), 2 * _delta(b, "layers/1/attn/q_proj/kernel"), rtol=1e-5, atol=1e-6
    )


def test_combine_and_align_errors(tmp_path):
    a = tiny_adapted(1, [QV])
    with pytest.raises(ValueError, match="combine_adapters: give at least one adapter folder"):
        adapters.combine_adapters(tiny_base(), [])
    with pytest.raises(ValueError, match="need at least one adapted params tree"):
        adapters.align([])
    with pytest.raises(ValueError, match="combine: 1 adapters but 2 weights; give one weight per adapter"):
        adapters.combine([a], [1.0, 2.0])
    other = lora.init(jax.random.key(0), llama.init(jax.random.key(0), dataclasses.replace(CFG, n_layers=1)), [QV])
    with pytest.raises(
        ValueError,
        match=r"adapter 1 is on another base tree: path 'norm/scale' where adapter 0 has 'layers/1/attn/k_proj/kernel'",
    ):
        adapters.combine([a, other], [1.0, 1.0])
    with pytest.raises(ValueError, match="align: rank=2 is below the largest adapter rank 4"):
        adapters.align([a], rank=2)
    with pytest.raises(ValueError, match="pad_rank: cannot pad a rank-4 adapter down to rank 2"):
        adapters.pad_rank(a["layers"][0]["attn"]["q_proj"]["kernel"], 2)
    base = {"w": jnp.ones((4, 6))}
    flat = lora.init(jax.random.key(0), base, [lora.LoraRule(pattern="w", rank=2)])
    two = lora.init(jax.random.key(0), {"w": jnp.ones((2, 2, 6))}, [lora.LoraRule(pattern="w", rank=2, in_dims=2)])
    two = {"w": dataclasses.replace(two["w"], base=base["w"])}  # same path, other factor layout
    with pytest.raises(
        ValueError, match=r"'w': adapter 1 has A \(4, 2\), B \(2, 6\), in_ndim=2; .* do not adapt the same"
    ):
        adapters.combine([flat, two], [1.0, 1.0])
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        adapters.load(tmp_path, tiny_base())
