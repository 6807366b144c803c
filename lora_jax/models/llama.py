"""A Llama-family decoder as pure functions over a parameter pytree.

The parameters are a plain nested dict whose paths name the roles the way
Hugging Face does, so one set of rules targets any built-in model::

    embed                                   (vocab, d)
    layers/<i>/attn_norm/scale              (d,)
    layers/<i>/attn/{q,k,v,o}_proj/kernel   (d, heads*head_dim) ... (heads*head_dim, d)
    layers/<i>/attn/{q,k,v}_proj/bias       only with qkv_bias (Qwen2)
    layers/<i>/mlp_norm/scale               (d,)
    layers/<i>/mlp/{gate,up,down}_proj/kernel
    norm/scale                              (d,)
    lm_head                                 (d, vocab), absent when embeddings are tied

The model code multiplies with ``@`` and looks rows up with ``[]``; a LoRA
weight or a quantized leaf in place of any of these arrays just works, so the
model knows nothing of LoRA. RoPE uses the Hugging Face (rotate-half) layout.

``layers`` may also be stacked (:func:`lora_jax.models.stacking.stack_layers`:
one dict whose arrays have a leading layer axis); :func:`hidden_states` then
runs the layers under ``jax.lax.scan`` (compile time independent of depth)
with the same numbers. Attention runs the block-causal path below or
``jax.nn.dot_product_attention`` (:mod:`lora_jax.models.attention`), chosen
per backend (``attention="auto"``) or by name; :func:`attention_choice` says
which one runs. ``remat`` takes the policies of :data:`lora_jax.models.layers.REMAT`.
Shape suffixes: B batch, T time (queries), S time (keys), D model width,
K kv heads, G query heads per kv head, H head dim, F ffn width, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_jax.errors import ConfigError
from lora_jax.models import attention as _attention
from lora_jax.models import layers as _layers
from lora_jax.models import stacking as _stacking

PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder (HF ``config.json`` names in comments)."""

    vocab_size: int  # vocab_size
    dim: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads
    ffn_dim: int  # intermediate_size
    head_dim: int | None = None  # head_dim (default dim // n_heads)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    max_seq_len: int = 2048
    sliding_window: int | None = None  # sliding_window (Mistral): query t sees keys t - window < s <= t

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"LlamaConfig: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(
                    f"LlamaConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig: head_dim={self.head_dim} must be even for RoPE")
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
            raise ConfigError(f"LlamaConfig.sliding_window must be a positive int or None, got {w!r}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


SMOLLM2_135M = LlamaConfig(
    vocab_size=49152,
    dim=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    ffn_dim=1536,
    rope_theta=100000.0,
    rms_eps=1e-5,
    tie_embeddings=True,
    max_seq_len=8192,
)


def init(key: jax.Array, config: LlamaConfig, dtype=jnp.float32) -> PyTree:
    """Random parameters (normal, std 0.02 as HF's ``initializer_range``; norms at 1).

    Examples:
      >>> cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
      >>> p = init(jax.random.key(0), cfg)
      >>> p["layers"][1]["attn"]["k_proj"]["kernel"].shape
      (32, 16)
    """
    c = config
    w = _layers.normal_init(key, 2 + 7 * c.n_layers, dtype)

    def proj(d_in, d_out, bias=False):
        p = {"kernel": w((d_in, d_out))}
        if bias:
            p["bias"] = jnp.zeros((d_out,), dtype)
        return p

    layers = []
    for _ in range(c.n_layers):
        layers.append(
            {
                "attn_norm": {"scale": jnp.ones((c.dim,), dtype)},
                "attn": {
                    "q_proj": proj(c.dim, c.q_dim, c.qkv_bias),
                    "k_proj": proj(c.dim, c.kv_dim, c.qkv_bias),
                    "v_proj": proj(c.dim, c.kv_dim, c.qkv_bias),
                    "o_proj": proj(c.q_dim, c.dim),
                },
                "mlp_norm": {"scale": jnp.ones((c.dim,), dtype)},
                "mlp": {
                    "gate_proj": proj(c.dim, c.ffn_dim),
                    "up_proj": proj(c.dim, c.ffn_dim),
                    "down_proj": proj(c.ffn_dim, c.dim),
                },
            }
        )
    params = {"embed": w((c.vocab_size, c.dim)), "layers": layers, "norm": {"scale": jnp.ones((c.dim,), dtype)}}
    if not c.tie_embeddings:
        params["lm_head"] = w((c.dim, c.vocab_size))
    return params


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float):
    """Full-width RoPE tables ``(B, T, head_dim)`` for the rotate-half layout.

    Returns ``cos = [cos, cos]`` and ``sin = [-sin, sin]`` (halves along the last
    axis), so that :func:`apply_rope` is ``x * cos + swap_halves(x) * sin``. The
    tables are computed once per call and kept as arrays (an optimization
    barrier): otherwise XLA fuses the ``cos``/``sin`` of the positions into
    every RoPE fusion of every layer and evaluates them per element of
    ``q`` and ``k`` (measured: ~3% of a LoRA train step on CPU).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    tables = jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([-sin, sin], axis=-1)
    return jax.lax.optimization_barrier(tables)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    """Rotate ``x`` (heads on axis 2) by the tables of :func:`rope_tables`."""
    half = x_BTNH.shape[-1] // 2
    swapped = jnp.concatenate([x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos = cos_BTH[:, :, None, :].astype(x_BTNH.dtype)
    sin = sin_BTH[:, :, None, :].astype(x_BTNH.dtype)
    return x_BTNH * cos + swapped * sin


#: Queries are processed in blocks of this many positions; block ``i`` computes
#: scores only against the keys of blocks ``0..i`` (the rest are causally
#: masked). At 128 tokens that skips a quarter of the attention matmuls.
CAUSAL_BLOCK = 64


def causal_blocks(seq_len: int) -> int:
    """How many query blocks :func:`self_attention` splits ``seq_len`` positions into (1: no skipping)."""
    b = CAUSAL_BLOCK
    return seq_len // b if seq_len % b == 0 and seq_len > b else 1


def attention_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the score and value matmuls that :func:`self_attention` computes.

    ``n`` query blocks of ``T/n`` positions see ``(i+1) T/n`` keys each, so the
    matmuls cover ``T^2 (n+1) / (2n)`` query-key pairs instead of ``T^2``.
    """
    n = causal_blocks(seq_len)
    pairs_per_query = seq_len * (n + 1) / (2 * n)
    return 2.0 * 2.0 * config.n_layers * config.n_heads * config.head_dim * pairs_per_query


