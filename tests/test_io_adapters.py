"""lora-jax adapter folders: round trips, atomic writes, torn pairs, and refusals that name the problem."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_adapters import CFG, QV, tiny_adapted, tiny_base, tiny_logits

import lora_jax
from lora_jax import lora, split
from lora_jax.errors import BaseMismatchError, CheckpointError
from lora_jax.io import adapters, files, hashing
from lora_jax.io import peft as io_peft
from lora_jax.models import llama

# ----------------------------------------------------------------------------
# Adapter folders


def test_roundtrip_and_file_contents(tmp_path):
    p = tiny_adapted(1, [QV])
    d = adapters.save_adapter(tmp_path / "a", p, base_model_id="tiny", base_hash=hashing.base_hash(p), rules=[QV])
    assert sorted(f.name for f in d.iterdir()) == ["adapter.safetensors", "lora_jax_adapter.json"]  # no temp files
    tensors = load_file(str(d / "adapter.safetensors"))
    assert len(tensors) == 8 and tensors["layers/1/attn/v_proj/kernel/lora_a"].shape == (32, 4)
    assert tensors["layers/1/attn/v_proj/kernel/lora_b"].shape == (4, 16)
    config = json.loads((d / "lora_jax_adapter.json").read_text())

    assert config["lora_jax_version"] == lora_jax.__version__ and config["base_model_id"] == "tiny"
    assert config["rules"][0] == {"pattern": QV.pattern, "rank": 4, "alpha": 8, "dropout": 0.05, "init": "kaiming",
                                  "rslora": False, "in_dims": 1}  # fmt: skip
    assert config["adapters"]["layers/0/attn/q_proj/kernel"] == {"shape": [32, 32], "in_ndim": 1, "rank": 4,
        "scale": 2.0, "alpha": 8.0, "rslora": False, "dropout": 0.05, "dtype": "float32"}  # fmt: skip
    loaded = adapters.load_adapter(d, tiny_base(), check_base=True)
    np.testing.assert_array_equal(tiny_logits(loaded), tiny_logits(p))
    node = loaded["layers"][1]["attn"]["v_proj"]["kernel"]
    assert (node.scale, node.dropout, node.in_ndim) == (2.0, 0.05, 1)
    assert loaded["layers"][0]["mlp"]["up_proj"]["kernel"] is tiny_base()["layers"][0]["mlp"]["up_proj"]["kernel"]


def test_load_onto_adapted_params_replaces_the_adapters(tmp_path):
    a, b = tiny_adapted(1, [QV]), tiny_adapted(2, [lora.LoraRule(pattern=r"layers/\d+/mlp/up_proj/kernel", rank=2)])
    adapters.save_adapter(tmp_path / "b", b)
    switched = adapters.load_adapter(tmp_path / "b", a)
    assert [p for p, _ in lora.nodes(switched)] == [p for p, _ in lora.nodes(b)]
    np.testing.assert_array_equal(tiny_logits(switched), tiny_logits(b))


def test_trainable_half_bfloat16_and_in_ndim(tmp_path):
    base = {"attn": {"kernel": jax.random.normal(jax.random.key(0), (4, 8, 32), jnp.bfloat16)}}
    p = lora.init(jax.random.key(1), base, [lora.LoraRule(pattern=".*kernel", rank=3, in_dims=2, rslora=True)])
    trainable, _ = split(p)
    adapters.save_adapter(
        tmp_path, trainable, rules=[lora.LoraRule(pattern=".*kernel", rank=3, in_dims=2, rslora=True)]
    )
    entry = json.loads((tmp_path / "lora_jax_adapter.json").read_text())["adapters"]["attn/kernel"]
    assert entry["shape"] is None and entry["dtype"] == "bfloat16" and entry["rslora"] is True
    loaded = adapters.load_adapter(tmp_path, base)["attn"]["kernel"]
    assert loaded.in_ndim == 2 and loaded.lora_a.dtype == jnp.bfloat16 and loaded.scale == pytest.approx(3**0.5)
    np.testing.assert_array_equal(
        np.asarray(loaded.lora_a, np.float32), np.asarray(p["attn"]["kernel"].lora_a, np.float32)
    )


def test_failed_write_leaves_no_temp_file_and_a_torn_pair_is_detected(tmp_path, monkeypatch):
    d = adapters.save_adapter(tmp_path, tiny_adapted(1, [QV]))
    real = os.replace

    def fail_on_json(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("no space left on device (simulated)")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_json)
    with pytest.raises(OSError, match="no space left"):
        adapters.save_adapter(d, tiny_adapted(2, [QV]))
    monkeypatch.undo()
    assert sorted(f.name for f in d.iterdir()) == ["adapter.safetensors", "lora_jax_adapter.json"]
    with pytest.raises(CheckpointError, match=r"does not match the hash in lora_jax_adapter\.json; it is truncated"):
        adapters.load_adapter(d, tiny_base())


def _rewrite(d: Path, tensors: dict | None = None, **config) -> None:
    """Change an adapter folder consistently (tensors hash updated)."""
    if tensors is not None:
        save_file(tensors, str(d / "adapter.safetensors"))
    c = json.loads((d / "lora_jax_adapter.json").read_text())
    c.update(config)
    c["tensors_sha256"] = files.sha256((d / "adapter.safetensors").read_bytes())
    (d / "lora_jax_adapter.json").write_text(json.dumps(c))


def _adapter_dir(tmp_path) -> Path:
    return adapters.save_adapter(tmp_path / "a", tiny_adapted(1, [QV]), base_model_id="tiny", base_hash="sha256:abc")


def test_load_errors_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such adapter folder"):
        adapters.load_adapter(tmp_path / "nope", tiny_base())
    d = _adapter_dir(tmp_path)
    f = d / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="does not match the hash in lora_jax_adapter.json"):
        adapters.load_adapter(d, tiny_base())
    _rewrite(d)  # a consistent but truncated pair: the safetensors parser says so
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors: truncated or corrupted safetensors file"):
        adapters.load_adapter(d, tiny_base())
    f.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter\.safetensors: missing adapter tensors"):
        adapters.load_adapter(d, tiny_base())
    (d / "lora_jax_adapter.json").write_text('{"format": "lora_jax.adap')
    with pytest.raises(CheckpointError, match=r"lora_jax_adapter\.json: not valid JSON .* truncated or corrupted"):
        adapters.load_adapter(d, tiny_base())
    (d / "lora_jax_adapter.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lora_jax_adapter\.json: missing"):
        adapters.load_adapter(d, tiny_base())
    (d / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="this is a PEFT adapter folder, read it with import_peft"):
        adapters.load_adapter(d, tiny_base())


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"format": "other"}, r"not a lora-jax adapter \(format='other'\)"),
        ({"format_version": 7}, r"format version 7 .* upgrade lora-jax"),
        ({"adapters": {}}, "no 'adapters' entries"),
        ({"adapters": {"layers/0/attn/q_proj/kernel": {"rank": 4}}}, "lacks rank, scale or in_ndim; it is corrupted"),
    ],
)
def test_load_errors_config(tmp_path, config, match):
    d = _adapter_dir(tmp_path)
    _rewrite(d, **config)
    with pytest.raises(CheckpointError, match=match):
        adapters.load_adapter(d, tiny_base())


def test_load_errors_fit(tmp_path):
    d = _adapter_dir(tmp_path)
    tensors = load_file(str(d / "adapter.safetensors"))
    entries = json.loads((d / "lora_jax_adapter.json").read_text())["adapters"]
    small = llama.init(jax.random.key(0), dataclasses.replace(CFG, n_layers=1))
    with pytest.raises(CheckpointError, match=r"adapter path 'layers/1/attn/q_proj/kernel' is not in the base params"):
        adapters.load_adapter(d, small)
    wide = llama.init(jax.random.key(0), dataclasses.replace(CFG, dim=48))
    with pytest.raises(
        CheckpointError, match=r"'layers/0/attn/q_proj/kernel' was trained on a weight of shape \(32, 32\)"
    ):
        adapters.load_adapter(d, wide)
    with pytest.raises(BaseMismatchError, match=r"adapter was trained on base 'tiny' \(sha256:abc\) but base_params"):
        adapters.load_adapter(d, tiny_base(), check_base=True)
    _rewrite(d, tensors={**tensors, "layers/0/attn/q_proj/kernel/lora_a": np.ones((16, 4), np.float32)})
    with pytest.raises(
        CheckpointError, match=r"'layers/0/attn/q_proj/kernel': factors A \(16, 4\) and B \(4, 32\) do not"
    ):
        adapters.load_adapter(d, tiny_base())
    _rewrite(d, tensors={k: v for k, v in tensors.items() if k != "layers/1/attn/v_proj/kernel/lora_b"})
    with pytest.raises(CheckpointError, match="missing tensor 'layers/1/attn/v_proj/kernel/lora_b'"):
        adapters.load_adapter(d, tiny_base())
    _rewrite(d, tensors={**tensors, "extra": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match="tensors not described in lora_jax_adapter.json: extra"):
        adapters.load_adapter(d, tiny_base())
    _rewrite(
        d,
        tensors=tensors,
        adapters={**entries, "layers/0/attn/q_proj/kernel": {**entries["layers/0/attn/q_proj/kernel"], "rank": 2}},
    )
    with pytest.raises(
        CheckpointError, match="'layers/0/attn/q_proj/kernel': A has rank 4, lora_jax_adapter.json says 2"
    ):
        adapters.load_adapter(d, tiny_base())
    _rewrite(
        d, adapters={**entries, "layers/0/attn/q_proj/kernel": {**entries["layers/0/attn/q_proj/kernel"], "in_ndim": 2}}
    )
    with pytest.raises(CheckpointError, match=r"in_ndim=2 does not fit the base weight of shape \(32, 32\)"):
        adapters.load_adapter(d, tiny_base())


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="save_adapter: params hold no LoRA weight"):
        adapters.save_adapter(tmp_path, tiny_base())
    with pytest.raises(ValueError, match=r"gives scale 1 but 'layers/0/attn/q_proj/kernel' has 2"):
        adapters.save_adapter(tmp_path, tiny_adapted(1, [QV]), rules=[dataclasses.replace(QV, alpha=4)])


def test_no_pickle(tmp_path, monkeypatch):
    d = adapters.save_adapter(tmp_path, tiny_adapted(1, [QV]))

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    peft = io_peft.export_peft(tmp_path / "peft", tiny_adapted(2, [QV]), base_model_name_or_path="tiny")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    adapters.load(d, tiny_base())
    adapters.load(peft, tiny_base())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"scale": 1e6}, r"scale 1e\+06 disagrees with alpha 8 and rank 4 \(expected 2\)"),
        ({"scale": None}, "scale is None; it must be a finite number"),
        ({"rslora": True}, r"scale 2 disagrees with alpha 8 and rank 4 \(expected 4 with rslora\)"),
    ],
)
def test_an_edited_scale_is_refused(tmp_path, edit, match):
    d = _adapter_dir(tmp_path)
    cfg_file = d / adapters.ADAPTER_CONFIG
    config = json.loads(cfg_file.read_text())
    first = next(iter(config["adapters"]))
    config["adapters"][first].update(edit)
    cfg_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        adapters.load_adapter(d, tiny_base())
