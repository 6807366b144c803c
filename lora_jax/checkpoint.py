"""Compatibility module: the checkpoint and export functions, re-exported from their homes.

- Train-state checkpoints (orbax): :mod:`lora_jax.io.state`.
- The identity of a frozen base (:func:`base_hash`): :mod:`lora_jax.io.hashing`.
- Hugging Face PEFT folders (:func:`export_peft`, :func:`import_peft`): :mod:`lora_jax.io.peft`.
- Merged Hugging Face folders (:func:`export_merged_hf`): :mod:`lora_jax.models.export_hf`.
- lora-jax adapter folders: :mod:`lora_jax.io.adapters`.

New code should import from those modules; the names below keep
``lora_jax.checkpoint.<name>`` working.
"""

from lora_jax.errors import BaseMismatchError, CheckpointError
from lora_jax.io.hashing import base_hash
from lora_jax.io.peft import MODEL_KINDS, PEFT_CONFIG, PEFT_TENSORS, export_peft, hf_module_name, import_peft
from lora_jax.io.state import (
    FORMAT_VERSION,
    TRAIN_FORMAT,
    checkpoint_manager,
    latest_step,
    restore_train_state,
    save_train_state,
)
from lora_jax.models.export_hf import export_merged_hf
from lora_jax.train import TrainState

__all__ = [
    "FORMAT_VERSION",
    "MODEL_KINDS",
    "PEFT_CONFIG",
    "PEFT_TENSORS",
    "TRAIN_FORMAT",
    "BaseMismatchError",
    "CheckpointError",
    "TrainState",
    "base_hash",
    "checkpoint_manager",
    "export_merged_hf",
    "export_peft",
    "hf_module_name",
    "import_peft",
    "latest_step",
    "restore_train_state",
    "save_train_state",
]
