"""The host allocator settings keep XLA:CPU's scratch buffer mapped between executions."""

import json
import os
import subprocess
import sys

import pytest

from lora_jax import hostmem

# A program whose 64 MB intermediate (x @ x.T) lives in XLA's scratch buffer;
# the output is small, so the page faults counted are the scratch buffer's.
SCRIPT = """
import json, resource
import lora_jax, jax, jax.numpy as jnp
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


def _run(env_value):
    env = dict(os.environ)
    env.pop(hostmem.ENV, None)
    if env_value is not None:
        env[hostmem.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(hostmem._libc() is None, reason="glibc malloc only")
def test_scratch_buffer_is_not_faulted_in_again():
    tuned = _run(None)
    system = _run("system")
    assert tuned["configured"] and not system["configured"]
    # 64 MB = 16384 pages: with the system defaults each execution maps them afresh.
    assert system["faults"] > 8000, system
    assert tuned["faults"] < 1000, tuned


def test_release_and_configure_are_idempotent():
    hostmem.release()
    assert hostmem.configure() == hostmem.configured()
    assert hostmem.configure() == hostmem.configured()
