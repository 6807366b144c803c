"""LoftQ (Li et al., 2023) for the library's quantizers: a quantized base and an adapter fitted to its error together.

For a float weight ``W`` and ``T`` alternating steps (PEFT's ``loftq_init``,
``peft/utils/loftq_utils.py``)::

    R = W
    repeat T times:
        Q = quantize(R)                      # nf4, fp4, int4, ... as the QuantRule says
        s * A @ B = SVD_r(W - dequantize(Q)) # the best rank-r fit of the quantization error
        R = W - s * A @ B

The node is a plain :class:`~lora_jax.lora.LoraWeight` on ``Q`` (the QLoRA
forward pass), with ``W ~ Q + s * A @ B`` at init instead of ``W ~ Q``. Unlike
PEFT, which sets ``lora_B @ lora_A = L @ R`` whatever ``lora_alpha / r`` is (exact
only when the scale is 1), the scale is divided out here: ``A = U_r sqrt(S_r / s)``,
``B = sqrt(S_r / s) Vh_r``.

:func:`init_with_report` also returns, per matrix, the initial error
``||W - (Q + s A B)||_F / ||W||_F`` next to plain QLoRA's ``||W - quantize(W)||_F / ||W||_F``,
so a user sees whether LoftQ helped before training.

An adapter trained from a LoftQ init is only valid on its base ``Q``, not on ``W``.
:func:`export_peft` writes what PEFT's LoftQ recipe saves: the LoftQ base
(``Q`` dequantized, as ``peft_model.unload().save_pretrained`` writes it) as a
Hugging Face folder, and the adapter as a PEFT folder that names that base.
Our NF4 (blocks of 64 along ``d_in``, no double quantization) is
bitsandbytes' NF4 (blocks of 64 along each torch row): when ``d_in`` is a
multiple of 64, that base loads back in 4 bits as the same ``Q``. PEFT's 8-bit
LoftQ is another quantizer: bitsandbytes' ``Int8Params`` rounds each residual
to float16 before its per-row absmax, while ``int8`` here (one block over
``d_in``) quantizes the float32 residual; at 8 bits that rounding is the size
of the quantization error, so the two fits differ.

Examples:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> w = jnp.asarray(np.random.default_rng(0).normal(size=(128, 32)), jnp.float32)
  >>> m = init_matrix(jax.random.key(0), w, rank=4, scale=2.0, steps=2)
  >>> bool(m.error < m.qlora_error)
  True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora as _lora
from lora_jax import paths as _paths
from lora_jax import quant as _quant
from lora_jax.errors import LoraError
from lora_jax.io import peft as _peft
from lora_jax.io.factors import strip_adapters
from lora_jax.methods.pissa import factors, map_nodes
from lora_jax.models import export_hf as _export_hf

__all__ = ["LoftqMatrix", "export_peft", "init", "init_matrix", "init_with_report", "requantize"]

PyTree = Any


class LoftqMatrix(NamedTuple):
    """One matrix after LoftQ: its quantized base, factors and initial errors (relative Frobenius norms)."""

    q: Any
    a: jax.Array
    b: jax.Array
    error: float  # ||W - (Q + s A B)|| / ||W||
    qlora_error: float  # ||W - quantize(W)|| / ||W||
    step_errors: tuple[float, ...] = ()  # the error after each step (the last one is ``error``)


def requantize(w: jax.Array, like: Any) -> Any:
    """Quantize ``w`` with the settings of the quantized leaf ``like`` (format, block size, double quantization)."""
    return _quant.quantize_weight(w, like.format, block_size=like.block_size, double_quant=like.double_quant,
                                  dtype=like.compute_dtype, block_axis=1 if like.transposed else 0)


def init_matrix(key: jax.Array, w: jax.Array, *, rank: int, scale: float, steps: int = 1, format: str = "nf4",
                block_size: int | None = 64, double_quant: bool = False, like: Any = None) -> LoftqMatrix:
    """LoftQ on one ``(d_in, d_out)`` float matrix; ``like`` (a quantized leaf) overrides the quantizer settings.

    Raises:
      LoraError: ``steps < 1``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LoraError(f"LoftQ: steps (loftq_iter) must be an int >= 1, got {steps!r}")
    w = jnp.asarray(w, jnp.float32)
    settings = (format, block_size, double_quant, None, 0) if like is None else (
        like.format, like.block_size, like.double_quant, np.dtype(like.compute_dtype), 1 if like.transposed else 0)
    norm = float(jnp.linalg.norm(w))
    res, errors = w, []
    for i in range(steps):
        q, a, b, err, q_err = _step(w, res, rank, float(scale), settings)
        if i == 0:
            qlora_error = float(q_err) / norm
        errors.append(float(err) / norm)
        res = w - scale * (a @ b)
    return LoftqMatrix(q, a, b, errors[-1], qlora_error, tuple(errors))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _step(w, res, rank: int, scale: float, settings: tuple):
    """One LoftQ step, compiled once per shape: ``Q = quantize(res)``, ``A, B`` from ``W - Q``, and both errors."""
    fmt, block_size, double_quant, dtype, block_axis = settings
    q = _quant.quantize_weight(res, fmt, block_size=block_size, double_quant=double_quant, dtype=dtype,
                               block_axis=block_axis)
    dq = _lora.dense(q).astype(jnp.float32)
    a, b, err = factors(None, w - dq, rank, scale, "pissa")
    return q, a, b, jnp.linalg.norm(err), jnp.linalg.norm(w - dq)


