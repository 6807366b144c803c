"""``lora.method`` of a run config -> the adapted parameter tree (called by ``runner.build.build_params``).

Each method is an init on the same :class:`~lora_jax.lora.LoraRule` s; the order
of quantizing and adapting depends on the method: LoRA and DoRA adapt the
quantized base (QLoRA, QDoRA), PiSSA and OLoRA move the principal part out of
the float weight and quantize the residual (QPiSSA), LoftQ quantizes inside its
own alternating steps, EVA decomposes the layer inputs of a few training
batches (on the base the adapters go on, quantized for QLoRA).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from lora_jax import lora as _lora
from lora_jax import quant as _quant
from lora_jax.errors import ConfigError
from lora_jax.methods.options import NEEDS_QUANT

__all__ = ["adapt", "check", "check_exportable", "for_saving"]


def check(config: Any) -> None:
    """Raise :class:`ConfigError` when ``lora.method`` does not fit the experiment's ``method``."""
    m = config.lora.method
    if m in NEEDS_QUANT and config.method != "qlora":
        raise ConfigError(
            f"lora.method: {m} initialises the adapter from the quantization error, so it needs method: qlora "
            f"(got method: {config.method}); set method: qlora or another lora.method"
        )


def adapt(
    lora_cfg: Any,
    key: jax.Array,
    params: Any,
    rules: Sequence[_lora.LoraRule],
    quant_rules: Sequence[_quant.QuantRule] | None = None,
    *,
    apply_fn: Any = None,
    batches: Sequence[Any] = (),
    masks: Sequence[Any] | None = None,
) -> Any:
    """Quantize (when ``quant_rules`` is given) and adapt ``params`` with the method of ``lora_cfg``.

    Args:
      lora_cfg: the ``lora:`` section (:class:`lora_jax.config.LoraConfig`): ``method`` and its options.
      key: the PRNG key of the adapters.
      params: the float base.
      rules: the LoRA rules (rank, alpha, targets).
      quant_rules: the quantization rules of a ``qlora`` run, or ``None``.
      apply_fn, batches, masks: ``eva`` only: the forward pass ``apply_fn(params, batch)``, the training batches
        whose layer inputs are decomposed, and their attention masks (:func:`lora_jax.methods.eva.collect_inputs`).
    """
    method = lora_cfg.method
    if method in ("lora", "dora", "vera"):
        if quant_rules:
            params = _quant.quantize(params, quant_rules)
        if method == "lora":
            return _lora.init(key, params, rules)
        if method == "dora":
            from lora_jax.methods import dora

            return dora.init(key, params, rules)
        from lora_jax.methods import vera

        d0 = 0.1 if lora_cfg.vera_d_initial is None else lora_cfg.vera_d_initial
        return vera.init(key, params, rules, d_initial=d0)
    if method == "eva":
        from lora_jax.methods import eva

        if apply_fn is None or not batches:
            raise ConfigError("lora.method: eva initialises A from the layer inputs of training batches, and none "
                              "were given; pass apply_fn and batches (the runner passes the run's first batches)")
        if quant_rules:
            params = _quant.quantize(params, quant_rules)
        targets = [path for path, _ in _lora.nodes(_lora.init(key, params, rules))]
        inputs = eva.collect_inputs(apply_fn, params, batches, targets, masks)
        return eva.init(params, rules, inputs, rho=2.0 if lora_cfg.eva_rho is None else lora_cfg.eva_rho)
    if method in ("pissa", "olora"):
        from lora_jax.methods import pissa

        return pissa.init(key, params, rules, method=method, niter=lora_cfg.pissa_niter, quant_rules=quant_rules)
    if method == "loftq":
        from lora_jax.methods import loftq

        if not quant_rules:
            raise ConfigError("lora.method: loftq needs method: qlora (a quantized base)")
        steps = 1 if lora_cfg.loftq_iter is None else lora_cfg.loftq_iter
        return loftq.init(key, params, rules, quant_rules, steps=steps)
    raise ConfigError(f"lora.method: unknown method {method!r}")  # the config's Literal stops this earlier


def for_saving(lora_cfg: Any, initial: Any, trained: Any, rules: Sequence[_lora.LoraRule]) -> tuple[Any, Any]:
    """``(params, rules)`` to write as a run's adapter folder: one that works on the untouched base where it can.

    PiSSA and OLoRA adapters are converted to plain LoRA of rank ``2r``
    (:func:`lora_jax.methods.pissa.to_plain_lora`; their rules' rank no longer
    describes them, so none are recorded); the others are saved as trained (a
    LoftQ adapter belongs to its LoftQ-quantized base; an EVA adapter's ranks
    differ per layer, so its rules are not recorded either).
    """
    if lora_cfg.method in ("pissa", "olora"):
        from lora_jax.methods import pissa

        return pissa.to_plain_lora(trained, initial), None
    if lora_cfg.method == "vera":  # the same update as a plain LoRA (A * lambda_d, B * lambda_b, scale 1)
        from lora_jax.methods import vera

        return vera.to_plain_lora(trained), None
    if lora_cfg.method == "eva":
        return trained, None
    return trained, rules


def check_exportable(params: Any, fmt: str, *, holds: Sequence[str] = ()) -> None:
    """Raise :class:`LoraError` when ``params`` hold a node of a method the format ``fmt`` cannot hold.

    Args:
      params: adapted params.
      fmt: the format's name, for the message (``"GGUF"``).
      holds: the methods besides plain LoRA the format holds (``("dora",)`` for PEFT).
    """
    from lora_jax.errors import LoraError

    for path, node in _lora.nodes(params):
        kind = "dora" if hasattr(node, "lora_magnitude") else "vera" if hasattr(node, "vera_lambda_d") else "lora"
        if kind != "lora" and kind not in holds:
            fix = ("merge it into the base (lora_jax.lora.merge) and export the merged model" if kind == "dora" else
                   "convert it to plain LoRA first (lora_jax.methods.vera.to_plain_lora)")
            raise LoraError(f"{fmt} cannot hold the {kind.upper()} adapter at {path!r} (its LoRA adapters are A and "
                            f"B only; a server applying it would drop the {kind.upper()} part silently); {fix}")
