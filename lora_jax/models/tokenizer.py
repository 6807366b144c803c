"""Tokenizers for the built-in models, built with Hugging Face ``tokenizers``.

A GGUF file carries its whole tokenizer in metadata: the vocabulary
(``tokenizer.ggml.tokens``), the BPE merges, a type per token (1 normal,
3 control, 4 user-defined), the bos/eos/pad ids, the name of the text splitter
the merges were learned with (``tokenizer.ggml.pre``) and a Jinja chat template.
:func:`from_gguf_metadata` turns that into a :class:`Tokenizer` around a
``tokenizers.Tokenizer`` (GPT-2 byte-level BPE); control and user-defined
tokens such as ``<|im_start|>`` are matched whole in the text and map to one id.

Chat prompts are written by :func:`chatml`, a hand-written ChatML formatter
(the format of SmolLM2, Qwen and many others). The file's Jinja template is
never executed as code: it is rendered only on request
(``Tokenizer.apply_chat_template(..., use_template=True)``) and only inside
``jinja2``'s immutable sandbox, when ``jinja2`` is installed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from lora_jax.errors import CheckpointError, DataError

# Token types of llama.cpp's vocabulary (``enum llama_token_type``).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = None  # ByteLevel(use_regex=True) applies the GPT-2 pattern itself
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ``tokenizer.ggml.pre`` -> (split digits one by one first?, extra split regex or None for GPT-2's).
PRE_TOKENIZERS: dict[str, tuple[bool, str | None]] = {
    "default": (False, _GPT2_SPLIT),
    "gpt-2": (False, _GPT2_SPLIT),
    "gpt2": (False, _GPT2_SPLIT),
    "phi-2": (False, _GPT2_SPLIT),
    # llama.cpp splits every digit off, then applies the GPT-2 pattern, for these:
    "smollm": (True, _GPT2_SPLIT),
    "starcoder": (True, _GPT2_SPLIT),
    "refact": (True, _GPT2_SPLIT),
    "codeshell": (True, _GPT2_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "llama-v3": (False, _LLAMA3_SPLIT),
    "smaug-bpe": (False, _LLAMA3_SPLIT),
}

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


def chatml(
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    default_system: str | None = None,
) -> str:
    """Format chat messages as ChatML.

    Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; with
    ``add_generation_prompt`` the text ends in ``<|im_start|>assistant\\n`` so the
    model writes the answer next.

    Args:
      messages: dicts with ``role`` (``system``, ``user``, ``assistant``...) and ``content``.
      add_generation_prompt: open an assistant turn at the end.
      default_system: a system message to put first when ``messages`` has none
        (SmolLM2's template does this; see :attr:`Tokenizer.default_system`).

    Returns:
      The prompt text; special markers are tokenized to single ids by :class:`Tokenizer`.

    Examples:
      >>> chatml([{"role": "user", "content": "Hi"}])
      '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
      >>> chatml([{"role": "user", "content": "Hi"}], add_generation_prompt=False, default_system="Be brief.")
      '<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n'
    """
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r}")
        if i == 0 and m["role"] != "system" and default_system is not None:
            parts.append(f"{CHATML_START}system\n{default_system}{CHATML_END}\n")
        parts.append(f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n")
    if add_generation_prompt:
        parts.append(f"{CHATML_START}assistant\n")
    return "".join(parts)


def _default_system_of(template: str | None) -> str | None:
    """The system message a ChatML template inserts when none is given (read, never run)."""
    if not template:
        return None
    m = re.search(r"'<\|im_start\|>system\n(.*?)<\|im_end\|>", template, flags=re.S)
    return m.group(1) if m else None


class Tokenizer:
    """Text <-> token ids, special tokens and the chat format of one model.

    Attributes:
      backend: the wrapped ``tokenizers.Tokenizer``.
      bos_id, eos_id, pad_id, unk_id: special ids (``None`` when the model has none).
      add_bos: whether :meth:`encode` puts ``bos_id`` first by default.
      chat_template: the model's Jinja chat template text, if any (not executed).
      default_system: the system message the template inserts when a chat has none.
    """

    turn_end = CHATML_END  # the token that ends a chat turn: a stop id where the vocabulary has it

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.default_system = _default_system_of(chat_template)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, chat={'ChatML' if self.is_chatml else 'none'})"
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def is_chatml(self) -> bool:
        return self.token_to_id(CHATML_START) is not None and self.token_to_id(CHATML_END) is not None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generated answer: ``eos_id`` and :attr:`turn_end` (ChatML's ``<|im_end|>``) if present."""
        ids = [self.eos_id] if self.eos_id is not None else []
        end = self.token_to_id(self.turn_end)
        if end is not None and end not in ids:
            ids.append(end)
        return tuple(ids)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special markers in the text (``<|im_start|>``) become single ids.

        Args:
          text: the text.
          add_bos: put ``bos_id`` first; default :attr:`add_bos` (from the file).
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode needs a str, got {type(text).__name__}: {text!r:.80}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """:meth:`encode` for several texts (ragged lists)."""
        return [self.encode(t, add_bos=add_bos) for t in texts]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-D array)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        use_template: bool = False,
    ) -> str:
        """Format a chat as the model expects it.

        Args:
          messages: dicts with ``role`` and ``content``.
          add_generation_prompt: end with an open assistant turn.
          use_template: render the file's Jinja template in ``jinja2``'s immutable
            sandbox instead of the built-in ChatML formatter (needs ``jinja2``).

        Returns:
          The prompt text. The default (ChatML with :attr:`default_system`) gives
          the same text as SmolLM2's own template.
        """
        if use_template:
            return self._render_template(messages, add_generation_prompt)
        if not self.is_chatml:
            raise CheckpointError(
                "this tokenizer has no <|im_start|>/<|im_end|> tokens, so the built-in ChatML formatter "
                "does not fit it; pass use_template=True to render the model's own template (needs jinja2)"
            )
        return chatml(messages, add_generation_prompt=add_generation_prompt, default_system=self.default_system)

    def _render_template(self, messages, add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise CheckpointError("this tokenizer has no chat template (no 'tokenizer.chat_template' metadata)")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise ImportError(
                "rendering the model's chat template needs jinja2 (pip install jinja2); "
                "or call apply_chat_template(..., use_template=False) for the built-in ChatML formatter"
            ) from e
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        special = {
            "bos_token": self.id_to_token(self.bos_id) if self.bos_id is not None else "",
            "eos_token": self.id_to_token(self.eos_id) if self.eos_id is not None else "",
        }
        return env.from_string(self.chat_template).render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **special
        )

    def encode_chat(self, messages: Sequence[Mapping[str, str]], **kwargs) -> list[int]:
        """Token ids of :meth:`apply_chat_template` (no extra bos: the format has its own markers)."""
        return self.encode(self.apply_chat_template(messages, **kwargs), add_bos=False)


