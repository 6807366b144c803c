"""Storage accounting of a params tree: :class:`Footprint` and :func:`footprint`."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np

from lora_jax.quant.qtensor import QTensor, nbytes_of

PyTree = Any


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
            const += nbytes_of(x.scale_mean)
            continue
        dt = getattr(x, "dtype", None)
        if dt is None:
            x = np.asarray(x)
            dt = x.dtype
        if jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):
            continue  # dropout keys are not parameters
        n += math.prod(np.shape(x))
        nbytes += nbytes_of(x)
    return Footprint(n, nbytes, const)
