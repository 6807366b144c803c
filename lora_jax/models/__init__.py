"""Models built into lora-jax, written as pure functions over parameter pytrees."""

from lora_jax.models import llama

__all__ = ["llama"]
