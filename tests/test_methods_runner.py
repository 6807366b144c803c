"""``lora.method`` in the runner: DoRA and QDoRA train end to end, their adapters round-trip, bad options fail early."""

from __future__ import annotations

import csv
import dataclasses
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
        ({"method": "lora", "eva_rho": 2.0}, r"lora.eva_rho: an option of lora.method=eva"),
        ({"method": "eva", "pissa_niter": 2}, r"pissa_niter: an option of lora.method=pissa, but lora.method is eva"),
        ({"method": "eva", "eva_rho": 0.5}, r"eva_rho.*must be >= 1"),
        ({"method": "eva", "eva_batches": 0}, r"eva_batches.*must be >= 1"),
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


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "olora", "vera", "loftq"])
def test_every_method_builds_through_select(method):
    import jax.numpy as jnp
    import numpy as np

    from lora_jax import lora, paths, quant
    from lora_jax.methods import select

    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32))
    rules = [lora.LoraRule(pattern="w", rank=4)]
    qrules = [quant.QuantRule(pattern="w", block_size=32)] if method == "loftq" else None
    opts = {"loftq_iter": 2} if method == "loftq" else {}
    p = select.adapt(LoraConfig(method=method, **opts), jax.random.key(0), {"w": w}, rules, qrules)
    merged = lora.merge(p)["w"]
    if method == "loftq":
        plain = lora.dense(quant.quantize({"w": w}, qrules)["w"])
        assert float(jnp.linalg.norm(merged - w)) < float(jnp.linalg.norm(plain - w))
    else:
        np.testing.assert_allclose(merged, w, atol=1e-4)  # every init starts at the base model
    trained = paths.combine(jax.tree.map(lambda x: x + 0.1, paths.split(p)[0]), paths.split(p)[1])
    saved, saved_rules = select.for_saving(LoraConfig(method=method, **opts), p, trained, rules)
    node = saved["w"]
    assert type(node) is (type(p["w"]) if method in ("lora", "dora", "loftq") else lora.LoraWeight)
    assert node.rank == (8 if method in ("pissa", "olora") else 4)
    assert (saved_rules is None) == (method in ("pissa", "olora", "vera"))
    if method in ("pissa", "olora"):  # the conversion computes the trained model on the untouched base
        on_base = lora.merge({"w": dataclasses.replace(node, base=w)})["w"]
        np.testing.assert_allclose(on_base, lora.merge(trained)["w"], atol=1e-4)


def test_qolora_and_loftq_sweep(tmp_path, tiny_gguf):
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, method="qlora", sweep={"lora.method": ["olora", "loftq"]},
                       **{"train.steps": 2, "train.checkpoint_every": 0, "quant.block_size": 32})
    out = tmp_path / "runs"
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out)]) == 0
    with open(out / "t" / "results.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows.values()), rows
    olora = next(n for n in rows if "olora" in n)
    entries = json.loads((out / "t" / olora / "adapter" / "lora_jax_adapter.json").read_text())["adapters"]
    assert {e["rank"] for e in entries.values()} == {4}  # rank 2 trained, saved as plain LoRA of rank 2r


def test_eva_sweep_finishes_and_results_record_the_method(tmp_path, tiny_gguf):
    cfg = write_config(tmp_path / "c.yaml", tiny_gguf, sweep={"lora.method": ["lora", "eva"]},
                       **{"train.steps": 2, "train.checkpoint_every": 0})
    out = tmp_path / "runs"
    assert cli.main(["sweep", str(cfg), "--quiet", "--output-dir", str(out)]) == 0
    with open(out / "t" / "results.csv", newline="") as f:
        rows = {r["lora_method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"lora", "eva"} and all(r["status"] == "finished" for r in rows.values()), rows
    eva_run = out / "t" / rows["eva"]["run"]
    assert json.loads((eva_run / "summary.json").read_text())["lora_method"] == "eva"
    entries = json.loads((eva_run / "adapter" / "lora_jax_adapter.json").read_text())["adapters"]
    plain = json.loads((out / "t" / rows["lora"]["run"] / "adapter" / "lora_jax_adapter.json").read_text())
    assert sum(e["rank"] for e in entries.values()) <= 2 * len(plain["adapters"])  # the rank budget, redistributed
    assert (out / "t" / "figures" / "val_loss_by_method.png").is_file()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_eva_in_the_runner_starts_from_the_input_components(tmp_path, tiny_gguf, method):
    import numpy as np

    from lora_jax import lora
    from lora_jax.config import from_dict
    from lora_jax.runner import build

    raw = {"method": method, "model": {"name": str(tiny_gguf)}, "quant": {"block_size": 32},
           "task": {"name": "python-docs-lm", "max_len": 64, "n_train": 16},
           "lora": {"rank": 2, "method": "eva", "eva_batches": 1, "eva_rho": 1.0}, "train": {"batch_size": 4}}
    cfg = from_dict(raw)
    model = build.load_model(cfg.model)
    nodes = dict(lora.nodes(build.build_params(cfg, model)))
    assert nodes and {n.rank for n in nodes.values()} == {2}  # rho 1: no redistribution
    for n in nodes.values():  # A: orthonormal principal directions (plain LoRA's random A is not), B = 0
        a = np.asarray(n.lora_a, np.float64)
        np.testing.assert_allclose(a.T @ a, np.eye(2), atol=1e-5)
        assert not np.asarray(n.lora_b).any()
    spread = dict(lora.nodes(build.build_params(from_dict({**raw, "lora": {**raw["lora"], "eva_rho": 4.0}}), model)))
    assert sum(n.rank for n in spread.values()) <= 2 * len(nodes)


def test_eva_without_batches_is_an_error():
    import jax.numpy as jnp

    from lora_jax import lora
    from lora_jax.methods import select

    with pytest.raises(ConfigError, match="eva initialises A from the layer inputs of training batches"):
        select.adapt(LoraConfig(method="eva"), jax.random.key(0), {"w": jnp.ones((4, 4))},
                     [lora.LoraRule(pattern="w", rank=2)])


def _results(sweep, methods):
    sweep.mkdir()
    cols = ["run", "method", "lora_method", "rank", "seed", "status", "val_loss"]
    with open(sweep / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for i, (m, r) in enumerate((m, r) for m in methods for r in (1, 4)):
            w.writerow({"run": f"{m}_r{r}", "method": "lora", "lora_method": m, "rank": r, "seed": 0,
                        "status": "finished", "val_loss": 2.5 - 0.1 * i})
    return sweep


def test_a_figure_compares_methods_only_when_there_are_two(tmp_path):
    from lora_jax import plots

    two = plots.make_all(_results(tmp_path / "two", ["lora", "dora"]))
    assert {p.name for p in two} >= {"val_loss_by_method.png", "val_loss_by_method.pdf"}
    assert (tmp_path / "two" / "figures" / "val_loss_by_method.png").stat().st_size > 0
    one = plots.make_all(_results(tmp_path / "one", ["dora"]))
    assert one and not [p for p in one if "by_method" in p.name]  # the other figures are still drawn
