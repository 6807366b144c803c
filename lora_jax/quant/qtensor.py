"""The quantized weight leaf :class:`QTensor`: layout checks, dequantization, row gathers, and :func:`from_codes`.

See :mod:`lora_jax.quant` for the formats and the layout of the children.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _kernels
from lora_jax.errors import QuantError
from lora_jax.quant import kquants as _kquants
from lora_jax.quant.codecs import (
    BITS,
    CODE_VALUES,
    DQ_BLOCK,
    FORMATS,
    check_block,
    expand_groups,
    is_concrete,
    pack_nibbles,
)

_F32 = jnp.float32


def shape_of(x: Any) -> tuple[int, ...] | None:
    """``tuple(x.shape)``, or ``None`` for an object without a shape."""
    s = getattr(x, "shape", None)
    return None if s is None else tuple(s)


def dtype_of(x: Any):
    """``np.dtype(x.dtype)``, or ``None`` for an object without a dtype."""
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
      >>> from lora_jax.quant import quantize_weight
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
        if self.format in _kquants.KFORMATS:
            return _kquants.expected_children(self.format, self.stored_shape)
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
          QuantError: the message lists every child's shape next to the expected one.
        """
        if self.format not in FORMATS + _kquants.KFORMATS:
            raise QuantError(f"QTensor format must be one of {FORMATS + _kquants.KFORMATS}, got {self.format!r}")
        if len(self.stored_shape) != 2:
            raise QuantError(f"QTensor stores a 2-D kernel (d_in, d_out), got stored_shape {self.stored_shape}")
        d_in, d_out = self.stored_shape
        bs = self.block_size
        if not isinstance(bs, int) or bs <= 0 or d_in % bs:
            raise QuantError(f"QTensor block_size={bs!r} must be a positive int dividing d_in={d_in}")
        if self.format in _kquants.KFORMATS:
            why = _kquants.check_shape(self.format, self.stored_shape)
            if why or bs != _kquants.SUB[self.format]:
                raise QuantError(f"QTensor {self.format}: {why or f'block_size must be {_kquants.SUB[self.format]}'}")
        elif BITS[self.format] == 4 and d_in % 2:
            raise QuantError(f"4-bit QTensor needs an even d_in to pack two codes per byte, got {d_in}")
        if not jnp.issubdtype(self.compute_dtype, jnp.floating):
            raise QuantError(f"QTensor compute dtype must be floating, got {self.compute_dtype}")
        expected = self.expected_children()
        bad = False
        for name, exp in expected.items():
            child = getattr(self, name)
            if exp is None:
                bad |= child is not None
            elif child is None or shape_of(child) != exp[0] or dtype_of(child) != exp[1]:
                bad = True
        if bad:
            rows = []
            for name, exp in expected.items():
                child = getattr(self, name)
                got = "None" if child is None else f"{shape_of(child)} {dtype_of(child)}"
                want = "None" if exp is None else f"{exp[0]} {exp[1]}"
                mark = "" if got == want else "   <-- mismatch"
                rows.append(f"  {name:13s} got {got:28s} expected {want}{mark}")
            raise QuantError(
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
        """Logical elements, times the leading (layer) axes of stacked children."""
        return math.prod(self.stored_shape) * math.prod(np.shape(self.codes)[:-2])

    @property
    def nbytes(self) -> int:
        """Bytes of all children (codes, scales and the rest), i.e. the stored size."""
        return sum(nbytes_of(getattr(self, n)) for n in self._CHILDREN)

    @property
    def T(self) -> QTensor:
        """The transposed weight (a flag; nothing is moved)."""
        return dataclasses.replace(self, transposed=not self.transposed)

    def __repr__(self) -> str:
        # children that are not arrays (e.g. after jax.tree.map(lambda a: a.shape, params)) are shown
        odd = [(n, getattr(self, n)) for n in self._CHILDREN if getattr(self, n) is not None]
        odd = "".join(f", {n}={v!r}" for n, v in odd if not hasattr(v, "dtype"))
        return (
            f"QTensor({self.format}, shape={self.shape}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}, dtype={self.dtype}{', transposed' if self.transposed else ''}{odd})"
        )

    # -- decoding ---------------------------------------------------------------
    def _values(self, nib: jax.Array) -> jax.Array:
        """Code values before scaling, float32."""
        if self.format == "int4":
            return nib.astype(_F32) - 8.0
        if self.format in ("int4_asym", "int8"):
            return nib.astype(_F32)
        return jnp.asarray(CODE_VALUES[self.format])[nib]

    def _block_params(self, rows=None, cols=None):
        """Float32 first-level scales (and offsets) at block rows ``rows`` / columns ``cols``."""

        def take(a):
            if rows is not None:
                a = a[rows]
            return a if cols is None else a[:, cols]

        s = take(self.scales)
        if self.double_quant:
            s2 = self.scale_scales if rows is None else self.scale_scales[rows]
            s2 = expand_groups(jnp, s2, self.stored_shape[1]) if cols is None else s2[:, cols // DQ_BLOCK]
            s = s.astype(_F32) * s2 + self.scale_mean
        return s, (None if self.offsets is None else take(self.offsets))

    def _decode_columns(self, cols=None) -> jax.Array:
        """The stored kernel (or its columns ``cols``) as float32 ``(d_in, n)``."""
        if self.format in _kquants.KFORMATS:
            return _kquants.decode_columns(self, cols)
        d_in = self.stored_shape[0]
        codes = self.codes if cols is None else self.codes[:, cols]
        if BITS[self.format] == 4:
            # Rows 2k and 2k+1 are byte row k shifted by 0 and 4 bits: a broadcast shift
            # keeps the decode one elementwise loop along d_out (a lookup of byte pairs
            # needed a transpose inside it, about 1.3x slower in bfloat16 on this CPU).
            shift = jnp.array([0, 4], jnp.uint8)[:, None]
            v = self._values((codes[:, None, :] >> shift) & 15).reshape(d_in, codes.shape[1])
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
        if self.format in _kquants.KFORMATS:  # blocks span 256 rows: decode them all
            return _kquants.decode_columns(self)[rows]
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
        return _kernels.qmatmul(x, self)

    def adapted_matmul(self, x, x_adapter, a, b, scale: float, *, custom_vjp: bool = True):
        """``x @ W + ((x_adapter @ A) * scale) @ B`` as one op (see :func:`lora_jax._kernels.qlora_matmul`)."""
        return _kernels.qlora_matmul(x, x_adapter, self, a, b, scale, custom_vjp=custom_vjp)

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


def nbytes_of(x: Any) -> int:
    """Stored bytes of an array (0 for ``None``)."""
    if x is None:
        return 0
    return math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize



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
      QuantError: codes out of range (when concrete), shapes that disagree, or
        ``offsets`` given / missing for the wrong format.

    Examples:
      >>> import numpy as np
      >>> q = from_codes("int4_asym", np.full((32, 2), 3), np.array([[0.5, 2.0]]),
      ...                offsets=np.array([[-1.0, 1.0]]), block_size=32)
      >>> q.dequantize()[0].tolist()
      [0.5, 7.0]
    """
    if fmt not in FORMATS:
        raise QuantError(f"from_codes: fmt must be one of {FORMATS}, got {fmt!r}")
    xp = np if is_concrete(codes) else jnp  # concrete codes (a file loader): numpy, no compilation
    c = xp.asarray(codes)
    where = f"from_codes({fmt!r})"
    if c.ndim != 2 or not jnp.issubdtype(c.dtype, jnp.integer):
        raise QuantError(f"{where}: codes must be a 2-D integer array (d_in, d_out), got {c.dtype} {tuple(c.shape)}")
    bs = check_block(c.shape, block_size, fmt, where)
    lo, hi = {"int4": (-8, 7), "int8": (-128, 127)}.get(fmt, (0, 15))
    if xp is np and c.size:
        cmin, cmax = int(c.min()), int(c.max())
        if cmin < lo or cmax > hi:
            raise QuantError(f"{where}: codes must lie in {lo}..{hi}, got values in {cmin}..{cmax}")
    if (offsets is None) == (fmt == "int4_asym"):
        raise QuantError(f"{where}: offsets are required for 'int4_asym' and not allowed otherwise")
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
                raise QuantError(
                    f"{where}: {name} must have shape (d_in // block_size, d_out) = {expected} for codes "
                    f"{tuple(c.shape)} and block_size={bs}, got {tuple(a.shape)}"
                )
    return QTensor(
        packed, arrays["scales"], arrays["offsets"], format=fmt, block_size=bs,
        stored_shape=tuple(c.shape), compute_dtype=dtype,
    )  # fmt: skip

