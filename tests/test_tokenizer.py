"""Tokenizer from GGUF metadata: round trips, special tokens, chat format, reference ids."""

import os

import pytest

from lora_jax.models import load_gguf, registry
from lora_jax.models import tokenizer as tk

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLES = [
    "Hello world! The year 2024 had 366 days.",
    "Grüße aus München – schön, oder? Straße, Äpfel, naïve café résumé.",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "日本語のテキストと한국어 텍스트, and Ελληνικά, русский текст, עברית, العربية.",
    "emoji 🎉🚀 test 👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇩🇪",
    "def f(x: int) -> int:\n    return x**2  # square\n\n\tif x: pass\r\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", a[i]); }  // C',
    "  leading and   multiple   spaces  \n\n\n trailing\t",
    "special-looking text: <|im_start|> inside",
    "",
]


@pytest.fixture(scope="module")
def smol_tok():
    try:
        path = registry.resolve("smollm2-135m")[1]
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    return load_gguf.load_tokenizer(path)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(smol_tok, text):
    ids = smol_tok.encode(text)
    assert smol_tok.decode(ids) == text
    assert all(0 <= i < smol_tok.vocab_size for i in ids)


def test_special_tokens_are_single_ids(smol_tok):
    assert smol_tok.token_to_id("<|endoftext|>") == 0
    assert smol_tok.token_to_id("<|im_start|>") == 1
    assert smol_tok.token_to_id("<|im_end|>") == 2
    assert smol_tok.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
    assert smol_tok.encode("a<|endoftext|>b")[1] == 0
    assert (smol_tok.bos_id, smol_tok.eos_id, smol_tok.pad_id) == (1, 2, 2)
    assert smol_tok.stop_ids == (2,)
    assert smol_tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"


def test_known_ids(smol_tok):
    # "Hello" and " world" as SmolLM2's published tokenizer.json numbers them
    assert smol_tok.encode("Hello world") == [19556, 905]
    # digits are split one by one ("smollm" pre-tokenizer)
    assert [smol_tok.id_to_token(i) for i in smol_tok.encode("2024")] == ["2", "0", "2", "4"]


def test_ids_match_transformers_gguf_tokenizer(smol_tok):
    """transformers converts GGUF tokenizers with its own code: an independent reference."""
    transformers = pytest.importorskip("transformers")
    path = registry.resolve("smollm2-135m")[1]
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in SAMPLES:
        assert smol_tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    chat = smol_tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert smol_tok.encode(chat) == ref.encode(chat, add_special_tokens=False)


def test_chat_template_matches_the_files_template(smol_tok):
    pytest.importorskip("jinja2")
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
    ]
    for chat in chats:
        for gen in (True, False):
            ours = smol_tok.apply_chat_template(chat, add_generation_prompt=gen)
            assert ours == smol_tok.apply_chat_template(chat, add_generation_prompt=gen, use_template=True)
    text = smol_tok.apply_chat_template(chats[0])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smol_tok.encode_chat(chats[1])
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


def test_template_is_sandboxed():
    pytest.importorskip("jinja2")
    from jinja2.exceptions import SecurityError

    tok = tk.Tokenizer(
        tk.byte_level_bpe(["a"], []),
        chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}",
    )
    with pytest.raises(SecurityError, match="__class__"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], use_template=True)


def test_add_bos_and_batch():
    backend = tk.byte_level_bpe(["<s>", "a", "b", "ab"], ["a b"], [3, 1, 1, 1])
    tok = tk.Tokenizer(backend, bos_id=0, add_bos=True)
    assert tok.encode("ab") == [0, 3]
    assert tok.encode("ab", add_bos=False) == [3]
    assert tok.encode_batch(["a", "abab"]) == [[0, 1], [0, 3, 3]]
    with pytest.raises(TypeError, match="needs a str"):
        tok.encode([1, 2])


def test_chatml_rejects_malformed_messages():
    with pytest.raises(ValueError, match=r"chat message 1 must be a dict with 'role' and 'content'"):
        tk.chatml([{"role": "user", "content": "x"}, {"text": "y"}])


def test_non_chatml_tokenizer_needs_template():
    tok = tk.Tokenizer(tk.byte_level_bpe(["a"], []))
    with pytest.raises(ValueError, match="no <|im_start|>/<|im_end|> tokens.*use_template=True"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], use_template=True)


def test_bad_metadata():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    assert tk.from_gguf_metadata(meta).encode("abba") == [2, 1, 0]
    with pytest.raises(ValueError, match=r"m\.gguf: tokenizer\.ggml\.model is 'llama'.*gpt2"):
        tk.from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"}, source="m.gguf")
    with pytest.raises(ValueError, match=r"m\.gguf: unsupported pre-tokenizer 'qwen9'"):
        tk.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "qwen9"}, source="m.gguf")
    with pytest.raises(ValueError, match=r"m\.gguf: a BPE merge must be two tokens.*'a b c'"):
        tk.from_gguf_metadata({**meta, "tokenizer.ggml.merges": ["a b c"]}, source="m.gguf")
    with pytest.raises(ValueError, match=r"m\.gguf: a 'gpt2' tokenizer needs tokenizer\.ggml\.merges"):
        tk.from_gguf_metadata({k: v for k, v in meta.items() if "merges" not in k}, source="m.gguf")
    with pytest.raises(ValueError, match=r"m\.gguf: no tokenizer in the metadata"):
        tk.from_gguf_metadata({}, source="m.gguf")
    with pytest.raises(ValueError, match=r"2 token types for 3 tokens"):
        tk.from_gguf_metadata({**meta, "tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(ValueError, match=r"lists token 'a' more than once"):
        tk.byte_level_bpe(["a", "a"], [])
