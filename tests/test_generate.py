"""KV-cache generation (lora_jax.generate) and sliding-window perplexity (lora_jax.metrics)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import generate as gen
from lora_jax import lora, metrics, quant
from lora_jax.errors import GenerateError
from lora_jax.models import llama, registry

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CFG = llama.LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=256)
PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13, 14, 15, 16, 17], [40, 41]]


@pytest.fixture(scope="module")
def params():
    p = llama.init(jax.random.key(1), CFG)
    # sharper logits than at init (std 0.02), so greedy choices are far from ties
    return jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, p)


_forward = jax.jit(llama.apply, static_argnums=2)


def greedy_reference(params, prompt, n, stop_ids=()):
    """Argmax of a full forward pass at every step: no cache.

    The sequence is right-padded to one fixed width (one compilation); in a causal
    model the padding after position ``t`` cannot change the logits at ``t``.
    """
    ids = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, 48), np.int32)
        buf[0, : len(ids)] = ids
        ids.append(int(jnp.argmax(_forward(params, jnp.asarray(buf), CFG)[0, len(ids) - 1])))
        if ids[-1] in stop_ids:
            break
    return ids[len(prompt) :]


def test_cache_decoding_equals_no_cache_reference(params):
    out = gen.generate(params, CFG, PROMPTS, max_new_tokens=10)
    assert out.tokens.shape == (len(PROMPTS), 10)
    for row, prompt in zip(out.rows(), PROMPTS, strict=True):
        assert row == greedy_reference(params, prompt, 10)


def test_batched_padded_prompts_equal_each_prompt_alone(params):
    batched = gen.generate(params, CFG, PROMPTS, max_new_tokens=8).rows()
    alone = [gen.generate(params, CFG, [p], max_new_tokens=8, bucket=1).rows()[0] for p in PROMPTS]
    assert batched == alone
    # the same prompts right-padded in an array with an attention mask
    width = max(map(len, PROMPTS)) + 3
    toks = np.full((len(PROMPTS), width), 5, np.int32)
    mask = np.zeros((len(PROMPTS), width), np.int32)
    for i, p in enumerate(PROMPTS):
        toks[i, : len(p)], mask[i, : len(p)] = p, 1
    assert gen.generate(params, CFG, toks, attention_mask=mask, max_new_tokens=8).rows() == batched
    # and left-padded
    left, lmask = gen.left_pad(PROMPTS, pad_id=3, bucket=32)
    assert gen.generate(params, CFG, left, attention_mask=lmask, max_new_tokens=8).rows() == batched


def test_no_recompile_for_new_prompts_of_a_seen_size(params):
    gen.generate(params, CFG, [[1, 2, 3]], max_new_tokens=4)
    before = gen._decode._cache_size()
    gen.generate(params, CFG, [[4, 5, 6, 7, 8]], max_new_tokens=4)  # same bucket of 16
    new_params = jax.tree.map(lambda x: x * 1.01, params)  # params are an argument, not a constant
    gen.generate(new_params, CFG, [[9]], max_new_tokens=4)
    assert gen._decode._cache_size() == before


def test_stops_per_sequence(params):
    ref = [greedy_reference(params, p, 12) for p in PROMPTS]
    stop = ref[0][3]  # row 0 stops after its 4th token
    out = gen.generate(params, CFG, PROMPTS, max_new_tokens=12, stop_ids=stop, pad_id=0)
    for i, r in enumerate(ref):
        n = r.index(stop) + 1 if stop in r else 12
        assert out.lengths[i] == n
        assert out.tokens[i, :n].tolist() == r[:n]
        assert (out.tokens[i, n:] == 0).all()
    # all rows stopped: the loop ends early and the rest is padding
    everyone = gen.generate(params, CFG, [PROMPTS[0]] * 2, max_new_tokens=12, stop_ids=[stop, 96], pad_id=-1)
    assert everyone.lengths.tolist() == [4, 4] and (everyone.tokens[:, 4:] == -1).all()


def test_sampling_follows_temperature_and_top_p(params):
    prompt = [[1, 2, 3]]
    logits = np.asarray(_forward(params, jnp.asarray(prompt), CFG)[0, -1], np.float64)
    n = 2000
    for temperature in (0.7, 1.5):
        out = gen.generate(
            params, CFG, prompt * n, max_new_tokens=1, temperature=temperature, key=jax.random.key(5), bucket=4
        )
        p = np.exp((logits - logits.max()) / temperature)
        p /= p.sum()
        freq = np.bincount(out.tokens[:, 0], minlength=CFG.vocab_size) / n
        assert np.abs(freq - p).max() < 4 * np.sqrt(p.max() / n) + 1e-3
    # top-p: only the smallest set of most likely tokens with mass >= top_p is ever drawn
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    k = int(np.searchsorted(np.cumsum(p[order]), 0.6)) + 1
    out = gen.generate(
        params, CFG, prompt * n, max_new_tokens=1, temperature=1.0, top_p=0.6, key=jax.random.key(6), bucket=4
    )
    assert set(out.tokens[:, 0].tolist()) <= set(order[:k].tolist())
    # a tiny nucleus is greedy; a key gives reproducible samples
    greedy = gen.generate(params, CFG, PROMPTS, max_new_tokens=6)
    nucleus = gen.generate(params, CFG, PROMPTS, max_new_tokens=6, temperature=1.0, top_p=1e-6, key=jax.random.key(0))
    assert nucleus.rows() == greedy.rows()
    a = gen.generate(params, CFG, PROMPTS, max_new_tokens=6, temperature=1.5, key=jax.random.key(1))
    b = gen.generate(params, CFG, PROMPTS, max_new_tokens=6, temperature=1.5, key=jax.random.key(1))
    assert a.rows() == b.rows()


def test_lora_and_quantized_leaves(params, key):
    q = quant.quantize(params, [quant.QuantRule(pattern=".*(q|k|v|o|gate|up|down)_proj/kernel", format="int8",
                                                block_size=16)])  # fmt: skip
    adapted = lora.init(key, q, [lora.LoraRule(pattern=".*(q|v)_proj/kernel", rank=4)])

    def nonzero_b(x):
        if isinstance(x, lora.LoraWeight):
            b = 0.5 * jax.random.normal(jax.random.key(9), x.lora_b.shape, x.lora_b.dtype)
            return lora.LoraWeight(x.base, x.lora_a, b, x.scale, x.in_ndim)
        return x

    adapted = jax.tree.map(nonzero_b, adapted, is_leaf=lora.is_node)
    out = gen.generate(adapted, CFG, PROMPTS[:2], max_new_tokens=6)
    assert out.rows() == [greedy_reference(adapted, p, 6) for p in PROMPTS[:2]]
    assert out.rows() != gen.generate(params, CFG, PROMPTS[:2], max_new_tokens=6).rows()


def test_bad_arguments(params):
    with pytest.raises(ValueError, match=r"needs a PRNG key"):
        gen.generate(params, CFG, PROMPTS, temperature=1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        gen.generate(params, CFG, PROMPTS, temperature=1.0, top_p=0, key=jax.random.key(0))
    for bad in (-1.0, float("nan")):
        with pytest.raises(GenerateError, match=r"temperature must be >= 0"):
            gen.generate(params, CFG, PROMPTS, temperature=bad)
    with pytest.raises(GenerateError, match=r"top_p must be in \(0, 1\], got nan"):
        gen.generate(params, CFG, PROMPTS, temperature=1.0, top_p=float("nan"), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"prompts \[1\] have no tokens"):
        gen.generate(params, CFG, [[1], []])
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive int, got 0"):
        gen.generate(params, CFG, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"exceeds the model's max_seq_len=256"):
        gen.generate(params, CFG, PROMPTS, max_new_tokens=250)
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 2\) differs from the prompts' shape \(1, 3\)"):
        gen.generate(params, CFG, np.ones((1, 3), np.int32), attention_mask=np.ones((1, 2)))


# ----------------------------------------------------------------------------
# Perplexity (lora_jax.metrics)


def test_perplexity_single_window_equals_mean_loss(params):
    ids = np.asarray(jax.random.randint(jax.random.key(2), (40,), 0, CFG.vocab_size))
    r = metrics.perplexity(params, CFG, ids, window=64, stride=32)
    loss, _ = llama.loss(params, {"tokens": jnp.asarray(ids[None])}, CFG)
    assert r.n_windows == 1 and r.n_tokens == 39
    np.testing.assert_allclose(r.nll, float(loss), rtol=1e-5)
    np.testing.assert_allclose(r.perplexity, np.exp(float(loss)), rtol=1e-5)


def test_perplexity_sliding_windows_score_each_token_once(params):
    ids = np.asarray(jax.random.randint(jax.random.key(3), (50,), 0, CFG.vocab_size))
    window, stride = 16, 6
    logp = {}
    for begin, end, first in metrics.windows(len(ids), window, stride):
        lp = jax.nn.log_softmax(_forward(params, jnp.asarray(ids[None, begin:end]), CFG)[0])
        for t in range(max(first, begin + 1), end):
            assert t not in logp  # scored once
            assert t - begin <= window - 1 and (begin == 0 or t - begin >= window - stride)  # context
            logp[t] = float(lp[t - 1 - begin, ids[t]])
    assert sorted(logp) == list(range(1, 50))
    for batch_size in (1, 3):
        r = metrics.perplexity(params, CFG, ids, window, stride, batch_size=batch_size)
        assert r.n_tokens == 49
        np.testing.assert_allclose(r.nll, -np.mean(list(logp.values())), rtol=1e-5)


def test_perplexity_bad_arguments(params):
    with pytest.raises(ValueError, match=r"stride must be in 1\.\.window=8, got 9"):
        metrics.perplexity(params, CFG, list(range(20)), window=8, stride=9)
    with pytest.raises(ValueError, match=r"at least 2 tokens, got 1"):
        metrics.perplexity(params, CFG, [3], window=8, stride=4)


# ----------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2():
    try:
        return registry.load_model("smollm2-135m")  # Q4_1/Q8_0 blocks as exact QTensor leaves
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.heavy
def test_smollm2_answers_paris(smollm2):
    params, cfg, tok = smollm2
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    (answer,) = gen.generate_text(params, cfg, tok, [chat], chat=True, max_new_tokens=24)
    assert "Paris" in answer, answer


@pytest.mark.parametrize(
    "prompts, chat", [("", False), (["hi", "  "], False), ([[{"role": "user", "content": ""}]], True)]
)
def test_empty_text_prompts_are_refused(params, prompts, chat):
    class NoTokenizer:  # the check comes before any encoding
        def __getattr__(self, name):
            raise AssertionError(f"tokenizer.{name} used before the prompts were checked")

    with pytest.raises(GenerateError, match=r"prompts \[\d\] are empty"):
        gen.generate_text(params, CFG, NoTokenizer(), prompts, chat=chat)


def test_a_chat_message_that_is_not_a_dict_reaches_the_tokenizers_own_error(params):
    from lora_jax.errors import DataError

    class Tokenizer:
        def encode_chat(self, messages):
            raise DataError(f"chat message 0 must be a dict with 'role' and 'content', got {messages[0]!r}")

    with pytest.raises(DataError, match="must be a dict"):
        gen.generate_text(params, CFG, Tokenizer(), [["just text"]], chat=True)
