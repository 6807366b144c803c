"""Adapter folders, switching adapters without recompiling, and exact weighted combinations."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax
from lora_jax import adapters, lora, split
from lora_jax import checkpoint as ck
from lora_jax.checkpoint import BaseMismatchError, CheckpointError
from lora_jax.models import llama

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
QV = lora.LoraRule(pattern=r"layers/\d+/attn/(q|v)_proj/kernel", rank=4, alpha=8, dropout=0.05)
TOKENS = jnp.array([[1, 5, 17, 3, 40, 2, 8, 9]])


@functools.cache
def _base():
    return llama.init(jax.random.key(0), CFG)


def _adapted(seed: int, rules) -> dict:
    """Adapters with random, non-zero B so each one changes the model."""
    p = lora.init(jax.random.key(seed), _base(), rules)
    return jax.tree.map(
        lambda x: (
            dataclasses.replace(x, lora_b=0.5 * jax.random.normal(jax.random.key(seed + 100), x.lora_b.shape))
            if lora.is_lora(x)
            else x
        ),
        p,
        is_leaf=lora.is_lora,
    )


_forward = jax.jit(lambda p, t: llama.apply(p, t, CFG))


def _logits(params) -> np.ndarray:
    return np.asarray(_forward(params, TOKENS))


# ----------------------------------------------------------------------------
# Adapter folders


def test_roundtrip_and_file_contents(tmp_path):
    p = _adapted(1, [QV])
    d = adapters.save_adapter(tmp_path / "a", p, base_model_id="tiny", base_hash=ck.base_hash(p), rules=[QV])
    assert sorted(f.name for f in d.iterdir()) == ["adapter.safetensors", "lora_jax_adapter.json"]  # no temp files
    tensors = load_file(str(d / "adapter.safetensors"))
    assert len(tensors) == 8 and tensors["layers/1/attn/v_proj/kernel/lora_a"].shape == (32, 4)
    assert tensors["layers/1/attn/v_proj/kernel/lora_b"].shape == (4, 16)
    config = json.loads((d / "lora_jax_adapter.json").read_text())
    import lora_jax

    assert config["lora_jax_version"] == lora_jax.__version__ and config["base_model_id"] == "tiny"
    assert config["rules"][0] == {"pattern": QV.pattern, "rank": 4, "alpha": 8, "dropout": 0.05, "init": "kaiming",
                                  "rslora": False, "in_dims": 1}  # fmt: skip
    assert config["adapters"]["layers/0/attn/q_proj/kernel"] == {"shape": [32, 32], "in_ndim": 1, "rank": 4,
        "scale": 2.0, "alpha": 8.0, "rslora": False, "dropout": 0.05, "dtype": "float32"}  # fmt: skip
    loaded = adapters.load_adapter(d, _base(), check_base=True)
    np.testing.assert_array_equal(_logits(loaded), _logits(p))
    node = loaded["layers"][1]["attn"]["v_proj"]["kernel"]
    assert (node.scale, node.dropout, node.in_ndim) == (2.0, 0.05, 1)
    assert loaded["layers"][0]["mlp"]["up_proj"]["kernel"] is _base()["layers"][0]["mlp"]["up_proj"]["kernel"]


def test_load_onto_adapted_params_replaces_the_adapters(tmp_path):
    a, b = _adapted(1, [QV]), _adapted(2, [lora.LoraRule(pattern=r"layers/\d+/mlp/up_proj/kernel", rank=2)])
    adapters.save_adapter(tmp_path / "b", b)
    switched = adapters.load_adapter(tmp_path / "b", a)
    assert [p for p, _ in lora.nodes(switched)] == [p for p, _ in lora.nodes(b)]
    np.testing.assert_array_equal(_logits(switched), _logits(b))


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
    d = adapters.save_adapter(tmp_path, _adapted(1, [QV]))
    real = os.replace

    def fail_on_json(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("no space left on device (simulated)")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_json)
    with pytest.raises(OSError, match="no space left"):
        adapters.save_adapter(d, _adapted(2, [QV]))
    monkeypatch.undo()
    assert sorted(f.name for f in d.iterdir()) == ["adapter.safetensors", "lora_jax_adapter.json"]
    with pytest.raises(CheckpointError, match=r"does not match the hash in lora_jax_adapter\.json; it is truncated"):
        adapters.load_adapter(d, _base())


def _rewrite(d: Path, tensors: dict | None = None, **config) -> None:
    """Change an adapter folder consistently (tensors hash updated)."""
    if tensors is not None:
        save_file(tensors, str(d / "adapter.safetensors"))
    c = json.loads((d / "lora_jax_adapter.json").read_text())
    c.update(config)
    c["tensors_sha256"] = ck._sha256((d / "adapter.safetensors").read_bytes())
    (d / "lora_jax_adapter.json").write_text(json.dumps(c))


def _adapter_dir(tmp_path) -> Path:
    return adapters.save_adapter(tmp_path / "a", _adapted(1, [QV]), base_model_id="tiny", base_hash="sha256:abc")


def test_load_errors_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such adapter folder"):
        adapters.load_adapter(tmp_path / "nope", _base())
    d = _adapter_dir(tmp_path)
    f = d / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="does not match the hash in lora_jax_adapter.json"):
        adapters.load_adapter(d, _base())
    _rewrite(d)  # a consistent but truncated pair: the safetensors parser says so
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors: truncated or corrupted safetensors file"):
        adapters.load_adapter(d, _base())
    f.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter\.safetensors: missing adapter tensors"):
        adapters.load_adapter(d, _base())
    (d / "lora_jax_adapter.json").write_text('{"format": "lora_jax.adap')
    with pytest.raises(CheckpointError, match=r"lora_jax_adapter\.json: not valid JSON .* truncated or corrupted"):
        adapters.load_adapter(d, _base())
    (d / "lora_jax_adapter.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lora_jax_adapter\.json: missing"):
        adapters.load_adapter(d, _base())
    (d / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="this is a PEFT adapter folder, read it with import_peft"):
        adapters.load_adapter(d, _base())


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
        adapters.load_adapter(d, _base())


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
        adapters.load_adapter(d, _base(), check_base=True)
    _rewrite(d, tensors={**tensors, "layers/0/attn/q_proj/kernel/lora_a": np.ones((16, 4), np.float32)})
    with pytest.raises(
        CheckpointError, match=r"'layers/0/attn/q_proj/kernel': factors A \(16, 4\) and B \(4, 32\) do not"
    ):
        adapters.load_adapter(d, _base())
    _rewrite(d, tensors={k: v for k, v in tensors.items() if k != "layers/1/attn/v_proj/kernel/lora_b"})
    with pytest.raises(CheckpointError, match="missing tensor 'layers/1/attn/v_proj/kernel/lora_b'"):
        adapters.load_adapter(d, _base())
    _rewrite(d, tensors={**tensors, "extra": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match="tensors not described in lora_jax_adapter.json: extra"):
        adapters.load_adapter(d, _base())
    _rewrite(
        d,
        tensors=tensors,
        adapters={**entries, "layers/0/attn/q_proj/kernel": {**entries["layers/0/attn/q_proj/kernel"], "rank": 2}},
    )
    with pytest.raises(
        CheckpointError, match="'layers/0/attn/q_proj/kernel': A has rank 4, lora_jax_adapter.json says 2"
    ):
        adapters.load_adapter(d, _base())
    _rewrite(
        d, adapters={**entries, "layers/0/attn/q_proj/kernel": {**entries["layers/0/attn/q_proj/kernel"], "in_ndim": 2}}
    )
    with pytest.raises(CheckpointError, match=r"in_ndim=2 does not fit the base weight of shape \(32, 32\)"):
        adapters.load_adapter(d, _base())


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="save_adapter: params hold no LoRA weight"):
        adapters.save_adapter(tmp_path, _base())
    with pytest.raises(ValueError, match=r"gives scale 1 but 'layers/0/attn/q_proj/kernel' has 2"):
        adapters.save_adapter(tmp_path, _adapted(1, [QV]), rules=[dataclasses.replace(QV, alpha=4)])


def test_no_pickle(tmp_path, monkeypatch):
    d = adapters.save_adapter(tmp_path, _adapted(1, [QV]))

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    peft = ck.export_peft(tmp_path / "peft", _adapted(2, [QV]), base_model_name_or_path="tiny")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    adapters.load(d, _base())
    adapters.load(peft, _base())


# ----------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("a", ("a", 1.0)),
        ("runs/b/adapter:0.5", ("runs/b/adapter", 0.5)),
        ("b:-2", ("b", -2.0)),
        ("b:1e-3", ("b", 0.001)),
        ("C:\\adapters\\x", ("C:\\adapters\\x", 1.0)),
        ("runs/x:y", ("runs/x:y", 1.0)),
        ("runs/a:3:1", ("runs/a:3", 1.0)),
    ],
)
def test_parse_adapter_spec(spec, want):
    assert adapters.parse_adapter_spec(spec) == want


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "adapter spec must be 'DIR' or 'DIR:WEIGHT', got ''"),
        ("b:", "has an empty weight after ':'"),
        (":0.5", "has no folder before ':'"),
        ("b:nan", "the weight must be finite, got 'nan'"),
        ("b:inf", "the weight must be finite"),
    ],
)
def test_parse_adapter_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        adapters.parse_adapter_spec(spec)


# ----------------------------------------------------------------------------
# Switching and combining


def _delta(params, path):
    node = dict(lora.nodes(params)).get(path)
    if node is None:
        return np.zeros(dict(lora_jax.paths.leaves_with_paths(_base()))[path].shape)
    return np.asarray(node.delta_weight(), np.float64)


def test_combine_is_the_exact_weighted_sum():
    a = _adapted(1, [QV])
    b = _adapted(2, [lora.LoraRule(pattern=r"layers/\d+/attn/q_proj/kernel", rank=2, alpha=7, rslora=True)])
    both = adapters.combine([a, b], [0.3, -1.5])
    q = both["layers"][0]["attn"]["q_proj"]["kernel"]
    v = both["layers"][0]["attn"]["v_proj"]["kernel"]
    assert (q.rank, q.scale, q.dropout, v.rank) == (6, 1.0, 0.0, 4)
    for path in ("layers/0/attn/q_proj/kernel", "layers/1/attn/v_proj/kernel"):
        want = 0.3 * _delta(a, path) + -1.5 * _delta(b, path)
        np.testing.assert_allclose(_delta(both, path), want, rtol=1e-5, atol=1e-6)
    one = adapters.combine([a], [1.0])
    np.testing.assert_allclose(_logits(one), _logits(a), rtol=1e-5, atol=1e-5)


def test_switching_aligned_adapters_does_not_recompile():
    a = _adapted(1, [QV])  # q, v rank 4, scale 2
    b = _adapted(2, [lora.LoraRule(pattern=r"layers/\d+/(attn/q|mlp/up)_proj/kernel", rank=2, alpha=5)])  # q, up
    forward = jax.jit(lambda p, t: llama.apply(p, t, CFG))
    forward(a, TOKENS)
    forward(b, TOKENS)
    assert forward._cache_size() == 2  # as they are, the trees differ: a second compilation
    a2, b2 = adapters.align([a, b])
    forward = jax.jit(lambda p, t: llama.apply(p, t, CFG))
    out_a, out_b = forward(a2, TOKENS), forward(b2, TOKENS)
    assert forward._cache_size() == 1
    np.testing.assert_allclose(out_a, _logits(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_b, _logits(b), rtol=1e-5, atol=1e-5)
    assert b2["layers"][0]["attn"]["v_proj"]["kernel"].rank == 4  # zero adapter where b had none
    # Mixing with weights as jit arguments: one compilation for all weights.
    mixed = jax.jit(lambda ads, w, t: llama.apply(adapters.combine(ads, w), t, CFG))
    for w in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.25]):
        out = mixed([a2, b2], jnp.asarray(w), TOKENS)
    assert mixed._cache_size() == 1
    np.testing.assert_allclose(out, _logits(adapters.combine([a, b], [0.5, 0.25])), rtol=1e-5, atol=1e-5)
    # Room for adapters of a larger rank later.
    a8, _ = adapters.align([a, b], rank=8)
    assert a8["layers"][1]["mlp"]["up_proj"]["kernel"].rank == 8


def test_combine_adapters_from_folders_of_both_formats(tmp_path):
    a = _adapted(1, [QV])
    b = _adapted(2, [lora.LoraRule(pattern=r"layers/\d+/attn/q_proj/kernel", rank=2)])
    adapters.save_adapter(tmp_path / "ours", a)
    ck.export_peft(tmp_path / "peft", b, base_model_name_or_path="tiny")
    got = adapters.combine_adapters(_base(), [str(tmp_path / "ours"), f"{tmp_path / 'peft'}:0.5"])
    np.testing.assert_allclose(_logits(got), _logits(adapters.combine([a, b], [1.0, 0.5])), rtol=1e-5, atol=1e-5)
    got = adapters.combine_adapters(_base(), [(tmp_path / "peft", 2.0)], model_kind="llama")
    np.testing.assert_allclose(
        _delta(got, "layers/1/attn/q_proj/kernel"), 2 * _delta(b, "layers/1/attn/q_proj/kernel"), rtol=1e-5, atol=1e-6
    )


def test_combine_and_align_errors(tmp_path):
    a = _adapted(1, [QV])
    with pytest.raises(ValueError, match="combine_adapters: give at least one adapter folder"):
        adapters.combine_adapters(_base(), [])
    with pytest.raises(ValueError, match="need at least one adapted params tree"):
        adapters.align([])
    with pytest.raises(ValueError, match="combine: 1 adapters but 2 weights; give one weight per adapter"):
        adapters.combine([a], [1.0, 2.0])
    other = lora.init(jax.random.key(0), llama.init(jax.random.key(0), dataclasses.replace(CFG, n_layers=1)), [QV])
    with pytest.raises(
        ValueError,
        match=r"adapter 1 is on another base tree: path 'norm/scale' where adapter 0 has 'layers/1/attn/k_proj/kernel'",
    ):
        adapters.combine([a, other], [1.0, 1.0])
    with pytest.raises(ValueError, match="align: rank=2 is below the largest adapter rank 4"):
        adapters.align([a], rank=2)
    with pytest.raises(ValueError, match="pad_rank: cannot pad a rank-4 adapter down to rank 2"):
        adapters.pad_rank(a["layers"][0]["attn"]["q_proj"]["kernel"], 2)
    base = {"w": jnp.ones((4, 6))}
    flat = lora.init(jax.random.key(0), base, [lora.LoraRule(pattern="w", rank=2)])
    two = lora.init(jax.random.key(0), {"w": jnp.ones((2, 2, 6))}, [lora.LoraRule(pattern="w", rank=2, in_dims=2)])
    two = {"w": dataclasses.replace(two["w"], base=base["w"])}  # same path, other factor layout
    with pytest.raises(
        ValueError, match=r"'w': adapter 1 has A \(4, 2\), B \(2, 6\), in_ndim=2; .* do not adapt the same"
    ):
        adapters.combine([flat, two], [1.0, 1.0])
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        adapters.load(tmp_path, _base())
