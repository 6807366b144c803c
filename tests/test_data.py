"""Tests for lora_jax.data: stdlib extraction, splits, tokenization with loss masks, files, batching, scores."""

import ast
import json
import sys
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest
import tokenizers

from lora_jax import data
from lora_jax.data import code_summaries, scoring
from lora_jax.data.encoding import Encoder
from lora_jax.models import llama

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CHAR = Encoder(encode=lambda s: [ord(c) for c in s], end_id=0)  # one id per character, end = 0


def chatml(messages):
    """ChatML with the assistant turn opened, as SmolLM2-Instruct formats a prompt."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def task(cache):
    """The real code-summarization task, extracted once into a temporary cache."""
    return data.get_task("code-summarization", cache_dir=cache)


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE with ChatML's special tokens, trained here on stdlib text."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([(STDLIB / "json" / "decoder.py").read_text()], trainer)
    return tok


# ----------------------------------------------------------------------------
# Extraction and splits


def test_extraction_finds_thousands_of_functions(task):
    info = task.info()
    assert sum(info["n_examples"].values()) == len(task.records) > 3000
    assert info["python_version"] == code_summaries.python_version()
    assert all(info["n_examples"][s] > 100 for s in ("train", "val", "test"))
    assert len({r.id for r in task.records}) == len(task.records)
    assert len({r.source for r in task.records}) == len(task.records)


def test_docstring_removed_and_summary_is_its_first_line(task):
    trees = {}
    for r in task.records[::75]:
        fn = ast.parse(r.source).body[0]
        assert isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        assert ast.get_docstring(fn) is None, r.id
        assert len(fn.body) >= 1
        if r.path not in trees:
            trees[r.path] = ast.parse((STDLIB / r.path).read_text(encoding="utf-8"))
        original = trees[r.path]
        (node,) = [
            n
            for n in ast.walk(original)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and min([n.lineno] + [d.lineno for d in n.decorator_list]) == r.lineno
            and n.name == r.qualname.split(".")[-1]
        ]
        assert ast.get_docstring(node).strip().splitlines()[0].strip() == r.summary


def test_known_functions():
    found = {r.qualname: r for r in code_summaries.extract([STDLIB / "fnmatch.py", STDLIB / "shlex.py"])}
    r = found["fnmatch"]
    assert (r.path, r.summary) == ("fnmatch.py", "Test whether FILENAME matches PATTERN.")
    assert r.source.startswith("def fnmatch(name, pat):\n    name = os.path.normcase(name)\n")
    r = found["shlex.pop_source"]  # a method, dedented
    assert (r.path, r.summary) == ("shlex.py", "Pop the input source stack.")
    assert r.source.startswith("def pop_source(self):\n    self.instream.close()\n")
    subset = data.get_task("code-summarization", records=found.values())
    assert sum(subset.info()["n_examples"].values()) == len(found)


@pytest.mark.parametrize(
    ("doc", "summary"),
    [
        ("Return x.", None),  # too short
        ("Return the value of x.\n\nMore.", "Return the value of x."),
        ("Return the value of x.\nMore on this line.", "Return the value of x."),  # ends a sentence
        ("Return the value\nof x.", None),  # wrapped: a fragment
        ("Return the value of x", "Return the value of x"),  # alone on its line
        ("Return the value of these:", None),
        ("get(key, default) -> value of key", None),
        ("od.__iter__() <==> iter(od)", None),
        ("print_help(file : file = stdout)", None),
        ("quoted-string = [CFWS] <bare-quoted-string> [CFWS]", None),
        ("Return f(x) for every x in xs.", "Return f(x) for every x in xs."),
        (" ".join(["word"] * 31) + ".", None),
    ],
)
def test_summary_line(doc, summary):
    assert code_summaries.summary_line(doc) == summary


def test_docstring_sharing_a_line_or_trivial_body_is_skipped(tmp_path):
    src = (
        "def a(x):\n"
        '    """Return the double of x."""; y = 2\n'
        "    return x * y\n"
        "def b(x):\n"
        '    """Do nothing with the argument x."""\n'
        "    raise NotImplementedError\n"
        "class C:\n"
        "    @property\n"
        "    def c(self):\n"
        '        """Return the answer to everything.\n\n        Details.\n        """\n'
        "\n"
        "        return 42\n"
    )
    (tmp_path / "m.py").write_text(src)
    (r,) = code_summaries.extract([tmp_path / "m.py"], root=tmp_path)
    assert (r.qualname, r.lineno, r.summary) == ("C.c", 8, "Return the answer to everything.")
    assert r.source == "@property\ndef c(self):\n    return 42\n"


def test_split_is_deterministic_and_by_file(task):
    files = {s: {r.path for r in task.examples(s)} for s in task.splits()}
    assert not files["train"] & files["val"] and not files["train"] & files["test"] and not files["val"] & files["test"]
    for s, paths in files.items():
        assert all(code_summaries.split_of(p) == s for p in paths)
    assert code_summaries.split_of("json/decoder.py") == code_summaries.split_of("json/decoder.py")


def test_dataset_hash_stable_across_extractions(task, cache):
    subset = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))
    first, second = code_summaries.extract(subset), code_summaries.extract(subset)
    assert len(first) > 50
    assert code_summaries.dataset_hash(first) == code_summaries.dataset_hash(second)
    assert code_summaries.dataset_hash(first) != code_summaries.dataset_hash(first[1:])
    # The cache written by the fixture reads back as the same dataset.
    again = data.get_task("code-summarization", cache_dir=cache)
    assert again.dataset_hash == task.dataset_hash and again.records == task.records


def test_cache_file_is_keyed_and_written_atomically(tmp_path, monkeypatch):
    fake = code_summaries.extract([STDLIB / "fnmatch.py"])
    monkeypatch.setattr(code_summaries, "extract", lambda: fake)
    monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path))
    assert code_summaries.load() == fake
    (path,) = (tmp_path / "code_summarization").iterdir()  # no temporary file left behind
    assert path.name == f"stdlib-{code_summaries.python_version()}-x{code_summaries.EXTRACTOR_VERSION}.jsonl"
    monkeypatch.setattr(code_summaries, "extract", lambda: pytest.fail("extracted again despite the cache"))
    assert code_summaries.load() == fake


def test_unreadable_cache_is_replaced(tmp_path, monkeypatch):
    fake = code_summaries.extract([STDLIB / "fnmatch.py"])
    monkeypatch.setattr(code_summaries, "extract", lambda: fake)
    code_summaries.load(tmp_path)
    (path,) = (tmp_path / "code_summarization").iterdir()
    path.write_text("{not json\n")
    with pytest.warns(UserWarning, match="ignoring the unreadable cache"):
        assert code_summaries.load(tmp_path) == fake
    assert code_summaries.load(tmp_path) == fake


def test_unwritable_cache_warns(tmp_path, monkeypatch):
    fake = code_summaries.extract([STDLIB / "fnmatch.py"])
    monkeypatch.setattr(code_summaries, "extract", lambda: fake)
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="could not cache"):
        assert code_summaries.load(tmp_path / "file") == fake


@pytest.mark.heavy
def test_full_extraction_count_and_cache_match(task):
    fresh = code_summaries.extract()
    assert 4000 < len(fresh) < 6000  # 4,380 on CPython 3.11.7
    assert code_summaries.dataset_hash(fresh) == task.dataset_hash


# ----------------------------------------------------------------------------
# Tokenization


def test_as_encoder(bpe):
    enc = data.as_encoder(bpe)
    assert enc.end_id == bpe.token_to_id("<|im_end|>") and enc.bos_id is None
    assert data.as_encoder(bpe, end_id="<|endoftext|>").end_id == bpe.token_to_id("<|endoftext|>")
    assert data.as_encoder(CHAR, end_id=7).end_id == 7
    with pytest.raises(ValueError, match="not a token of the tokenizer"):
        data.as_encoder(bpe, end_id="<missing>")
    with pytest.raises(TypeError, match="must have an encode"):
        data.as_encoder(object())
    plain = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="pass end_id"):
        data.as_encoder(plain)


def test_as_encoder_lora_jax_tokenizer(bpe):
    tokenizer_mod = pytest.importorskip("lora_jax.models.tokenizer")
    tok = tokenizer_mod.Tokenizer(bpe, bos_id=bpe.token_to_id("<|endoftext|>"), eos_id=0, add_bos=True)
    enc = data.as_encoder(tok)
    assert enc.bos_id == bpe.token_to_id("<|endoftext|>") and enc.end_id == bpe.token_to_id("<|im_end|>")
    assert enc.encode("def f") == bpe.encode("def f", add_special_tokens=False).ids


def test_loss_mask_covers_exactly_the_summary_and_end_token(task, bpe):
    ex = task.examples("val")[0]
    tz = task.tokenize(ex, bpe, chatml, max_len=4096)
    target = bpe.encode(ex.summary, add_special_tokens=False).ids + [bpe.token_to_id("<|im_end|>")]
    assert tz.ids.dtype == np.int32 and tz.ids.shape == tz.loss_mask.shape
    assert tz.ids[tz.loss_mask == 1].tolist() == target
    assert tz.loss_mask.tolist() == [0] * tz.prompt_len + [1] * len(target)
    assert not tz.truncated
    # The prompt tokens are what the generation prompt encodes to.
    prompt = task.prompt_for_generation(ex, chatml)
    assert prompt.endswith("```<|im_end|>\n<|im_start|>assistant\n") and ex.source.rstrip() in prompt
    assert bpe.encode(prompt, add_special_tokens=False).ids == tz.ids[: tz.prompt_len].tolist()
    assert task.reference(ex) == ex.summary


def test_truncation_cuts_the_source_and_keeps_the_summary(task, bpe):
    ex = max(task.examples("val"), key=lambda r: len(r.source))
    target = bpe.encode(ex.summary, add_special_tokens=False).ids + [bpe.token_to_id("<|im_end|>")]
    tz = task.tokenize(ex, bpe, chatml, max_len=200)
    assert tz.truncated and len(tz.ids) == 200
    assert tz.ids[tz.loss_mask == 1].tolist() == target and tz.ids[-len(target) :].tolist() == target
    tail = bpe.encode("\n```<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    assert tz.ids[tz.prompt_len - len(tail) : tz.prompt_len].tolist() == tail  # the template survives
    with pytest.raises(ValueError, match="max_len=20 is too small"):
        task.tokenize(ex, bpe, chatml, max_len=20)


def test_encode_turn_errors():
    with pytest.raises(ValueError, match="copy each message's content verbatim"):
        data.encode_turn(CHAR, head="", body="x", tail="", completion="y", max_len=9, format_chat=lambda m: "fixed")
    with pytest.raises(ValueError, match="the prompt is empty"):
        data.encode_turn(
            CHAR, head="", body="", tail="", completion="y", max_len=9, format_chat=lambda m: m[0]["content"]
        )


def test_encode_chat_masks_assistant_turns_only(bpe):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a module."},
        {"role": "assistant", "content": "json"},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "re"},
    ]
    tz = data.encode_chat(data.as_encoder(bpe), msgs, max_len=512, format_chat=chatml)
    end = bpe.token_to_id("<|im_end|>")
    enc = lambda s: bpe.encode(s, add_special_tokens=False).ids
    assert tz.ids[tz.loss_mask == 1].tolist() == enc("json") + [end] + enc("re") + [end]
    # The whole sequence is the conversation as ChatML renders it, with no doubled end token.
    full = chatml(msgs[:4]) + "re<|im_end|>"
    assert tz.ids.tolist() == enc(chatml(msgs[:2])) + enc("json") + enc(full[len(chatml(msgs[:2])) + 4 :])
    assert tz.prompt_len == len(enc(chatml(msgs[:2])))
    short = data.encode_chat(data.as_encoder(bpe), msgs, max_len=tz.prompt_len + 2, format_chat=chatml)
    assert short.truncated and short.loss_mask.tolist() == [0] * tz.prompt_len + [1, 1]
    with pytest.raises(ValueError, match="max_len=3 is too small"):
        data.encode_chat(data.as_encoder(bpe), msgs, max_len=3, format_chat=chatml)


def test_encode_chat_plain_fallback_places_end_tokens():
    msgs = [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 2, ["a", "b", "c", "d"], strict=True)]
    tz = data.encode_chat(CHAR, msgs, max_len=512)
    text = "".join(chr(i) if i else "|" for i in tz.ids)
    assert text == "### User:\na\n\n### Assistant:\nb|\n\n### User:\nc\n\n### Assistant:\nd|"
    assert "".join(chr(i) if i else "|" for i in tz.ids[tz.loss_mask == 1]) == "b|d|"


def test_encode_chat_errors():
    with pytest.raises(ValueError, match="needs an assistant turn"):
        data.encode_chat(CHAR, [{"role": "user", "content": "a"}], max_len=9)
    with pytest.raises(ValueError, match="needs an assistant turn"):
        data.encode_chat(CHAR, [{"role": "assistant", "content": "a"}], max_len=9)
    msgs = [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 2, "abcd", strict=True)]
    with pytest.raises(ValueError, match="not prefix-consistent"):
        data.encode_chat(CHAR, msgs, max_len=99, format_chat=lambda m: "".join(x["content"] for x in m[-1:]) + ">")


def test_pack_windows_targets_every_token_once():
    docs = [list(range(1, 8)), list(range(10, 15))]
    windows = data.pack_windows(docs, 4, CHAR)
    stream = [*docs[0], 0, *docs[1], 0]
    assert all(len(w.ids) <= 4 and w.loss_mask[0] == 0 for w in windows)
    targets = [int(i) for w in windows for i in w.ids[w.loss_mask == 1]]
    assert targets == stream[1:]
    assert [w.ids[0] for w in windows[1:]] == [w.ids[-1] for w in windows[:-1]]
    with pytest.raises(ValueError, match="window must be >= 2"):
        data.pack_windows(docs, 1, CHAR)


# ----------------------------------------------------------------------------
# Other tasks and the registry


def test_python_docs_lm_split_by_topic():
    lm = data.get_task("python-docs-lm")
    topics = {s: {d.name for d in lm.examples(s)} for s in lm.splits()}
    assert sum(map(len, topics.values())) == len(set().union(*topics.values())) > 50
    assert all(len(topics[s]) > 3 for s in lm.splits())
    assert lm.dataset_hash == data.get_task("python-docs-lm").dataset_hash
    assert lm.info()["n_documents"] == {s: len(v) for s, v in topics.items()}
    windows = lm.tokenize(lm.examples("val")[0], CHAR, max_len=64)
    assert all(len(w.ids) <= 64 for w in windows) and len(windows[0].ids) == 64


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'; known tasks"):
        data.get_task("nope")
    with pytest.raises(ValueError, match="unknown: \\['rank'\\]"):
        data.get_task("python-docs-lm", rank=4)
    with pytest.raises(ValueError, match="needs at least one file"):
        data.get_task("jsonl")
    with pytest.raises(ValueError, match="has splits \\['train', 'val', 'test'\\], got 'dev'"):
        data.get_task("python-docs-lm").examples("dev")


def write(path, text):
    path.write_text(text)
    return path


def test_jsonl_task(tmp_path, bpe):
    rows = [
        {"prompt": "Name a module.", "completion": "json", "extra": 1},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
    ]
    train = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n")
    t = data.get_task("jsonl", train=train)
    assert t.splits() == ("train",) and t.info()["n_examples"] == {"train": 2}
    ex = t.examples("train")[0]
    assert ex.origin == f"{train}:1" and t.reference(ex) == "json"
    assert t.prompt_for_generation(ex, chatml) == chatml([{"role": "user", "content": "Name a module."}])
    tz = t.tokenize_split("train", bpe, chatml, max_len=64)
    assert [x.ids[x.loss_mask == 1].tolist()[-1] for x in tz] == [bpe.token_to_id("<|im_end|>")] * 2
    assert t.score(["json"], ["json"])["exact_match"] == 1.0
    assert data.get_task("jsonl", train=train).dataset_hash == t.dataset_hash
    with pytest.raises(ValueError, match=f"{train}:1: max_len=3 is too small"):
        t.tokenize(ex, bpe, chatml, max_len=3)
    with pytest.raises(data.DataError, match=":1: 'messages' has no assistant turn"):
        data.get_task("jsonl", train=write(tmp_path / "bad.jsonl", json.dumps(rows[2])))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', ":2: invalid JSON"),
        ('\n\n["prompt", "completion"]\n', ":3: expected a JSON object, got list"),
        ('{"prompt": "a"}\n', ":1: expected keys 'prompt' and 'completion', or 'messages'; got \\['prompt'\\]"),
        ('{"prompt": "a", "completion": 3}\n', ":1: 'completion' must be a string, got int"),
        ('{"messages": []}\n', ":1: 'messages' must be a non-empty list"),
        ('{"messages": ["hi"]}\n', ":1: messages\\[0\\] must be an object with 'role' and 'content'"),
        ('{"messages": [{"role": "user", "content": null}]}\n', ":1: messages\\[0\\].content must be a string"),
        ("\n  \n", ": empty file; expected JSON lines"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, text, match):
    path = write(tmp_path / "d.jsonl", text)
    with pytest.raises(data.DataError, match=str(path).replace("\\", "\\\\") + match):
        data.read_jsonl(path)


def test_non_utf8_and_text_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(data.DataError, match="bad.jsonl:2: not UTF-8 text"):
        data.read_jsonl(bad)
    with pytest.raises(data.DataError, match="empty.txt: empty file; expected text"):
        data.get_task("text", train=write(tmp_path / "empty.txt", " \n"))
    t = data.get_task("text", train=write(tmp_path / "a.txt", "Hello world. " * 20), val=write(tmp_path / "b.txt", "x"))
    assert t.splits() == ("train", "val") and t.info()["n_chars"] == {"train": 260, "val": 1}
    windows = t.tokenize_split("train", CHAR, max_len=100)
    assert [len(w.ids) for w in windows] == [100, 100, 63]  # 261 tokens (with the end token), overlap 1


# ----------------------------------------------------------------------------
# Batching


def examples(n, rng):
    out = []
    for i in range(n):
        k = int(rng.integers(2, 9))
        mask = np.r_[np.zeros(k // 2), np.ones(k - k // 2)].astype(np.uint8)
        out.append(data.Tokenized(np.full(k, i + 1, np.int32), mask, k // 2))
    return out


def test_pad_examples_right_pads():
    exs = examples(5, np.random.default_rng(0))
    b = data.pad_examples(exs, 10, pad_id=99)
    assert {k: v.dtype for k, v in b.items()} == {
        "tokens": np.int32,
        "loss_mask": np.float32,
        "attention_mask": np.int32,
    }
    for i, ex in enumerate(exs):
        n = len(ex.ids)
        assert b["tokens"][i].tolist() == ex.ids.tolist() + [99] * (10 - n)
        assert b["loss_mask"][i].tolist() == ex.loss_mask.tolist() + [0] * (10 - n)
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (10 - n)


def test_pad_examples_errors():
    with pytest.raises(ValueError, match="no examples"):
        data.pad_examples([], 4)
    with pytest.raises(ValueError, match="example 1 has 5 tokens; every example needs 1..max_len=4"):
        data.pad_examples([([1], [0]), ([1] * 5, [0] * 5)], 4)
    with pytest.raises(ValueError, match="example 0 has 0 tokens"):
        data.pad_examples([([], [])], 4)
    with pytest.raises(ValueError, match="example 0: loss_mask has shape \\(1,\\) but ids \\(2,\\)"):
        data.pad_examples([([1, 2], [0])], 4)
    with pytest.raises(ValueError, match="position 0 cannot be a target"):
        data.pad_examples([([1, 2], [1, 1])], 4)


def test_batch_at_is_pure_and_resumable():
    padded = data.pad_examples(examples(10, np.random.default_rng(0)), 8)
    run = [data.batch_at(padded, k, batch_size=3, seed=7) for k in range(9)]
    resumed = [data.batch_at(padded, k, batch_size=3, seed=7) for k in range(5, 9)]
    for a, b in zip(run[5:], resumed, strict=True):
        assert all((a[key] == b[key]).all() for key in a)
    assert all(b["tokens"].shape == (3, 8) for b in run)
    for epoch in range(3):  # 3 batches per epoch: 9 distinct examples, a new order each epoch
        rows = [int(t) for b in run[3 * epoch : 3 * epoch + 3] for t in b["tokens"][:, 0]]
        assert len(set(rows)) == 9
    orders = [[int(t) for b in run[3 * e : 3 * e + 3] for t in b["tokens"][:, 0]] for e in range(3)]
    assert orders[0] != orders[1]
    other = [int(t) for k in range(3) for t in data.batch_at(padded, k, batch_size=3, seed=8)["tokens"][:, 0]]
    assert other != orders[0]
    assert data.position(7, n=10, batch_size=3) == (2, 1)
    in_order = data.batch_at(padded, 1, batch_size=3, seed=7, shuffle=False)
    assert in_order["tokens"][:, 0].tolist() == [4, 5, 6]


def test_batching_errors():
    padded = data.pad_examples([([1, 2], [0, 1])] * 3, 4)
    with pytest.raises(ValueError, match="batch_size must be in 1..3"):
        data.batch_at(padded, 0, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        data.batch_at(padded, -1, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        list(data.eval_batches(padded, 0))


def test_eval_batches_cover_everything_once():
    exs = examples(7, np.random.default_rng(1))
    padded = data.pad_examples(exs, 8)
    batches = list(data.eval_batches(padded, 3))
    assert [b["tokens"].shape for b in batches] == [(3, 8)] * 3
    assert sum(float(b["loss_mask"].sum()) for b in batches) == sum(int(e.loss_mask.sum()) for e in exs)
    assert batches[-1]["attention_mask"][1:].sum() == 0


def test_batches_feed_the_llama_loss():
    config = llama.LlamaConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    params = llama.init(jax.random.key(0), config)
    padded = data.pad_examples(examples(3, np.random.default_rng(2)), 8)
    loss_fn = jax.jit(llama.loss, static_argnums=2)
    for batch in [data.batch_at(padded, 0, batch_size=2, seed=0), *data.eval_batches(padded, 2)]:
        loss, aux = loss_fn(params, batch, config)  # the last eval batch has an empty row
        assert np.isfinite(float(loss)) and float(aux["n_tokens"]) == batch["loss_mask"][:, 1:].sum()


# ----------------------------------------------------------------------------
# Scores


def test_rouge_identical_and_disjoint():
    s = data.score_summaries(["Return the sum of a and b."], ["Return the sum of a and b."])
    assert s == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "exact_match": 1.0, "n": 1}
    s = data.score_summaries(["open the file"], ["close a socket"])
    assert s["rouge1"] == s["rouge2"] == s["rougeL"] == s["exact_match"] == 0.0


def test_rouge_hand_checked_value():
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    # Unigrams: 5 of 6 match (the x2, cat, on, mat); bigrams: 3 of 5 (the cat, on the, the mat);
    # longest common subsequence: "the cat on the mat", 5 tokens.
    s = data.score_summaries([pred, ref], [ref, ref])
    assert s["rouge1"] == pytest.approx((5 / 6 + 1) / 2)
    assert s["rouge2"] == pytest.approx((3 / 5 + 1) / 2)
    assert s["rougeL"] == pytest.approx((5 / 6 + 1) / 2)
    from rouge_score import rouge_scorer

    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, pred)
    assert data.score_summaries([pred], [ref])["rouge2"] == pytest.approx(direct["rouge2"].fmeasure) == 0.6
    # Stemming: "returns" and "return" are one word.
    assert data.score_summaries(["Returns the files"], ["return the file"])["rouge1"] == 1.0


def test_exact_match_normalization():
    s = data.score_summaries(["  Return  THE sum\n", "Return a sum."], ["Return the sum.", "Return the sum."])
    assert s["exact_match"] == 0.5


def test_score_errors(monkeypatch):
    with pytest.raises(ValueError, match="got 1 predictions for 2 references"):
        data.score_summaries(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="nothing to score"):
        data.score_summaries([], [])
    with pytest.raises(TypeError, match="not a single string"):
        data.score_summaries("abc", "abc")
    scoring._scorer.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    try:
        with pytest.raises(ImportError, match="pip install rouge-score"):
            data.score_summaries(["a"], ["a"])
    finally:
        scoring._scorer.cache_clear()


def test_tokenize_split_with_a_limit_is_the_whole_split_cut(task, bpe, tmp_path):
    """The runner asks for ``task.n_train`` examples only: the same ones as tokenizing everything, then cutting."""
    bos = Encoder(encode=CHAR.encode, end_id=0, bos_id=1)
    docs = data.get_task("python-docs-lm")
    for enc in (CHAR, bos):
        whole = docs.tokenize_split("val", enc, max_len=64)
        for n in (1, 5, 300, len(whole), len(whole) + 3):
            cut = docs.tokenize_split("val", enc, max_len=64, limit=n)
            assert [w.ids.tolist() for w in cut] == [w.ids.tolist() for w in whole[:n]], n
            assert [w.loss_mask.tolist() for w in cut] == [w.loss_mask.tolist() for w in whole[:n]], n
    small, whole = (task.tokenize_split("val", bpe, chatml, max_len=4096, limit=n) for n in (3, None))
    assert [x.ids.tolist() for x in small] == [x.ids.tolist() for x in whole[:3]]
    rows = data.get_task("jsonl", train=write(tmp_path / "d.jsonl", '{"prompt": "a", "completion": "b"}\n' * 3))
    assert len(rows.tokenize_split("train", CHAR, max_len=64, limit=2)) == 2
