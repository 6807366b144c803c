"""Tasks: named datasets with splits, tokenization with loss masks, and their metric.

:func:`get_task` builds one by name:

- ``code-summarization``: a function of the Python standard library -> the first
  line of its docstring (:mod:`lora_jax.data.code_summaries`), through the model's
  chat format; greedy generations are scored with ROUGE-1/2/L and exact match.
- ``python-docs-lm``: causal language modelling on the Python reference
  documentation (``pydoc_data.topics``), split by topic, packed into windows;
  the metric is perplexity.
- ``jsonl``: the user's prompt/completion or chat files (:mod:`lora_jax.data.files`),
  one file per split (``get_task("jsonl", train=..., val=...)``).
- ``text``: the user's plain text files for language modelling, one per split.

Every task has ``name``, ``kind`` (``"generation"`` or ``"lm"``), ``splits()``,
``examples(split)``, ``dataset_hash``, ``info()``, ``tokenize(example, tokenizer,
format_chat, max_len)``, ``tokenize_split(split, ...)`` (what training reads) and
``min_len(tokenizer, format_chat)`` (the fewest tokens an example can fit in:
the smallest ``max_len`` that leaves a target token; checked before a run starts).
Generation tasks add ``prompt_for_generation(example, format_chat)``,
``reference(example)`` and ``score(predictions, references)``.

``tokenizer`` is anything :func:`~lora_jax.data.encoding.as_encoder` accepts;
``format_chat`` renders messages and opens the assistant turn (for a lora-jax
``Tokenizer``: ``tokenizer.apply_chat_template``; default
:func:`~lora_jax.data.encoding.plain_chat`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lora_jax.data import code_summaries, encoding, files, scoring
from lora_jax.data.encoding import ChatFormat, Tokenized
from lora_jax.errors import DataError

INSTRUCTION = "Summarize this Python function in one line:"


def _check_split(task, split: str) -> None:
    if split not in task.splits():
        raise DataError(f"task {task.name!r} has splits {list(task.splits())}, got {split!r}")


def _tokenize_all(task, split, tokenizer, format_chat, max_len, limit=None) -> list[Tokenized]:
    enc = encoding.as_encoder(tokenizer)
    return [task.tokenize(ex, enc, format_chat, max_len) for ex in task.examples(split)[:limit]]


class CodeSummarization:
    """Summarize a standard-library function in one line (its docstring's first line).

    Args:
      cache_dir: where the extracted pairs are cached (default
        :func:`~lora_jax.data.code_summaries.cache_dir`).
      records: use these pairs instead of the stdlib's (for tests and subsets).
    """

    name = "code-summarization"
    kind = "generation"

    def __init__(self, *, cache_dir: str | os.PathLike | None = None, records: Iterable | None = None):
        self.records = list(records) if records is not None else code_summaries.load(cache_dir)
        self._by_split = {s: [] for s in code_summaries.SPLITS}
        for r in self.records:
            self._by_split[code_summaries.split_of(r.path)].append(r)
        self.dataset_hash = code_summaries.dataset_hash(self.records)

    def splits(self) -> tuple[str, ...]:
        return tuple(self._by_split)

    def examples(self, split: str) -> list[code_summaries.CodeSummary]:
        _check_split(self, split)
        return self._by_split[split]

    def info(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "python_version": code_summaries.python_version(),
            "extractor_version": code_summaries.EXTRACTOR_VERSION,
            "split_fractions": dict(code_summaries.SPLITS),
            "dataset_hash": self.dataset_hash,
            "n_examples": {s: len(v) for s, v in self._by_split.items()},
            "n_files": {s: len({r.path for r in v}) for s, v in self._by_split.items()},
        }

    def messages(self, example: code_summaries.CodeSummary) -> list[dict[str, str]]:
        """The user turn that asks for the summary."""
        return [{"role": "user", "content": f"{INSTRUCTION}\n\n```python\n{example.source.rstrip()}\n```"}]

    def tokenize(self, example, tokenizer, format_chat: ChatFormat | None = None, max_len: int = 512) -> Tokenized:
        """Tokenize with the loss on the summary and its end token; a long source is cut, never the summary."""
        return encoding.encode_turn(
            encoding.as_encoder(tokenizer),
            head=f"{INSTRUCTION}\n\n```python\n",
            body=example.source.rstrip(),
            tail="\n```",
            completion=example.summary,
            max_len=max_len,
            format_chat=format_chat,
        )

    def tokenize_split(self, split, tokenizer, format_chat: ChatFormat | None = None, max_len: int = 512,
                       limit: int | None = None):
        """The split's examples tokenized (only the first ``limit`` when given)."""
        return _tokenize_all(self, split, tokenizer, format_chat, max_len, limit)

    def min_len(self, tokenizer, format_chat: ChatFormat | None = None) -> int:
        """The prompt template, one token of source, one of summary and the end token."""
        empty = code_summaries.CodeSummary(path="", qualname="", lineno=0, source="", summary="")
        return len(self.tokenize(empty, tokenizer, format_chat, max_len=1 << 30).ids) + 2

    def prompt_for_generation(self, example, format_chat: ChatFormat | None = None) -> str:
        """The full prompt text (untruncated; ``tokenize(...).ids[:prompt_len]`` is the truncated one)."""
        return (format_chat or encoding.plain_chat)(self.messages(example))

    def reference(self, example) -> str:
        return example.summary

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        return scoring.score_summaries(predictions, references)


class Document(NamedTuple):
    """A text for language modelling: ``name`` (topic or file) and ``text``."""

    name: str
    text: str


class _LanguageModelling:
    """Shared part of the LM tasks: documents per split, windows with every token after the first a target."""

    kind = "lm"
    metric = "perplexity"
    _docs: dict[str, list[Document]]

    def splits(self) -> tuple[str, ...]:
        return tuple(self._docs)

    def examples(self, split: str) -> list[Document]:
        _check_split(self, split)
        return self._docs[split]

    def info(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "dataset_hash": self.dataset_hash,
            "n_documents": {s: len(v) for s, v in self._docs.items()},
            "n_chars": {s: sum(len(d.text) for d in v) for s, v in self._docs.items()},
        }

    def tokenize(self, example: Document, tokenizer, format_chat=None, max_len: int = 512) -> list[Tokenized]:
        """The windows of one document (``format_chat`` is unused)."""
        enc = encoding.as_encoder(tokenizer)
        return encoding.pack_windows([enc.encode(example.text)], max_len, enc)

    def tokenize_split(self, split: str, tokenizer, format_chat=None, max_len: int = 512,
                       limit: int | None = None) -> list[Tokenized]:
        """The split's documents packed into windows of ``max_len`` tokens (the first ``limit`` when given).

        With ``limit``, documents are encoded only until their tokens fill
        ``limit`` windows: the windows are those of the whole split, cut.
        """
        enc = encoding.as_encoder(tokenizer)
        need = None if limit is None else limit * (max_len - 1) + 1  # stream tokens that fill `limit` windows
        docs, n = [], 0
        for d in self.examples(split):
            if need is not None and n >= need:
                break
            docs.append(enc.encode(d.text))
            n += len(docs[-1]) + 1 + (enc.bos_id is not None)  # [bos] doc [end]
        return encoding.pack_windows(docs, max_len, enc)[:limit]

    def min_len(self, tokenizer=None, format_chat=None) -> int:
        """A window needs a token of context and one target."""
        return 2


class PythonDocsLM(_LanguageModelling):
    """Language modelling on the Python reference documentation, split by topic (80/10/10)."""

    name = "python-docs-lm"

    def __init__(self):
        from pydoc_data.topics import topics

        self._docs = {s: [] for s in code_summaries.SPLITS}
        for topic in sorted(topics):
            self._docs[code_summaries.split_of(topic)].append(Document(topic, topics[topic]))
        blob = json.dumps(topics, sort_keys=True, ensure_ascii=False).encode()
        self.dataset_hash = hashlib.sha256(blob).hexdigest()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "python_version": code_summaries.python_version()}


