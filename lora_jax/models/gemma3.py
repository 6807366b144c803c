"""The Gemma 3 text decoder as pure functions over a parameter pytree.

Same role names as :mod:`lora_jax.models.llama` (one rule set targets both),
plus Gemma's extra norms::

    embed                                   (vocab, d)   also the output head (tied)
    layers/<i>/attn_norm/scale              (d,)         before attention
    layers/<i>/attn/{q,k,v,o}_proj/kernel
    layers/<i>/attn/{q,k}_norm/scale        (head_dim,)  RMSNorm of each query / key head
    layers/<i>/post_attn_norm/scale         (d,)         on the attention output
    layers/<i>/mlp_norm/scale               (d,)         before the MLP
    layers/<i>/mlp/{gate,up,down}_proj/kernel
    layers/<i>/post_mlp_norm/scale          (d,)         on the MLP output
    norm/scale                              (d,)

Numerics as Hugging Face's ``Gemma3ForCausalLM``: every RMSNorm multiplies by
``1 + scale`` (the stored scale is Hugging Face's; GGUF files store ``1 + scale``),
the embeddings are multiplied by ``sqrt(d)``, the MLP is GeGLU with tanh GELU,
queries are scaled by ``query_pre_attn_scalar ** -0.5``. Layers alternate
between local attention (a sliding window, RoPE base ``rope_local_theta``) and
global attention (RoPE base ``rope_theta``): layer ``i`` is global when
``(i + 1) % sliding_window_pattern == 0``. Attention runs through
``jax.nn.dot_product_attention`` with an explicit mask. Stacked layers
(:mod:`lora_jax.models.stacking`) run under ``jax.lax.scan`` with a per-layer
global flag. Shape suffixes as in :mod:`lora_jax.models.llama`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.errors import ConfigError
from lora_jax.models import layers as _layers
from lora_jax.models import llama as _llama
from lora_jax.models import stacking as _stacking

PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3Config:
    """Shape and numerics of a Gemma 3 text decoder (HF ``Gemma3TextConfig`` names in comments)."""

    vocab_size: int  # vocab_size
    dim: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads
    ffn_dim: int  # intermediate_size
    head_dim: int  # head_dim
    rope_theta: float = 1_000_000.0  # rope_theta (global layers)
    rope_local_theta: float = 10_000.0  # rope_local_base_freq (sliding layers)
    rms_eps: float = 1e-6
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    query_pre_attn_scalar: float = 256.0
    max_seq_len: int = 32768
    tie_embeddings: bool = True  # Gemma 3 always ties; kept for code shared with Llama

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim",
                     "sliding_window", "sliding_window_pattern"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"Gemma3Config.{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"Gemma3Config: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"Gemma3Config: head_dim={self.head_dim} must be even for RoPE")
        if not self.tie_embeddings:
            raise ConfigError("Gemma3Config: Gemma 3 ties the output head to the embeddings (tie_embeddings=True)")

    q_dim = _llama.LlamaConfig.q_dim  # n_heads * head_dim, the same property
    kv_dim = _llama.LlamaConfig.kv_dim  # n_kv_heads * head_dim

    def is_global(self, i: int) -> bool:
        """Whether layer ``i`` attends globally (else within the sliding window)."""
        return (i + 1) % self.sliding_window_pattern == 0


GEMMA3_270M = Gemma3Config(vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, ffn_dim=2048,
                           head_dim=256)


def init(key: jax.Array, config: Gemma3Config, dtype=jnp.float32) -> PyTree:
    """Random parameters (normal, std 0.02; norm scales 0, i.e. a factor of 1).

    Examples:
      >>> cfg = Gemma3Config(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, head_dim=16)
      >>> p = init(jax.random.key(0), cfg)
      >>> p["layers"][1]["attn"]["k_proj"]["kernel"].shape, p["layers"][0]["attn"]["q_norm"]["scale"].shape
      ((32, 16), (16,))
    """
    c = config
    w = _layers.normal_init(key, 1 + 7 * c.n_layers, dtype)
    zeros = lambda n: {"scale": jnp.zeros((n,), dtype)}  # noqa: E731
    layers = [
        {
            "attn_norm": zeros(c.dim),
            "attn": {
                "q_proj": {"kernel": w((c.dim, c.q_dim))},
                "k_proj": {"kernel": w((c.dim, c.kv_dim))},
                "v_proj": {"kernel": w((c.dim, c.kv_dim))},
                "o_proj": {"kernel": w((c.q_dim, c.dim))},
                "q_norm": zeros(c.head_dim),
                "k_norm": zeros(c.head_dim),
            },
            "post_attn_norm": zeros(c.dim),
            "mlp_norm": zeros(c.dim),
            "mlp": {
                "gate_proj": {"kernel": w((c.dim, c.ffn_dim))},
                "up_proj": {"kernel": w((c.dim, c.ffn_dim))},
                "down_proj": {"kernel": w((c.ffn_dim, c.dim))},
            },
            "post_mlp_norm": zeros(c.dim),
        }
        for _ in range(c.n_layers)
    ]
    return {"embed": w((c.vocab_size, c.dim)), "layers": layers, "norm": zeros(c.dim)}


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)`` in float32, cast back to ``x``'s dtype."""
    return _llama.rms_norm(x, 1.0 + scale.astype(jnp.float32), eps)


