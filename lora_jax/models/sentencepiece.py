"""SentencePiece-style tokenizers from GGUF metadata (``tokenizer.ggml.model = "llama"``), and Gemma's chat turns.

A SentencePiece vocabulary in a GGUF file is a list of pieces (spaces spelled
``▁``), a score and a type per piece (1 normal, 2 unknown, 3 control,
4 user-defined, 6 byte: ``<0x41>``), and the bos/eos/unk/pad ids; it has no
merge list. :func:`from_gguf_metadata` builds a byte-fallback BPE over it
with Hugging Face ``tokenizers``: the merges are every split of a piece into
two pieces of the vocabulary, ranked by the piece they make (earlier in the
file is better for Gemma, whose scores do not follow its merge order; higher
score otherwise), longer left part first. Text is normalized by writing each
space as ``▁`` (no prefix space unless ``tokenizer.ggml.add_space_prefix``);
characters without a piece fall back to their UTF-8 bytes; control and
user-defined pieces (``<start_of_turn>``) are matched whole.

Gemma's chat format (:func:`gemma_turns`)::

    <start_of_turn>user
    What is the capital of France?<end_of_turn>
    <start_of_turn>model

The tokenizer puts ``<bos>`` first (``tokenizer.ggml.add_bos_token``) and stops
generation at ``<eos>`` or ``<end_of_turn>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

from lora_jax.errors import CheckpointError, DataError
from lora_jax.models import tokenizer as _tokenizer

SPACE = "\u2581"
TURN_START, TURN_END = "<start_of_turn>", "<end_of_turn>"


def gemma_turns(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
    """Format a chat in Gemma's turn format (a ``system`` message is put before the first user message).

    Examples:
      >>> print(gemma_turns([{"role": "user", "content": "Hi"}]))
      <start_of_turn>user
      Hi<end_of_turn>
      <start_of_turn>model
      <BLANKLINE>
    """
    out, system = [], ""
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r}")
        role = m["role"]
        if role == "system":
            system += m["content"] + "\n\n"
            continue
        content = system + m["content"] if role == "user" else m["content"]
        system = "" if role == "user" else system
        out.append(f"{TURN_START}{'model' if role == 'assistant' else role}\n{content}{TURN_END}\n")
    if add_generation_prompt:
        out.append(f"{TURN_START}model\n")
    return "".join(out)


class SentencePieceTokenizer(_tokenizer.Tokenizer):
    """A :class:`~lora_jax.models.tokenizer.Tokenizer` over a SentencePiece vocabulary, with Gemma's chat turns."""

    turn_end = TURN_END  # a stop id besides eos_id, for Gemma

    @property
    def is_gemma_chat(self) -> bool:
        return self.token_to_id(TURN_START) is not None and self.token_to_id(TURN_END) is not None

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True, use_template: bool = False) -> str:
        """Gemma's turn format (:func:`gemma_turns`) when the vocabulary has its markers, else as the base class."""
        if use_template or not self.is_gemma_chat:
            return super().apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                               use_template=use_template)
        return gemma_turns(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], **kwargs) -> list[int]:
        """Token ids of the chat prompt, ``<bos>`` first when the file asks for it."""
        return self.encode(self.apply_chat_template(messages, **kwargs))


def merges_from_vocab(tokens: Sequence[str], priority: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: each split of a piece into two pieces, best piece first.

    Args:
      tokens: the pieces, by id.
      priority: per piece, higher merges first.

    Examples:
      >>> merges_from_vocab(["a", "b", "c", "ab", "abc"], [0, 0, 0, 2, 1])
      [('a', 'b'), ('ab', 'c')]
    """
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for t, i in ids.items():
        for k in range(len(t) - 1, 0, -1):  # longer left part first
            left, right = t[:k], t[k:]
            if left in ids and right in ids:
                found.append((-priority[i], i, -k, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def from_gguf_metadata(meta: Mapping[str, Any], *, source: str = "GGUF metadata") -> SentencePieceTokenizer:
    """Build the tokenizer of a SentencePiece (``llama``) vocabulary in GGUF metadata.

    Raises:
      CheckpointError: not a SentencePiece vocabulary, or lists of different lengths.
    """
    if meta.get("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{source}: not a SentencePiece ('llama') vocabulary (tokenizer.ggml.model / tokens)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [_tokenizer.NORMAL] * len(tokens))
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    if not (len(tokens) == len(types) == len(scores)):
        raise CheckpointError(f"{source}: {len(tokens)} tokens, {len(types)} token types and {len(scores)} scores")
    arch = meta.get("general.architecture", "")
    if str(arch).startswith("gemma"):
        # Gemma files spell runs of spaces with real spaces; its merges follow the file order, not the scores
        tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
        priority: Sequence[float] = [-i for i in range(len(tokens))]
    else:
        priority = scores
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    bpe = models.BPE(vocab=vocab, merges=merges_from_vocab(tokens, priority), unk_token=unk, fuse_unk=True,
                     byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    norm = [normalizers.Replace(" ", SPACE)]
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        norm.insert(0, normalizers.Prepend(SPACE))
    backend.normalizer = normalizers.Sequence(norm)
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                if k == _tokenizer.CONTROL]
    backend.add_special_tokens(specials)
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                        if k == _tokenizer.USER_DEFINED])

    def opt_id(key):
        v = meta.get(key)
        return None if v is None else int(v)

    return SentencePieceTokenizer(
        backend,
        bos_id=opt_id("tokenizer.ggml.bos_token_id"),
        eos_id=opt_id("tokenizer.ggml.eos_token_id"),
        pad_id=opt_id("tokenizer.ggml.padding_token_id"),
        unk_id=opt_id("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        chat_template=meta.get("tokenizer.chat_template"),
    )
