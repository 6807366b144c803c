"""Adapters exported for llama.cpp (lora_jax.io.gguf_adapter) run in llama.cpp as in our model."""

import contextlib
import io

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


def run_llama_cpp(llama_cpp, model, adapter, prompt_ids):
    llm = llama_cpp.Llama(model_path=str(model), lora_path=None if adapter is None else str(adapter), n_ctx=128,
                          verbose=False, n_threads=2, logits_all=True)
    results = []
    for ids in prompt_ids:
        llm.reset()
        llm.eval(ids)
        last = np.array(llm.scores[len(ids) - 1], np.float32)
        llm.reset()
        toks = []
        for t in llm.generate(ids, temp=0.0, top_k=1):
            toks.append(int(t))
            if len(toks) == 16:
                break
        results.append((last, toks))
    return results


@pytest.mark.heavy
@pytest.mark.parametrize("name", [
    pytest.param("smollm2-135m", marks=pytest.mark.xfail(
        strict=False, reason="measured 2026-12-03: logit-shift cosine 0.975 on 'Water boils at' (0.997, 0.998 on "
        "the others); llama.cpp's 8-bit activations on the Q4_1 base are the suspected cause, not yet shown")),
    "gemma3-270m",
])
def test_llama_cpp_runs_our_exported_adapter_like_our_model(name, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    try:
        kind, path = registry.resolve(name)
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    params, cfg, tok = load_gguf.load(path)
    arch = "gemma3" if isinstance(cfg, gemma3.Gemma3Config) else "llama"
    p = adapted(params)
    adapter = gguf_adapter.export_gguf_adapter(p, cfg, tmp_path / "adapter.gguf", architecture=arch)
    assert gguf.GGUFReader(str(adapter)).fields["general.type"].contents() == "adapter"
    ids = [tok.encode(s) for s in PROMPTS]
    model = gemma3.decoder_module(cfg)
    forward = jax.jit(lambda q, t: model.apply(q, t, cfg))
    with contextlib.redirect_stderr(io.StringIO()):
        base = run_llama_cpp(llama_cpp, path, None, ids)
        ours_cpp = run_llama_cpp(llama_cpp, path, adapter, ids)
    for i, x in enumerate(ids):
        shift = np.asarray(forward(p, jnp.asarray([x])))[0, -1] - np.asarray(forward(params, jnp.asarray([x])))[0, -1]
        cpp_shift = ours_cpp[i][0] - base[i][0]
        cos = float(shift @ cpp_shift / (np.linalg.norm(shift) * np.linalg.norm(cpp_shift)))
        assert cos >= 0.98, (PROMPTS[i], cos)
        want = ours_cpp[i][1]
        got = [int(t) for t in generate.generate(p, cfg, [x], max_new_tokens=16).rows()[0]]
        # llama.cpp rounds activations to 8 bits for its quantized dot products and may take the other side of
        # a near-tie (then the two continuations part); teacher-forced on its tokens, ours must rank each
        # within 0.5 of our top token.
        logits = np.asarray(forward(p, jnp.asarray([x + want])))[0, len(x) - 1 : -1]
        gap = logits.max(-1) - logits[np.arange(16), want]
        assert gap.max() < 0.5, (PROMPTS[i], got, want, gap)
        parted = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        print(PROMPTS[i], f"cos {cos:.4f}", "identical" if parted is None else f"parted at token {parted}")
