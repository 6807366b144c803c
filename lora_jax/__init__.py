"""lora-jax: LoRA and QLoRA as pure transformations of JAX parameter pytrees.

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

from lora_jax import lora, optim, paths, train
from lora_jax.lora import LoraRule, LoraWeight, merge, unmerge
from lora_jax.paths import combine, split

__version__ = "0.1.0"

__all__ = [
    "LoraRule",
    "LoraWeight",
    "combine",
    "lora",
    "merge",
    "optim",
    "paths",
    "split",
    "train",
    "unmerge",
]
