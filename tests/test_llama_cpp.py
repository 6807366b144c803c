"""Adapters exported for llama.cpp (lora_jax.io.gguf_adapter) run in llama.cpp as in our model."""

import contextlib
import ctypes
import io
import itertools
import struct

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import generate, lora
from lora_jax.errors import LoraError
from lora_jax.io import gguf_adapter
from lora_jax.models import gemma3, gguf_file, load_gguf, registry

RULES = [lora.LoraRule(pattern=r"layers/\d+/(attn/[qkvo]_proj|mlp/down_proj)/kernel", rank=4, alpha=8,
                       rslora=True)]
PROMPTS = ["def fibonacci(n):", "The quick brown fox", "Water boils at"]


def adapted(params):
    """Adapters with random A and B (B = 0 would change nothing), on the real base."""
    p = lora.init(jax.random.key(0), params, RULES)
    keys = iter(jax.random.split(jax.random.key(1), 1000))

    def fill(x):
        if lora.is_lora(x):
            return x.__class__(**{**x.__dict__, "lora_b": 0.05 * jax.random.normal(next(keys), x.lora_b.shape)})
        return x

    return jax.tree.map(fill, p, is_leaf=lora.is_node)


def test_llama_cpp_adapter_file_has_the_names_shapes_and_folded_scale(tmp_path):
    from lora_jax.models import llama

    cfg = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    p = adapted(llama.init(jax.random.key(0), cfg))
    out = gguf_adapter.export_gguf_adapter(p, cfg, tmp_path / "a.gguf", architecture="llama")
    meta, tensors = gguf_file.read(out)
    assert (meta["general.type"], meta["adapter.type"], meta["adapter.lora.alpha"]) == ("adapter", "lora", 4.0)
    node = p["layers"][1]["attn"]["q_proj"]["kernel"]
    a = np.asarray(tensors["blk.1.attn_q.weight.lora_a"].data)
    b = np.asarray(tensors["blk.1.attn_q.weight.lora_b"].data)
    assert a.shape == (4, 32) and b.shape == (32, 4)
    # llama.cpp adds (alpha / r) * B'(A x) = 1 * B'(A x); undo the Q permutation and compare with ours
    delta = a.T @ load_gguf.unpermute_rope_rows(b, cfg.n_heads).T
    np.testing.assert_allclose(delta, np.asarray(node.scale * node.lora_a @ node.lora_b), rtol=1e-5, atol=1e-7)
    assert node.scale == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r), folded into B


def test_llama_cpp_export_refuses_what_llama_cpp_cannot_apply(tmp_path):
    from lora_jax.models import llama

    cfg = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                            tie_embeddings=False)
    p = lora.init(jax.random.key(0), llama.init(jax.random.key(0), cfg), [lora.LoraRule(pattern="lm_head", rank=2)])
    with pytest.raises(LoraError, match=r"lm_head is adapted, but llama.cpp adapts only"):
        gguf_adapter.export_gguf_adapter(p, cfg, tmp_path / "a.gguf", architecture="llama")
    with pytest.raises(LoraError, match=r"no LoRA weight"):
        gguf_adapter.export_gguf_adapter(llama.init(jax.random.key(0), cfg), cfg, tmp_path / "b.gguf",
                                         architecture="llama")


N_NEW = 16
# Measured 2026-12-03 on this machine, for PROMPTS. On the F32 copy: logit-shift cosine 1.00000 for every prompt;
# the base's logits within 1.3e-6..3.2e-6 (SmolLM2) and 2.8e-4..9.4e-4 (Gemma 3) of ours, relative to the largest
# logit (for Gemma the llama.cpp side's source of the 1e-3 is not isolated; its GELU reads an F16 table). On the
# quantized file: shift cosine 0.999, 0.997, 0.956 (SmolLM2, Q4_1; the third was 0.975 with llama.cpp's default
# F16 KV cache) and 0.991, 0.998, 0.996 (Gemma 3, Q4_K_M). See the test's docstring.
BASE_RELATIVE_ERROR = 2e-3
QUANT_COSINE = 0.9


def float_copy(src, dst):
    """``src`` with every tensor dequantized to F32 by the gguf package; the metadata copied byte for byte."""
    meta, tensors = gguf_file.read(src)
    align = int(meta.get("general.alignment", 32))
    pad = lambda n: b"\0" * (-n % align)  # noqa: E731
    with open(dst, "wb") as f:
        f.write(struct.pack("<4sIQQ", b"GGUF", 3, len(tensors), meta["GGUF.kv_count"]))
        f.write(gguf_file.metadata_bytes(src))
        offset = 0
        for name, t in tensors.items():
            n, dims = name.encode(), [int(d) for d in t.shape]
            f.write(struct.pack(f"<Q{len(n)}sI{len(dims)}QIQ", len(n), n, len(dims), *dims, 0, offset))  # 0: F32
            size = 4 * int(np.prod(dims))
            offset += size + len(pad(size))
        f.write(pad(f.tell()))
        for t in tensors.values():
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).tobytes()
            f.write(w + pad(len(w)))
    return dst


