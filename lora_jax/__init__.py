"""lora-jax: LoRA and QLoRA as pure transformations of JAX parameter pytrees.

Submodules load on first use: ``import lora_jax`` imports no JAX and changes
no process setting, and tools that only read stored results
(``lora_jax.plots``) never import JAX. Process-level choices (the host
allocator, :mod:`lora_jax.hostmem`) are made by the ``lora-jax`` command or
explicitly by the caller.

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> import lora_jax as lj
  >>> params = {"layer": {"kernel": jnp.ones((16, 8))}}
  >>> params = lj.lora.init(jax.random.key(0), params, [lj.LoraRule(pattern=".*kernel", rank=2)])
  >>> trainable, frozen = lj.split(params)
  >>> tx = lj.optim.masked(optax.adam(1e-3))
  >>> y = jnp.ones((3, 16)) @ lj.combine(trainable, frozen)["layer"]["kernel"]
  >>> y.shape
  (3, 8)
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "adapters", "checkpoint", "cli", "config", "data", "errors", "flax_adapt", "generate", "hostmem", "io", "lora",
    "metrics", "models", "optim", "paths", "plan", "plots", "quant", "runner", "sweep", "train",
)
_NAMES = {
    "LoraRule": "lora",
    "LoraWeight": "lora",
    "merge": "lora",
    "unmerge": "lora",
    "split": "paths",
    "combine": "paths",
    "LoraJaxError": "errors",
    "QTensor": "quant",
    "QuantRule": "quant",
    "quantize": "quant",
}

__all__ = sorted(set(_SUBMODULES) | set(_NAMES))


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"lora_jax.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"lora_jax.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")


def __dir__():
    return __all__
