"""Host allocator settings that keep XLA:CPU's per-step scratch memory mapped.

XLA:CPU allocates the scratch ("temp") buffer of a compiled program afresh
on every execution: for a training step it holds the activations kept for
the backward pass, 1.1 GB for the SmolLM2-135M LoRA step at batch 4 x 128.
glibc's ``malloc`` serves a block that large with a fresh ``mmap`` and gives
it back with ``munmap`` on ``free``, so every step page-faults the whole
buffer in again: measured here, 330k minor faults and 0.4-0.8 s of kernel
time per 1.2 s step.

:func:`configure` makes glibc keep such blocks: large allocations come from
the heap (``M_MMAP_MAX = 0``) of one arena (``M_ARENA_MAX = 1``: the other
arenas have 64 MB heaps and fall back to ``mmap`` for larger blocks), and
freed memory stays with the process (``M_TRIM_THRESHOLD = -1``: no trimming
on ``free``) until :func:`release` hands it back. The step then reuses the same
pages (no faults; 1.18 -> 0.90 s on that step). Peak memory is unchanged; the
resident size after a step no longer drops back, which is what a training
process wants.

Nothing here runs on import: ``import lora_jax`` leaves the process's
allocator as it was. The ``lora-jax`` command calls :func:`configure` at
start-up (:func:`lora_jax.cli.process_settings`), before JAX starts its
threads; research code that wants the same calls it before its first JAX
computation (the settings only reach threads that have not allocated yet), or
sets glibc's equivalent ``MALLOC_*`` environment variables (``mallopt(3)``). Set
``LORA_JAX_MALLOC=system`` to keep the system allocator's defaults even under
the command. Elsewhere than glibc (macOS, musl) nothing changes.
``experiments/benchmarks/train_step.py`` measures the step with and without
these settings, in the loop that blocks after every step and in the loop that
dispatches ahead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # M_TRIM_THRESHOLD = -1: never trim on free

ENV = "LORA_JAX_MALLOC"

_state = {"configured": False}


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only
        return libc
    except (OSError, AttributeError):
        return None


def configure() -> bool:
    """Apply the settings above once; True if they are in effect.

    Returns False (and changes nothing) off glibc or with ``LORA_JAX_MALLOC=system``.
    """
    if _state["configured"]:
        return True
    if os.environ.get(ENV, "").strip().lower() == "system":
        return False
    libc = _libc()
    if libc is None:
        return False
    ok = all(libc.mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER)))
    _state["configured"] = ok
    return ok


def configured() -> bool:
    """Whether :func:`configure` is in effect in this process."""
    return _state["configured"]


def release() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    Memory freed by earlier work (weights staged on the host, a previous run,
    compilation) otherwise stays resident inside the allocator and inflates the
    next peak-RSS reading.
    """
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
