"""Quantization rules over a params tree: :class:`QuantRule`, :func:`quantize`, and :func:`quantize_weight`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax.errors import QuantError
from lora_jax.quant.codecs import FORMATS, check_block, encode, is_concrete
from lora_jax.quant.qtensor import QTensor, shape_of

PyTree = Any


def _quantize(w, fmt, block_size, double_quant, dtype, where: str) -> QTensor:
    if fmt not in FORMATS:
        raise QuantError(f"{where}: format must be one of {FORMATS}, got {fmt!r}")
    shape = shape_of(w)
    if shape is None or len(shape) != 2:
        raise QuantError(
            f"{where}: only 2-D kernels (d_in, d_out) can be quantized, got shape {shape}; "
            "narrow the rule's pattern (e.g. end it in 'kernel')"
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise QuantError(f"{where}: only float weights can be quantized, got dtype {w.dtype}")
    bs = check_block(shape, block_size, fmt, where)
    dtype = np.dtype(w.dtype if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise QuantError(f"{where}: compute dtype must be floating (float32, bfloat16), got {dtype}")
    ch, (n_nan, n_inf) = encode(w, fmt, bs, bool(double_quant))
    if is_concrete(n_nan) and (int(n_nan) or int(n_inf)):
        raise QuantError(
            f"{where}: weight of shape {shape} has {int(n_nan)} NaN and {int(n_inf)} inf values; "
            "quantization needs finite weights (check the checkpoint or the preceding training)"
        )
    return QTensor(**ch, format=fmt, block_size=bs, stored_shape=shape, compute_dtype=dtype)


def quantize_weight(
    w: jax.Array,
    format: str = "nf4",
    *,
    block_size: int | None = 64,
    double_quant: bool = False,
    dtype: Any = None,
    block_axis: int = 0,
) -> QTensor:
    """Quantize one 2-D weight in blocks along its first axis.

    Args:
      w: float array ``(d_in, d_out)``, finite.
      format: one of :data:`FORMATS`.
      block_size: rows per block (must divide the blocked axis); ``None`` for one
        block per output channel.
      double_quant: quantize the fp32 block scales to int8 as well (QLoRA).
      dtype: compute dtype of the dequantized weight; default ``w.dtype``.
      block_axis: ``0`` (kernels: blocks along the input rows) or ``1`` (blocks
        along each row, e.g. an embedding table ``(vocab, d)``; stored transposed).

    Returns:
      A :class:`QTensor` of ``w``'s shape. Under tracing (``jit``, ``eval_shape``)
      the finiteness check is skipped.

    Raises:
      QuantError: not 2-D, not float, NaN/inf present, or a block size that does
        not divide the blocked dimension.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(0), (256, 512))
      >>> from lora_jax.quant import footprint
      >>> q = quantize_weight(w, "nf4", double_quant=True)
      >>> footprint(q).bits_per_param
      4.126953125
      >>> err = jnp.mean((q.dequantize() - w) ** 2) / jnp.mean(w**2)
      >>> bool(err < 0.01)
      True
    """
    if block_axis not in (0, 1):
        raise QuantError(f"quantize_weight: block_axis must be 0 or 1, got {block_axis!r}")
    if block_axis == 1:
        return quantize_weight(w.T, format, block_size=block_size, double_quant=double_quant, dtype=dtype).T
    return _quantize(w, format, block_size, double_quant, dtype, "quantize_weight")



@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
    """Which leaves become :class:`QTensor` s, and how.

    Attributes:
      pattern: regex matched with ``re.fullmatch`` against the leaf path.
      format: one of :data:`FORMATS`.
      block_size: rows per block; ``None`` means one block per output channel.
      double_quant: quantize the block scales too (QLoRA).
      dtype: compute dtype of the dequantized weight (float32 or bfloat16);
        ``None`` keeps the weight's dtype.
      block_axis: ``0`` for kernels ``(d_in, d_out)``; ``1`` for blocks along
        each row (an embedding table ``(vocab, d)``).
    """

    pattern: str
    format: str = "nf4"
    block_size: int | None = 64
    double_quant: bool = False
    dtype: Any = jnp.float32
    block_axis: int = 0

    def __post_init__(self):
        if self.format not in FORMATS:
            raise QuantError(f"QuantRule({self.pattern!r}): format must be one of {FORMATS}, got {self.format!r}")
        bs = self.block_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0):
            raise QuantError(f"QuantRule({self.pattern!r}): block_size must be a positive int or None, got {bs!r}")
        if self.dtype is not None and not jnp.issubdtype(np.dtype(self.dtype), jnp.floating):
            raise QuantError(f"QuantRule({self.pattern!r}): dtype must be a float dtype, got {self.dtype!r}")
        if self.block_axis not in (0, 1):
            raise QuantError(f"QuantRule({self.pattern!r}): block_axis must be 0 or 1, got {self.block_axis!r}")


def quantize(params: PyTree, rules: Sequence[QuantRule]) -> PyTree:
    """Replace every leaf matched by ``rules`` with a :class:`QTensor`.

    Compose with LoRA for QLoRA: ``lora.init(key, quantize(params, qrules), lrules)``
    gives LoRA weights whose frozen base is quantized.

    Args:
      params: the parameter pytree (dense arrays).
      rules: ordered :class:`QuantRule` s; the first matching rule wins.

    Returns:
      The same tree with the matched weights quantized.

    Raises:
      QuantError: a rule matches nothing, a matched leaf is not a finite 2-D
        float matrix, is already quantized or adapted, or its blocked dimension
        is not divisible by the block size (the message names the path and shape).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax.quant import footprint
      >>> params = {"mlp": {"kernel": jnp.ones((128, 64)), "bias": jnp.zeros(64)}}
      >>> q = quantize(params, [QuantRule(pattern=".*kernel", double_quant=True)])
      >>> q["mlp"]["kernel"]
      QTensor(nf4, shape=(128, 64), block_size=64, double_quant=True, dtype=float32)
      >>> footprint(q).nbytes  # 4096 B codes, 128 B scale codes, 8 B scale scales, 4 B mean, 256 B bias
      4492
    """
    def quantize_leaf(path: str, w: Any, rule: QuantRule) -> QTensor:
        where = f"{rule!r} at {path!r}"
        if _lora.is_node(w):
            raise QuantError(
                f"{where}: the leaf is already a {type(w).__name__}; quantize dense weights, "
                "and call quantize before lora.init"
            )
        w = jnp.asarray(w) if not hasattr(w, "dtype") else w
        if rule.block_axis == 1:
            if shape_of(w) is None or len(shape_of(w)) != 2:
                raise QuantError(f"{where}: only 2-D weights can be quantized, got shape {shape_of(w)}")
            q = _quantize(w.T, rule.format, rule.block_size, rule.double_quant, rule.dtype, where + " (block_axis=1)")
            return q.T
        return _quantize(w, rule.format, rule.block_size, rule.double_quant, rule.dtype, where)

    return _paths.map_rules(params, rules, quantize_leaf, is_leaf=_lora.is_node, what="QuantRule",
                            rule_type=QuantRule, caller="quantize")
