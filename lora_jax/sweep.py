"""Compatibility names: the runner lives in :mod:`lora_jax.runner`.

- :mod:`lora_jax.runner.build`: model, rules, parameters, optimizer, loss, data of a run
- :mod:`lora_jax.runner.loop`: the training loop of one run
- :mod:`lora_jax.runner.evaluate`: validation loss, perplexity and generation scores
- :mod:`lora_jax.runner.sweep`: runs, ``results.csv``, resume
- :mod:`lora_jax.runner.telemetry`: peak memory, versions, git commit
"""

from lora_jax.io.files import atomic_write
from lora_jax.runner.build import LoadedModel, RunContext, load_model, make_lr_schedule, make_optimizer, prepare
from lora_jax.runner.evaluate import evaluate
from lora_jax.runner.loop import train_run
from lora_jax.runner.sweep import RESULT_COLUMNS, run_one, run_sweep, write_results
from lora_jax.runner.telemetry import peak_rss_mb, release_freed_memory, reset_peak_rss

__all__ = [
    "RESULT_COLUMNS", "LoadedModel", "RunContext", "atomic_write", "evaluate", "load_model", "make_lr_schedule",
    "make_optimizer", "peak_rss_mb", "prepare", "release_freed_memory", "reset_peak_rss", "run_one", "run_sweep",
    "train_run", "write_results",
]
