"""Custom VJPs of the core ops (low-rank product, dequantizing matmul, QLoRA layer, bf16 matmul) and their fallbacks.

Four ops carry a hand-written backward pass:

* :func:`low_rank`: ``((x @ A) * s) @ B``, the LoRA adapter;
* :func:`qmatmul`: ``x @ dequantize(q)`` whose residual is the packed leaf;
* :func:`qlora_matmul`: both at once, a QLoRA layer;
* :func:`matmul`: ``x @ w`` that, for two bfloat16 operands, accumulates in
  float32 in the forward and the backward pass (see :func:`dot`).

``jax.custom_vjp`` functions cannot be differentiated in forward mode
(``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``). Each op therefore takes
``custom_vjp=True``; ``custom_vjp=False`` computes the same value with plain
jax.numpy, which every JAX transformation differentiates (in both modes).
The flag is a static Python bool, so it composes with ``jit`` (a change
retraces). :class:`lora_jax.lora.LoraWeight` stores it as a static field;
:func:`lora_jax.lora.with_custom_vjp` sets it on every node of a tree.

This is a private module: :mod:`lora_jax.lora` and :mod:`lora_jax.quant` import
its public names.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> x, a, b = jnp.ones((2, 4)), jnp.ones((4, 1)), jnp.ones((1, 3))
  >>> low_rank(x, a, b, 0.5).tolist() == low_rank(x, a, b, 0.5, custom_vjp=False).tolist()
  True
  >>> jax.jvp(lambda x: low_rank(x, a, b, 0.5, custom_vjp=False), (x,), (x,))[1][0].tolist()
  [2.0, 2.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32
_BF16 = np.dtype(jnp.bfloat16)


# ----------------------------------------------------------------------------
# bf16 products with fp32 accumulation


def dot(a, b, *, b_transposed: bool = False):
    """``a @ b`` (``a @ b.T`` with ``b_transposed``); two bfloat16 operands accumulate in float32, rounded once.

    XLA:CPU multiplies bfloat16 matrices with the CPU's bf16 dot instructions
    (AVX512-BF16, AMX) only when the dot's result is float32: measured here
    (AMD EPYC, AVX512-BF16, 2 threads) a bf16 x bf16 -> f32 dot runs at 1.6-2.2x
    the fp32 rate, a bf16 x bf16 -> bf16 dot at 0.7-0.9x. A transposed operand
    is contracted on its own axis (``dot_general``): ``b.T`` materialized by a
    transpose before the dot sends XLA:CPU back to float32 (2x slower here).
    Other dtypes: plain ``@``. Not differentiable in a useful way (JAX's
    transpose of a dot emits bf16-output dots again): :func:`matmul` wraps it
    with a backward pass.

    Examples:
      >>> a = jnp.full((2, 300), 1 + 2**-7, jnp.bfloat16)  # exact in bf16
      >>> y = dot(a, jnp.ones((300, 1), jnp.bfloat16))  # 302.34 rounded once to bf16
      >>> y.dtype, float(y[0, 0])
      (dtype(bfloat16), 302.0)
      >>> dot(a, jnp.ones((1, 300), jnp.bfloat16), b_transposed=True).tolist() == y.tolist()
      True
    """
    if a.dtype == _BF16 and b.dtype == _BF16:
        dims = (((a.ndim - 1,), (1 if b_transposed else 0,)), ((), ()))
        return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32).astype(_BF16)
    return a @ (b.T if b_transposed else b)


def dot_tn(a, b):
    """``a.T @ b`` for 2-D ``a``, ``b`` (contracting their rows), bf16 accumulated in float32 as :func:`dot`."""
    if a.dtype == _BF16 and b.dtype == _BF16:
        return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32).astype(_BF16)
    return a.T @ b


def narrow_t(t):
    """``t.T`` for a 2-D ``t`` of few columns (``(N, r)``, ``r`` small); bfloat16 as a product with the identity.

    XLA:CPU runs a bf16 dot on its bf16 path (YNNPACK) only when the left
    operand is contracted on its last axis in row-major layout. A transpose
    feeding a dot is a layout change to XLA, so ``h.T @ g`` (an adapter's
    factor gradient) reaches it as "contract ``h``'s rows", which it rejects
    and runs in float32 instead, converting the large ``g`` too (also through
    an optimization barrier, and an elementwise op after the transpose can
    even leave a bf16 dot that no CPU kernel runs). ``I_r @ t.T`` is a dot
    whose result XLA lays out row-major: ``r * r * N`` multiply-adds, exact
    (every output is one product by 1.0). Other dtypes: plain ``t.T``.

    Examples:
      >>> t = jnp.arange(6.0).reshape(3, 2)
      >>> narrow_t(t.astype(jnp.bfloat16)).tolist() == t.T.tolist() == narrow_t(t).tolist()
      True
    """
    if t.dtype != _BF16:
        return t.T
    eye = np.eye(t.shape[1], dtype=_BF16)  # a constant of the program, not an iota computed every step
    return jax.lax.dot_general(eye, t, (((1,), (1,)), ((), ())), preferred_element_type=_F32).astype(_BF16)


def matmul(x, w, *, custom_vjp: bool = True):
    """``x @ w`` for ``x (..., d_in)`` and a 2-D array ``w``, bf16 operands accumulated in float32 both ways.

    For two bfloat16 operands a custom VJP computes the input and weight
    gradients with :func:`dot` too; other dtypes (or ``custom_vjp=False``,
    which forward-mode differentiation needs) are plain ``x @ w``.

    Examples:
      >>> x, w = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
      >>> g = jax.grad(lambda w: matmul(x, w).astype(jnp.float32).sum())(w)
      >>> g.dtype, float(g[0, 0])
      (dtype(bfloat16), 6.0)
    """
    if custom_vjp and x.dtype == _BF16 and getattr(w, "dtype", None) == _BF16 and w.ndim == 2:
        return _bf16_matmul(x, w)
    return x @ w


@jax.custom_vjp
def _bf16_matmul(x, w):
    return dot(x, w)


def _bf16_matmul_fwd(x, w):
    return dot(x, w), (x, w)


def _bf16_matmul_bwd(res, g):
    x, w = res
    g = g.astype(_BF16)
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    return dot(g, w, b_transposed=True), dot_tn(x2, g2)


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


# ----------------------------------------------------------------------------
# The low-rank product (LoRA)


def low_rank(x_ND, a_DR, b_RO, scale: float, *, custom_vjp: bool = True):
    """``((x @ A) * s) @ B`` for 2-D ``x``; ``custom_vjp=False``: plain autodiff (forward mode works)."""
    if custom_vjp:
        return _low_rank(x_ND, a_DR, b_RO, scale)
    return ((x_ND @ a_DR) * jnp.asarray(scale, x_ND.dtype)) @ b_RO


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank(x_ND, a_DR, b_RO, scale: float):
    """``((x @ A) * s) @ B`` with a backward pass laid out for XLA.

    The hand-written backward keeps every large operand (``x``, the output
    cotangent) in its natural row-major layout and transposes only the small
    rank-``r`` tensors; in float32, optimization barriers stop XLA from folding
    those small transposes back into the dots, which otherwise makes it
    materialize a transposed copy of each adapter's input and output gradient
    (measured here: about a fifth of a LoRA train step on CPU); in bfloat16
    see :func:`low_rank_bwd`. Forward-mode differentiation (``jax.jvp``) is
    not defined for it.
    """
    return dot(dot(x_ND, a_DR) * jnp.asarray(scale, x_ND.dtype), b_RO)


def low_rank_fwd(x_ND, a_DR, b_RO, scale):
    """Forward pass of :func:`low_rank`: the output and the residuals ``(x, A, B, (x @ A) * s)``."""
    h_NR = dot(x_ND, a_DR) * jnp.asarray(scale, x_ND.dtype)
    return dot(h_NR, b_RO), (x_ND, a_DR, b_RO, h_NR)


def low_rank_bwd(scale, res, g_NO):
    """Backward pass of :func:`low_rank`: ``(dx, dA, dB)`` from the residuals and the output cotangent.

    bfloat16: every product keeps its large operand (``x``, ``g``) as it is and
    contracts the factors on their own axes (:func:`dot` with ``b_transposed``);
    the two row contractions take the small ``h`` and ``dh`` transposed by
    :func:`narrow_t`, so all four run on XLA:CPU's bf16 path (a transposed
    small operand sent each, with a float32 copy of ``g`` or ``x``, to float32).
    """
    x_ND, a_DR, b_RO, h_NR = res
    if all(t.dtype == _BF16 for t in (x_ND, a_DR, b_RO, h_NR, g_NO)):
        dh_NR = dot(g_NO, b_RO, b_transposed=True) * jnp.asarray(scale, g_NO.dtype)
        db_RO = dot(narrow_t(h_NR), g_NO)
        da_DR = dot(narrow_t(dh_NR), x_ND).T
        dx_ND = dot(dh_NR, a_DR, b_transposed=True)
        return dx_ND, da_DR, db_RO
    bar = jax.lax.optimization_barrier
    db_RO = dot(bar(h_NR.T), g_NO)
    dh_NR = dot(g_NO, bar(b_RO.T)) * jnp.asarray(scale, g_NO.dtype)
    da_DR = bar(dot(bar(dh_NR.T), x_ND)).T
    dx_ND = dot(dh_NR, bar(a_DR.T))
    return dx_ND, da_DR, db_RO


_low_rank.defvjp(low_rank_fwd, low_rank_bwd)


# ----------------------------------------------------------------------------
# The dequantizing matmul (a quantized base)


def _zero_of(x) -> jax.Array:
    """An exact float32 zero that XLA cannot prove constant: ``x0 > inf`` is false for every value, NaN included."""
    return (x.reshape(-1)[0] > jnp.inf).astype(_F32)


def _plus(q, zero):
    """``q`` with ``zero`` added to its scales: the same values, now data-dependent on ``zero``."""
    if q.double_quant:
        return dataclasses.replace(q, scale_mean=q.scale_mean + zero)
    return dataclasses.replace(q, scales=q.scales + zero)


def matmul_late(x, q, after=None, *, transposed: bool = False):
    """``x @ dequantize(q)`` (``.T`` of it with ``transposed``), dequantized after ``after`` (default ``x``) exists.

    Without a dependency on ``x`` XLA may dequantize every weight of the model up
    front and keep them all alive (XLA:CPU does), and may CSE the backward's
    re-dequantization with the forward one. The optimization barrier says so to
    backends that respect it when scheduling; XLA:CPU drops barriers before
    scheduling, so the scales also get an exact zero computed from ``after``
    (see :func:`_zero_of`).
    """
    after = x if after is None else after
    x, q, after = jax.lax.optimization_barrier((x, q, after))
    if after.size:
        q = _plus(q, _zero_of(after))
    return dot(x, q.dequantize(), b_transposed=transposed)


def _for_dtype(q, dtype):
    return dataclasses.replace(q, compute_dtype=dtype) if q.dtype != dtype else q


def qmatmul(x, q):
    """``x @ dequantize(q)`` whose backward pass re-dequantizes ``q`` (no dense weight is kept)."""
    return _qmatmul(np.dtype(jnp.result_type(x)), x, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qmatmul(x_dtype, x, q):
    return matmul_late(x, q)


def _qmatmul_fwd(x_dtype, x, q):
    return matmul_late(x, q), q  # residual: the packed leaf, not the dense weight


def _qmatmul_bwd(x_dtype, q, g):
    dx = matmul_late(g, _for_dtype(q, g.dtype), transposed=True)  # g @ W.T, contracting W's own axis
    return dx.astype(x_dtype), None  # None: zero cotangents (float0 for integer codes)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


# ----------------------------------------------------------------------------
# The QLoRA layer: a quantized base and an adapter as one op


def qlora_matmul(x, x_adapter, q, a, b, scale: float, *, custom_vjp: bool = True):
    """``x @ dequantize(q) + ((x_adapter @ A) * scale) @ B`` for 2-D ``x``: a QLoRA layer.

    What :class:`lora_jax.lora.LoraWeight` computes for a quantized base. One
    custom VJP for both paths lets each dequantization be ordered after a
    product of the adapter (``x_adapter @ A`` forward, its input gradient
    backward), a dot output XLA keeps in memory anyway, rather than after ``x`` or the
    output gradient, whose elementwise producers XLA would otherwise recompute
    inside every dequantization and split into extra kernels (a smaller
    compiled step: fewer instructions held in memory). ``x_adapter`` is
    ``x`` after adapter dropout (``x`` itself without it). The backward pass
    re-dequantizes ``q`` instead of keeping the dense weight. ``custom_vjp=False``
    computes the same value with plain autodiff (``jax.jvp`` works).
    """
    if not custom_vjp:
        return x @ q.dequantize() + low_rank(x_adapter, a, b, float(scale), custom_vjp=False)
    return _qlora(np.dtype(x.dtype), float(scale), x, x_adapter, q, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _qlora(x_dtype, scale, x, xa, q, a, b):
    return _qlora_fwd(x_dtype, scale, x, xa, q, a, b)[0]


def _qlora_fwd(x_dtype, scale, x, xa, q, a, b):
    delta, res = low_rank_fwd(xa, a, b, scale)
    h = res[-1]  # (xa @ A) * scale
    return matmul_late(x, q, after=h) + delta, (res, q)


def _qlora_bwd(x_dtype, scale, residuals, g):
    res, q = residuals
    dxa, da, db = low_rank_bwd(scale, res, g)  # the adapter's backward, as for a dense base
    dx = matmul_late(g, _for_dtype(q, g.dtype), after=dxa, transposed=True)  # dxa = (g @ B^T * s) @ A^T
    return dx.astype(x_dtype), dxa, None, da, db


_qlora.defvjp(_qlora_fwd, _qlora_bwd)

