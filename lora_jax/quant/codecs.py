"""Quantization codecs: the format tables, nibble packing, and encoding a 2-D weight into codes and scales.

See :mod:`lora_jax.quant` for the formats and the layout of the encoded children.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import QuantError

FORMATS = ("int4", "int4_asym", "nf4", "fp4", "int8")
BITS = {"int4": 4, "int4_asym": 4, "nf4": 4, "fp4": 4, "int8": 8}
DQ_BLOCK = 256  # second-level (double quantization) group size along d_out

#: The 16 NormalFloat values of the QLoRA paper (code ``c`` is ``NF4_VALUES[c]``).
NF4_VALUES = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip

_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
#: E2M1 values by code: bit 3 is the sign, bits 2-1 the exponent, bit 0 the mantissa.
FP4_VALUES = np.concatenate([_E2M1, -_E2M1])

_QMAX = {"int4": 7.0, "nf4": 1.0, "fp4": 6.0, "int8": 127.0}  # absmax maps to this code value


def _midpoints(sorted_values: np.ndarray) -> np.ndarray:
    return ((sorted_values[:-1] + sorted_values[1:]) / np.float32(2)).astype(np.float32)


_NF4_MID = _midpoints(NF4_VALUES)
_E2M1_MID = _midpoints(_E2M1)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """Pack 4-bit codes ``0..15`` two per byte along axis 0.

    Args:
      codes: integer array ``(n, ...)`` with even ``n``.

    Returns:
      ``uint8 (n // 2, ...)``: row ``2k`` in the low nibble, ``2k + 1`` in the high one.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = pack_nibbles(jnp.array([[1], [15]]))
      >>> int(p[0, 0]), unpack_nibbles(p).ravel().tolist()
      (241, [1, 15])
    """
    xp = np if isinstance(codes, np.ndarray | list) else jnp  # numpy input: no compilation
    c = xp.asarray(codes).astype(np.uint8)
    if c.shape[0] % 2:
        raise QuantError(f"pack_nibbles needs an even number of rows, got shape {tuple(c.shape)}")
    return jnp.asarray(c[0::2] | (c[1::2] << 4))


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """Unpack two codes per byte along axis 0 (the inverse of :func:`pack_nibbles`).

    Args:
      packed: ``uint8 (n // 2, ...)``.

    Returns:
      ``uint8 (n, ...)`` codes ``0..15``.
    """
    p = jnp.asarray(packed)
    return jnp.stack([p & 15, p >> 4], axis=1).reshape(p.shape[0] * 2, *p.shape[1:])


#: The value of each 4-bit code before scaling.
CODE_VALUES = {
    "int4": np.arange(16, dtype=np.float32) - 8,
    "int4_asym": np.arange(16, dtype=np.float32),
    "nf4": NF4_VALUES,
    "fp4": FP4_VALUES,
}


@functools.cache
def pair_table(fmt: str) -> np.ndarray:
    """``(256, 2)`` float32: the values of the low and high nibble of every byte (4-bit formats)."""
    b = np.arange(256)
    return np.stack([CODE_VALUES[fmt][b & 15], CODE_VALUES[fmt][b >> 4]], axis=1).astype(np.float32)



def check_block(shape, block_size, fmt, where: str) -> int:
    """Return the block size for ``shape`` (``None``: all of ``d_in``), or raise naming ``where``."""
    d_in = shape[0]
    bs = d_in if block_size is None else block_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
        raise QuantError(f"{where}: block_size must be a positive int or None, got {block_size!r}")
    if d_in % bs:
        raise QuantError(
            f"{where}: shape {tuple(shape)} has d_in={d_in} (axis 0), which block_size={bs} does not "
            f"divide. Use a block size that divides {d_in}, block_size=None (one block per output "
            "channel), or leave this weight unquantized."
        )
    if BITS[fmt] == 4 and d_in % 2:
        raise QuantError(f"{where}: shape {tuple(shape)} has an odd d_in={d_in}; 4-bit codes pack two rows per byte")
    return bs


def expand_groups(xp, s2, d_out: int):
    """Second-level scales ``(nb, groups)`` repeated over their DQ_BLOCK columns: ``(nb, d_out)``.

    A broadcast rather than a gather, so it costs the compiled program no index arithmetic.
    """
    nb, g = s2.shape
    return xp.broadcast_to(s2[:, :, None], (nb, g, DQ_BLOCK)).reshape(nb, g * DQ_BLOCK)[:, :d_out]


def _dq_encode(xp, scales):
    nb, d_out = scales.shape
    mean = xp.mean(scales, dtype=np.float32)
    groups = -(-d_out // DQ_BLOCK)
    c = xp.pad(scales - mean, ((0, 0), (0, groups * DQ_BLOCK - d_out))).reshape(nb, groups, DQ_BLOCK)
    s2 = xp.max(xp.abs(c), axis=-1) / np.float32(127.0)
    inv = xp.where(s2 > 0, np.float32(1.0) / xp.where(s2 > 0, s2, np.float32(1.0)), np.float32(0.0))
    codes = xp.clip(xp.round(c * inv[..., None]), -127, 127).astype(np.int8)
    return codes.reshape(nb, groups * DQ_BLOCK)[:, :d_out], s2, mean


def _encode_with(xp, w, fmt: str, bs: int, double_quant: bool):
    """Encode ``w`` with array namespace ``xp``: numpy for concrete weights, jax.numpy under tracing."""
    d_in, d_out = w.shape
    wb = w.astype(np.float32).reshape(d_in // bs, bs, d_out)
    one, zero = np.float32(1.0), np.float32(0.0)
    children = {"offsets": None, "scale_scales": None, "scale_mean": None}
    if fmt == "int4_asym":
        lo = xp.min(wb, axis=1)
        scale = (xp.max(wb, axis=1) - lo) / np.float32(15.0)
        children["offsets"] = lo
    else:
        scale = xp.max(xp.abs(wb), axis=1) / np.float32(_QMAX[fmt])
    if double_quant:
        sc, s2, mean = _dq_encode(xp, scale)
        children.update(scales=sc, scale_scales=s2, scale_mean=mean)
        scale = sc.astype(np.float32) * expand_groups(xp, s2, d_out) + mean  # encode against what decodes
    else:
        children["scales"] = scale
    inv = xp.where(scale != 0, one / xp.where(scale != 0, scale, one), zero)[:, None, :]
    if fmt == "int4_asym":
        y = (wb - children["offsets"][:, None, :]) * inv
        codes = xp.clip(xp.round(y), 0, 15).astype(np.uint8)
    elif fmt in ("int4", "int8"):
        q = _QMAX[fmt]
        codes = xp.clip(xp.round(wb * inv), -q, q)
        codes = (codes + 8).astype(np.uint8) if fmt == "int4" else codes.astype(np.int8)
    elif fmt == "nf4":
        codes = xp.searchsorted(xp.asarray(_NF4_MID), xp.clip(wb * inv, -one, one)).astype(np.uint8)
    else:  # fp4: nearest E2M1 magnitude, sign in bit 3 (never a negative zero)
        y = wb * inv
        mag = xp.searchsorted(xp.asarray(_E2M1_MID), xp.minimum(xp.abs(y), np.float32(6.0))).astype(np.uint8)
        codes = xp.where((y < 0) & (mag > 0), mag | 8, mag).astype(np.uint8)
    codes = codes.reshape(d_in, d_out)
    children["codes"] = pack_nibbles(codes) if BITS[fmt] == 4 else codes
    return children


def _nonfinite_counts(xp, w):
    return xp.sum(xp.isnan(w)), xp.sum(xp.isinf(w))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _encode_jit(w, fmt: str, bs: int, double_quant: bool):
    return _encode_with(jnp, w, fmt, bs, double_quant), _nonfinite_counts(jnp, w)


def encode(w, fmt: str, bs: int, double_quant: bool):
    """Quantization codes and scales of a 2-D weight.

    Concrete weights are encoded with numpy on the host: eager quantization then
    leaves no compiled XLA programs behind (XLA:CPU keeps a few MB resident per
    compiled program, per weight shape, for the life of the process). Under
    tracing the same code runs in jax.numpy.
    """
    if not is_concrete(w):
        return _encode_jit(w, fmt, bs, double_quant)
    w_np = np.asarray(w)
    if w_np.dtype not in (np.float32, np.float64, np.float16):
        w_np = w_np.astype(np.float32)  # bfloat16 and other ml_dtypes
    counts = _nonfinite_counts(np, w_np)
    if counts[0] or counts[1]:
        return {}, counts  # the caller raises, naming the weight
    children = _encode_with(np, w_np, fmt, bs, double_quant)
    return {k: None if v is None else jnp.asarray(v) for k, v in children.items()}, counts


def is_concrete(x: Any) -> bool:
    """True unless ``x`` is a tracer (inside ``jit``, ``grad``, ``eval_shape``)."""
    return not isinstance(x, jax.core.Tracer)

