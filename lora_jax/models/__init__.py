"""Models built into lora-jax, written as pure functions over parameter pytrees."""

from lora_jax.models import bert, llama

__all__ = ["bert", "llama"]
