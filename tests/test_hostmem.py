"""The host allocator settings: off on import, applied by the command, and what they change."""

import json
import os
import subprocess
import sys

import pytest

from lora_jax import hostmem

# A program whose 64 MB intermediate (x @ x.T) lives in XLA's scratch buffer;
# the output is small, so the page faults counted are the scratch buffer's.
# The settings are applied as the lora-jax command applies them.
SCRIPT = """
import json, resource
from lora_jax import cli
import lora_jax, jax, jax.numpy as jnp
cli.process_settings()
f = jax.jit(lambda x: ((x @ x.T) @ x).sum(axis=0))
x = jnp.ones((4096, 256), jnp.float32)
for _ in range(2):
    f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 3
print(json.dumps({"configured": lora_jax.hostmem.configured(), "faults": faults}))
"""

# Importing lora_jax and using its JAX-side modules must leave a plain numpy
# program's allocations as the system makes them: a 64 MB array freed and
# allocated again is mapped afresh each time (numpy asks for huge pages, so
# hundreds of faults rather than 16384); under the command's settings the
# heap keeps the pages and nothing is faulted in again.
NUMPY_SCRIPT = """
import json, resource, sys
import lora_jax, lora_jax.train, lora_jax.lora
import numpy as np
if sys.argv[1:] == ["command"]:
    lora_jax.cli.process_settings()
for _ in range(2):
    np.ones(16 * 2**20, np.float32).sum()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    np.ones(16 * 2**20, np.float32).sum()
print(json.dumps({"configured": lora_jax.hostmem.configured(),
                  "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 3}))
"""


def _run(script, env_value=None, *argv):
    env = dict(os.environ)
    env.pop(hostmem.ENV, None)
    if env_value is not None:
        env[hostmem.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(hostmem._libc() is None, reason="glibc malloc only")
def test_scratch_buffer_is_not_faulted_in_again_under_the_command_settings():
    tuned = _run(SCRIPT)
    system = _run(SCRIPT, "system")
    assert tuned["configured"] and not system["configured"]
    # 64 MB = 16384 pages: with the system defaults each execution maps them afresh.
    assert system["faults"] > 8000, system
    assert tuned["faults"] < 1000, tuned


def test_import_changes_no_process_setting():
    r = subprocess.run([sys.executable, "-c", "import lora_jax, sys; assert 'jax' not in sys.modules; "
                        "assert not lora_jax.hostmem.configured()"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(hostmem._libc() is None, reason="glibc malloc only")
def test_numpy_allocations_after_import_behave_as_the_system_makes_them():
    plain = _run(NUMPY_SCRIPT)
    command = _run(NUMPY_SCRIPT, None, "command")
    assert not plain["configured"] and command["configured"]
    assert plain["faults"] > 100, plain  # had the import set M_MMAP_MAX=0, the pages would be reused
    assert command["faults"] < 10, command


def test_release_and_configure_are_idempotent():
    hostmem.release()
    assert hostmem.configure() == hostmem.configured()
    assert hostmem.configure() == hostmem.configured()