def attend(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, scale: float):
    """Masked grouped-query softmax attention (``jax.nn.dot_product_attention``); returns ``(B, T, K, G, H)``."""
    B, T, K, G, H = q_BTKGH.shape
    out = jax.nn.dot_product_attention(q_BTKGH.reshape(B, T, K * G, H), k_BSKH.astype(q_BTKGH.dtype),
                                       v_BSKH.astype(q_BTKGH.dtype), mask=mask_BTS[:, None], scale=scale,
                                       implementation="xla")
    return out.reshape(B, T, K, G, H)


def _qkv(p, x_BTD, cos, sin, c: Gemma3Config):
    B, T, _ = x_BTD.shape
    K, G, H = c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim
    q = rms_norm(_layers.linear(x_BTD, p["q_proj"]).reshape(B, T, K * G, H), p["q_norm"]["scale"], c.rms_eps)
    k = rms_norm(_layers.linear(x_BTD, p["k_proj"]).reshape(B, T, K, H), p["k_norm"]["scale"], c.rms_eps)
    v = _layers.linear(x_BTD, p["v_proj"]).reshape(B, T, K, H)
    q = _llama.apply_rope(q, cos, sin).reshape(B, T, K, G, H)
    return q, _llama.apply_rope(k, cos, sin), v


def mlp(p: PyTree, x_BTD: jax.Array) -> jax.Array:
    """GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``."""
    h = jax.nn.gelu(_layers.linear(x_BTD, p["gate_proj"]), approximate=True) * _layers.linear(x_BTD, p["up_proj"])
    return _layers.linear(h, p["down_proj"])


def _block(lp, x_BTD, attn_fn, c: Gemma3Config):
    """One decoder layer around an attention function ``attn_fn(attn_params, normed_x) -> (out, aux)``."""
    h, aux = attn_fn(lp["attn"], rms_norm(x_BTD, lp["attn_norm"]["scale"], c.rms_eps))
    x_BTD = x_BTD + rms_norm(h, lp["post_attn_norm"]["scale"], c.rms_eps)
    h = mlp(lp["mlp"], rms_norm(x_BTD, lp["mlp_norm"]["scale"], c.rms_eps))
    return x_BTD + rms_norm(h, lp["post_mlp_norm"]["scale"], c.rms_eps), aux


def _embed(params, tokens_BT, c: Gemma3Config):
    x = params["embed"][tokens_BT]
    return x * jnp.asarray(math.sqrt(c.dim), jnp.float32).astype(x.dtype)


def _masks(seen_BTS, cols_T, s_S, window):
    """``(global, local)`` masks: ``seen`` and ``seen`` within the window."""
    return seen_BTS, seen_BTS & (s_S[None, None, :] > cols_T[None, :, None] - window)


def hidden_states(
    params: PyTree,
    tokens_BT: jax.Array,
    config: Gemma3Config,
    *,
    attention_mask_BT: jax.Array | None = None,
    positions_BT: jax.Array | None = None,
    remat: bool | str = False,
    attention: str = "auto",
) -> jax.Array:
    """Final-norm hidden states ``(B, T, D)`` (arguments as :func:`lora_jax.models.llama.hidden_states`).

    ``attention`` is accepted for a common signature; Gemma always runs ``jax.nn.dot_product_attention``.
    """
    del attention
    c = config
    B, T = tokens_BT.shape
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    t = jnp.arange(T)
    seen = jnp.broadcast_to(t[None, :] <= t[:, None], (B, T, T))
    if attention_mask_BT is not None:
        seen = seen & attention_mask_BT.astype(bool)[:, None, :]
    masks = _masks(seen, t, t, c.sliding_window)
    tables = [_llama.rope_tables(positions_BT, c.head_dim, th) for th in (c.rope_theta, c.rope_local_theta)]
    scale = c.query_pre_attn_scalar ** -0.5
    x_BTD = _embed(params, tokens_BT, c)

    def layer(x_BTD, lp_glob):
        lp, glob = lp_glob
        cos = jnp.where(glob, tables[0][0], tables[1][0])
        sin = jnp.where(glob, tables[0][1], tables[1][1])
        mask = jnp.where(glob, masks[0], masks[1])

        def attn(p, h):
            q, k, v = _qkv(p, h, cos, sin, c)
            B_, T_, K, G, H = q.shape
            return _layers.linear(attend(q, k, v, mask, scale).reshape(B_, T_, K * G * H), p["o_proj"]), None

        return _block(lp, x_BTD, attn, c)[0]

    layer = _layers.remat_layer(layer, remat)
    flags = jnp.array([c.is_global(i) for i in range(c.n_layers)])
    if _stacking.is_stacked(params):
        layers = _stacking.per_layer_dropout_keys(params["layers"], _stacking.n_layers(params))
        x_BTD, _ = jax.lax.scan(lambda x, xs: (layer(x, xs), None), x_BTD, (layers, flags))
    else:
        for i, lp in enumerate(params["layers"]):
            x_BTD = layer(x_BTD, (lp, c.is_global(i)))
    return rms_norm(x_BTD, params["norm"]["scale"], c.rms_eps)


