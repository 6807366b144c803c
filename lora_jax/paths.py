"""Key paths, factor names, path rules (:func:`map_rules`, the one rule walk), filters, split / combine.

Every leaf of a parameter pytree has a *path*: its keys joined with ``/``
(``layers/3/attn/q_proj/kernel``). Rules select leaves by matching a regular
expression against that path with :func:`re.fullmatch`; rules are ordered and
the first one that matches a leaf wins. A rule that matches nothing is an error.
LoRA factors sit under the keys :data:`FACTOR_NAMES`, which is what the default
trainable filter of :func:`split` selects.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import jax

from lora_jax.errors import RuleError

PyTree = Any
Filter = Callable[[str, Any], bool]

#: The keys under which an adapter node flattens its trainable children (A, B; DoRA: m; VeRA: its two vectors).
FACTOR_NAMES = ("lora_a", "lora_b", "lora_magnitude", "vera_lambda_d", "vera_lambda_b")


def is_factor_path(path: str) -> bool:
    """True for the path of a LoRA factor (``.../lora_a`` or ``.../lora_b``).

    Examples:
      >>> is_factor_path("layers/0/q_proj/kernel/lora_a"), is_factor_path("layers/0/q_proj/kernel/base")
      (True, False)
    """
    return path.rsplit("/", 1)[-1] in FACTOR_NAMES


def key_to_str(key: Any) -> str:
    """Return the path component of one ``jax.tree_util`` key entry."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """Join a ``jax.tree_util`` key path into a ``/``-separated string.

    Examples:
      >>> import jax
      >>> [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path({"a": [1, 2]})]
      ['a/0', 'a/1']
    """
    return "/".join(key_to_str(k) for k in path)


def leaves_with_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None):
    """Return ``[(path_string, leaf), ...]`` in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), leaf) for p, leaf in flat]


