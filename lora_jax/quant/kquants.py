"""llama.cpp's K-quant and 5-bit block formats as :class:`~lora_jax.quant.QTensor` layouts (exact GGUF import).

A GGUF file stores ``Q4_K``, ``Q6_K``, ``Q5_0`` and ``Q5_1`` weights as blocks
of codes with hierarchical scales. :func:`from_gguf_blocks` keeps the file's own
codes and scales (repacked along the kernel's input axis, nothing requantized),
and :func:`decode_columns` dequantizes them inside the jit-compiled step with
the same float32 operations as ``gguf.quants.dequantize``, so the values are
bit-identical. The QTensor children hold, for a kernel ``(d_in, d_out)`` whose
blocks run along ``d_in`` (one column per output):

==========  ==============================  ===============================  ================  ====================
format      value of element ``e``          ``codes`` (uint8)                ``scales``        other children
==========  ==============================  ===============================  ================  ====================
``q4_k``    ``(d*sc) * q - (dmin*m)``       nibbles ``(d_in/2, n)``          ``sc`` uint8 per  ``offsets``: ``m``
            ``q`` 0..15, ``sc, m`` 6-bit                                     32 rows           uint8 per 32 rows;
                                                                                               ``scale_scales``:
                                                                                               ``[d, dmin]`` f16
                                                                                               ``(2, d_in/256, n)``
``q6_k``    ``(d*sc) * (q - 32)``           nibbles ``(d_in/2, n)`` then     ``sc`` int8 per   ``scale_scales``:
            ``q`` 0..63                     2-bit highs ``(d_in/4, n)``      16 rows           ``d`` f16
                                                                                               ``(1, d_in/256, n)``
``q5_0``    ``d * (q - 16)``, ``q`` 0..31   nibbles ``(d_in/2, n)`` then     ``d`` f16 per     --
                                            high bits ``(d_in/8, n)``        32 rows
``q5_1``    ``d * q + m``, ``q`` 0..31      as ``q5_0``                      ``d`` f16 per     ``offsets``: ``m``
                                                                             32 rows           f16 per 32 rows
==========  ==============================  ===============================  ================  ====================

Nibbles pack rows ``2k, 2k+1`` into the low and high half of a byte (as the
4-bit formats); 2-bit highs pack rows ``4k..4k+3`` and single high bits rows
``8k..8k+7`` from the lowest bits up. Every K-format leaf also has a 0-d
float32 ``scale_mean`` equal to zero that is subtracted from the f16 scales: the
dequantizing matmul adds a data-dependent zero there to order the
dequantization (:func:`lora_jax._kernels.matmul_late`); ``x - 0`` is exact.
Stored bits per parameter: ``q4_k`` 4.625, ``q6_k`` 6.5625, ``q5_0`` 5.5,
``q5_1`` 6.0 (:func:`lora_jax.quant.footprint`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.errors import QuantError

KFORMATS = ("q4_k", "q6_k", "q5_0", "q5_1")
"""The QTensor formats of this module (GGUF import only; :func:`lora_jax.quant.quantize` does not write them)."""

GGML_TYPES = {"Q4_K": "q4_k", "Q6_K": "q6_k", "Q5_0": "q5_0", "Q5_1": "q5_1"}
"""ggml type name -> QTensor format."""

SUPER = 256  # elements per K-quant super-block
SUB = {"q4_k": 32, "q6_k": 16, "q5_0": 32, "q5_1": 32}  # rows per (sub-)block scale
BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210, "Q5_0": 22, "Q5_1": 24}
BLOCK_ELEMENTS = {"Q4_K": SUPER, "Q6_K": SUPER, "Q5_0": 32, "Q5_1": 32}
_F32 = jnp.float32


def expected_children(fmt: str, stored_shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], np.dtype] | None]:
    """The ``(shape, dtype)`` of each child of a ``fmt`` leaf storing a ``(d_in, d_out)`` kernel (``None``: absent)."""
    d_in, n = stored_shape
    u8, f16, f32 = np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32)
    nb = d_in // SUB[fmt]
    if fmt == "q4_k":
        return {"codes": ((d_in // 2, n), u8), "scales": ((nb, n), u8), "offsets": ((nb, n), u8),
                "scale_scales": ((2, d_in // SUPER, n), f16), "scale_mean": ((), f32)}
    if fmt == "q6_k":
        return {"codes": ((d_in // 2 + d_in // 4, n), u8), "scales": ((nb, n), np.dtype(np.int8)), "offsets": None,
                "scale_scales": ((1, d_in // SUPER, n), f16), "scale_mean": ((), f32)}
    return {"codes": ((d_in // 2 + d_in // 8, n), u8), "scales": ((nb, n), f16),
            "offsets": ((nb, n), f16) if fmt == "q5_1" else None, "scale_scales": None, "scale_mean": ((), f32)}


def check_shape(fmt: str, stored_shape: tuple[int, int]) -> str | None:
    """Why a ``(d_in, d_out)`` kernel cannot be stored as ``fmt``, or ``None``."""
    d_in = stored_shape[0]
    unit = SUPER if fmt in ("q4_k", "q6_k") else 32
    return None if d_in % unit == 0 else f"{fmt} needs d_in to be a multiple of {unit}, got {d_in}"


# ----------------------------------------------------------------------------
# File blocks -> per-element codes and scales (numpy, on the host)


def _f16(b: np.ndarray, lo: int) -> np.ndarray:
    return np.ascontiguousarray(b[..., lo : lo + 2]).view(np.float16)[..., 0]


def _low_high_nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Bytes ``(..., k*group)`` -> codes ``(..., k*2*group)``: each group's low nibbles, then its high nibbles."""
    g = qs.reshape(*qs.shape[:-1], -1, 1, group) >> np.array([0, 4], np.uint8).reshape(2, 1)
    return (g & 0x0F).reshape(*qs.shape[:-1], -1)