class Masks(NamedTuple):
    """Which keys each query of a training/scoring pass may see, in the forms each attention path takes.

    Attributes:
      full_BTS: True where query ``t`` may attend key ``s`` (causal, padding and window combined).
      key_valid_BS: True at real keys; ``None`` when there is no padding.
      window: the sliding window, or ``None``.
    """

    full_BTS: jax.Array
    key_valid_BS: jax.Array | None
    window: int | None


def make_masks(attention_mask_BT: jax.Array | None, T: int, window: int | None) -> Masks:
    """The :class:`Masks` of ``T`` positions with padding ``attention_mask_BT`` (1 real, 0 padding)."""
    t = jnp.arange(T)
    full_TS = t[None, :] <= t[:, None]
    if window is not None:
        full_TS = full_TS & (t[None, :] > t[:, None] - window)
    full_BTS = full_TS[None]
    key_valid_BS = None
    if attention_mask_BT is not None:
        key_valid_BS = attention_mask_BT.astype(bool)
        full_BTS = full_BTS & key_valid_BS[:, None, :]
    return Masks(full_BTS, key_valid_BS, window)


def attention_choice(
    config: LlamaConfig, attention: str = "auto", dtype: Any = None, backend: str | None = None
) -> str:
    """The attention implementation :func:`hidden_states` runs: ``blocked``, ``dot_product`` or ``cudnn``.

    Args:
      config: the model config (its head dim).
      attention: ``auto`` (by backend and shape) or a name of :data:`lora_jax.models.attention.ATTENTION`.
      dtype: the activations' dtype (the embedding's); default float32.
      backend: default ``jax.default_backend()``.

    Raises:
      ConfigError: see :func:`lora_jax.models.attention.choose`.

    Examples:
      >>> cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
      >>> attention_choice(cfg, backend="cpu"), attention_choice(cfg, "dot_product")
      ('blocked', 'dot_product')
    """
    return _attention.choose(attention, backend=backend or jax.default_backend(),
                             dtype=jnp.float32 if dtype is None else dtype, head_dim=config.head_dim)


