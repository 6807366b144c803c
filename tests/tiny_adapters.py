"""A tiny Llama, random adapters and train states on it, shared by the adapter, I/O and export tests."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import lora, optim, train
from lora_jax.models import llama

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
QV = lora.LoraRule(pattern=r"layers/\d+/attn/(q|v)_proj/kernel", rank=4, alpha=8, dropout=0.05)
TOKENS = jnp.array([[1, 5, 17, 3, 40, 2, 8, 9]])
STATE_RULES = [lora.LoraRule(pattern=r"layers/\d+/attn/(q|v)_proj/kernel", rank=4, alpha=8, dropout=0.1)]


@functools.cache
def tiny_base():
    """The tiny Llama's base params (cached)."""
    return llama.init(jax.random.key(0), CFG)


def tiny_adapted(seed: int, rules) -> dict:
    """Adapters with random, non-zero B so each one changes the model."""
    p = lora.init(jax.random.key(seed), tiny_base(), rules)
    return jax.tree.map(
        lambda x: (
            dataclasses.replace(x, lora_b=0.5 * jax.random.normal(jax.random.key(seed + 100), x.lora_b.shape))
            if lora.is_lora(x)
            else x
        ),
        p,
        is_leaf=lora.is_lora,
    )


_forward = jax.jit(lambda p, t: llama.apply(p, t, CFG))


def tiny_logits(params) -> np.ndarray:
    """The tiny Llama's logits for ``TOKENS``."""
    return np.asarray(_forward(params, TOKENS))


def tiny_state(seed: int = 0, rules=STATE_RULES, base=None, tx=None) -> train.TrainState:
    """A train state on the tiny base (masked AdamW unless ``tx``), adapters from ``seed``."""
    params = lora.init(jax.random.key(seed + 1), tiny_base() if base is None else base, rules)
    return train.init_state(params, tx or optim.masked(optax.adamw(1e-2)), jax.random.key(seed + 2))