def unpack_file_blocks(raw: np.ndarray, ggml_type: str) -> dict[str, np.ndarray]:
    """Split a GGUF tensor's rows of ``ggml_type`` blocks into per-element codes and per-block scales.

    Args:
      raw: ``uint8 (rows, n_blocks * bytes_per_block)``.
      ggml_type: ``Q4_K``, ``Q6_K``, ``Q5_0`` or ``Q5_1``.

    Returns:
      ``q`` uint8 ``(rows, ne0)`` (element order of the row) and the scales:
      ``Q4_K``: ``d``, ``dmin`` f16 ``(rows, ne0/256)``, ``sc``, ``m`` uint8 ``(rows, ne0/32)``;
      ``Q6_K``: ``d`` f16 ``(rows, ne0/256)``, ``sc`` int8 ``(rows, ne0/16)``;
      ``Q5_0``: ``d``; ``Q5_1``: ``d``, ``m`` f16 ``(rows, ne0/32)``.
    """
    if ggml_type not in BLOCK_BYTES:
        raise QuantError(f"unpack_file_blocks: ggml type {ggml_type!r} is not one of {sorted(BLOCK_BYTES)}")
    rows = raw.shape[0]
    b = np.asarray(raw, np.uint8).reshape(rows, -1, BLOCK_BYTES[ggml_type])
    out: dict[str, np.ndarray] = {}
    if ggml_type == "Q4_K":
        out["d"], out["dmin"] = _f16(b, 0), _f16(b, 2)
        s = b[..., 4:16].reshape(rows, -1, 3, 4)
        d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
        out["sc"] = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1).reshape(rows, -1)
        out["m"] = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1).reshape(rows, -1)
        q = _low_high_nibbles(b[..., 16:], 32)
    elif ggml_type == "Q6_K":
        ql = _low_high_nibbles(b[..., :128], 64).reshape(rows, -1, 8, 32)
        qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
        qh = (qh & 0x03).reshape(rows, -1, 8, 32)
        q = ql | (qh << 4)
        out["sc"] = np.ascontiguousarray(b[..., 192:208]).view(np.int8).reshape(rows, -1)
        out["d"] = _f16(b, 208)
    else:
        out["d"] = _f16(b, 0)
        lo = 4 if ggml_type == "Q5_1" else 2
        if ggml_type == "Q5_1":
            out["m"] = _f16(b, 2)
        qh = np.ascontiguousarray(b[..., lo : lo + 4]).view("<u4")[..., :1] >> np.arange(32, dtype=np.uint32)
        q = _low_high_nibbles(b[..., lo + 4 :], 16) | ((qh & 1).astype(np.uint8) << 4)
    out["q"] = np.asarray(q, np.uint8).reshape(rows, -1)
    return out


def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-wide codes along axis 0, ``8 // bits`` rows per byte, lowest bits first."""
    per = 8 // bits
    c = codes.reshape(-1, per, *codes.shape[1:]).astype(np.uint8)
    out = np.zeros(c[:, 0].shape, np.uint8)
    for j in range(per):
        out |= c[:, j] << np.uint8(j * bits)
    return out


