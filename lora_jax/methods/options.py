"""The options of each adapter method (``lora.method`` and the keys that belong to it); no JAX.

:func:`option_errors` is the config check: an option set for a method that does
not take it is an error naming the method that does.

Examples:
  >>> from lora_jax.config import LoraConfig
  >>> option_errors(LoraConfig(method="dora"))
  []
  >>> OPTIONS["pissa"]
  ('pissa_niter',)
"""

from __future__ import annotations

from typing import Any

#: The config keys (under ``lora.``) each method takes, besides rank, alpha, dropout, rslora, init and targets.
OPTIONS: dict[str, tuple[str, ...]] = {
    "lora": (),
    "dora": (),
    "pissa": ("pissa_niter",),
    "olora": (),
    "loftq": ("loftq_iter",),
    "vera": ("vera_d_initial",),
    "eva": ("eva_batches", "eva_rho"),
}

#: Methods that only make sense on a quantized base (experiment ``method: qlora``).
NEEDS_QUANT = ("loftq",)


def option_errors(lora_cfg: Any) -> list[str]:
    """The complaints about ``lora.method``'s options in a ``lora:`` section (empty when it is consistent)."""
    method = lora_cfg.method
    errors = []
    for m, keys in OPTIONS.items():
        for key in keys:
            if m != method and getattr(lora_cfg, key) is not None:
                errors.append(
                    f"lora.{key}: an option of lora.method={m}, but lora.method is {method} "
                    f"(got {getattr(lora_cfg, key)!r}); remove it or set lora.method: {m}"
                )
    return errors
