"""A BERT encoder as pure functions over a parameter pytree.

The paths name the roles as :mod:`lora_jax.models.llama` does where the roles
match, so one rule such as ``layers/\\d+/attn/(q|v)_proj/kernel`` targets the
decoder and the encoder alike::

    embed                                   (vocab, d)        word embeddings
    pos_embed                               (max_positions, d)
    type_embed                              (type_vocab, d)   token-type (segment) embeddings
    embed_norm/{scale,bias}                 (d,)              LayerNorm after the embedding sum
    layers/<i>/attn/{q,k,v,o}_proj/kernel   (d, d)
    layers/<i>/attn/{q,k,v,o}_proj/bias     (d,)
    layers/<i>/attn_norm/{scale,bias}       (d,)              post-attention LayerNorm
    layers/<i>/mlp/up_proj/{kernel,bias}    (d, f), (f,)
    layers/<i>/mlp/down_proj/{kernel,bias}  (f, d), (d,)
    layers/<i>/mlp_norm/{scale,bias}        (d,)              post-MLP LayerNorm

BERT is post-norm: each block adds its residual first and normalizes after.
The code multiplies with ``@`` and looks rows up with ``[]``, so LoRA and
quantized leaves work in place of any array. Sentence embeddings follow
sentence-transformers' all-MiniLM-L6-v2 (``modules.json``: Transformer, mean
Pooling, Normalize). Shape suffixes: B batch, T time (queries), S time (keys),
D model width, N heads, H head dim, F ffn width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ConfigError
from lora_jax.models import layers as _layers

PyTree = Any

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Shape and numerics of a BERT encoder (HF ``config.json`` names in comments)."""

    vocab_size: int  # vocab_size
    dim: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads
    ffn_dim: int  # intermediate_size
    max_positions: int = 512  # max_position_embeddings
    type_vocab_size: int = 2  # type_vocab_size
    ln_eps: float = 1e-12  # layer_norm_eps
    act: str = "gelu"  # hidden_act

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_positions", "type_vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"BertConfig.{name} must be a positive int, got {v!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"BertConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"BertConfig.act={self.act!r} is not supported; choose one of {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


MINILM_L6 = BertConfig(vocab_size=30522, dim=384, n_layers=6, n_heads=12, ffn_dim=1536)


def init(key: jax.Array, config: BertConfig, dtype=jnp.float32) -> PyTree:
    """Return random parameters (normal, std 0.02 as HF's ``initializer_range``; norms at 1, biases 0).

    Args:
      key: PRNG key.
      config: the model's :class:`BertConfig`.
      dtype: dtype of every leaf.

    Returns:
      The parameter tree described in the module docstring.

    Examples:
      >>> cfg = BertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_dim=64)
      >>> p = init(jax.random.key(0), cfg)
      >>> p["layers"][1]["mlp"]["up_proj"]["kernel"].shape
      (32, 64)
    """
    c = config
    w = _layers.normal_init(key, 3 + 6 * c.n_layers, dtype)

    def proj(d_in, d_out):
        return {"kernel": w((d_in, d_out)), "bias": jnp.zeros((d_out,), dtype)}

    def norm():
        return {"scale": jnp.ones((c.dim,), dtype), "bias": jnp.zeros((c.dim,), dtype)}

    layers = [
        {
            "attn": {name: proj(c.dim, c.dim) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "attn_norm": norm(),
            "mlp": {"up_proj": proj(c.dim, c.ffn_dim), "down_proj": proj(c.ffn_dim, c.dim)},
            "mlp_norm": norm(),
        }
        for _ in range(c.n_layers)
    ]
    return {
        "embed": w((c.vocab_size, c.dim)),
        "pos_embed": w((c.max_positions, c.dim)),
        "type_embed": w((c.type_vocab_size, c.dim)),
        "embed_norm": norm(),
        "layers": layers,
    }


def layer_norm(x: jax.Array, p: PyTree, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32, with ``p = {"scale", "bias"}``."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def attention(p: PyTree, x_BTD: jax.Array, mask_BS: jax.Array, c: BertConfig) -> jax.Array:
    """Bidirectional multi-head self-attention; ``mask_BS`` is True at the keys to attend to."""
    B, T, _ = x_BTD.shape
    N, H = c.n_heads, c.head_dim
    q_BTNH = _layers.linear(x_BTD, p["q_proj"]).reshape(B, T, N, H)
    k_BSNH = _layers.linear(x_BTD, p["k_proj"]).reshape(B, T, N, H)
    v_BSNH = _layers.linear(x_BTD, p["v_proj"]).reshape(B, T, N, H)
    logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH) / jnp.asarray(math.sqrt(H), x_BTD.dtype)
    logits_BNTS = jnp.where(mask_BS[:, None, None, :], logits_BNTS.astype(jnp.float32), -1e30)
    probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(x_BTD.dtype)
    out_BTNH = jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BSNH)
    return _layers.linear(out_BTNH.reshape(B, T, N * H), p["o_proj"])