def from_gguf_blocks(raw: np.ndarray, ggml_type: str, permute=None) -> tuple[str, dict[str, Any], int]:
    """The QTensor format, children and block size of a GGUF weight's blocks (the kernel is the transpose).

    Args:
      raw: ``uint8 (d_out, n_blocks * bytes_per_block)``, the file's rows.
      ggml_type: ``Q4_K``, ``Q6_K``, ``Q5_0`` or ``Q5_1``.
      permute: optional function applied to every per-row array (rows are outputs), e.g. a head permutation.

    Returns:
      ``(format, children, block_size)`` for :class:`~lora_jax.quant.QTensor`.
    """
    parts = unpack_file_blocks(raw, ggml_type)
    if permute is not None:
        parts = {k: permute(v) for k, v in parts.items()}
    fmt = GGML_TYPES[ggml_type]
    q = np.ascontiguousarray(parts["q"].T)  # (d_in, d_out)
    low = _pack_bits(q & 0x0F, 4)
    zero = np.zeros((), np.float32)
    t = lambda a: np.ascontiguousarray(a.T)  # noqa: E731
    if fmt == "q4_k":
        ch = {"codes": low, "scales": t(parts["sc"]), "offsets": t(parts["m"]),
              "scale_scales": np.stack([t(parts["d"]), t(parts["dmin"])])}
    elif fmt == "q6_k":
        ch = {"codes": np.concatenate([low, _pack_bits(q >> 4, 2)]), "scales": t(parts["sc"]), "offsets": None,
              "scale_scales": t(parts["d"])[None]}
    else:
        ch = {"codes": np.concatenate([low, _pack_bits(q >> 4, 1)]), "scales": t(parts["d"]),
              "offsets": t(parts["m"]) if fmt == "q5_1" else None, "scale_scales": None}
    ch["scale_mean"] = zero
    return fmt, ch, SUB[fmt]


# ----------------------------------------------------------------------------
# Dequantization (jax.numpy, inside the step)


def _unpack(packed, bits: int, rows: int):
    """Codes ``(rows, n)`` uint8 from ``bits``-wide codes packed along axis 0."""
    shifts = jnp.arange(0, 8, bits, dtype=jnp.uint8)[None, :, None]
    c = (packed[:, None, :] >> shifts) & jnp.uint8((1 << bits) - 1)
    return c.reshape(rows, packed.shape[-1])


def decode_columns(q, cols=None):
    """The stored kernel of a K-format :class:`~lora_jax.quant.QTensor` ``q`` (or columns ``cols``), float32.

    The arithmetic follows ``gguf.quants.dequantize`` operation by operation
    (float32 products of the f16 scales with the integer sub-scales, then with
    the codes), so the values are bit-identical to it.
    """
    d_in = q.stored_shape[0]
    fmt = q.format

    def take(a):
        return a if (a is None or cols is None) else a[..., cols]

    codes = take(q.codes)
    n = codes.shape[-1]
    zero = q.scale_mean
    v = _unpack(codes[: d_in // 2], 4, d_in)
    if fmt == "q6_k":
        v = v | (_unpack(codes[d_in // 2 :], 2, d_in) << 4)
    elif fmt in ("q5_0", "q5_1"):
        v = v | (_unpack(codes[d_in // 2 :], 1, d_in) << 4)
    bs = SUB[fmt]
    per_super = SUPER // bs

    def sup(i):  # f16 super-block scale repeated over its sub-blocks: (d_in / bs, n)
        s = take(q.scale_scales)[i].astype(_F32) - zero
        return jnp.repeat(s, per_super, axis=0)

    if fmt == "q4_k":
        scale = sup(0) * take(q.scales).astype(_F32)
        dmin = sup(1) * take(q.offsets).astype(_F32)
        y = v.astype(_F32).reshape(-1, bs, n) * scale[:, None, :] - dmin[:, None, :]
    elif fmt == "q6_k":
        scale = sup(0) * take(q.scales).astype(_F32)
        y = scale[:, None, :] * (v.astype(jnp.int8) - jnp.int8(32)).astype(_F32).reshape(-1, bs, n)
    else:
        d = take(q.scales).astype(_F32) - zero
        if fmt == "q5_0":
            y = d[:, None, :] * (v.astype(jnp.int8) - jnp.int8(16)).astype(_F32).reshape(-1, bs, n)
        else:
            m = take(q.offsets).astype(_F32) - zero
            y = d[:, None, :] * v.astype(_F32).reshape(-1, bs, n) + m[:, None, :]
    return y.reshape(d_in, n)