def self_attention(
    p: PyTree, x_BTD: jax.Array, cos, sin, masks: Masks, c: LlamaConfig, impl: str = "blocked"
) -> jax.Array:
    """Grouped-query causal self-attention with the implementation ``impl`` (see :func:`attention_choice`).

    ``blocked``: keys past a query block (:data:`CAUSAL_BLOCK`) are skipped,
    not scored (``masks.full_BTS`` is causal). The output of a query that may
    see no key at all (a left-padding position) is unspecified in every path
    (the mean of the values it scores); no loss should depend on it.
    """
    B, T, _ = x_BTD.shape
    K, G, H = c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim
    q_BTKGH = apply_rope(_layers.linear(x_BTD, p["q_proj"]).reshape(B, T, K * G, H), cos, sin).reshape(B, T, K, G, H)
    k_BSKH = apply_rope(_layers.linear(x_BTD, p["k_proj"]).reshape(B, T, K, H), cos, sin)
    v_BSKH = _layers.linear(x_BTD, p["v_proj"]).reshape(B, T, K, H)
    if impl != "blocked":
        out_BTKGH = _attention.dot_product(q_BTKGH, k_BSKH, v_BSKH, key_valid_BS=masks.key_valid_BS,
                                           window=masks.window, implementation=impl)
    else:
        n = causal_blocks(T)
        size = T // n
        outs = []
        for i in range(n):
            lo, hi = i * size, (i + 1) * size
            outs.append(_attend(q_BTKGH[:, lo:hi], k_BSKH[:, :hi], v_BSKH[:, :hi], masks.full_BTS[:, lo:hi, :hi],
                                x_BTD.dtype))
        out_BTKGH = outs[0] if n == 1 else jnp.concatenate(outs, axis=1)
    return _layers.linear(out_BTKGH.reshape(B, T, K * G * H), p["o_proj"])


