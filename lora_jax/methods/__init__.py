"""Adapter methods beyond plain LoRA, each a node type or an init function on the same rules.

- :mod:`lora_jax.methods.dora`: DoRA (and QDoRA on a quantized base), :class:`~lora_jax.methods.dora.DoraWeight`.
- :mod:`lora_jax.methods.pissa`: PiSSA and OLoRA initialisations (QPiSSA on a quantized base), and their
  conversion to plain LoRA on the untouched base.
- :mod:`lora_jax.methods.eva`: EVA, A from the principal components of each layer's inputs, ranks redistributed.
- :mod:`lora_jax.methods.vera`: VeRA, :class:`~lora_jax.methods.vera.VeraWeight` (shared frozen A/B, trained vectors).
- :mod:`lora_jax.methods.loftq`: LoftQ for the library's quantizers, with the per-matrix error report.
- :mod:`lora_jax.methods.audit`: the adapter audit (also ``lora_jax.lora.audit``).
- :mod:`lora_jax.methods.select`: ``lora.method`` of a config -> the init function of that method.

Submodules load on first use, as the package does.
"""

import importlib

_SUBMODULES = ("audit", "dora", "eva", "loftq", "options", "pissa", "select", "vera")

__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"lora_jax.methods.{name}")
    raise AttributeError(f"module 'lora_jax.methods' has no attribute {name!r}")
