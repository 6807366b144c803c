"""The runner: from a config to results.

This package holds what turns an :class:`~lora_jax.config.ExperimentConfig`
into a run: building the parameters, rules, optimizer and loss
(:mod:`lora_jax.runner.build`), the training loop, evaluation, sweeps and
plans. Its modules are imported by name; this file imports none of them, so
``import lora_jax.runner`` loads no JAX.
"""
