"""Compatibility names: ``lora-jax plan`` lives in :mod:`lora_jax.runner.plan`."""

from lora_jax.runner.plan import format_table, plan, plan_run

__all__ = ["format_table", "plan", "plan_run"]
