"""base_hash: the identity of a frozen base, blind to adapters, sensitive to every byte."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest

from lora_jax import lora, optim, train
from lora_jax.io import hashing
from lora_jax.models import llama

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
RULES = [lora.LoraRule(pattern=r"layers/\d+/attn/(q|v)_proj/kernel", rank=4, alpha=8, dropout=0.1)]



@functools.cache
def _base():
    return llama.init(jax.random.key(0), CFG)



def _state(seed: int = 0, rules=RULES, base=None, tx=None):
    params = lora.init(jax.random.key(seed + 1), _base() if base is None else base, rules)
    return train.init_state(params, tx or optim.masked(optax.adamw(1e-2)), jax.random.key(seed + 2))


def test_base_hash_ignores_adapters_and_sees_every_byte():
    base = _base()
    h = hashing.base_hash(base)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", h)
    state = _state(base=base)
    assert hashing.base_hash(state.frozen) == hashing.base_hash(state.params) == h
    assert hashing.base_hash(state.trainable) != h  # A and B are not the base
    changed = jax.tree.map(lambda x: x, base)
    changed["layers"][1]["mlp"]["up_proj"]["kernel"] = (
        changed["layers"][1]["mlp"]["up_proj"]["kernel"].at[3, 4].add(1e-6)
    )
    assert hashing.base_hash(changed) != h
    assert hashing.base_hash(jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)) != h


def test_base_hash_of_quantized_base_includes_static_fields():
    quant = pytest.importorskip("lora_jax.quant")
    base = {"w": jax.random.normal(jax.random.key(0), (32, 16))}
    q1 = quant.quantize(base, [quant.QuantRule(pattern="w", format="int4", block_size=16)])
    q2 = quant.quantize(base, [quant.QuantRule(pattern="w", format="int4", block_size=16)])
    assert hashing.base_hash(q1) == hashing.base_hash(q2) != hashing.base_hash(base)

