"""Text to token ids with a loss mask: chat turns, prompt/completion pairs, LM windows.

Everything here speaks to a tokenizer through :class:`Encoder`, three fields:
``encode(text) -> list[int]`` (no special tokens added), the id that ends a
completion (``end_id``: ``<|im_end|>`` for ChatML models, otherwise EOS) and an
optional ``bos_id`` put first in every sequence. :func:`as_encoder` builds one
from a lora-jax :class:`~lora_jax.models.tokenizer.Tokenizer`, a Hugging Face
``tokenizers.Tokenizer`` or any object with ``encode``.

Chats go through a formatter ``format_chat(messages) -> str`` that renders the
messages and opens an assistant turn at the end (ChatML:
``...<|im_start|>assistant\\n``); :func:`plain_chat` is the fallback for models
without a chat format. Prompt and completion are tokenized separately and
concatenated, so the prompt tokens of a training example are exactly the tokens a
model is given at generation time (``ids[:prompt_len]``).

Loss masks follow :func:`lora_jax.models.llama.loss`: ``loss_mask[t] = 1`` where
token ``t`` is a target, predicted from the tokens before it; position 0 never is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from lora_jax.errors import DataError

Messages = Sequence[Mapping[str, str]]
ChatFormat = Callable[[Messages], str]

# Tried in order when a ``tokenizers.Tokenizer`` is given without ``end_id``.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]")
_BODY = "\x00lora_jax:body\x00"  # stands for the truncatable part while rendering a chat


@dataclasses.dataclass(frozen=True)
class Encoder:
    """The three things data preparation needs from a tokenizer.

    Attributes:
      encode: text -> token ids, adding no special tokens.
      end_id: id appended after every completion and every document.
      bos_id: id put first in every sequence, or ``None``.
      pad_id: id written into padding.

    Examples:
      >>> enc = Encoder(encode=lambda s: [ord(c) for c in s], end_id=0)
      >>> enc.encode("hi")
      [104, 105]
    """

    encode: Callable[[str], list[int]]
    end_id: int
    bos_id: int | None = None
    pad_id: int = 0


def as_encoder(tokenizer: Any, *, end_id: int | str | None = None) -> Encoder:
    """Wrap a tokenizer as an :class:`Encoder`.

    Args:
      tokenizer: an :class:`Encoder` (returned as is unless ``end_id`` is given),
        a lora-jax ``Tokenizer`` (its BOS when it adds one; ``<|im_end|>`` ends a
        completion for ChatML models, else EOS), a ``tokenizers.Tokenizer`` (the
        first of :data:`END_TOKENS` in its vocabulary ends a completion) or any
        object with ``encode(text) -> list[int]`` (then ``end_id`` is required).
      end_id: the id (or token string) that ends a completion, overriding the default.

    Returns:
      The encoder.

    Examples:
      >>> import tokenizers
      >>> tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "</s>": 1, "a": 2}, unk_token="[UNK]"))
      >>> tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
      >>> enc = as_encoder(tok)
      >>> enc.encode("a a b"), enc.end_id
      ([2, 2, 0], 1)
    """
    if isinstance(tokenizer, Encoder):
        return tokenizer if end_id is None else dataclasses.replace(tokenizer, end_id=_token_id(tokenizer, end_id))
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must have an encode(text) method, got {type(tokenizer).__name__}")
    bos_id, pad_id = None, 0
    if hasattr(tokenizer, "stop_ids"):  # lora_jax.models.tokenizer.Tokenizer
        encode = lambda text: list(tokenizer.encode(text, add_bos=False))
        bos_id = tokenizer.bos_id if tokenizer.add_bos else None
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        default_end = tokenizer.token_to_id("<|im_end|>") if tokenizer.is_chatml else tokenizer.eos_id
    elif hasattr(tokenizer, "token_to_id") and hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
        default_end = next((i for t in END_TOKENS if (i := tokenizer.token_to_id(t)) is not None), None)
        pad = next((i for t in ("<pad>", "[PAD]", "<|padding|>") if (i := tokenizer.token_to_id(t)) is not None), None)
        pad_id = pad if pad is not None else 0
    else:
        encode, default_end = tokenizer.encode, None
    end = _token_id(tokenizer, end_id) if end_id is not None else default_end
    if end is None:
        raise DataError(
            f"cannot tell which token ends a completion for {type(tokenizer).__name__} "
            f"(none of {END_TOKENS} found); pass end_id=<id or token>"
        )
    return Encoder(encode=encode, end_id=int(end), bos_id=bos_id, pad_id=int(pad_id))


def _token_id(tokenizer: Any, token: int | str) -> int:
    if isinstance(token, int):
        return token
    i = tokenizer.token_to_id(token) if hasattr(tokenizer, "token_to_id") else None
    if i is None:
        raise DataError(f"end_id={token!r} is not a token of the tokenizer; pass its integer id")
    return int(i)


def plain_chat(messages: Messages) -> str:
    """Format messages for a model without a chat format, opening an assistant turn.

    Args:
      messages: dicts with ``role`` and ``content``.

    Returns:
      ``### Role:\\ncontent\\n\\n`` per message, then ``### Assistant:\\n``.

    Examples:
      >>> plain_chat([{"role": "user", "content": "Hi"}])
      '### User:\\nHi\\n\\n### Assistant:\\n'
    """
    return "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages) + "### Assistant:\n"


class Tokenized(NamedTuple):
    """One tokenized training example.

    Attributes:
      ids: ``(n,)`` int32 token ids.
      loss_mask: ``(n,)`` uint8, 1 where the token is a target (never at position 0).
      prompt_len: tokens before the first target: ``ids[:prompt_len]`` is the
        generation prompt of a prompt/completion example (0 for LM windows).
      truncated: whether text was cut to fit ``max_len``.
    """

    ids: np.ndarray
    loss_mask: np.ndarray
    prompt_len: int
    truncated: bool = False


def _make(pieces: Sequence[tuple[Sequence[int], int]], prompt_len: int, truncated: bool) -> Tokenized:
    ids = np.fromiter((i for p, _ in pieces for i in p), np.int32)
    mask = np.fromiter((m for p, m in pieces for _ in p), np.uint8)
    return Tokenized(ids, mask, prompt_len, truncated)


def encode_turn(
    encoder: Encoder,
    *,
    head: str,
    body: str,
    tail: str,
    completion: str,
    max_len: int,
    format_chat: ChatFormat | None = None,
) -> Tokenized:
    """Tokenize a one-turn chat ``user: head + body + tail``, ``assistant: completion``.

    The loss mask covers the completion and the end token. When the example is
    longer than ``max_len``, ``body`` is cut (its first tokens kept); the
    completion is never cut.

    Args:
      encoder: see :class:`Encoder`.
      head, body, tail: the user message, in three parts; only ``body`` is truncated.
      completion: the assistant's answer (the training target).
      max_len: the most tokens in the result.
      format_chat: ``messages -> prompt`` ending in an open assistant turn
        (default :func:`plain_chat`); it must copy the message content verbatim.

    Returns:
      The example; ``ids[:prompt_len]`` is the generation prompt.

    Examples:
      >>> enc = Encoder(encode=lambda s: [ord(c) for c in s], end_id=0)
      >>> fmt = lambda msgs: msgs[0]["content"] + "="
      >>> ex = encode_turn(enc, head="<", body="abcdef", tail=">", completion="ok", max_len=9, format_chat=fmt)
      >>> "".join(map(chr, ex.ids[: ex.prompt_len])), ex.ids[ex.prompt_len :].tolist(), ex.loss_mask.tolist()
      ('<abc>=', [111, 107, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1])
    """
    format_chat = format_chat or plain_chat
    prompt = format_chat([{"role": "user", "content": head + _BODY + tail}])
    if prompt.count(_BODY) != 1:
        raise DataError(
            "format_chat must copy each message's content verbatim into the prompt; "
            f"it returned {prompt[:200]!r} for a message holding a marker"
        )
    before, after = prompt.split(_BODY)
    before_ids = ([encoder.bos_id] if encoder.bos_id is not None else []) + list(encoder.encode(before))
    after_ids, body_ids = list(encoder.encode(after)), list(encoder.encode(body))
    target = list(encoder.encode(completion)) + [encoder.end_id]
    room = max_len - len(before_ids) - len(after_ids) - len(target)
    if room < min(1, len(body_ids)):
        raise DataError(
            f"max_len={max_len} is too small: the prompt template takes {len(before_ids) + len(after_ids)} tokens "
            f"and the completion {len(target)}, leaving {room} for the text; raise max_len"
        )
    if not before_ids and not body_ids[:room] and not after_ids:
        raise DataError("the prompt is empty: the first completion token would have nothing to be predicted from")
    truncated = len(body_ids) > room
    prompt_ids = before_ids + body_ids[:room] + after_ids
    return _make([(prompt_ids, 0), (target, 1)], len(prompt_ids), truncated)


def encode_chat(
    encoder: Encoder, messages: Messages, *, max_len: int, format_chat: ChatFormat | None = None
) -> Tokenized:
    """Tokenize a conversation with the loss on the assistant turns (and their end tokens) only.

    The text before assistant turn ``i`` is ``format_chat(messages[:i])``; each
    such prompt must extend the previous one by the assistant's answer, as chat
    formats do. Conversations longer than ``max_len`` lose their last tokens.

    Args:
      encoder: see :class:`Encoder`.
      messages: dicts with ``role`` and ``content``; at least one ``assistant``
        turn, and not as the first message.
      max_len: the most tokens in the result.
      format_chat: ``messages -> prompt`` ending in an open assistant turn (default :func:`plain_chat`).

    Returns:
      The example; ``prompt_len`` counts the tokens before the first assistant turn.

    Examples:
      >>> enc = Encoder(encode=lambda s: [ord(c) for c in s], end_id=0)
      >>> fmt = lambda msgs: "".join(f"{m['role'][0]}:{m['content']};" for m in msgs) + "a:"
      >>> msgs = [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 2, "abcd")]
      >>> ex = encode_chat(enc, msgs, max_len=32, format_chat=fmt)
      >>> "".join(chr(i) if i else "|" for i in ex.ids), "".join(map(str, ex.loss_mask))
      ('u:a;a:b|;u:c;a:d|', '00000011000000011')
    """
    format_chat = format_chat or plain_chat
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns or turns[0] == 0:
        raise DataError("a conversation needs an assistant turn after at least one other message")
    pieces: list[tuple[list[int], int]] = [([encoder.bos_id] if encoder.bos_id is not None else [], 0)]
    done, prompt_len = "", 0
    for k, i in enumerate(turns):
        prompt = format_chat(messages[:i])
        if not prompt.startswith(done):
            raise DataError(
                f"format_chat is not prefix-consistent: the prompt before assistant turn {i} does not start "
                f"with the conversation so far ({done[-80:]!r})"
            )
        gap = list(encoder.encode(prompt[len(done) :]))
        if k > 0 and gap[:1] == [encoder.end_id]:  # the format writes the end token we already placed
            gap = gap[1:]
        pieces.append((gap, 0))
        if k == 0:
            prompt_len = sum(len(p) for p, _ in pieces)
        content = messages[i]["content"]
        pieces.append((list(encoder.encode(content)) + [encoder.end_id], 1))
        done = prompt + content
    ex = _make(pieces, prompt_len, False)
    if len(ex.ids) > max_len:
        if prompt_len >= max_len:
            raise DataError(
                f"max_len={max_len} is too small: the first assistant turn starts at token {prompt_len}; raise max_len"
            )
        ex = Tokenized(ex.ids[:max_len], ex.loss_mask[:max_len], prompt_len, True)
    return ex


def pack_windows(documents: Sequence[Sequence[int]], window: int, encoder: Encoder) -> list[Tokenized]:
    """Pack token streams into windows of ``window`` tokens for language modelling.

    Documents are joined as ``[bos] doc [end]``. Consecutive windows overlap by
    one token, so every token after the first is a target exactly once (position 0
    of a window only gives context). The last window may be shorter.

    Args:
      documents: token ids of each document (no special tokens).
      window: tokens per window (at least 2).
      encoder: gives ``bos_id`` and ``end_id``.

    Returns:
      The windows, in order.

    Examples:
      >>> enc = Encoder(encode=None, end_id=0)
      >>> [w.ids.tolist() for w in pack_windows([[1, 2, 3], [4, 5]], 4, enc)]
      [[1, 2, 3, 0], [0, 4, 5, 0]]
    """
    if window < 2:
        raise DataError(f"window must be >= 2 tokens, got {window}")
    bos = [encoder.bos_id] if encoder.bos_id is not None else []
    stream = np.fromiter((i for d in documents for i in (*bos, *d, encoder.end_id)), np.int32)
    out = []
    for start in range(0, max(len(stream) - 1, 0), window - 1):
        ids = stream[start : start + window]
        mask = np.ones(len(ids), np.uint8)
        mask[0] = 0
        out.append(Tokenized(ids, mask, 0, False))
    return out
