"""One LoRA / QLoRA train step with the JAX peers (qwix, flax.nnx), the JAX side of ``peers.py``.

The model is a plain flax.nnx Llama written the way a researcher would write it
(``nnx.Linear`` projections, ``nnx.Embed``, ``nnx.RMSNorm``, rotate-half RoPE,
``jax.nn.dot_product_attention`` with grouped-query heads and a causal mask,
SwiGLU, tied head through ``Embed.attend``), in float32, loaded with *our*
parameter tree: its module paths are our paths (``layers/<i>/attn/q_proj/kernel``
...), so the weights go in with one ``nnx.update``.

Setups (adapters on q, k, v, o, gate, up, down; A random, B zero, so the first
loss is the base model's):
  ``qwix_lora``   ``qwix.LoraProvider(module_path=..., rank, alpha)``; qwix scales the
                  update by ``alpha / rank``, as we do.
  ``qwix_qlora``  the same with ``weight_qtype="nf4"`` and ``tile_size=64``: the seven
                  kernels become uint4 NF4 codes with one float32 absmax scale per 64
                  input rows per output column (our ``block_size=64``). qwix 0.1.8 has no
                  double quantization (the scales stay float32) and dequantizes the whole
                  kernel before each matmul (``_slow_dot_general``; NF4 cannot be
                  dequantized on the output).
  ``nnx_lora``    ``nnx.LoRALinear(lora_rank=rank)`` in place of ``nnx.Linear``. It has no
                  alpha: the update is ``x @ A @ B``, effective scale 1 (not alpha/rank = 2).
                  The scale does not change the cost of a step.

The optimizer is ``optax.adamw(lr)`` over ``nnx.LoRAParam`` only
(``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``), no activation checkpointing.
The loss is the mean next-token cross entropy, ``model(tokens[:, :-1])`` against
``tokens[:, 1:]`` as in the nnx examples: the decoder runs on T-1 positions, ours on T
(a 1/T smaller step for the peers).

    step = build("qwix_lora", jax.tree.map(np.asarray, params), cfg)
    loss = step(tokens)  # int (B, T); loss before the update
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx

from lora_jax.models import llama

SETUPS = ("qwix_lora", "qwix_qlora", "nnx_lora")
TARGETS = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
NF4_TILE = 64  # input rows per scale, as our block_size=64
TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.OptState)  # what a step changes: adapters, AdamW state, step count


def rope(x_BTNH: jax.Array, cos_TH: jax.Array, sin_TH: jax.Array) -> jax.Array:
    """Rotate-half RoPE (Hugging Face layout); tables are ``(T, H/2)``."""
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    cos, sin = cos_TH[:, None], sin_TH[:, None]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: llama.LlamaConfig, linear, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = linear(cfg.dim, cfg.q_dim, rngs=rngs)
        self.k_proj = linear(cfg.dim, cfg.kv_dim, rngs=rngs)
        self.v_proj = linear(cfg.dim, cfg.kv_dim, rngs=rngs)
        self.o_proj = linear(cfg.q_dim, cfg.dim, rngs=rngs)

    def __call__(self, x_BTD, cos, sin):
        B, T, _ = x_BTD.shape
        q_BTNH = rope(self.q_proj(x_BTD).reshape(B, T, self.n_heads, self.head_dim), cos, sin)
        k_BTKH = rope(self.k_proj(x_BTD).reshape(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v_BTKH = self.v_proj(x_BTD).reshape(B, T, self.n_kv_heads, self.head_dim)
        out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True)
        return self.o_proj(out_BTNH.reshape(B, T, -1))


class MLP(nnx.Module):
    def __init__(self, cfg: llama.LlamaConfig, linear, *, rngs: nnx.Rngs):
        self.gate_proj = linear(cfg.dim, cfg.ffn_dim, rngs=rngs)
        self.up_proj = linear(cfg.dim, cfg.ffn_dim, rngs=rngs)
        self.down_proj = linear(cfg.ffn_dim, cfg.dim, rngs=rngs)

    def __call__(self, x_BTD):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class Block(nnx.Module):
    def __init__(self, cfg: llama.LlamaConfig, linear, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(cfg.dim, epsilon=cfg.rms_eps, rngs=rngs)
        self.attn = Attention(cfg, linear, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.dim, epsilon=cfg.rms_eps, rngs=rngs)
        self.mlp = MLP(cfg, linear, rngs=rngs)

    def __call__(self, x_BTD, cos, sin):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Llama(nnx.Module):
    def __init__(self, cfg: llama.LlamaConfig, *, linear=None, rngs: nnx.Rngs):
        linear = linear or functools.partial(nnx.Linear, use_bias=False)
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs)
        self.layers = nnx.List([Block(cfg, linear, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = nnx.RMSNorm(cfg.dim, epsilon=cfg.rms_eps, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else nnx.Linear(cfg.dim, cfg.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens_BT):
        inv_freq = 1.0 / self.rope_theta ** (jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim)
        ang_TH = jnp.arange(tokens_BT.shape[1], dtype=jnp.float32)[:, None] * inv_freq
        cos, sin = jnp.cos(ang_TH), jnp.sin(ang_TH)
        x_BTD = self.embed(tokens_BT)
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos, sin)
        x_BTD = self.norm(x_BTD)
        return self.embed.attend(x_BTD) if self.lm_head is None else self.lm_head(x_BTD)


def loss_fn(model: Llama, tokens_BT: jax.Array) -> jax.Array:
    logits_BTV = model(tokens_BT[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:]).mean()


def load(model: Llama, params: dict) -> None:
    """Copy our parameter tree into ``model`` (our paths are its paths, but for ``embed``)."""
    tree = {k: v for k, v in params.items() if k not in ("embed", "layers", "lm_head")}
    tree["embed"] = {"embedding": params["embed"]}
    tree["layers"] = dict(enumerate(params["layers"]))
    if "lm_head" in params:
        tree["lm_head"] = {"kernel": params["lm_head"]}
    nnx.update(model, jax.tree.map(jnp.asarray, tree))


def build(
    setup: str, params: dict, cfg: llama.LlamaConfig, *, rank: int = 16, alpha: int = 32, lr: float = 1e-4
) -> Callable[..., float | None]:
    """A train step ``step(tokens) -> loss`` (forward, backward, AdamW update, blocked until done).

    Args:
      setup: one of :data:`SETUPS`.
      params: our parameter tree (nested dict of float32 numpy arrays, ``layers`` a list).
      cfg: its :class:`lora_jax.models.llama.LlamaConfig`.
      rank: LoRA rank.
      alpha: LoRA alpha (qwix scales by ``alpha / rank``; ``nnx.LoRALinear`` ignores it).
      lr: AdamW learning rate.

    Returns:
      ``step(tokens, block=True)``: takes int tokens ``(B, T)``, returns the loss before the update
      as a float; with ``block=False`` it dispatches the step and returns ``None`` (``step.wait()``
      then blocks and returns the last loss).
    """
    if setup not in SETUPS:
        raise ValueError(f"setup must be one of {SETUPS}, got {setup!r}")
    rngs = nnx.Rngs(0)
    if setup == "nnx_lora":
        model = Llama(cfg, linear=functools.partial(nnx.LoRALinear, lora_rank=rank, use_bias=False), rngs=rngs)
        load(model, params)
    else:
        model = Llama(cfg, rngs=rngs)
        load(model, params)
        qtype = {"weight_qtype": "nf4", "tile_size": NF4_TILE} if setup == "qwix_qlora" else {}
        provider = qwix.LoraProvider(module_path=TARGETS, rank=rank, alpha=alpha, **qtype)
        # qwix adds the adapters (and quantizes the kernels) on a first call with sample inputs.
        model = qwix.apply_lora_to_model(model, provider, jnp.zeros((1, 8), jnp.int32), rngs=nnx.Rngs(1))
        if provider.get_unused_rules():
            raise RuntimeError(f"qwix rule {TARGETS!r} matched no module")
    _check(model, setup, 7 * cfg.n_layers)
    optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.LoRAParam)

    # flax's "functional training loop" (guides/performance): jax.jit over nnx.split state.
    # Plain nnx.jit re-traverses the model graph in Python on every call: ~60-90 ms per step
    # for a 30-layer model on a 2-core CPU (~15-20 ms with nnx.cached_partial, ~1-3 ms here).
    # One change from the guide's example, which returns the whole state: only the trainable
    # part comes back, so jit does not copy the frozen weights (540 MB here) into new outputs.
    graphdef, trainable, frozen = nnx.split((model, optimizer), TRAINABLE, ...)

    @jax.jit
    def train_step(graphdef, trainable, frozen, tokens_BT):
        model, optimizer = nnx.merge(graphdef, trainable, frozen)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, tokens_BT)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer), TRAINABLE)

    last = [None]

    def wait() -> float:
        return float(jax.block_until_ready((last[0], trainable))[0])

    def step(tokens: np.ndarray, block: bool = True) -> float | None:
        nonlocal trainable
        last[0], trainable = train_step(graphdef, trainable, frozen, jnp.asarray(tokens, jnp.int32))
        return wait() if block else None

    step.wait = wait
    return step


def _check(model: nnx.Module, setup: str, expected: int) -> None:
    """One A and one B on each targeted projection, and (QLoRA) each of their kernels in NF4."""
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
    adapted = {re.sub(r"/(kernel_lora_[ab]|lora/lora_[ab])$", "", p) for p in paths}
    if len(paths) != 2 * expected or len(adapted) != expected or not all(re.fullmatch(TARGETS, p) for p in adapted):
        raise RuntimeError(f"{setup}: expected A and B on {expected} projections, got {len(paths)} LoRA params")
    if setup == "qwix_qlora":
        nf4 = [p for p, v in nnx.to_flat_state(nnx.state(model)) if p[-1] == "qvalue" and v.dtype == jnp.uint4]
        if len(nf4) != expected:
            raise RuntimeError(f"qwix_qlora: expected {expected} NF4 kernels, got {len(nf4)}")


def describe(setup: str) -> dict:
    """Versions and the settings a reader needs to interpret the numbers of ``setup``."""
    if setup not in SETUPS:
        raise ValueError(f"setup must be one of {SETUPS}, got {setup!r}")
    notes = {
        "qwix_lora": "qwix LoraProvider on the seven projections, scale alpha/rank",
        "qwix_qlora": f"qwix LoraProvider weight_qtype='nf4', tile_size={NF4_TILE} along d_in; "
        "float32 scales (qwix 0.1.8 has no double quantization); kernels dequantized before each matmul",
        "nnx_lora": "flax.nnx.LoRALinear, no alpha: effective scale 1 (x @ A @ B)",
    }[setup]
    return {
        "setup": setup,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "qwix": qwix.__version__,
        "optimizer": "optax.adamw over nnx.LoRAParam, float32 state",
        "jit": "jax.jit over nnx.split state (flax functional training loop)",
        "attention": "jax.nn.dot_product_attention (XLA), causal, grouped-query",
        "notes": notes,
    }