def output_head(params: PyTree, config: Gemma3Config):
    """The ``(D, V)`` output projection: the transposed embedding."""
    return params["embed"].T


def apply(params: PyTree, tokens_BT: jax.Array, config: Gemma3Config, **kwargs) -> jax.Array:
    """Logits ``(B, T, V)``; keyword arguments as :func:`hidden_states`."""
    return _layers.matmul(hidden_states(params, tokens_BT, config, **kwargs), output_head(params, config))


def loss(params: PyTree, batch: dict, config: Gemma3Config, *, remat: bool | str = False, attention: str = "auto"):
    """Mean next-token cross entropy over ``batch['loss_mask']`` (as :func:`lora_jax.models.llama.loss`)."""
    tokens_BT = batch["tokens"]
    mask_BT = batch.get("loss_mask")
    if mask_BT is None:
        mask_BT = jnp.ones(tokens_BT.shape, jnp.float32)
    hidden_BTD = hidden_states(params, tokens_BT, config, attention_mask_BT=batch.get("attention_mask"), remat=remat)
    logits_BTV = _layers.matmul(hidden_BTD[:, :-1], output_head(params, config)).astype(jnp.float32)
    weights_BT = mask_BT[:, 1:].astype(jnp.float32)
    n = jnp.maximum(weights_BT.sum(), 1.0)
    return jnp.sum(_layers.token_nll(logits_BTV, tokens_BT[:, 1:]) * weights_BT) / n, {"n_tokens": weights_BT.sum()}


def attention_choice(config: Gemma3Config, attention: str = "auto", dtype: Any = None, backend: str | None = None):
    """The attention implementation Gemma runs: always ``dot_product`` (an explicit mask per layer kind)."""
    return "dot_product"


# ----------------------------------------------------------------------------
# KV-cache decoding (used by lora_jax.generate)


def init_cache(config: Gemma3Config, batch: int, length: int, dtype=jnp.float32):
    """An empty key/value cache, per layer ``k`` and ``v`` ``(B, S, K, H)`` (as Llama's)."""
    return _llama.init_cache(config, batch, length, dtype)


def hidden_states_cached(params, tokens_BT, config: Gemma3Config, cache, *, index, positions_BT, kv_mask_BS):
    """Hidden states of ``T`` new tokens written into the cache (as :func:`lora_jax.models.llama.hidden_states_cached`).

    Local layers see cache columns within the sliding window of each query.
    """
    c = config
    params = _stacking.unstack_layers(params)
    T = tokens_BT.shape[1]
    S = cache[0]["k"].shape[1]
    cols_T = jnp.asarray(index, jnp.int32) + jnp.arange(T, dtype=jnp.int32)
    s_S = jnp.arange(S, dtype=jnp.int32)
    seen = (s_S[None, :] <= cols_T[:, None])[None] & kv_mask_BS.astype(bool)[:, None, :]
    masks = _masks(seen, cols_T, s_S, c.sliding_window)
    tables = [_llama.rope_tables(positions_BT, c.head_dim, th) for th in (c.rope_theta, c.rope_local_theta)]
    scale = c.query_pre_attn_scalar ** -0.5
    x_BTD = _embed(params, tokens_BT, c)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, jnp.asarray(index, jnp.int32), zero, zero)
    new_cache = []
    for i, (lp, lc) in enumerate(zip(params["layers"], cache, strict=True)):
        g = 0 if c.is_global(i) else 1
        cos, sin = tables[g]

        def attn(p, h, lc=lc, cos=cos, sin=sin, mask=masks[g]):
            q, k, v = _qkv(p, h, cos, sin, c)
            k_all = jax.lax.dynamic_update_slice(lc["k"], k.astype(lc["k"].dtype), start)
            v_all = jax.lax.dynamic_update_slice(lc["v"], v.astype(lc["v"].dtype), start)
            B_, T_, K, G, H = q.shape
            out = attend(q, k_all, v_all, mask, scale).reshape(B_, T_, K * G * H)
            return _layers.linear(out, p["o_proj"]), {"k": k_all, "v": v_all}

        x_BTD, lc = _block(lp, x_BTD, attn, c)
        new_cache.append(lc)
    return rms_norm(x_BTD, params["norm"]["scale"], c.rms_eps), new_cache


def decoder_module(config: Any):
    """The module of model functions for ``config``: this one for a :class:`Gemma3Config`, else Llama's.

    Examples:
      >>> decoder_module(GEMMA3_270M).__name__, decoder_module(_llama.SMOLLM2_135M).__name__
      ('lora_jax.models.gemma3', 'lora_jax.models.llama')
    """
    import sys

    return sys.modules[__name__] if isinstance(config, Gemma3Config) else _llama
