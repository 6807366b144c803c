"""Quantized base weights: :class:`QTensor`, the codecs, double quantization.

The package holds one concept per module: :mod:`~lora_jax.quant.codecs` (format
tables, nibble packing, encoding), :mod:`~lora_jax.quant.qtensor` (the leaf,
dequantization, :func:`from_codes`), :mod:`~lora_jax.quant.rules` (:class:`QuantRule`,
:func:`quantize`, :func:`quantize_weight`) and :mod:`~lora_jax.quant.footprint`.
The custom VJPs live in :mod:`lora_jax._kernels`. Every name is re-exported here.

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

from lora_jax._kernels import qlora_matmul
from lora_jax.quant.codecs import BITS, DQ_BLOCK, FORMATS, FP4_VALUES, NF4_VALUES, pack_nibbles, unpack_nibbles
from lora_jax.quant.footprint import Footprint, footprint
from lora_jax.quant.qtensor import QTensor, from_codes
from lora_jax.quant.rules import QuantRule, quantize, quantize_weight

__all__ = [
    "BITS",
    "DQ_BLOCK",
    "FORMATS",
    "FP4_VALUES",
    "NF4_VALUES",
    "Footprint",
    "QTensor",
    "QuantRule",
    "footprint",
    "from_codes",
    "pack_nibbles",
    "qlora_matmul",
    "quantize",
    "quantize_weight",
    "unpack_nibbles",
]