def mlp(p: PyTree, x_BTD: jax.Array, c: BertConfig) -> jax.Array:
    return _layers.linear(ACTIVATIONS[c.act](_layers.linear(x_BTD, p["up_proj"])), p["down_proj"])


def apply(
    params: PyTree,
    input_ids_BT: jax.Array,
    attention_mask_BT: jax.Array | None = None,
    token_type_ids_BT: jax.Array | None = None,
    *,
    config: BertConfig,
) -> jax.Array:
    """Return the last hidden states ``(B, T, D)`` (HF ``BertModel``'s ``last_hidden_state``).

    Args:
      params: the parameter tree (LoRA and quantized leaves allowed).
      input_ids_BT: int token ids.
      attention_mask_BT: 1 for real tokens, 0 for padding (masks keys); default all 1.
      token_type_ids_BT: segment ids; default all 0.
      config: the model's :class:`BertConfig` (keyword-only; static under ``jit``).

    Returns:
      Hidden states in the dtype of the embeddings.

    Examples:
      >>> cfg = BertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_dim=64)
      >>> p = init(jax.random.key(0), cfg)
      >>> apply(p, jnp.array([[1, 5, 7, 0]]), jnp.array([[1, 1, 1, 0]]), config=cfg).shape
      (1, 4, 32)
    """
    c = config
    B, T = input_ids_BT.shape
    if T > c.max_positions:
        raise ConfigError(f"sequence length {T} exceeds BertConfig.max_positions={c.max_positions}; truncate the input")
    if attention_mask_BT is None:
        attention_mask_BT = jnp.ones((B, T), jnp.int32)
    if token_type_ids_BT is None:
        token_type_ids_BT = jnp.zeros((B, T), jnp.int32)
    x_BTD = params["embed"][input_ids_BT] + params["type_embed"][token_type_ids_BT]
    x_BTD = x_BTD + params["pos_embed"][jnp.arange(T)][None]
    x_BTD = layer_norm(x_BTD, params["embed_norm"], c.ln_eps)
    mask_BS = attention_mask_BT.astype(bool)
    for lp in params["layers"]:
        x_BTD = layer_norm(x_BTD + attention(lp["attn"], x_BTD, mask_BS, c), lp["attn_norm"], c.ln_eps)
        x_BTD = layer_norm(x_BTD + mlp(lp["mlp"], x_BTD, c), lp["mlp_norm"], c.ln_eps)
    return x_BTD