def map_with_path(
    fn: Callable[[str, Any], Any], tree: PyTree, is_leaf: Callable[[Any], bool] | None = None
) -> PyTree:
    """Like ``jax.tree.map`` but ``fn`` receives ``(path_string, leaf)``."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(path_str(p), x), tree, is_leaf=is_leaf
    )


class Rule(Protocol):
    """Anything with a ``pattern`` string: LoRA rules and quantization rules."""

    pattern: str


R = TypeVar("R", bound=Rule)


def _shape_of(x: Any) -> str:
    shape = getattr(x, "shape", None)
    return f" {tuple(shape)}" if shape is not None else ""


def nearby_paths(paths: Sequence[str], pattern: str, n: int = 8) -> list[str]:
    """Paths that look most like ``pattern`` (for error messages)."""
    close = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0)
    return close or list(paths[:n])


def assign_rules(
    tree: PyTree,
    rules: Sequence[R],
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    what: str = "rule",
    rule_type: type | None = None,
    caller: str = "assign_rules",
) -> dict[str, R]:
    """Map each leaf path to the first rule whose pattern fully matches it.

    Args:
      tree: the parameter pytree.
      rules: ordered rules, each with a ``pattern`` attribute (a regex).
      is_leaf: passed to the flattening (to stop at LoRA or quantized nodes).
      what: the word used for a rule in error messages.
      rule_type: when given, every rule must be an instance of it and at least
        one rule is required.
      caller: the function named in those two errors.

    Returns:
      ``{path: rule}`` for every leaf matched by some rule.

    Raises:
      RuleError: a pattern is not a valid regex, or a rule matches no leaf
        (the message names the rule and lists paths of the tree).

    Examples:
      >>> import dataclasses
      >>> @dataclasses.dataclass
      ... class R:
      ...   pattern: str
      >>> tree = {"q": {"kernel": 1}, "k": {"kernel": 2}}
      >>> sorted(assign_rules(tree, [R("q/.*"), R(".*")]).items())
      [('k/kernel', R(pattern='.*')), ('q/kernel', R(pattern='q/.*'))]
    """
    if rule_type is not None:
        name = rule_type.__name__
        if not rules:
            raise RuleError(f"{caller} needs at least one {name}, e.g. [{name}(pattern='.*kernel', ...)]")
        for r in rules:
            if not isinstance(r, rule_type):
                raise TypeError(f"rules must be {name} instances, got {type(r).__name__}: {r!r}")
    compiled = []
    for rule in rules:
        try:
            compiled.append(re.compile(rule.pattern))
        except re.error as e:
            raise RuleError(f"{what} pattern {rule.pattern!r} is not a valid regex: {e}") from e
    leaves = leaves_with_paths(tree, is_leaf=is_leaf)
    paths = [p for p, _ in leaves]
    used = [False] * len(rules)
    out: dict[str, R] = {}
    for path in paths:
        for i, rx in enumerate(compiled):
            if rx.fullmatch(path):
                out[path] = rules[i]
                used[i] = True
                break
    for i, was_used in enumerate(used):
        if not was_used:
            shown = dict(leaves)
            examples = "\n  ".join(
                f"{p}{_shape_of(shown[p])}" for p in nearby_paths(paths, rules[i].pattern)
            )
            shadow = ""
            if any(compiled[i].fullmatch(p) for p in paths):
                shadow = " (every path it matches is taken by an earlier rule: first match wins)"
            raise RuleError(
                f"{what} {rules[i]!r} matches no leaf of the tree{shadow}. "
                f"Patterns are matched with re.fullmatch on '/'-joined paths. "
                f"Paths in the tree include:\n  {examples}"
            )
    return out


def map_rules(
    tree: PyTree,
    rules: Sequence[R],
    fn: Callable[[str, Any, R], Any],
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    what: str = "rule",
    rule_type: type | None = None,
    caller: str = "map_rules",
) -> PyTree:
    """Replace every leaf matched by ``rules`` with ``fn(path, leaf, rule)``: the one rule walk.

    Rules are assigned by :func:`assign_rules` (first match wins; a rule that
    matches nothing, or only paths an earlier rule took, is an error); leaves no
    rule matches are kept as they are. ``lora.init`` and ``quant.quantize`` are
    this walk with their own ``fn``.

    Args:
      tree: the parameter pytree.
      rules: ordered rules, each with a ``pattern`` attribute (a regex).
      fn: ``(path, leaf, rule) -> new leaf``, called in flattening order.
      is_leaf, what, rule_type, caller: as for :func:`assign_rules`.

    Returns:
      A tree of the same structure with the matched leaves replaced.

    Raises:
      RuleError: as :func:`assign_rules`.

    Examples:
      >>> import dataclasses
      >>> @dataclasses.dataclass
      ... class Scale:
      ...   pattern: str
      ...   factor: int
      >>> map_rules({"q": {"kernel": 1, "bias": 2}}, [Scale("q/kernel", 10)], lambda p, x, r: x * r.factor)
      {'q': {'bias': 2, 'kernel': 10}}
      >>> map_rules({"q": 1}, [Scale("k", 10)], lambda p, x, r: x)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax.errors.RuleError: rule Scale(pattern='k', factor=10) matches no leaf of the tree. ...
    """
    assigned = assign_rules(tree, rules, is_leaf=is_leaf, what=what, rule_type=rule_type, caller=caller)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    out = []
    for p, leaf in flat:
        path = path_str(p)
        rule = assigned.get(path)
        out.append(leaf if rule is None else fn(path, leaf, rule))
    return treedef.unflatten(out)


STACKED_PATH = re.compile(r"(?:^|/)layers/(?!\d+(?:/|$))")
"""A path under a stacked ``layers`` node (``layers/attn/q_proj/kernel``), not under one layer (``layers/3/...``)."""


def check_stacked_rules(paths: Sequence[str], rules: Sequence[Rule], error: type[Exception] = RuleError) -> None:
    """Raise ``error`` for a rule written for single layers' paths (``layers/0/...``) that meets stacked paths.

    A stacked weight (``layers/attn/q_proj/kernel``, see
    :func:`lora_jax.models.stacking.stack_layers`) holds every layer, so a
    rule cannot pick layers of it; without this check such a rule would only
    "match nothing".

    Examples:
      >>> import dataclasses
      >>> @dataclasses.dataclass
      ... class R:
      ...   pattern: str
      >>> check_stacked_rules(["layers/attn/q/kernel"], [R(r"layers/\\d+/attn/q/kernel")])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax.errors.RuleError: R(pattern='layers/\\\\d+/attn/q/kernel') is written for the paths of single layers ...
    """
    stacked = [p for p in paths if STACKED_PATH.search(p)]
    for rule in rules if stacked else ():
        rx = re.compile(rule.pattern)
        if any(rx.fullmatch(p) for p in paths):
            continue
        one = [STACKED_PATH.sub(lambda m: m.group(0).replace("layers/", "layers/0/"), p, count=1) for p in stacked]
        hit = next((p for p in one if rx.fullmatch(p)), None)
        if hit is not None:
            raise error(
                f"{rule!r} is written for the paths of single layers (it matches {hit!r}), but these params "
                f"are stacked (paths like {stacked[0]!r}): one stacked weight holds every layer, so a rule "
                "cannot pick layers of it. Init the adapters (or quantize) on the unrolled params and stack "
                "after (lora_jax.models.stacking.stack_layers; every layer must get the same leaves), or "
                "target the stacked path (LoRA: with stacked_axes=1)."
            )


# ----------------------------------------------------------------------------
# Trainable / frozen split (equinox-style partition and combine).


def is_trainable_leaf(path: str, leaf: Any) -> bool:
    """Default filter: a leaf is trainable when it is a LoRA factor ``a`` or ``b``.

    LoRA nodes flatten their factors under the keys ``a`` and ``b`` (the base
    weight is ``base``), so this is a statement about paths, not about types.
    """
    return is_factor_path(path)


def everything(path: str, leaf: Any) -> bool:
    """Filter that marks every leaf trainable (full fine-tuning)."""
    return True


def split(params: PyTree, trainable: Filter = is_trainable_leaf) -> tuple[PyTree, PyTree]:
    """Split ``params`` into ``(trainable, frozen)`` trees of the same structure.

    Each leaf goes to exactly one side; the other side holds ``None`` there.
    ``None`` is an empty pytree, so ``jax.grad`` and optax see only the leaves of
    the side they are given: differentiating a loss with respect to the
    ``trainable`` tree never computes a gradient for a frozen weight, and an
    optimizer initialised on it has state for the trainable leaves alone.

    Args:
      params: any pytree (LoRA nodes are containers, their ``a``/``b`` leaves
        are what the default filter selects).
      trainable: ``(path, leaf) -> bool``; default: LoRA factors only. Pass
        :func:`everything` for full fine-tuning.

    Returns:
      ``(trainable, frozen)``; ``combine(trainable, frozen)`` rebuilds ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> t, f = split({"w": jnp.ones(2), "b": jnp.zeros(2)}, lambda p, x: p == "w")
      >>> t["b"] is None and f["w"] is None
      True
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    mask = [bool(trainable(path_str(p), x)) for p, x in flat]
    leaves = [x for _, x in flat]
    left = [x if m else None for x, m in zip(leaves, mask)]
    right = [None if m else x for x, m in zip(leaves, mask)]
    return treedef.unflatten(left), treedef.unflatten(right)


def combine(*trees: PyTree) -> PyTree:
    """Merge trees of one structure: at each leaf take the first non-``None``.

    Examples:
      >>> combine({"a": None, "b": 2}, {"a": 1, "b": None})
      {'a': 1, 'b': 2}
    """
    if not trees:
        raise ValueError("combine() needs at least one tree, e.g. combine(trainable, frozen)")

    def first(*xs):
        for x in xs:
            if x is not None:
                return x
        return None

    return jax.tree.map(first, *trees, is_leaf=lambda x: x is None)