def test_float_copy_keeps_metadata_and_dequantizes_every_tensor(tmp_path):
    """The F32 copy the llama.cpp test runs on, read back by the gguf package's own reader."""
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_float32("llama.rope.freq_base", 1e4)
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", x[0])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    r = gguf.GGUFReader(str(float_copy(tmp_path / "q.gguf", tmp_path / "f.gguf")))
    f = r.fields
    assert f["llama.block_count"].types == [gguf.GGUFValueType.UINT32] and f["llama.block_count"].contents() == 3
    assert f["tokenizer.ggml.tokens"].contents() == ["a", "b"] and f["llama.rope.freq_base"].contents() == 1e4
    t = {t.name: t for t in r.tensors}
    assert {n: t[n].tensor_type.name for n in t} == {"blk.0.attn_q.weight": "F32", "output_norm.weight": "F32"}
    want = gguf.quants.dequantize(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                                  gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(np.asarray(t["blk.0.attn_q.weight"].data), want)
    np.testing.assert_array_equal(np.asarray(t["output_norm.weight"].data), x[0])


def llama_cpp_runs(llama_cpp, model, adapter, prompt_ids, *, new_tokens):
    """llama.cpp on ``model`` (one load), without then with ``adapter``: per prompt, the logits after the prompt
    and, with the adapter, the greedy continuation of ``new_tokens`` tokens. The KV cache is F32 (default F16)."""
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                          type_k=0, type_v=0)
    lora_p = llama_cpp.llama_adapter_lora_init(llm.model, str(adapter).encode())
    assert lora_p, f"llama.cpp refused the adapter {adapter}"
    runs = {}
    for on in (False, True):
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora_p) if on else None
        assert llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, int(on), (ctypes.c_float * 1)(1.0)) == 0
        runs[on] = []
        for ids in prompt_ids:
            llm.reset()  # nothing of the other setting's cache is reused
            if on and new_tokens:
                toks = [int(t) for t in itertools.islice(llm.generate(ids, temp=0.0, top_k=1), new_tokens)]
            else:
                llm.eval(ids)
                toks = []
            runs[on].append((np.array(llm.scores[len(ids) - 1], np.float32), toks))
    llm.close()
    return runs


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_llama_cpp_runs_our_exported_adapter_like_our_model(name, tmp_path):
    """On an F32 copy of the base, llama.cpp with our adapter continues each prompt with our greedy tokens, its
    logits without the adapter are ours and its logit shift is ours (cosine >= 0.98; measured 1.00000).

    On the quantized file itself llama.cpp rounds the activations to 8 bits for its quantized dot products (the
    Q8_0/Q8_1/Q8_K partners of the weight types), which moves the logits by about as much as this small adapter
    does, and greedy tokens part after a few steps: there only the shift's cosine is checked, against the bound
    QUANT_COSINE below the values measured on this machine. Our side runs on the dequantized weights, which our
    QTensor formats reproduce bit for bit (tests/test_kquants.py, tests/test_quant.py).
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    try:
        _, path = registry.resolve(name)
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    f32 = float_copy(path, tmp_path / "f32.gguf")
    params, cfg, tok = load_gguf.load(f32)
    arch = "gemma3" if isinstance(cfg, gemma3.Gemma3Config) else "llama"
    p = adapted(params)
    adapter = gguf_adapter.export_gguf_adapter(p, cfg, tmp_path / "adapter.gguf", architecture=arch)
    assert gguf.GGUFReader(str(adapter)).fields["general.type"].contents() == "adapter"
    ids = [tok.encode(s) for s in PROMPTS]
    with contextlib.redirect_stderr(io.StringIO()):
        cpp = llama_cpp_runs(llama_cpp, f32, adapter, ids, new_tokens=N_NEW)
        cpp_q = llama_cpp_runs(llama_cpp, path, adapter, ids, new_tokens=0)
    model = gemma3.decoder_module(cfg)
    forward = jax.jit(lambda q, t: model.apply(q, t, cfg))
    width = max(map(len, ids))
    padded = jnp.asarray([x + [0] * (width - len(x)) for x in ids])  # right padding: causal, the prompt unchanged
    last = [len(x) - 1 for x in ids]
    base, ours = (np.asarray(forward(q, padded))[np.arange(len(ids)), last] for q in (params, p))
    got = generate.generate(p, cfg, ids, max_new_tokens=N_NEW).tokens.tolist()
    report = []
    for i in range(len(ids)):
        err = float(np.abs(base[i] - cpp[False][i][0]).max() / np.abs(base[i]).max())
        cos, cos_q = (cosine(ours[i] - base[i], c[True][i][0] - c[False][i][0]) for c in (cpp, cpp_q))
        report.append(f"{PROMPTS[i]!r}: F32 base: logits within {err:.1e} (relative), shift cosine {cos:.5f}; "
                      f"quantized base: shift cosine {cos_q:.4f}")
        assert got[i] == cpp[True][i][1], (report[-1], got[i], cpp[True][i][1])
        assert err < BASE_RELATIVE_ERROR and cos >= 0.98 and cos_q >= QUANT_COSINE, report[-1]
    print(name, *report, sep="\n  ")
