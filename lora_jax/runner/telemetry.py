"""What a run records about the process and the code: peak memory, versions, the git commit."""

from __future__ import annotations

import functools
import platform
import resource
import subprocess
from pathlib import Path

from lora_jax import hostmem


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (see :func:`lora_jax.hostmem.release`)."""
    hostmem.release()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported.

    Freed memory is handed back to the OS first (:func:`release_freed_memory`),
    so the new peak measures what the following work holds.
    """
    release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last :func:`reset_peak_rss` (else since the process began)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the code this process runs (read once), with ``+dirty`` for local changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries a run's numbers depend on."""
    import flax
    import jax
    import numpy as np
    import optax

    import lora_jax

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jax.lib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "lora_jax": lora_jax.__version__,
            "numpy": np.__version__}
