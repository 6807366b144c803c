"""Quantized base weights: :class:`QTensor`, the codecs, double quantization.

A quantized leaf stands for a frozen kernel ``W`` of shape ``(d_in, d_out)``
(stored as in Flax). ``W`` is cut into blocks of ``block_size`` consecutive
*input* rows per output column (axis 0), and each block keeps one fp32 scale:

=============  ==========================================  ==========================
format         value of a code ``c`` in a block             codes written by quantize
=============  ==========================================  ==========================
``int4``       ``c * scale``, ``scale = absmax / 7``         -7..7 (-8 is valid, e.g.
                                                             llama.cpp Q4_0 via
                                                             :func:`from_codes`)
``int4_asym``  ``c * scale + minimum`` (llama.cpp Q4_1)      0..15
``nf4``        ``NF4_VALUES[c] * absmax`` (QLoRA)            0..15 (index into table)
``fp4``        ``FP4_VALUES[c] * absmax / 6`` (E2M1)         0..15 (sign, 2 exp, 1 man)
``int8``       ``c * scale``, ``scale = absmax / 127``       -127..127 (-128 is valid)
=============  ==========================================  ==========================

Layout (every child is an ordinary array, so a ``NamedSharding`` can split it):

* ``codes``: 4-bit formats pack two codes per byte along axis 0,
  ``uint8 (d_in // 2, d_out)``; the low nibble is row ``2k``, the high nibble
  row ``2k + 1`` (``int4`` stores ``c + 8``). ``int8`` keeps ``int8 (d_in, d_out)``.
* ``scales``: ``float32 (d_in // block_size, d_out)``; with double quantization
  ``int8`` codes of the same shape.
* ``offsets``: ``float32``, same shape, the block minimum (``int4_asym`` only).
* double quantization (QLoRA): the fp32 scales minus their mean are quantized
  to int8, absmax over groups of :data:`DQ_BLOCK` = 256 consecutive scales along
  ``d_out``; ``scale_scales`` ``float32 (d_in // block_size, ceil(d_out / 256))``
  and the per-tensor ``scale_mean`` (0-d ``float32``) restore them.

A dimension the block size does not divide is rejected (no hidden padding);
``block_size=None`` gives one block per output channel. Dequantization happens
where the leaf is used (``x @ q``, ``q[ids]``, :func:`lora_jax.lora.dense`),
inside the jit-compiled step that takes the leaf as an argument; ``x @ q`` has a
custom VJP whose residual is the packed leaf, so the backward pass dequantizes
again instead of keeping dense weights alive between layers. A LoRA weight on
a quantized base (QLoRA) runs base and adapter as one op,
:func:`qlora_matmul`, with the same recomputing backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths

PyTree = Any

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
_F32 = jnp.float32


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
        raise ValueError(f"pack_nibbles needs an even number of rows, got shape {tuple(c.shape)}")
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


# The value of each 4-bit code before scaling.
_CODE_VALUES = {
    "int4": np.arange(16, dtype=np.float32) - 8,
    "int4_asym": np.arange(16, dtype=np.float32),
    "nf4": NF4_VALUES,
    "fp4": FP4_VALUES,
}


@functools.cache
def _pair_table(fmt: str) -> np.ndarray:
    """``(256, 2)`` float32: the values of the low and high nibble of every byte (4-bit formats)."""
    b = np.arange(256)
    return np.stack([_CODE_VALUES[fmt][b & 15], _CODE_VALUES[fmt][b >> 4]], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------
# QTensor


def _shape(x: Any) -> tuple[int, ...] | None:
    s = getattr(x, "shape", None)
    return None if s is None else tuple(s)


def _dtype(x: Any):
    d = getattr(x, "dtype", None)
    return None if d is None else np.dtype(d)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class QTensor:
    """A frozen 2-D weight stored as block-quantized codes (see the module docstring).

    It behaves like the weight it replaces in model code: ``x @ q`` (dequantize,
    then matmul, with a memory-lean VJP), ``q[ids]`` (dequantizes only the
    gathered rows), ``q.T``, ``.shape``, ``.dtype`` (the compute dtype).

    Attributes:
      codes: packed codes (``uint8 (d_in // 2, d_out)``; ``int8 (d_in, d_out)`` for int8).
      scales: ``float32 (d_in // block_size, d_out)``, or ``int8`` with double quantization.
      offsets: block minimum for ``int4_asym``, else ``None``.
      scale_scales: second-level scales ``(d_in // block_size, ceil(d_out / 256))`` or ``None``.
      scale_mean: 0-d mean added back to double-quantized scales, or ``None``.
      format: static; one of :data:`FORMATS`.
      block_size: static; input rows per block.
      stored_shape: static ``(d_in, d_out)`` of the stored kernel.
      compute_dtype: static dtype that :meth:`dequantize` returns.
      transposed: static; the logical weight is the stored kernel transposed.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> q = quantize_weight(jax.random.normal(jax.random.key(0), (128, 32)), "nf4")
      >>> q
      QTensor(nf4, shape=(128, 32), block_size=64, double_quant=False, dtype=float32)
      >>> (jnp.ones((2, 128)) @ q).shape, q[jnp.array([0, 5])].shape, q.T.shape
      ((2, 32), (2, 32), (32, 128))
    """

    codes: Any
    scales: Any
    offsets: Any = None
    scale_scales: Any = None
    scale_mean: Any = None
    format: str = "nf4"
    block_size: int = 64
    stored_shape: tuple[int, int] = (0, 0)
    compute_dtype: Any = np.dtype(np.float32)
    transposed: bool = False

    __array_ufunc__ = None  # numpy defers ``np_array @ q`` to ``__rmatmul__``
    _CHILDREN = ("codes", "scales", "offsets", "scale_scales", "scale_mean")
    _AUX = ("format", "block_size", "stored_shape", "compute_dtype", "transposed")

    def __post_init__(self):
        object.__setattr__(self, "compute_dtype", np.dtype(self.compute_dtype))
        object.__setattr__(self, "stored_shape", tuple(int(d) for d in self.stored_shape))
        self.validate()

    # -- pytree protocol --------------------------------------------------
    def tree_flatten_with_keys(self):
        k = jax.tree_util.GetAttrKey
        children = tuple((k(n), getattr(self, n)) for n in self._CHILDREN)
        return children, tuple(getattr(self, n) for n in self._AUX)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)  # no validation: transformations pass placeholders
        for name, value in zip(cls._CHILDREN + cls._AUX, tuple(children) + tuple(aux), strict=True):
            object.__setattr__(obj, name, value)
        return obj

    # -- checks -------------------------------------------------------------
    def expected_children(self) -> dict[str, tuple[tuple[int, ...], np.dtype] | None]:
        """Return the ``(shape, dtype)`` each child must have (``None``: must be absent)."""
        d_in, d_out = self.stored_shape
        nb = d_in // self.block_size
        four = BITS[self.format] == 4
        dq = self.double_quant
        f32 = np.dtype(np.float32)
        return {
            "codes": ((d_in // 2, d_out), np.dtype(np.uint8)) if four else ((d_in, d_out), np.dtype(np.int8)),
            "scales": ((nb, d_out), np.dtype(np.int8) if dq else f32),
            "offsets": ((nb, d_out), f32) if self.format == "int4_asym" else None,
            "scale_scales": ((nb, -(-d_out // DQ_BLOCK)), f32) if dq else None,
            "scale_mean": ((), f32) if dq else None,
        }

    def validate(self) -> None:
        """Check the static fields and that every child has its expected shape and dtype.

        Raises:
          ValueError: the message lists every child's shape next to the expected one.
        """
        if self.format not in FORMATS:
            raise ValueError(f"QTensor format must be one of {FORMATS}, got {self.format!r}")
        if len(self.stored_shape) != 2:
            raise ValueError(f"QTensor stores a 2-D kernel (d_in, d_out), got stored_shape {self.stored_shape}")
        d_in, d_out = self.stored_shape
        bs = self.block_size
        if not isinstance(bs, int) or bs <= 0 or d_in % bs:
            raise ValueError(f"QTensor block_size={bs!r} must be a positive int dividing d_in={d_in}")
        if BITS[self.format] == 4 and d_in % 2:
            raise ValueError(f"4-bit QTensor needs an even d_in to pack two codes per byte, got {d_in}")
        if not jnp.issubdtype(self.compute_dtype, jnp.floating):
            raise ValueError(f"QTensor compute dtype must be floating, got {self.compute_dtype}")
        expected = self.expected_children()
        bad = False
        for name, exp in expected.items():
            child = getattr(self, name)
            if exp is None:
                bad |= child is not None
            elif child is None or _shape(child) != exp[0] or _dtype(child) != exp[1]:
                bad = True
        if bad:
            rows = []
            for name, exp in expected.items():
                child = getattr(self, name)
                got = "None" if child is None else f"{_shape(child)} {_dtype(child)}"
                want = "None" if exp is None else f"{exp[0]} {exp[1]}"
                mark = "" if got == want else "   <-- mismatch"
                rows.append(f"  {name:13s} got {got:28s} expected {want}{mark}")
            raise ValueError(
                f"QTensor children disagree with format={self.format!r}, block_size={bs}, "
                f"stored_shape={self.stored_shape}:\n" + "\n".join(rows)
            )

    # -- array-like surface -----------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.scale_mean is not None or self.scale_scales is not None

    @property
    def shape(self) -> tuple[int, int]:
        d_in, d_out = self.stored_shape
        return (d_out, d_in) if self.transposed else (d_in, d_out)

    @property
    def dtype(self) -> np.dtype:
        return self.compute_dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return math.prod(self.stored_shape)

    @property
    def nbytes(self) -> int:
        """Bytes of all children (codes, scales and the rest), i.e. the stored size."""
        return sum(_nbytes(getattr(self, n)) for n in self._CHILDREN)

    @property
    def T(self) -> QTensor:
        """The transposed weight (a flag; nothing is moved)."""
        return dataclasses.replace(self, transposed=not self.transposed)

    def __repr__(self) -> str:
        return (
            f"QTensor({self.format}, shape={self.shape}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}, dtype={self.dtype}{', transposed' if self.transposed else ''})"
        )

    # -- decoding ---------------------------------------------------------------
    def _values(self, nib: jax.Array) -> jax.Array:
        """Code values before scaling, float32."""
        if self.format == "int4":
            return nib.astype(_F32) - 8.0
        if self.format in ("int4_asym", "int8"):
            return nib.astype(_F32)
        return jnp.asarray(_CODE_VALUES[self.format])[nib]

    def _block_params(self, rows=None, cols=None):
        """Float32 first-level scales (and offsets) at block rows ``rows`` / columns ``cols``."""

        def take(a):
            if rows is not None:
                a = a[rows]
            return a if cols is None else a[:, cols]

        s = take(self.scales)
        if self.double_quant:
            s2 = self.scale_scales if rows is None else self.scale_scales[rows]
            s2 = _expand_groups(jnp, s2, self.stored_shape[1]) if cols is None else s2[:, cols // DQ_BLOCK]
            s = s.astype(_F32) * s2 + self.scale_mean
        return s, (None if self.offsets is None else take(self.offsets))

    def _decode_columns(self, cols=None) -> jax.Array:
        """The stored kernel (or its columns ``cols``) as float32 ``(d_in, n)``."""
        d_in = self.stored_shape[0]
        codes = self.codes if cols is None else self.codes[:, cols]
        if BITS[self.format] == 4:
            # One lookup per byte gives both rows' values: fewer ops than unpacking the
            # nibbles and looking each up (a smaller compiled program per weight).
            # uint8 codes index the 256-row table directly (always in bounds, no int32 copy).
            dnums = jax.lax.GatherDimensionNumbers(offset_dims=(2,), collapsed_slice_dims=(0,), start_index_map=(0,))
            pairs = jax.lax.gather(jnp.asarray(_pair_table(self.format)), codes[..., None], dnums, (1, 2),
                                   mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)  # (d_in/2, n, 2)
            v = jnp.swapaxes(pairs, 1, 2).reshape(d_in, codes.shape[1])
        else:
            v = self._values(codes)
        n = v.shape[1]
        s, off = self._block_params(cols=cols)
        y = v.reshape(d_in // self.block_size, self.block_size, n) * s[:, None, :]
        if off is not None:
            y = y + off[:, None, :]
        return y.reshape(d_in, n)

    def _decode_rows(self, rows: jax.Array) -> jax.Array:
        """Stored rows ``rows`` (1-D int) as float32 ``(len(rows), d_out)``."""
        if BITS[self.format] == 4:
            shift = ((rows % 2) * 4).astype(jnp.uint8)[:, None]
            nib = (self.codes[rows // 2] >> shift) & 15
        else:
            nib = self.codes[rows]
        s, off = self._block_params(rows=rows // self.block_size)
        y = self._values(nib) * s
        return y if off is None else y + off

    def dequantize(self) -> jax.Array:
        """Return the dense weight in the logical shape and the compute dtype."""
        return _dequantize(self)

    def __rmatmul__(self, x):
        return _qmatmul(np.dtype(jnp.result_type(x)), x, self)

    def adapted_matmul(self, x, x_adapter, a, b, scale: float):
        """``x @ W + ((x_adapter @ A) * scale) @ B`` as one op (see :func:`qlora_matmul`)."""
        return qlora_matmul(x, x_adapter, self, a, b, scale)

    def __getitem__(self, idx):
        """Gather rows of the logical weight (embedding lookup), dequantizing only those rows.

        Integer indices (int or int array of any shape) gather along axis 0 and
        give ``(*idx.shape, shape[1])``; any other index dequantizes everything.
        """
        if isinstance(idx, tuple | slice) or idx is None or idx is Ellipsis:
            return self.dequantize()[idx]
        ids = jnp.asarray(idx)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            return self.dequantize()[idx]
        return _gather_rows(self, ids)


@jax.jit  # one compiled program per layout when called eagerly; inlined under an outer jit
def _dequantize(q: QTensor) -> jax.Array:
    w = q._decode_columns().astype(q.dtype)
    return w.T if q.transposed else w


@jax.jit
def _gather_rows(q: QTensor, ids: jax.Array) -> jax.Array:
    flat = ids.reshape(-1)
    flat = jnp.where(flat < 0, flat + q.shape[0], flat)
    out = q._decode_columns(flat).T if q.transposed else q._decode_rows(flat)
    return out.astype(q.dtype).reshape(*ids.shape, q.shape[1])


def _nbytes(x: Any) -> int:
    if x is None:
        return 0
    return math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize


def _zero_of(x) -> jax.Array:
    """An exact float32 zero that XLA cannot prove constant: ``x0 > inf`` is false for every value, NaN included."""
    return (x.reshape(-1)[0] > jnp.inf).astype(_F32)


def _plus(q, zero):
    """``q`` with ``zero`` added to its scales: the same values, now data-dependent on ``zero``."""
    if q.double_quant:
        return dataclasses.replace(q, scale_mean=q.scale_mean + zero)
    return dataclasses.replace(q, scales=q.scales + zero)


def _matmul_late(x, q, after=None):
    """``x @ dequantize(q)`` with the dequantization scheduled after ``after`` (default ``x``) exists.

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
    return x @ q.dequantize()


def _for_dtype(q, dtype):
    return dataclasses.replace(q, compute_dtype=dtype) if q.dtype != dtype else q


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qmatmul(x_dtype, x, q):
    return _matmul_late(x, q)


def _qmatmul_fwd(x_dtype, x, q):
    return _matmul_late(x, q), q  # residual: the packed leaf, not the dense weight


def _qmatmul_bwd(x_dtype, q, g):
    dx = _matmul_late(g, _for_dtype(q.T, g.dtype))
    return dx.astype(x_dtype), None  # None: zero cotangents (float0 for integer codes)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def qlora_matmul(x, x_adapter, q, a, b, scale: float):
    """``x @ dequantize(q) + ((x_adapter @ A) * scale) @ B`` for 2-D ``x``: a QLoRA layer.

    What :class:`lora_jax.lora.LoraWeight` computes for a quantized base. One
    custom VJP for both paths lets each dequantization be ordered after a
    product of the adapter (``x_adapter @ A`` forward, its input gradient
    backward), a dot output XLA keeps in memory anyway, rather than after ``x`` or the
    output gradient, whose elementwise producers XLA would otherwise recompute
    inside every dequantization and split into extra kernels (a smaller
    compiled step: fewer instructions held in memory). ``x_adapter`` is
    ``x`` after adapter dropout (``x`` itself without it). The backward pass
    re-dequantizes ``q`` instead of keeping the dense weight.
    """
    return _qlora(np.dtype(x.dtype), float(scale), x, x_adapter, q, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _qlora(x_dtype, scale, x, xa, q, a, b):
    return _qlora_fwd(x_dtype, scale, x, xa, q, a, b)[0]


def _qlora_fwd(x_dtype, scale, x, xa, q, a, b):
    delta, res = _lora._low_rank_fwd(xa, a, b, scale)
    h = res[-1]  # (xa @ A) * scale
    return _matmul_late(x, q, after=h) + delta, (res, q)


def _qlora_bwd(x_dtype, scale, residuals, g):
    res, q = residuals
    dxa, da, db = _lora._low_rank_bwd(scale, res, g)  # the adapter's backward, as for a dense base
    dx = _matmul_late(g, _for_dtype(q.T, g.dtype), after=dxa)  # dxa = (g @ B^T * s) @ A^T, a dot output
    return dx.astype(x_dtype), dxa, None, da, db


_qlora.defvjp(_qlora_fwd, _qlora_bwd)


# ----------------------------------------------------------------------------
# Encoding


def _check_block(shape, block_size, fmt, where: str) -> int:
    d_in = shape[0]
    bs = d_in if block_size is None else block_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
        raise ValueError(f"{where}: block_size must be a positive int or None, got {block_size!r}")
    if d_in % bs:
        raise ValueError(
            f"{where}: shape {tuple(shape)} has d_in={d_in} (axis 0), which block_size={bs} does not "
            f"divide. Use a block size that divides {d_in}, block_size=None (one block per output "
            "channel), or leave this weight unquantized."
        )
    if BITS[fmt] == 4 and d_in % 2:
        raise ValueError(f"{where}: shape {tuple(shape)} has an odd d_in={d_in}; 4-bit codes pack two rows per byte")
    return bs


def _expand_groups(xp, s2, d_out: int):
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
        scale = sc.astype(np.float32) * _expand_groups(xp, s2, d_out) + mean  # encode against what decodes
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


def _encode(w, fmt: str, bs: int, double_quant: bool):
    """Quantization codes and scales of a 2-D weight.

    Concrete weights are encoded with numpy on the host: eager quantization then
    leaves no compiled XLA programs behind (XLA:CPU keeps a few MB resident per
    compiled program, per weight shape, for the life of the process). Under
    tracing the same code runs in jax.numpy.
    """
    if not _is_concrete(w):
        return _encode_jit(w, fmt, bs, double_quant)
    w_np = np.asarray(w)
    if w_np.dtype not in (np.float32, np.float64, np.float16):
        w_np = w_np.astype(np.float32)  # bfloat16 and other ml_dtypes
    counts = _nonfinite_counts(np, w_np)
    if counts[0] or counts[1]:
        return {}, counts  # the caller raises, naming the weight
    children = _encode_with(np, w_np, fmt, bs, double_quant)
    return {k: None if v is None else jnp.asarray(v) for k, v in children.items()}, counts


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _quantize(w, fmt, block_size, double_quant, dtype, where: str) -> QTensor:
    if fmt not in FORMATS:
        raise ValueError(f"{where}: format must be one of {FORMATS}, got {fmt!r}")
    shape = _shape(w)
    if shape is None or len(shape) != 2:
        raise ValueError(
            f"{where}: only 2-D kernels (d_in, d_out) can be quantized, got shape {shape}; "
            "narrow the rule's pattern (e.g. end it in 'kernel')"
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{where}: only float weights can be quantized, got dtype {w.dtype}")
    bs = _check_block(shape, block_size, fmt, where)
    dtype = np.dtype(w.dtype if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{where}: compute dtype must be floating (float32, bfloat16), got {dtype}")
    ch, (n_nan, n_inf) = _encode(w, fmt, bs, bool(double_quant))
    if _is_concrete(n_nan) and (int(n_nan) or int(n_inf)):
        raise ValueError(
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
      ValueError: not 2-D, not float, NaN/inf present, or a block size that does
        not divide the blocked dimension.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(0), (256, 512))
      >>> q = quantize_weight(w, "nf4", double_quant=True)
      >>> footprint(q).bits_per_param
      4.126953125
      >>> err = jnp.mean((q.dequantize() - w) ** 2) / jnp.mean(w**2)
      >>> bool(err < 0.01)
      True
    """
    if block_axis not in (0, 1):
        raise ValueError(f"quantize_weight: block_axis must be 0 or 1, got {block_axis!r}")
    if block_axis == 1:
        return quantize_weight(w.T, format, block_size=block_size, double_quant=double_quant, dtype=dtype).T
    return _quantize(w, format, block_size, double_quant, dtype, "quantize_weight")


def from_codes(
    fmt: str,
    codes: Any,
    scales: Any,
    *,
    offsets: Any = None,
    block_size: int,
    dtype: Any = jnp.float32,
) -> QTensor:
    """Build a :class:`QTensor` from unpacked integer codes (exact import, e.g. GGUF).

    The dequantized weight is exactly ``codes * scales (+ offsets)`` in float32,
    each scale (and offset) applied to its block of ``block_size`` rows. For
    llama.cpp: Q4_0 ``x = d * (q - 8)`` is ``int4`` with code ``q - 8``; Q4_1
    ``x = d * q + m`` is ``int4_asym`` with ``offsets = m``; Q8_0 ``x = d * q``
    is ``int8``. llama.cpp blocks run along a row of the ``(out, in)`` matrix, so
    pass the transposed codes (``(in, out)``) and scales. For a table whose rows
    are looked up (``token_embd``, ``(vocab, d)`` with blocks along ``d``), build
    the ``(d, vocab)`` kernel and take ``.T``: ``q.T[ids]`` then gathers columns.

    Args:
      fmt: one of :data:`FORMATS`.
      codes: integers of the logical shape ``(d_in, d_out)``: int4 ``-8..7``,
        int4_asym ``0..15``, nf4/fp4 ``0..15`` (index into :data:`NF4_VALUES` /
        :data:`FP4_VALUES`), int8 ``-128..127``.
      scales: ``(d_in // block_size, d_out)``, exactly representable in float32.
      offsets: ``int4_asym`` only: the per-block minimum, shape as ``scales``.
      block_size: rows per block.
      dtype: compute dtype.

    Returns:
      The quantized weight.

    Raises:
      ValueError: codes out of range (when concrete), shapes that disagree, or
        ``offsets`` given / missing for the wrong format.

    Examples:
      >>> import numpy as np
      >>> q = from_codes("int4_asym", np.full((32, 2), 3), np.array([[0.5, 2.0]]),
      ...                offsets=np.array([[-1.0, 1.0]]), block_size=32)
      >>> q.dequantize()[0].tolist()
      [0.5, 7.0]
    """
    if fmt not in FORMATS:
        raise ValueError(f"from_codes: fmt must be one of {FORMATS}, got {fmt!r}")
    xp = np if _is_concrete(codes) else jnp  # concrete codes (a file loader): numpy, no compilation
    c = xp.asarray(codes)
    where = f"from_codes({fmt!r})"
    if c.ndim != 2 or not jnp.issubdtype(c.dtype, jnp.integer):
        raise ValueError(f"{where}: codes must be a 2-D integer array (d_in, d_out), got {c.dtype} {tuple(c.shape)}")
    bs = _check_block(c.shape, block_size, fmt, where)
    lo, hi = {"int4": (-8, 7), "int8": (-128, 127)}.get(fmt, (0, 15))
    if xp is np and c.size:
        cmin, cmax = int(c.min()), int(c.max())
        if cmin < lo or cmax > hi:
            raise ValueError(f"{where}: codes must lie in {lo}..{hi}, got values in {cmin}..{cmax}")
    if (offsets is None) == (fmt == "int4_asym"):
        raise ValueError(f"{where}: offsets are required for 'int4_asym' and not allowed otherwise")
    c32 = c.astype(np.int32)
    if fmt == "int8":
        packed = jnp.asarray(c32.astype(np.int8))
    else:
        packed = pack_nibbles(c32 + 8 if fmt == "int4" else c32)
    expected = (c.shape[0] // bs, c.shape[1])
    arrays = {"scales": scales, "offsets": offsets}
    for name, a in arrays.items():
        if a is not None:
            arrays[name] = a = jnp.asarray(xp.asarray(a).astype(np.float32))
            if tuple(a.shape) != expected:
                raise ValueError(
                    f"{where}: {name} must have shape (d_in // block_size, d_out) = {expected} for codes "
                    f"{tuple(c.shape)} and block_size={bs}, got {tuple(a.shape)}"
                )
    return QTensor(
        packed, arrays["scales"], arrays["offsets"], format=fmt, block_size=bs,
        stored_shape=tuple(c.shape), compute_dtype=dtype,
    )  # fmt: skip


# ----------------------------------------------------------------------------
# Rules over a params tree


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
            raise ValueError(f"QuantRule({self.pattern!r}): format must be one of {FORMATS}, got {self.format!r}")
        bs = self.block_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0):
            raise ValueError(f"QuantRule({self.pattern!r}): block_size must be a positive int or None, got {bs!r}")
        if self.dtype is not None and not jnp.issubdtype(np.dtype(self.dtype), jnp.floating):
            raise ValueError(f"QuantRule({self.pattern!r}): dtype must be a float dtype, got {self.dtype!r}")
        if self.block_axis not in (0, 1):
            raise ValueError(f"QuantRule({self.pattern!r}): block_axis must be 0 or 1, got {self.block_axis!r}")


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
      ValueError: a rule matches nothing, a matched leaf is not a finite 2-D
        float matrix, is already quantized or adapted, or its blocked dimension
        is not divisible by the block size (the message names the path and shape).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = {"mlp": {"kernel": jnp.ones((128, 64)), "bias": jnp.zeros(64)}}
      >>> q = quantize(params, [QuantRule(pattern=".*kernel", double_quant=True)])
      >>> q["mlp"]["kernel"]
      QTensor(nf4, shape=(128, 64), block_size=64, double_quant=True, dtype=float32)
      >>> footprint(q).nbytes  # 4096 B codes, 128 B scale codes, 8 B scale scales, 4 B mean, 256 B bias
      4492
    """
    assigned = _paths.assign_rules(params, rules, is_leaf=_lora.is_node, what="QuantRule", rule_type=QuantRule,
                                   caller="quantize")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_lora.is_node)
    out = []
    for p, w in flat:
        path = _paths.path_str(p)
        rule = assigned.get(path)
        if rule is None:
            out.append(w)
            continue
        where = f"{rule!r} at {path!r}"
        if _lora.is_node(w):
            raise ValueError(
                f"{where}: the leaf is already a {type(w).__name__}; quantize dense weights, "
                "and call quantize before lora.init"
            )
        w = jnp.asarray(w) if not hasattr(w, "dtype") else w
        if rule.block_axis == 1:
            if _shape(w) is None or len(_shape(w)) != 2:
                raise ValueError(f"{where}: only 2-D weights can be quantized, got shape {_shape(w)}")
            q = _quantize(w.T, rule.format, rule.block_size, rule.double_quant, rule.dtype, where + " (block_axis=1)")
            out.append(q.T)
        else:
            out.append(_quantize(w, rule.format, rule.block_size, rule.double_quant, rule.dtype, where))
    return treedef.unflatten(out)


# ----------------------------------------------------------------------------
# Footprint


class Footprint(NamedTuple):
    """Storage of a params tree.

    ``nbytes`` counts every array (dense leaves at their dtype, quantized leaves
    packed, LoRA weights as base + factors). ``bits_per_param`` leaves out the
    per-tensor constants (``constant_bytes``: 4 bytes of ``scale_mean`` per
    double-quantized matrix), so it is the rate that holds for any matrix size:
    NF4 with double quantization at block 64 is ``4 + 8/64 + 32/(64*256) =
    4.126953125`` bits when ``d_out`` is a multiple of 256; without it ``4.5``.
    """

    n_params: int
    nbytes: int
    constant_bytes: int

    @property
    def bits_per_param(self) -> float:
        return 8.0 * (self.nbytes - self.constant_bytes) / self.n_params if self.n_params else 0.0


def footprint(params: PyTree) -> Footprint:
    """Count logical parameters and stored bytes of any params tree (works on ``eval_shape`` output).

    Examples:
      >>> import jax.numpy as jnp
      >>> footprint({"w": jnp.ones((4, 4), jnp.bfloat16)})
      Footprint(n_params=16, nbytes=32, constant_bytes=0)
    """
    n = nbytes = const = 0
    for x in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, QTensor)):
        if isinstance(x, QTensor):
            n += x.size
            nbytes += x.nbytes
            const += _nbytes(x.scale_mean)
            continue
        dt = getattr(x, "dtype", None)
        if dt is None:
            x = np.asarray(x)
            dt = x.dtype
        if jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):
            continue  # dropout keys are not parameters
        n += math.prod(np.shape(x))
        nbytes += _nbytes(x)
    return Footprint(n, nbytes, const)
