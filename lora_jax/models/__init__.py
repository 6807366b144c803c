"""Models built into lora-jax, written as pure functions over parameter pytrees.

Submodules load on first use (``from lora_jax.models import llama`` and
``lora_jax.models.llama`` both work), so :mod:`lora_jax.models.registry`, which
the config checks model names against, imports no JAX.
"""

import importlib

__all__ = ["bert", "gemma3", "llama"]

_SUBMODULES = ("assemble", "attention", "bert", "gemma3", "gguf_file", "layers", "llama", "load_gguf", "load_hf",
               "registry", "sentencepiece", "stacking", "tokenizer")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"lora_jax.models.{name}")
    raise AttributeError(f"module 'lora_jax.models' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_SUBMODULES})