def _attend(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, dtype):
    """Masked softmax attention of grouped queries; scores in float32, probabilities in ``dtype``."""
    H = q_BTKGH.shape[-1]
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH)
    logits_BKGTS = logits_BKGTS / jnp.asarray(math.sqrt(H), logits_BKGTS.dtype)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS.astype(jnp.float32), -1e30)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` whose backward pass keeps only ``gate`` and ``up``.

    Plain autodiff saves the sigmoid and the SiLU output as well (two more
    ``(tokens, ffn)`` tensors per layer, written in the forward pass and read
    in the backward); here the backward recomputes the sigmoid inside the one
    fusion that forms both input gradients.
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    return g * up * (sig + silu * (1 - sig)), g * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def mlp(p: PyTree, x_BTD: jax.Array) -> jax.Array:
    h_BTF = swiglu(_layers.linear(x_BTD, p["gate_proj"]), _layers.linear(x_BTD, p["up_proj"]))
    return _layers.linear(h_BTF, p["down_proj"])


def hidden_states(
    params: PyTree,
    tokens_BT: jax.Array,
    config: LlamaConfig,
    *,
    attention_mask_BT: jax.Array | None = None,
    positions_BT: jax.Array | None = None,
    remat: bool | str = False,
    attention: str = "auto",
) -> jax.Array:
    """Final-norm hidden states ``(B, T, D)``.

    Args:
      params: the parameter tree (LoRA and quantized leaves allowed; ``layers``
        a list, or stacked: then the layers run under ``jax.lax.scan``).
      tokens_BT: int token ids.
      config: the model's :class:`LlamaConfig`.
      attention_mask_BT: 1 for real tokens, 0 for padding (keys only); default all 1.
      positions_BT: RoPE positions; default ``0..T-1``.
      remat: what each layer's backward pass recomputes: ``none``/``False``,
        ``full``/``True`` (the whole layer), ``dots`` or ``offload``
        (:func:`lora_jax.models.layers.remat_layer`).
      attention: ``auto``, ``blocked``, ``dot_product`` or ``cudnn`` (:func:`attention_choice`).
    """
    c = config
    B, T = tokens_BT.shape
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    masks = make_masks(attention_mask_BT, T, c.sliding_window)
    cos, sin = rope_tables(positions_BT, c.head_dim, c.rope_theta)
    x_BTD = params["embed"][tokens_BT]
    impl = attention_choice(c, attention, x_BTD.dtype)

    def layer(x_BTD, lp):
        h_BTD = rms_norm(x_BTD, lp["attn_norm"]["scale"], c.rms_eps)
        x_BTD = x_BTD + self_attention(lp["attn"], h_BTD, cos, sin, masks, c, impl)
        return x_BTD + mlp(lp["mlp"], rms_norm(x_BTD, lp["mlp_norm"]["scale"], c.rms_eps))

    layer = _layers.remat_layer(layer, remat)
    if _stacking.is_stacked(params):
        layers = _stacking.per_layer_dropout_keys(params["layers"], _stacking.n_layers(params))
        x_BTD, _ = jax.lax.scan(lambda x, lp: (layer(x, lp), None), x_BTD, layers)
    else:
        for lp in params["layers"]:
            x_BTD = layer(x_BTD, lp)
    return rms_norm(x_BTD, params["norm"]["scale"], c.rms_eps)


def output_head(params: PyTree, config: LlamaConfig):
    """The ``(D, V)`` output projection (the transposed embedding when tied)."""
    return params["embed"].T if config.tie_embeddings else params["lm_head"]


def apply(params: PyTree, tokens_BT: jax.Array, config: LlamaConfig, **kwargs) -> jax.Array:
    """Logits ``(B, T, V)``; keyword arguments as :func:`hidden_states`."""
    return _layers.matmul(hidden_states(params, tokens_BT, config, **kwargs), output_head(params, config))


def loss(params: PyTree, batch: dict, config: LlamaConfig, *, remat: bool | str = False, attention: str = "auto"):
    """Mean next-token cross entropy over the positions where ``batch['loss_mask']`` is 1.

    Args:
      params: parameters.
      batch: ``tokens`` (B, T) int; optional ``loss_mask`` (B, T), 1 where the
        token at that position is a target (position 0 is never one);
        optional ``attention_mask`` (B, T).
      config: model config.
      remat, attention: as for :func:`hidden_states`.

    Returns:
      ``(loss, {"n_tokens": ...})``.
    """
    tokens_BT = batch["tokens"]
    mask_BT = batch.get("loss_mask")
    if mask_BT is None:
        mask_BT = jnp.ones(tokens_BT.shape, jnp.float32)
    hidden_BTD = hidden_states(params, tokens_BT, config, attention_mask_BT=batch.get("attention_mask"), remat=remat,
                               attention=attention)
    # Drop the last position before the output head: slicing the (B, T, V)
    # logits instead would copy the largest tensor of the step.
    logits_BTV = _layers.matmul(hidden_BTD[:, :-1], output_head(params, config)).astype(jnp.float32)
    targets_BT = tokens_BT[:, 1:]
    weights_BT = mask_BT[:, 1:].astype(jnp.float32)
    n = jnp.maximum(weights_BT.sum(), 1.0)
    return jnp.sum(_layers.token_nll(logits_BTV, targets_BT) * weights_BT) / n, {"n_tokens": weights_BT.sum()}


def matmul_flops_per_token(config: LlamaConfig, seq_len: int) -> dict[str, float]:
    """Forward matmul FLOPs per token: weights (``2 * params``) and attention.

    The attention term counts the score/value matmuls :func:`self_attention`
    computes (see :func:`attention_flops_per_token`), not the skipped blocks.
    """
    c = config
    per_layer = c.dim * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.dim + 3 * c.dim * c.ffn_dim
    weights = 2.0 * (c.n_layers * per_layer + c.dim * c.vocab_size)
    return {"weights": weights, "attention": attention_flops_per_token(c, seq_len)}


# ----------------------------------------------------------------------------
# KV-cache decoding (used by lora_jax.generate)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> list[dict[str, jax.Array]]:
    """An empty key/value cache: per layer ``k`` and ``v`` of shape ``(B, S, K, H)``.

    Examples:
      >>> cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
      >>> cache = init_cache(cfg, batch=3, length=10)
      >>> len(cache), cache[0]["k"].shape
      (2, (3, 10, 2, 8))
    """
    shape = (batch, length, config.n_kv_heads, config.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.n_layers)]


def attention_cached(
    p: PyTree, x_BTD: jax.Array, cos, sin, layer_cache: dict, index: jax.Array, mask_BTS: jax.Array, c: LlamaConfig
) -> tuple[jax.Array, dict]:
    """:func:`self_attention` over a cache: write this step's keys/values at column ``index``, attend to all ``S``.

    ``mask_BTS`` (True where query ``t`` may see cache column ``s``) covers the whole cache.
    """
    B, T, _ = x_BTD.shape
    K, G, H = c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim
    q_BTKGH = apply_rope(_layers.linear(x_BTD, p["q_proj"]).reshape(B, T, K * G, H), cos, sin).reshape(B, T, K, G, H)
    k_BTKH = apply_rope(_layers.linear(x_BTD, p["k_proj"]).reshape(B, T, K, H), cos, sin)
    v_BTKH = _layers.linear(x_BTD, p["v_proj"]).reshape(B, T, K, H)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, jnp.asarray(index, jnp.int32), zero, zero)
    k_BSKH = jax.lax.dynamic_update_slice(layer_cache["k"], k_BTKH.astype(layer_cache["k"].dtype), start)
    v_BSKH = jax.lax.dynamic_update_slice(layer_cache["v"], v_BTKH.astype(layer_cache["v"].dtype), start)
    out_BTKGH = _attend(q_BTKGH, k_BSKH.astype(q_BTKGH.dtype), v_BSKH.astype(x_BTD.dtype), mask_BTS, x_BTD.dtype)
    return _layers.linear(out_BTKGH.reshape(B, T, K * G * H), p["o_proj"]), {"k": k_BSKH, "v": v_BSKH}


def hidden_states_cached(
    params: PyTree,
    tokens_BT: jax.Array,
    config: LlamaConfig,
    cache: list[dict[str, jax.Array]],
    *,
    index: jax.Array,
    positions_BT: jax.Array,
    kv_mask_BS: jax.Array,
) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
    """Final-norm hidden states of ``T`` new tokens written into cache columns ``index .. index+T-1``.

    Args:
      params: the parameter tree (LoRA and quantized leaves allowed).
      tokens_BT: the new tokens (a whole prompt for prefill, one token per step after).
      config: the model's :class:`LlamaConfig`.
      cache: from :func:`init_cache` (or a previous call); ``S`` columns.
      index: int scalar, the cache column of ``tokens_BT[:, 0]`` (the same for every row,
        so prompts are left-padded to a common end).
      positions_BT: RoPE positions of the new tokens.
      kv_mask_BS: True at cache columns that hold real tokens, including the new ones.

    Returns:
      ``(hidden_BTD, new_cache)``. Query ``t`` attends to valid columns ``s <= index + t``
      (and ``s > index + t - sliding_window`` with a window). Stacked layers run unrolled here.
    """
    c = config
    params = _stacking.unstack_layers(params)
    T = tokens_BT.shape[1]
    S = cache[0]["k"].shape[1]
    cols_T = jnp.asarray(index, jnp.int32) + jnp.arange(T, dtype=jnp.int32)
    s_S = jnp.arange(S, dtype=jnp.int32)
    seen_TS = s_S[None, :] <= cols_T[:, None]
    if c.sliding_window is not None:  # cache columns and positions differ by the same offset on each row
        seen_TS = seen_TS & (s_S[None, :] > cols_T[:, None] - c.sliding_window)
    mask_BTS = seen_TS[None] & kv_mask_BS.astype(bool)[:, None, :]
    cos, sin = rope_tables(positions_BT, c.head_dim, c.rope_theta)
    x_BTD = params["embed"][tokens_BT]
    new_cache = []
    for lp, lc in zip(params["layers"], cache, strict=True):
        h_BTD, lc = attention_cached(
            lp["attn"], rms_norm(x_BTD, lp["attn_norm"]["scale"], c.rms_eps), cos, sin, lc, index, mask_BTS, c
        )
        x_BTD = x_BTD + h_BTD
        x_BTD = x_BTD + mlp(lp["mlp"], rms_norm(x_BTD, lp["mlp_norm"]["scale"], c.rms_eps))
        new_cache.append(lc)
    return rms_norm(x_BTD, params["norm"]["scale"], c.rms_eps), new_cache