def mean_pool(hidden_BTD: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Average the hidden states over the real tokens (sentence-transformers' mean pooling).

    Args:
      hidden_BTD: token states.
      mask_BT: 1 for real tokens, 0 for padding.

    Returns:
      ``(B, D)`` float32: ``sum(h * mask) / max(sum(mask), 1e-9)``.

    Examples:
      >>> h = jnp.array([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
      >>> mean_pool(h, jnp.array([[1, 1, 0]]))
      Array([[2., 3.]], dtype=float32)
    """
    m_BT1 = mask_BT.astype(jnp.float32)[..., None]
    total_BD = jnp.sum(hidden_BTD.astype(jnp.float32) * m_BT1, axis=1)
    return total_BD / jnp.maximum(jnp.sum(m_BT1, axis=1), 1e-9)


def l2_normalize(x_BD: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Divide each row by its L2 norm (at least ``eps``), as ``torch.nn.functional.normalize``."""
    return x_BD / jnp.maximum(jnp.linalg.norm(x_BD, axis=-1, keepdims=True), eps)


def embed_sentences(
    params: PyTree,
    input_ids_BT: jax.Array,
    attention_mask_BT: jax.Array,
    token_type_ids_BT: jax.Array | None = None,
    *,
    config: BertConfig,
    normalize: bool = True,
) -> jax.Array:
    """Return sentence embeddings ``(B, D)``: encoder, mean pooling, then L2 normalization.

    This is the all-MiniLM-L6-v2 pipeline (``modules.json``: Transformer,
    Pooling with ``pooling_mode_mean_tokens``, Normalize).

    Args:
      params: the parameter tree.
      input_ids_BT: token ids, e.g. ``tokenize(tokenizer, texts)["input_ids"]``.
      attention_mask_BT: 1 for real tokens, 0 for padding.
      token_type_ids_BT: segment ids; default all 0.
      config: the model's :class:`BertConfig`.
      normalize: divide each embedding by its L2 norm (the ``Normalize`` module).

    Returns:
      float32 embeddings, unit length when ``normalize``.

    Examples:
      >>> cfg = BertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, ffn_dim=64)
      >>> p = init(jax.random.key(0), cfg)
      >>> e = embed_sentences(p, jnp.array([[2, 3, 4], [5, 6, 0]]), jnp.array([[1, 1, 1], [1, 1, 0]]), config=cfg)
      >>> e.shape, jnp.allclose(jnp.linalg.norm(e, axis=-1), 1.0)
      ((2, 32), Array(True, dtype=bool))
    """
    hidden_BTD = apply(params, input_ids_BT, attention_mask_BT, token_type_ids_BT, config=config)
    pooled_BD = mean_pool(hidden_BTD, attention_mask_BT)
    return l2_normalize(pooled_BD) if normalize else pooled_BD


def tokenize(tokenizer: Any, texts: Sequence[str], *, pad_id: int | None = None) -> dict[str, np.ndarray]:
    """Encode a batch with a ``tokenizers.Tokenizer`` into right-padded int32 arrays.

    The tokenizer's own truncation applies. Sequences are padded to the
    longest one (the padding a tokenizer may be configured with, such as the
    fixed length 128 in all-MiniLM-L6-v2's ``tokenizer.json``, is trimmed back
    to it; with right padding this changes no real token's output).

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (anything whose ``encode_batch``
        returns encodings with ``ids``, ``attention_mask`` and ``type_ids``).
      texts: the sentences.
      pad_id: id for padding; default the tokenizer's padding id, else 0.

    Returns:
      ``{"input_ids", "attention_mask", "token_type_ids"}``, each ``(B, T)`` int32.

    Examples:
      >>> from tokenizers import Tokenizer, models, pre_tokenizers
      >>> tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
      >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
      >>> batch = tokenize(tok, ["a b a", "b"])
      >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
      ([[1, 2, 1], [2, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    if isinstance(texts, str):
        raise TypeError(f"tokenize expects a sequence of strings, got one string {texts[:40]!r}; wrap it in a list")
    encodings = tokenizer.encode_batch(list(texts))
    if pad_id is None:
        padding = getattr(tokenizer, "padding", None)
        pad_id = padding["pad_id"] if padding else 0
    lengths = [int(np.sum(e.attention_mask)) for e in encodings]
    width = max(max(lengths, default=0), 1)
    out = {k: np.zeros((len(encodings), width), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    out["input_ids"][:] = pad_id
    for i, (e, n) in enumerate(zip(encodings, lengths, strict=True)):
        real = np.asarray(e.attention_mask, bool)
        out["input_ids"][i, :n] = np.asarray(e.ids)[real]
        out["attention_mask"][i, :n] = 1
        out["token_type_ids"][i, :n] = np.asarray(e.type_ids)[real]
    return out
