"""Sharding: mesh shapes, and train steps on 8 host CPU devices against one device.

The 8-device cases run in one subprocess (``experiments/benchmarks/mesh_check.py``,
which sets ``--xla_force_host_platform_device_count=8`` before JAX starts); the
tests below read its JSON. The reference is the same step on one device, the
plain ``lora_jax.train.make_train_step`` without any sharding.
"""

import fcntl
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

import lora_jax as lj
from lora_jax import sharding
from lora_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MESHES = [[8, 1, 1], [2, 4, 1], [1, 4, 2], [1, 8, 1]]


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory, worker_id):
    """The 8-device subprocess's JSON, computed once per test session (shared by the xdist workers)."""
    root = tmp_path_factory.mktemp("mesh") if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out = root / "mesh.json"
    with open(root / "mesh.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits for this one's result instead of recomputing it
        if not out.exists():
            env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
            env.pop("XLA_FLAGS", None)
            tmp = root / "mesh.json.part"
            proc = subprocess.run([sys.executable, str(ROOT / "experiments/benchmarks/mesh_check.py"), str(tmp)],
                                  env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stderr[-4000:]
            tmp.rename(out)
    return json.loads(out.read_text())


def test_mesh_shape_fills_minus_one_and_rejects_bad_sizes():
    assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4, 1)
    assert sharding.mesh_shape({"tensor": -1}, 4) == (1, 1, 4)
    with pytest.raises(ConfigError, match="need 6 devices but there are 8"):
        sharding.mesh_shape({"data": 2, "fsdp": 3}, 8)
    with pytest.raises(ConfigError, match="more than one -1"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(ConfigError, match="unknown axis 'model'"):
        sharding.mesh_shape({"model": 2}, 8)
    with pytest.raises(ConfigError, match="data=0"):
        sharding.mesh_shape({"data": 0}, 8)


def test_batch_not_divisible_by_data_times_fsdp_is_refused():
    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 2})  # only the axis sizes are read
    sharding.check_batch(16, mesh)
    with pytest.raises(ConfigError, match="data x fsdp = 8 devices; make the batch size a multiple of 8"):
        sharding.check_batch(12, mesh)


def test_one_device_mesh_step_equals_unsharded_step():
    params = lj.lora.init(jax.random.key(0), {"w": jax.random.normal(jax.random.key(1), (8, 4))},
                          [lj.LoraRule(pattern="w", rank=2)])
    tx = optax.sgd(0.1)

    def loss(p, b):
        return jnp.mean((b @ p["w"]) ** 2), {}

    state = lj.train.init_state(params, tx, jax.random.key(2))
    mesh = sharding.make_mesh()
    sh = sharding.state_shardings(state, mesh)
    a, _ = lj.train.make_train_step(loss, tx, donate=False)(state, jnp.ones((2, 8)))
    b, _ = lj.train.make_train_step(loss, tx, shardings=sh)(sharding.place(state, sh), jnp.ones((2, 8)))
    assert jnp.allclose(a.trainable["w"].lora_a, b.trainable["w"].lora_a)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_sharded_steps_equal_one_device(mesh_results, kind, mesh):
    rows = {r["opt"]: r for r in mesh_results["cases"] if r["kind"] == kind and r["mesh"] == mesh}
    sgd, adamw = rows["sgd"], rows["adamw"]
    assert sgd["loss_rel"] <= 1e-5 and sgd["param_rel"] <= 1e-5, sgd  # one SGD step, every factor element
    # Ten AdamW steps: every loss, and the factors as a whole (Adam divides by sqrt(v), so an element whose
    # gradient is ~0 amplifies reduction-order noise; the per-element bound is looser).
    assert adamw["loss_rel"] <= 1e-4 and adamw["param_rel_l2"] <= 1e-4 and adamw["param_rel"] <= 1e-3, adamw
    assert sgd["recompiles"] == adamw["recompiles"] == 0
    assert sgd["placed"] and adamw["placed"]  # the step keeps the state's shardings


def test_stacked_layers_shard_with_the_layer_axis_replicated(mesh_results):
    s = mesh_results["stacked"]
    assert s["loss_rel"] <= 1e-5 and s["param_rel"] <= 1e-5 and s["placed"], s
    assert s["layer_axis_spec"] == "P(None, None, 'fsdp')"


def test_qtensor_children_split_on_whole_blocks(mesh_results):
    # up_proj (32, 64), block 32: one block of d_in, so only d_out splits; codes and scales alike.
    up = mesh_results["specs"]["4x2"]["up_proj"]
    assert up["codes"] == up["scales"] == "P(None, 'fsdp')"
    assert up["scale_scales"] == "P(None, None)"  # 16 columns per device are not whole groups of 256
    assert up["lora_a"] == "P(None, None)" and up["lora_b"] == "P(None, 'fsdp')"  # A like W's in, B like W's out
    # down_proj (64, 32): two blocks of d_in; fsdp=4 cannot split 2 blocks, tensor=2 can.
    down = mesh_results["specs"]["4x2"]["down_proj"]
    assert down["codes"] == down["scales"] == "P('tensor', 'fsdp')"
    assert down["scale_scales"] == "P('tensor', None)"
    assert down["lora_a"] == "P('tensor', None)" and down["lora_b"] == "P(None, 'fsdp')"
    assert mesh_results["specs"]["8x1"]["embed"] == "P('fsdp', None)"  # (vocab 64, dim 32): the larger dim