def init_with_report(
    key: jax.Array,
    params: PyTree,
    rules: Sequence[_lora.LoraRule],
    quant_rules: Sequence[_quant.QuantRule],
    *,
    steps: int = 1,
) -> tuple[PyTree, dict[str, tuple[float, float]]]:
    """:func:`init`, and per adapted matrix ``(loftq_error, qlora_error)`` (relative Frobenius norms)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LoraError(f"LoftQ: steps (loftq_iter) must be an int >= 1, got {steps!r}")
    floats = dict(_paths.leaves_with_paths(params, is_leaf=_lora.is_node))
    adapted = _lora.init(key, _quant.quantize(params, quant_rules), rules)  # QLoRA: the shapes, scales and Q's format
    report: dict[str, tuple[float, float]] = {}

    def fit(path: str, node: _lora.LoraWeight) -> _lora.LoraWeight:
        if not _lora.is_node(node.base):
            raise LoraError(
                f"LoftQ: {path!r} is adapted but not quantized by quant_rules; LoftQ fits the adapter to the "
                "quantization error, so target only quantized weights (or quantize this one too)"
            )
        if np.ndim(node.lora_a) != 2:
            raise LoraError(f"LoftQ: {path!r} is stacked; init the unrolled params and stack after (stack_layers)")
        m = init_matrix(key, floats[path], rank=node.rank, scale=node.scale, steps=steps, like=node.base)
        report[path] = (m.error, m.qlora_error)
        return dataclasses.replace(node, base=m.q, lora_a=m.a.astype(node.lora_a.dtype),
                                   lora_b=m.b.astype(node.lora_b.dtype))

    return map_nodes(adapted, fit), report


def init(key: jax.Array, params: PyTree, rules: Sequence[_lora.LoraRule], quant_rules: Sequence[_quant.QuantRule],
         *, steps: int = 1) -> PyTree:
    """Quantize ``params`` with ``quant_rules`` and adapt them with LoftQ-initialised LoRA weights (``steps`` = T).

    Args:
      key: PRNG key (unused by the full SVD; kept for the init signature).
      params: the float base.
      rules: :class:`~lora_jax.lora.LoraRule` s; every weight they match must also be quantized.
      quant_rules: :class:`~lora_jax.quant.QuantRule` s (any format: nf4, fp4, int4, ...).
      steps: the alternating steps T (PEFT's ``loftq_iter``).

    Raises:
      LoraError: ``steps < 1``, an adapted weight that is not quantized, or stacked params.
    """
    return init_with_report(key, params, rules, quant_rules, steps=steps)[0]


def export_peft(directory: Any, params: PyTree, config: Any, tokenizer: Any = None, *,
                model_kind: str = "llama") -> tuple[Path, Path]:
    """Write a LoftQ run as PEFT's LoftQ recipe saves it: ``directory/base`` and ``directory/adapter``.

    ``base`` is a Hugging Face folder of the model with every quantized weight
    dequantized (the LoftQ base ``Q``; other weights as they are), ``adapter`` a
    PEFT LoRA folder whose ``base_model_name_or_path`` is that folder, so
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)``
    computes what ``params`` computes.

    Args:
      directory: the folder (created if needed).
      params: the LoftQ-initialised (and trained) params: LoRA weights on quantized bases.
      config: the model's config (:func:`lora_jax.models.export_hf.export_merged_hf`).
      tokenizer: saved with the base when given.
      model_kind: ``"llama"`` or ``"bert"``.

    Returns:
      ``(base folder, adapter folder)``.

    Raises:
      CheckpointError: what :func:`~lora_jax.models.export_hf.export_merged_hf` and
        :func:`~lora_jax.io.peft.export_peft` raise (e.g. a node PEFT cannot hold).
    """
    directory = Path(directory)
    base, adapter = directory / "base", directory / "adapter"
    _export_hf.export_merged_hf(base, strip_adapters(params), config, tokenizer)
    _peft.export_peft(adapter, params, base_model_name_or_path=str(base), model_kind=model_kind)
    return base, adapter
