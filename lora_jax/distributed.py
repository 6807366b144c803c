"""Several processes (hosts) in one run: ``jax.distributed`` start-up from arguments or environment variables.

Every process runs the same command; together their devices form one mesh
(:mod:`lora_jax.sharding`), each process placing only its own devices' shards.
The coordinator is process 0's ``host:port``. Arguments win over the
environment: ``LORA_JAX_COORDINATOR``, ``LORA_JAX_NUM_PROCESSES``,
``LORA_JAX_PROCESS_ID``, then JAX's own ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. On CPUs the processes exchange
data through gloo (``jax_cpu_collectives_implementation``).

    lora-jax plan cfg.yaml --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # on host 0
    lora-jax plan cfg.yaml --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 1   # on host 1

What works across processes: the sharded train step, :mod:`lora_jax.sharding`
placement and train-state checkpoints in one shared folder
(``experiments/benchmarks/multihost_check.py``, ``tests/test_multihost.py``).
Not yet: the runner's own files. ``lora-jax train``/``sweep`` take a lock on
the output folder and write metrics and summaries from every process, so
several processes sharing one output folder are refused by the lock; and
every process still reads the whole base file before placing its shards.
"""

from __future__ import annotations

import os

from lora_jax.errors import ConfigError

ENV = {
    "coordinator": ("LORA_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("LORA_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("LORA_JAX_PROCESS_ID", "JAX_PROCESS_ID"),
}
"""The environment variables read for each setting, first found wins."""


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, environ=None) -> dict | None:
    """Resolve the three settings from the arguments and the environment; ``None`` when none is set.

    Raises:
      ConfigError: some but not all are set, or a number is not an int in range.

    Examples:
      >>> settings(environ={}) is None
      True
      >>> settings("127.0.0.1:1234", environ={"LORA_JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
      {'coordinator': '127.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
    """
    environ = os.environ if environ is None else environ
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, names in ENV.items():
        if given[key] is None:
            given[key] = next((environ[n] for n in names if environ.get(n)), None)
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise ConfigError(f"several processes need --coordinator, --num-processes and --process-id (or the "
                          f"environment variables {', '.join(n for k in missing for n in ENV[k][:1])}); missing "
                          f"{flags}")
    try:
        n, i = int(given["num_processes"]), int(given["process_id"])
    except ValueError as e:
        raise ConfigError(f"--num-processes and --process-id must be ints, got {given['num_processes']!r} and "
                          f"{given['process_id']!r}") from e
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--process-id must be in 0..{n - 1} for --num-processes {n}, got {i}")
    if ":" not in str(given["coordinator"]):
        raise ConfigError(f"--coordinator must be host:port of process 0, got {given['coordinator']!r}")
    return {"coordinator": str(given["coordinator"]), "num_processes": n, "process_id": i}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str = "gloo") -> bool:
    """Start ``jax.distributed`` when several processes are asked for; return whether it started.

    Call it before anything touches a device. With one process (nothing set)
    it does nothing and returns ``False``.

    Raises:
      ConfigError: incomplete or invalid settings (see :func:`settings`).
    """
    s = settings(coordinator, num_processes, process_id)
    if s is None or s["num_processes"] == 1:
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=s["coordinator"], num_processes=s["num_processes"],
                               process_id=s["process_id"])
    return True


def is_primary() -> bool:
    """True in process 0 (or when there is one process): the one that writes shared files."""
    import jax

    return jax.process_index() == 0