def test_checkpoint_from_2x4_restores_on_1x8_and_on_one_device(mesh_results):
    c = mesh_results["checkpoint"]
    for where in ("mesh_1x8", "one_device"):
        assert c[where] == 0.0 and c[where + "_on_like_shardings"] and c[where + "_step"] == 10, c


def test_fsdp8_frozen_base_bytes_per_device(mesh_results):
    assert mesh_results["fsdp8_frozen_bytes_per_device_over_total"] <= 0.15


def _cli_8_devices(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.run([sys.executable, "-m", "lora_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


def _table(text: str) -> list[dict[str, str]]:
    head, *rows = [line.split() for line in text.strip().splitlines()]
    return [dict(zip(head, r)) for r in rows]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from tiny_models import write_tiny_chat_gguf, write_yaml_config

    d = tmp_path_factory.mktemp("run")
    model = write_tiny_chat_gguf(d / "tiny.gguf")
    cfg = {"name": "t", "seed": 0, "method": "qlora", "model": {"name": str(model)},
           "task": {"name": "python-docs-lm", "max_len": 32, "n_train": 32, "n_val": 8},
           "lora": {"rank": 2, "alpha": 4}, "quant": {"block_size": 32},
           "optim": {"name": "adamw", "lr": 3e-3},
           "train": {"steps": 4, "batch_size": 8, "log_every": 1, "checkpoint_every": 2, "eval_batches": 1}}
    return write_yaml_config(d / "c.yaml", cfg, {})


def test_runner_on_an_fsdp8_mesh_matches_one_device(tiny_config, tmp_path):
    from lora_jax import cli

    assert cli.main(["train", str(tiny_config), "--quiet", "--output-dir", str(tmp_path / "one")]) == 0
    proc = _cli_8_devices("train", str(tiny_config), "--quiet", "--output-dir", str(tmp_path / "mesh"),
                          "--set", "mesh.fsdp=-1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one/t/run/summary.json").read_text())
    mesh = json.loads((tmp_path / "mesh/t/run/summary.json").read_text())
    for k in ("train_loss", "val_loss"):
        assert mesh[k] == pytest.approx(one[k], rel=1e-5), k


def test_plan_prints_per_device_bytes_for_the_mesh(tiny_config):
    proc = _cli_8_devices("plan", str(tiny_config), "--set", "mesh.fsdp=-1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = _table(proc.stdout)[0]
    proc = _cli_8_devices("plan", str(tiny_config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole = _table(proc.stdout)[0]
    assert sharded["mesh"] == "1x8x1" and "mesh" not in whole
    assert float(sharded["compile_s"]) > 0
    # The sharded step's per-device arguments: the base split 8 ways plus the replicated vectors and batch.
    assert float(sharded["step_args_mb"].replace(",", "")) < 0.5 * float(whole["step_args_mb"].replace(",", ""))


def test_scale_benchmark_reads_the_sharding_keys(mesh_results):
    sys.path.insert(0, str(ROOT / "experiments/benchmarks"))
    import scale

    multi = {"multiprocess_loss_rel_diff": 3e-7}
    keys = scale.mesh_keys(mesh_results, multi)
    assert keys["mesh_max_rel_loss_diff"] == max(c["loss_rel"] for c in mesh_results["cases"])
    assert {c["mesh"][0] for c in mesh_results["cases"]} == {8, 2, 1} and len(mesh_results["cases"]) == 16
    assert keys["fsdp8_frozen_bytes_per_device_over_total"] == mesh_results["fsdp8_frozen_bytes_per_device_over_total"]
    assert keys["multiprocess_loss_rel_diff"] == 3e-7


def test_readme_sharded_section_runs():
    from test_readme import python_blocks

    (code,) = python_blocks("Sharded runs")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert int(namespace["state"].step) == 1 and namespace["metrics"]["loss"].shape == ()


def test_mesh_config_checks_sizes_and_stays_out_of_the_run_hash():
    from lora_jax.config import ExperimentConfig, MeshConfig, config_hash, from_dict

    assert MeshConfig().sizes() == {}  # all 1: no mesh, the run is placed as before
    assert MeshConfig(fsdp=-1).sizes() == {"data": 1, "fsdp": -1, "tensor": 1}
    with pytest.raises(ConfigError, match="only one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match=r"mesh\.tensor: must be a positive int, or -1"):
        from_dict({"mesh": {"tensor": 0}})
    # A run resumes on another mesh: the mesh is placement, not part of what the run computes.
    assert config_hash(ExperimentConfig(mesh=MeshConfig(fsdp=8))) == config_hash(ExperimentConfig())


def test_generation_with_sharded_params_gives_one_devices_tokens(mesh_results):
    assert mesh_results["generate_tokens_equal"] is True


@jax.tree_util.register_pytree_node_class
class _OtherNode:
    """A weight node of a kind sharding has no rule for (as a method's own weight type would be)."""

    def __init__(self, w, m):
        self.w, self.m = w, m

    def dequantize(self):
        return self.w * self.m

    def tree_flatten(self):
        return (self.w, self.m), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def test_other_node_kinds_are_replicated_child_by_child():
    params = {"n": _OtherNode(jnp.ones((8, 4)), jnp.ones((1, 4))), "w": jnp.ones((8, 4))}
    s = sharding.param_shardings(params, sharding.make_mesh())
    assert isinstance(s["n"], _OtherNode) and s["n"].w.spec == s["n"].m.spec == jax.sharding.PartitionSpec()
    placed = sharding.place(params, s)
    assert jnp.array_equal(placed["n"].dequantize(), params["n"].dequantize())
