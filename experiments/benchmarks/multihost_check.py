"""Two processes, 4 host CPU devices each, one 8-device mesh, against one process with 8 devices; prints JSON.

    python experiments/benchmarks/multihost_check.py [OUT.json]

This process (8 host devices) starts two worker processes on 127.0.0.1 (a free
port; :func:`lora_jax.distributed.initialize`, gloo CPU collectives), which
train the QLoRA model of ``mesh_check.py`` for three AdamW steps on mesh
(1, 8, 1) (fsdp across both processes) and save a checkpoint together. It
trains the same steps itself on its own 8 devices, then restores the workers'
checkpoint.

Keys:
  losses_two_processes, losses_one_process   the three losses
  multiprocess_loss_rel_diff                 max |two - one| / |one| over the steps (<= 1e-5)
  restored_step                              the step of the restored checkpoint (3)
  restored_max_rel_diff                      max over leaves of |restored - own| / max |own|, the trainable
                                             params and optimizer state (<= 1e-5)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import mesh_check as mc  # noqa: E402
import numpy as np  # noqa: E402

from lora_jax import distributed, sharding  # noqa: E402
from lora_jax.io import state as ckpt  # noqa: E402

STEPS = 3


def train(mesh):
    """Three AdamW steps of the QLoRA model on ``mesh``; the state and the losses."""
    params = mc.params_of("qlora")
    tx = mc.OPTIMIZERS["adamw"][0]()
    state = mc.lj.train.init_state(params, tx, jax.random.key(3))
    sh = sharding.state_shardings(state, mesh)
    state = sharding.place(state, sh)
    step = mc.lj.train.make_train_step(mc.loss_fn, tx, shardings=sh)
    losses = []
    for i in range(STEPS):
        state, m = step(state, sharding.shard_batch(mc.batch_at(i), mesh))
        losses.append(float(m["loss"]))
    return state, losses, tx, params


def worker(i: int, port: int, folder: str) -> None:
    mc.host_devices(4)
    distributed.initialize(f"127.0.0.1:{port}", 2, i)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    state, losses, _, _ = train(sharding.make_mesh((1, 8, 1)))
    ckpt.save_train_state(Path(folder) / "ckpt", state, base_id="tiny")
    if distributed.is_primary():
        (Path(folder) / "losses.json").write_text(json.dumps(losses))
    jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> dict:
    folder = tempfile.mkdtemp()
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), str(port), folder], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    mc.host_devices(8)
    mesh = sharding.make_mesh((1, 8, 1))
    own, losses, tx, params = train(mesh)
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        if p.returncode:
            raise RuntimeError(f"a worker failed (exit {p.returncode}):\n{log[-4000:]}")
    two = json.loads((Path(folder) / "losses.json").read_text())
    like = sharding.shard_state(mc.lj.train.init_state(params, tx, jax.random.key(3)), mesh)
    restored, _ = ckpt.restore_train_state(Path(folder) / "ckpt", like, base_id="tiny")
    got = jax.tree.leaves((restored.trainable, restored.opt_state))
    want = jax.tree.leaves((own.trainable, own.opt_state))
    diffs = [float(np.abs(np.asarray(g) - np.asarray(w)).max() / max(np.abs(np.asarray(w)).max(), 1e-30))
             for g, w in zip(got, want, strict=True)]
    return {
        "losses_two_processes": two, "losses_one_process": losses,
        "multiprocess_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(two, losses, strict=True)),
        "restored_step": int(restored.step), "restored_max_rel_diff": max(diffs),
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        sys.exit(0)
    res = main()
    text = json.dumps(res, indent=1)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)
    print(text)
