"""A sweep's runs as Ray tasks: ``lora-jax sweep CONFIG --ray ADDRESS``.

Each run is one Ray task that calls the same function a local sweep calls
(:func:`lora_jax.runner.sweep.run_recorded`) on the run's folder under the
sweep folder, so a run writes the same files wherever it runs. The sweep
folder must therefore be one path that every node sees (a shared file
system); the config's ``output_dir`` (or ``--output-dir``) says where, and
the driver passes each task the absolute path of its run folder.

- Resources: a task reserves ``resources.cpu`` CPUs and ``resources.gpu``
  GPUs of the run's config.
- Faults: a task whose worker process dies (killed, node lost) is started
  again, up to ``resources.max_retries`` times, and resumes from the run's
  last checkpoint; a run that raises is recorded as failed (as locally) and
  not retried. Runs whose ``summary.json`` already says ``finished`` for the
  same config are not submitted at all.
- Two drivers: the driver holds the sweep folder's lock file
  (:func:`lora_jax.io.files.locked`, taken by
  :func:`~lora_jax.runner.sweep.run_sweep`), so a second driver on the same
  folder stops with a :class:`~lora_jax.errors.LockedError`.
- Progress: a bar of runs done, with running / queued / failed counts
  (``running`` counts the submitted runs that fit the cluster's CPUs and GPUs
  at once; Ray does not tell a driver which have started); ``quiet`` prints
  one line per ended run instead and keeps the workers' output off the
  driver's terminal.

Configs and summaries cross the cluster as JSON text. Ray is optional
(``pip install 'lora-jax[ray]'``); without it ``--ray`` stops with that line.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from lora_jax import config as _config
from lora_jax.runner import sweep as _sweep

INSTALL_LINE = "pip install 'lora-jax[ray]'"
"""How to install the optional Ray dependency."""


def import_ray():
    """Return the ``ray`` module, or raise ``ModuleNotFoundError`` with the install line."""
    try:
        import ray
    except ImportError as e:
        raise ModuleNotFoundError(
            f"--ray runs the sweep on a Ray cluster, but the ray package is not installed; run `{INSTALL_LINE}` "
            "(on the driver and on every node), or drop --ray to run the sweep here", name="ray") from e
    return ray


def run_task(name: str, cfg_json: str, run_dir: str) -> str:
    """Run one run where Ray placed it; return its summary as JSON (the body of each Ray task)."""
    from lora_jax.io.files import remove_stale_temporaries

    cfg = _config.from_dict(json.loads(cfg_json))
    if Path(run_dir).is_dir():  # a killed earlier attempt's half-written files; that attempt is gone
        remove_stale_temporaries(run_dir)
    return json.dumps(_sweep.run_recorded(name, cfg, Path(run_dir), quiet=True), default=str)


def _capacity(ray, cfgs) -> int:
    total = ray.cluster_resources()
    fits = [math.inf]
    for key, need in (("CPU", max(c.resources.cpu for c in cfgs)), ("GPU", max(c.resources.gpu for c in cfgs))):
        if need > 0:
            fits.append(total.get(key, 0) // need)
    return int(min(fits)) if min(fits) != math.inf else len(cfgs)


def _connect(ray, address: str, quiet: bool) -> bool:
    """Connect to (or, for ``local``, start) a cluster; return whether this call did, so must shut it down."""
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=not quiet)
    else:
        ray.init(address=address, log_to_driver=not quiet)
    return True


def run_all(runs: list[tuple[str, _config.ExperimentConfig]], sweep_dir: Path, *, address: str,
            quiet: bool = False) -> list[dict]:
    """Run every run of ``runs`` as a Ray task, writing ``results.csv`` as they end; return the summaries.

    Call it with ``sweep_dir`` held (:func:`lora_jax.io.files.locked`), as
    :func:`~lora_jax.runner.sweep.run_sweep` does. The rows of ``results.csv``
    come in sweep order, as from a local sweep.

    Raises:
      ModuleNotFoundError: Ray is not installed (the message has the install line).
    """
    ray = import_ray()
    sweep_dir = Path(sweep_dir).resolve()
    done: dict[str, dict] = {}
    for name, cfg in runs:  # finished runs are never submitted again
        if _sweep.finished_summary(sweep_dir / name, cfg) is not None:
            done[name] = _sweep.run_one(name, cfg, sweep_dir / name)
    todo = [(name, cfg) for name, cfg in runs if name not in done]
    order = [name for name, _ in runs]

    def write():
        _sweep.write_results(sweep_dir, [done[n] for n in order if n in done])

    if not todo:
        write()
        return [done[n] for n in order]
    owns = _connect(ray, address, quiet)
    task = ray.remote(run_task)
    pending = {}
    bar = None
    try:
        for name, cfg in todo:
            r = cfg.resources
            ref = task.options(num_cpus=r.cpu, num_gpus=r.gpu, max_retries=r.max_retries, retry_exceptions=False,
                               name=f"lora-jax {sweep_dir.name}/{name}").remote(name, json.dumps(_config.to_dict(cfg)),
                                                               str(sweep_dir / name))
            pending[ref] = (name, cfg)
        capacity = _capacity(ray, [cfg for _, cfg in todo])
        failed = sum(s.get("status") == "failed" for s in done.values())
        if not quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(runs), initial=len(done), desc="runs", unit="run", dynamic_ncols=True)

        def show():
            if bar is not None:
                running = min(len(pending), capacity)
                bar.set_postfix(running=running, queued=len(pending) - running, failed=failed)

        show()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            name, cfg = pending.pop(ready[0])
            try:
                s = json.loads(ray.get(ready[0]))
            except ray.exceptions.RayError as e:  # the worker died more often than max_retries allows
                first = str(e).splitlines()[0] if str(e) else ""
                s = _sweep.record_failed(name, cfg, sweep_dir / name, RuntimeError(
                    f"Ray task failed after {cfg.resources.max_retries} retries: {type(e).__name__}: {first}"))
            done[name] = s
            failed += s.get("status") == "failed"
            write()
            line = f"{name}: {s.get('status')}" + (f" ({s.get('reason')})" if s.get("reason") else "")
            if bar is not None:
                bar.update(1)
                show()
                bar.write(line)
            else:
                print(f"[{len(done)}/{len(runs)}] {line}", file=sys.stderr, flush=True)
    except BaseException:
        for ref in pending:  # Ctrl-C or an error on the driver: stop the runs it started
            ray.cancel(ref)
        raise
    finally:
        if bar is not None:
            bar.close()
        if owns:
            ray.shutdown()
    return [done[n] for n in order]
