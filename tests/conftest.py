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


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny Hugging Face Llama folder loaded by us: ``(directory, params, config, tokenizer)``."""
    from hf_models import load_hf_llama

    return load_hf_llama(tmp_path_factory.mktemp("llama"))
