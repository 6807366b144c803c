"""base_hash: the identity of a frozen base, blind to adapters, sensitive to every byte."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_adapters import tiny_base, tiny_state

from lora_jax.io import hashing


def test_base_hash_ignores_adapters_and_sees_every_byte():
    base = tiny_base()
    h = hashing.base_hash(base)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", h)
    state = tiny_state(base=base)
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



def test_quantized_bases_differing_only_in_static_fields_hash_differently():
    """Same children, another format, layout or compute dtype: another base."""
    quant = pytest.importorskip("lora_jax.quant")
    base = {"w": jax.random.normal(jax.random.key(0), (32, 16))}
    q = quant.quantize(base, [quant.QuantRule(pattern="w", format="int4", block_size=16)])["w"]
    variants = {
        "same": dataclasses.replace(q),
        "format": dataclasses.replace(q, format="nf4"),  # the same codes read through another table
        "transposed": q.T,
        "dtype": dataclasses.replace(q, compute_dtype=jnp.bfloat16),
    }  # (another block size or stored shape changes a child's shape too, which the bytes' header shows)
    assert all(np.array_equal(np.asarray(v.codes), np.asarray(q.codes)) for v in variants.values())
    hashes = {k: hashing.base_hash({"w": v}) for k, v in variants.items()}
    assert hashes["same"] == hashing.base_hash({"w": q})
    assert len(set(hashes.values())) == len(variants), hashes
