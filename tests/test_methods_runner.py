"""``lora.method`` in the runner: DoRA and QDoRA train end to end, their adapters round-trip, bad options fail early."""

from __future__ import annotations

import csv
import json
import math

import jax
import pytest
from safetensors.numpy import load_file
from test_sweep import write_config
from tiny_models import write_tiny_chat_gguf

from lora_jax import cli
from lora_jax.config import ExperimentConfig, LoraConfig
from lora_jax.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_chat_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


def test_dora_and_qdora_train_end_to_end(tmp_path, tiny_gguf):
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, sweep={"method": ["lora", "qlora"]},
                       **{"lora.method": "dora", "train.steps": 3, "train.checkpoint_every": 0,
                          "quant.block_size": 32})
    out = tmp_path / "runs"
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out)]) == 0
    with open(out / "t" / "results.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows.values()), rows
    for name, row in rows.items():
        assert math.isfinite(float(row["train_loss"]))
        tensors = load_file(str(out / "t" / name / "adapter" / "adapter.safetensors"))
        mags = [k for k in tensors if k.endswith("/lora_magnitude")]
        assert mags and len(mags) * 2 == len([k for k in tensors if k.endswith(("/lora_a", "/lora_b"))])
        assert int(row["trainable_params"]) == sum(v.size for v in tensors.values())  # A, B and m all trained
        entries = json.loads((out / "t" / name / "adapter" / "lora_jax_adapter.json").read_text())["adapters"]
        assert {e["method"] for e in entries.values()} == {"dora"}


def test_saved_dora_adapter_loads_back_as_dora(tmp_path):
    import jax.numpy as jnp
    import numpy as np

    from lora_jax import lora
    from lora_jax.io import adapters
    from lora_jax.methods import dora

    base = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32))}
    p = dora.init(jax.random.key(0), base, [lora.LoraRule(pattern="w", rank=2)])
    p = {"w": dora.to_dora_with(p["w"], p["w"].lora_magnitude * 2)}
    back = adapters.load_adapter(adapters.save_adapter(tmp_path / "a", p), base)
    assert dora.is_dora(back["w"])
    np.testing.assert_array_equal(back["w"].lora_magnitude, p["w"].lora_magnitude)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "dora", "pissa_niter": 2}, r"lora.pissa_niter: an option of lora.method=pissa, but lora.method is"),
        ({"method": "pissa", "loftq_iter": 5}, r"lora.loftq_iter: an option of lora.method=loftq"),
        ({"method": "lora", "vera_d_initial": 0.5}, r"lora.vera_d_initial: an option of lora.method=vera"),
        ({"method": "nope"}, r"lora.method"),
    ],
)
def test_an_option_a_method_does_not_take_is_an_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_loftq_needs_a_quantized_base(tiny_gguf):
    from lora_jax.methods import select

    with pytest.raises(ConfigError, match="loftq initialises the adapter from the quantization error, so it needs "
                                          "method: qlora"):
        select.check(ExperimentConfig(method="lora", lora=LoraConfig(method="loftq")))