def byte_level_bpe(
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int] | None = None,
    *,
    pre: str = "default",
) -> tokenizers.Tokenizer:
    """Build a GPT-2 style byte-level BPE ``tokenizers.Tokenizer``.

    Args:
      tokens: the vocabulary in GPT-2's byte-to-unicode spelling (``'Ġthe'``), id = index.
      merges: ``'a b'`` strings, highest priority first.
      token_types: llama.cpp token types; control (3) and user-defined (4) tokens are
        matched whole in the text.
      pre: the name of the text splitter (``tokenizer.ggml.pre``), one of :data:`PRE_TOKENIZERS`.

    Examples:
      >>> tok = byte_level_bpe(["a", "b", "ab", "<s>"], ["a b"], [1, 1, 1, 3])
      >>> tok.encode("abab<s>a").ids
      [2, 2, 3, 0]
    """
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {sorted(PRE_TOKENIZERS)}"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        dup = next(t for i, t in enumerate(tokens) if vocab[t] != i)
        raise CheckpointError(f"the vocabulary lists token {dup!r} more than once")
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"a BPE merge must be two tokens separated by one space, got {m!r}")
        pairs.append((parts[0], parts[1]))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    digits, split = PRE_TOKENIZERS[pre]
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    if token_types is not None:
        if len(token_types) != len(tokens):
            raise CheckpointError(f"{len(token_types)} token types for {len(tokens)} tokens")
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, token_types, strict=True)
            if ty in (CONTROL, USER_DEFINED)
        ]
        if special:
            backend.add_special_tokens(special)
    return backend


def from_gguf_metadata(meta: Mapping[str, Any], *, source: str = "GGUF metadata") -> Tokenizer:
    """Build the :class:`Tokenizer` described by GGUF ``tokenizer.*`` metadata.

    Args:
      meta: key -> value (``tokenizer.ggml.tokens`` etc., as read by
        :mod:`lora_jax.models.load_gguf`).
      source: what to name in error messages (the file path).

    Raises:
      CheckpointError: no tokenizer in the metadata, or one that is not GPT-2 byte-level BPE.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{source}: no tokenizer in the metadata (tokenizer.ggml.model / tokens missing)")
    if kind != "gpt2":
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model is {kind!r}; lora-jax reads GPT-2 byte-level BPE ('gpt2') only "
            "(SentencePiece 'llama' vocabularies are not supported)"
        )
    if "tokenizer.ggml.merges" not in meta:
        raise CheckpointError(f"{source}: a 'gpt2' tokenizer needs tokenizer.ggml.merges, which is missing")
    pre = meta.get("tokenizer.ggml.pre", "default")
    try:
        backend = byte_level_bpe(
            meta["tokenizer.ggml.tokens"],
            meta["tokenizer.ggml.merges"],
            meta.get("tokenizer.ggml.token_type"),
            pre=pre,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None

    def opt_id(key):
        v = meta.get(key)
        return None if v is None else int(v)

    return Tokenizer(
        backend,
        bos_id=opt_id("tokenizer.ggml.bos_token_id"),
        eos_id=opt_id("tokenizer.ggml.eos_token_id"),
        pad_id=opt_id("tokenizer.ggml.padding_token_id"),
        unk_id=opt_id("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )
