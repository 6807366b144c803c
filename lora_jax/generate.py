"""KV-cache decoding for the built-in Llama decoder.

:func:`generate` runs one jit-compiled program per (batch, padded prompt
length, ``max_new_tokens``) shape: a prefill pass writes the prompt's keys and
values into a fixed-size cache, then a ``lax.while_loop`` appends one token per
step until every sequence has produced a stop token or the budget is spent. The
parameters are an argument of the compiled program (LoRA nodes and quantized
leaves welcome), never a closed-over constant, and a new prompt of a size seen
before does not recompile (prompt lengths are rounded up to ``bucket``).

Prompts of different lengths are left-padded internally to a common end, so
every row writes its next token at the same cache column; padding is masked out
of attention and RoPE positions count real tokens only, which makes a padded
row compute what the prompt computes alone. Prompts may be given as ragged
lists, or as an array with an ``attention_mask`` padded on either side.

Many adapters in one batch: given :class:`lora_jax.members.Members` and an
``adapter_index`` per row, each row is decoded with its own adapter in one
program (``jax.vmap`` over rows, the base shared and read once per step).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import members as _members
from lora_jax.errors import GenerateError
from lora_jax.models import gemma3 as _gemma3
from lora_jax.models import llama as _llama
from lora_jax.models import stacking as _stacking

PyTree = Any


class Generation(NamedTuple):
    """Output of :func:`generate`.

    Attributes:
      tokens: ``(B, max_new_tokens)`` generated ids; after a row's stop token, ``pad_id``.
      lengths: ``(B,)`` generated tokens per row, the stop token included.
    """

    tokens: np.ndarray
    lengths: np.ndarray

    def rows(self) -> list[list[int]]:
        """The generated ids of each row, up to and including its stop token."""
        return [t[:n].tolist() for t, n in zip(self.tokens, self.lengths, strict=True)]


def left_pad(
    prompts: Sequence[Sequence[int]] | np.ndarray,
    attention_mask: np.ndarray | None = None,
    *,
    pad_id: int = 0,
    bucket: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Arrange prompts so that every row ends in the last column.

    Args:
      prompts: ragged lists of ids, or a ``(B, T)`` array.
      attention_mask: with an array, 1 for real tokens and 0 for padding, on any
        side (or in between); the real tokens keep their order.
      pad_id: id written into padding.
      bucket: round the width up to a multiple of this.

    Returns:
      ``(tokens, mask)``, both ``(B, T')`` int32.

    Examples:
      >>> t, m = left_pad([[5, 6, 7], [8]], pad_id=0, bucket=4)
      >>> t.tolist(), m.tolist()
      ([[0, 5, 6, 7], [0, 0, 0, 8]], [[0, 1, 1, 1], [0, 0, 0, 1]])
      >>> left_pad(np.array([[8, 9, 0], [7, 0, 0]]), np.array([[1, 1, 0], [1, 0, 0]]))[0].tolist()
      [[8, 9], [0, 7]]
    """
    if isinstance(prompts, np.ndarray | jax.Array) or attention_mask is not None:
        toks = np.asarray(prompts)
        if toks.ndim != 2:
            raise GenerateError(f"prompts as an array must be (batch, length), got shape {toks.shape}")
        mask = np.ones(toks.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != toks.shape:
            raise GenerateError(f"attention_mask shape {mask.shape} differs from the prompts' shape {toks.shape}")
        rows = [r[m].tolist() for r, m in zip(toks, mask, strict=True)]
    else:
        rows = [list(map(int, r)) for r in prompts]
    if not rows:
        raise GenerateError("no prompts given")
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise GenerateError(f"prompts {empty} have no tokens; every prompt needs at least one (e.g. the bos id)")
    width = max(len(r) for r in rows)
    width = -(-width // bucket) * bucket
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return tokens, mask


def _sample(logits_BV, key, temperature, top_p, mode: str):
    if mode == "greedy":
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if mode == "top_p":
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
        keep_BV = before_BV < top_p  # the most likely token is always kept
        threshold_B = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1)
        logits_BV = jnp.where(logits_BV >= threshold_B[:, None], logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "mode", "stop_ids", "pad_id"))
def _decode(params, tokens_BP, mask_BP, key, temperature, top_p, *, config, max_new_tokens, mode, stop_ids, pad_id):
    c = config
    B, P = tokens_BP.shape
    N = max_new_tokens
    dtype = params["embed"].dtype
    model = _gemma3.decoder_module(c)  # Llama or Gemma 3
    head = model.output_head(params, c)
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

    cache = model.init_cache(c, B, P + N, dtype)
    kv_mask_BS = jnp.concatenate([mask_BP.astype(bool), jnp.zeros((B, N), bool)], axis=1)
    prompt_len_B = mask_BP.sum(axis=1).astype(jnp.int32)
    positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0).astype(jnp.int32)
    x_BPD, cache = model.hidden_states_cached(
        params, tokens_BP, c, cache, index=0, positions_BT=positions_BP, kv_mask_BS=kv_mask_BS
    )
    key, sub = jax.random.split(key)
    tok_B = _sample(x_BPD[:, -1] @ head, sub, temperature, top_p, mode)
    out_BN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok_B)
    done_B = jnp.isin(tok_B, stops)

    def cond(state):
        i, _, _, done_B, _, _, _ = state
        return (i < N) & ~jnp.all(done_B)

    def body(state):
        i, tok_B, out_BN, done_B, cache, kv_mask_BS, key = state
        col = P + i - 1  # the cache column of tok_B
        kv_mask_BS = jax.lax.dynamic_update_slice(kv_mask_BS, jnp.ones((B, 1), bool), (0, col))
        pos_B1 = (prompt_len_B + i - 1)[:, None]
        x_B1D, cache = model.hidden_states_cached(
            params, tok_B[:, None], c, cache, index=col, positions_BT=pos_B1, kv_mask_BS=kv_mask_BS
        )
        key, sub = jax.random.split(key)
        nxt_B = _sample(x_B1D[:, 0] @ head, sub, temperature, top_p, mode)
        nxt_B = jnp.where(done_B, pad_id, nxt_B)
        out_BN = jax.lax.dynamic_update_slice(out_BN, nxt_B[:, None], (0, i))
        return i + 1, nxt_B, out_BN, done_B | jnp.isin(nxt_B, stops), cache, kv_mask_BS, key

    state = (jnp.asarray(1, jnp.int32), tok_B, out_BN, done_B, cache, kv_mask_BS, key)
    state = jax.lax.while_loop(cond, body, state)
    return state[2]


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "mode", "stop_ids", "pad_id"))
def _decode_rows(members, index_B, tokens_BP, mask_BP, keys_B, temperature, top_p, **static):
    """:func:`_decode` of each row alone with its own adapter (``jax.vmap`` over rows; the base is shared)."""

    def one(t, rank, scale, tok_P, mask_P, key):
        params = _stacking.unstack_layers(_members.member_params(t, members.frozen, rank, scale))
        return _decode(params, tok_P[None], mask_P[None], key, temperature, top_p, **static)[0]

    rows = jax.tree.map(lambda f: f[index_B], members.trainable)
    return jax.vmap(one)(rows, members.ranks[index_B], members.scales[index_B], tokens_BP, mask_BP, keys_B)


def generate(
    params: PyTree,
    config: _llama.LlamaConfig,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    adapter_index: Sequence[int] | np.ndarray | None = None,
    max_new_tokens: int = 64,
    attention_mask: np.ndarray | None = None,
    stop_ids: int | Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    pad_id: int = 0,
    bucket: int = 16,
) -> Generation:
    """Continue token prompts with a KV cache (greedy, or sampling with temperature and top-p).

    Args:
      params: Llama parameters (LoRA nodes and quantized leaves allowed), or
        :class:`lora_jax.members.Members`: several adapter sets on one base.
      config: the model's config.
      prompts: ragged lists of ids, or a ``(B, T)`` array with ``attention_mask``
        (1 real, 0 padding; either side).
      adapter_index: with ``Members``, the member each row is answered with
        (``(B,)`` ints): one batch, each row with its own adapter, the same tokens
        as generating each row with its adapter alone. Sampling draws each row
        with its own key (split from ``key``).
      max_new_tokens: tokens to generate per row at most.
      stop_ids: a row stops after emitting one of these (e.g. ``tokenizer.stop_ids``).
      temperature: 0 is greedy decoding; above 0 samples from ``softmax(logits / temperature)``.
      top_p: nucleus sampling: sample among the most likely tokens whose mass reaches ``top_p``.
      key: PRNG key for sampling (required when ``temperature > 0``).
      pad_id: written into prompt padding and after a row's stop token.
      bucket: round the prompt width up to a multiple of this (fewer compilations).

    Returns:
      A :class:`Generation` (host numpy arrays).

    Examples:
      >>> cfg = _llama.LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
      >>> params = _llama.init(jax.random.key(0), cfg)
      >>> out = generate(params, cfg, [[1, 2, 3], [4]], max_new_tokens=5)
      >>> out.tokens.shape, out.lengths.tolist()
      ((2, 5), [5, 5])
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:  # NaN too
        raise GenerateError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise GenerateError(f"top_p must be in (0, 1], got {top_p!r}")
    mode = "greedy" if temperature == 0 else ("sample" if top_p >= 1.0 else "top_p")
    if mode != "greedy" and key is None:
        raise GenerateError("sampling (temperature > 0) needs a PRNG key: generate(..., key=jax.random.key(0))")
    stops = (stop_ids,) if isinstance(stop_ids, int) else tuple(int(s) for s in stop_ids)
    tokens, mask = left_pad(prompts, attention_mask, pad_id=pad_id, bucket=bucket)
    if tokens.shape[1] + max_new_tokens > config.max_seq_len:
        raise GenerateError(
            f"prompt width {tokens.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_seq_len={config.max_seq_len}"
        )
    if key is None:
        key = jax.random.key(0)
    static = dict(config=config, max_new_tokens=max_new_tokens, mode=mode, stop_ids=stops, pad_id=int(pad_id))
    sampling = (jnp.asarray(temperature if temperature > 0 else 1.0, jnp.float32), jnp.asarray(top_p, jnp.float32))
    if isinstance(params, _members.Members):
        index = _adapter_rows(params, adapter_index, tokens.shape[0])
        keys = jax.random.split(key, tokens.shape[0])
        out = _decode_rows(params, index, jnp.asarray(tokens), jnp.asarray(mask), keys, *sampling, **static)
    else:
        if adapter_index is not None:
            raise GenerateError("adapter_index needs several adapters: pass params as lora_jax.members.Members "
                                "(members.stack([params_a, params_b]))")
        # the KV-cache path runs unrolled; slice stacked layers once
        out = _decode(_stacking.unstack_layers(params), jnp.asarray(tokens), jnp.asarray(mask), key, *sampling,
                      **static)
    out = np.asarray(out)
    lengths = np.full(out.shape[0], max_new_tokens, np.int32)
    if stops:
        hit = np.isin(out, stops)
        first = hit.argmax(axis=1)
        lengths = np.where(hit.any(axis=1), first + 1, max_new_tokens).astype(np.int32)
    return Generation(out, lengths)


def _adapter_rows(members, adapter_index, batch: int) -> jax.Array:
    if adapter_index is None:
        raise GenerateError(f"generate with {members.size} adapters (Members) needs adapter_index: the adapter of "
                            "each row, e.g. adapter_index=[0, 1]")
    index = np.asarray(adapter_index)
    if index.shape != (batch,) or not np.issubdtype(index.dtype, np.integer):
        raise GenerateError(f"adapter_index must be {batch} ints (one per prompt), got {index.tolist()!r}")
    if index.size and (index.min() < 0 or index.max() >= members.size):
        raise GenerateError(f"adapter_index {index.tolist()} names an adapter outside 0..{members.size - 1}")
    return jnp.asarray(index, jnp.int32)


def generate_text(
    params: PyTree,
    config: _llama.LlamaConfig,
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[Mapping[str, str]]],
    *,
    chat: bool = False,
    skip_special_tokens: bool = True,
    **kwargs,
) -> list[str]:
    """Generate text for text prompts (or chats) with the model's tokenizer.

    Args:
      params, config: the model.
      tokenizer: a :class:`lora_jax.models.tokenizer.Tokenizer`.
      prompts: a string, a list of strings, or with ``chat=True`` a list of chats
        (each a list of ``{"role", "content"}`` dicts, formatted by
        ``tokenizer.apply_chat_template``).
      chat: treat ``prompts`` as chats.
      skip_special_tokens: drop special tokens (the stop token) from the text.
      **kwargs: passed to :func:`generate`; ``stop_ids`` defaults to
        ``tokenizer.stop_ids`` and ``pad_id`` to the tokenizer's pad id.

    Returns:
      One decoded continuation per prompt.

    Raises:
      GenerateError: an empty prompt, or settings :func:`generate` refuses.
    """
    if isinstance(prompts, str) or (chat and prompts and isinstance(prompts[0], Mapping)):
        prompts = [prompts]
    # A message that is not a dict is left to the tokenizer, whose error says what a message must be.
    texts = [[m.get("content", "") if isinstance(m, Mapping) else m for m in p] if chat else [p] for p in prompts]
    empty = [i for i, t in enumerate(texts) if not any(str(x).strip() for x in t)]
    if empty:
        raise GenerateError(f"prompts {empty} are empty (only whitespace); give each prompt some text")
    if chat:
        ids = [tokenizer.encode_chat(m) for m in prompts]
    else:
        ids = [tokenizer.encode(p) for p in prompts]
    kwargs.setdefault("stop_ids", tokenizer.stop_ids)
    kwargs.setdefault("pad_id", tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    out = generate(params, config, ids, **kwargs)
    return [tokenizer.decode(r, skip_special_tokens=skip_special_tokens) for r in out.rows()]
