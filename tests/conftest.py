"""Test-wide settings: JAX on the CPU, a shared PRNG key fixture.

Strict dtype promotion is not switched on globally (optax's Adam bias
correction mixes int and float scalars); tests that check dtype hygiene use
``jax.numpy_dtype_promotion("strict")`` locally.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
    return jax.random.key(0)
