"""File I/O: plain-file helpers, lora-jax adapter folders, PEFT folders, orbax train state.

- :mod:`lora_jax.io.files`: the one atomic write, JSON and safetensors reading, hashes (imports no JAX).
- :mod:`lora_jax.io.factors`: fitting saved LoRA factors onto a base tree.
- :mod:`lora_jax.io.hashing`: :func:`base_hash`, the identity of a frozen base, and array digests.
- :mod:`lora_jax.io.adapters`: lora-jax adapter folders (:func:`save_adapter`, :func:`load_adapter`, :func:`load`).
- :mod:`lora_jax.io.peft`: Hugging Face PEFT folders (:func:`export_peft`, :func:`import_peft`).
- :mod:`lora_jax.io.state`: orbax train-state checkpoints (:func:`save_train_state`, :func:`restore_train_state`).

The merged Hugging Face export is :mod:`lora_jax.models.export_hf`. The
names below load their module on first use, so ``import lora_jax.io.files``
imports no JAX.
"""

import importlib

_NAMES = {
    "atomic_write": "files",
    "read_json": "files",
    "base_hash": "hashing",
    "save_adapter": "adapters",
    "load_adapter": "adapters",
    "load": "adapters",
    "read_adapter_config": "adapters",
    "export_peft": "peft",
    "import_peft": "peft",
    "checkpoint_manager": "state",
    "save_train_state": "state",
    "restore_train_state": "state",
    "latest_step": "state",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"lora_jax.io.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'lora_jax.io' has no attribute {name!r}")


def __dir__():
    return sorted(set(__all__) | set(globals()))