def _files_hash(paths: dict[str, Path]) -> str:
    h = hashlib.sha256()
    for split, p in paths.items():
        h.update(f"{split}\0".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _split_files(name: str, train, val, test) -> dict[str, Path]:
    paths = {s: Path(p) for s, p in (("train", train), ("val", val), ("test", test)) if p is not None}
    if not paths:
        raise DataError(f"task {name!r} needs at least one file: get_task({name!r}, train=..., val=..., test=...)")
    return paths


class TextFiles(_LanguageModelling):
    """Language modelling on plain text files, one per split (each file one document)."""

    name = "text"

    def __init__(self, *, train=None, val=None, test=None):
        paths = _split_files(self.name, train, val, test)
        self._docs = {s: [Document(str(p), files.read_text(p))] for s, p in paths.items()}
        self.dataset_hash = _files_hash(paths)


class ChatFiles:
    """Prompt/completion pairs or chats from JSONL files, one per split; loss on the assistant turns."""

    name = "jsonl"
    kind = "generation"

    def __init__(self, *, train=None, val=None, test=None):
        paths = _split_files(self.name, train, val, test)
        self._rows = {s: files.read_jsonl(p) for s, p in paths.items()}
        self.dataset_hash = _files_hash(paths)

    def splits(self) -> tuple[str, ...]:
        return tuple(self._rows)

    def examples(self, split: str) -> list[files.Conversation]:
        _check_split(self, split)
        return self._rows[split]

    def info(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "dataset_hash": self.dataset_hash,
            "n_examples": {s: len(v) for s, v in self._rows.items()},
        }

    def tokenize(self, example, tokenizer, format_chat: ChatFormat | None = None, max_len: int = 512) -> Tokenized:
        """A user/assistant pair has its prompt cut to fit; longer chats lose their last tokens."""
        enc, msgs = encoding.as_encoder(tokenizer), example.messages
        try:
            if [m["role"] for m in msgs] == ["user", "assistant"]:
                user, answer = msgs[0]["content"], msgs[1]["content"]
                return encoding.encode_turn(
                    enc, head="", body=user, tail="", completion=answer, max_len=max_len, format_chat=format_chat
                )
            return encoding.encode_chat(enc, msgs, max_len=max_len, format_chat=format_chat)
        except ValueError as e:
            raise DataError(f"{example.origin}: {e}") from None

    def tokenize_split(self, split, tokenizer, format_chat: ChatFormat | None = None, max_len: int = 512,
                       limit: int | None = None):
        """The split's rows tokenized, the first ``limit`` returned (every row is tokenized, so a bad one is named)."""
        return _tokenize_all(self, split, tokenizer, format_chat, max_len)[:limit]

    def min_len(self, tokenizer, format_chat: ChatFormat | None = None) -> int:
        """The chat template around an empty user turn, and the end token of the answer."""
        empty = files.Conversation(({"role": "user", "content": ""}, {"role": "assistant", "content": ""}), "")
        return len(self.tokenize(empty, tokenizer, format_chat, max_len=1 << 30).ids)

    def _last_answer(self, example) -> int:
        return max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")

    def prompt_for_generation(self, example, format_chat: ChatFormat | None = None) -> str:
        """The conversation up to its last assistant turn, which is left open."""
        return (format_chat or encoding.plain_chat)(example.messages[: self._last_answer(example)])

    def reference(self, example) -> str:
        return example.messages[self._last_answer(example)]["content"]

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        return scoring.score_summaries(predictions, references)


TASKS: dict[str, Callable[..., Any]] = {
    CodeSummarization.name: CodeSummarization,
    PythonDocsLM.name: PythonDocsLM,
    ChatFiles.name: ChatFiles,
    TextFiles.name: TextFiles,
}


def get_task(name: str, **options: Any):
    """Build a task by name.

    Args:
      name: one of :data:`TASKS` (``code-summarization``, ``python-docs-lm``, ``jsonl``, ``text``).
      **options: the task's keyword options (``cache_dir`` for code-summarization;
        ``train``, ``val``, ``test`` file paths for ``jsonl`` and ``text``).

    Returns:
      The task.

    Examples:
      >>> task = get_task("python-docs-lm")
      >>> task.splits(), task.kind
      (('train', 'val', 'test'), 'lm')
      >>> from lora_jax.data.encoding import Encoder
      >>> windows = task.tokenize_split("val", Encoder(encode=lambda s: list(s.encode()), end_id=0), max_len=256)
      >>> windows[0].ids.shape, int(windows[0].loss_mask.sum())
      ((256,), 255)
    """
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    factory = TASKS[name]
    accepted = set(inspect.signature(factory).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(f"task {name!r} takes options {sorted(accepted)}; unknown: {unknown}")
    return factory(**options)
