"""The errors lora-jax raises for bad input, one class per area.

Every error a user can fix (a config key, a file, a rule, a shape) is a
:class:`LoraJaxError`; its message names the problem and the fix in one
paragraph, and the ``lora-jax`` command prints it without a traceback.
Anything else that escapes is a bug and keeps its traceback.

Each class also derives from the built-in exception that code written before
this hierarchy caught (``ValueError``), so ``except ValueError`` still works.

Examples:
  >>> from lora_jax import errors
  >>> issubclass(errors.ConfigError, errors.LoraJaxError), issubclass(errors.ConfigError, ValueError)
  (True, True)
  >>> str(errors.ConfigError(["lora.rank: must be >= 1 (got 0)"]))
  'lora.rank: must be >= 1 (got 0)'
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "LoraJaxError",
    "ConfigError",
    "RuleError",
    "LoraError",
    "QuantError",
    "CheckpointError",
    "BaseMismatchError",
    "GGUFError",
    "DataError",
    "GenerateError",
    "LockedError",
]


class LoraJaxError(Exception):
    """Base class: a problem with the user's input that the message explains how to fix."""


class ConfigError(LoraJaxError, ValueError):
    """A config problem found before any compute; ``errors`` holds one line per problem.

    Examples:
      >>> print(ConfigError(["lora.rank: must be >= 1 (got 0)", "optim.lr: must be > 0 (got -1)"]))
      2 problems:
        - lora.rank: must be >= 1 (got 0)
        - optim.lr: must be > 0 (got -1)
    """

    SHOWN = 20  # problems listed in the message; ``errors`` keeps them all

    def __init__(self, errors: str | Sequence[str]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            msg = self.errors[0]
        else:
            shown = self.errors[: self.SHOWN]
            msg = f"{len(self.errors)} problems:\n  - " + "\n  - ".join(shown)
            if len(self.errors) > len(shown):
                msg += f"\n  ... and {len(self.errors) - len(shown)} more (fix the ones above first)"
        super().__init__(msg)

    def within(self, where: str) -> ConfigError:
        """The same errors, each prefixed with ``where`` (a file name, a sweep point)."""
        return ConfigError([f"{where}: {e}" for e in self.errors])


class RuleError(LoraJaxError, ValueError):
    """Rules on parameter paths that do not fit the tree (no match, a shadowed rule, a bad pattern)."""


class LoraError(LoraJaxError, ValueError):
    """A LoRA node, rule or factor that cannot be built or used as given (shapes, ranks, misuse as an array)."""


class QuantError(LoraJaxError, ValueError):
    """A weight that cannot be quantized as asked, or a quantized leaf whose codes and scales disagree."""


class CheckpointError(LoraJaxError, ValueError):
    """A file or directory that cannot be loaded as it is (the message names the file and the problem)."""


class BaseMismatchError(CheckpointError):
    """A train checkpoint or adapter written for other base weights than the ones given."""


class GGUFError(CheckpointError):
    """A GGUF file that lora-jax cannot load; the message names the file and the problem."""


class DataError(LoraJaxError, ValueError):
    """A data file that cannot be used; the message names the file and line."""


class GenerateError(LoraJaxError, ValueError):
    """Generation settings or prompts that cannot be decoded (empty prompt, bad temperature or top-p)."""


class LockedError(LoraJaxError, RuntimeError):
    """An output directory that another running ``lora-jax`` process holds (its lock file names it)."""
