"""Path strings, ordered rules, split / combine."""

import dataclasses

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax import paths


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str


TREE = {"layers": [{"attn": {"q_proj": {"kernel": np.ones((4, 4))}, "k_proj": {"kernel": np.ones((4, 2))}}}] * 2,
        "embed": np.ones((10, 4))}


def test_path_strings_join_dict_and_sequence_keys():
    got = [p for p, _ in paths.leaves_with_paths(TREE)]
    assert got == ["embed", "layers/0/attn/k_proj/kernel", "layers/0/attn/q_proj/kernel",
                   "layers/1/attn/k_proj/kernel", "layers/1/attn/q_proj/kernel"]


def test_first_matching_rule_wins_and_fullmatch_is_used():
    r1, r2 = Rule(r"layers/0/.*"), Rule(r".*kernel")
    got = paths.assign_rules(TREE, [r1, r2])
    assert got["layers/0/attn/q_proj/kernel"] is r1
    assert got["layers/1/attn/q_proj/kernel"] is r2
    assert "embed" not in got
    # fullmatch: a pattern matching only a prefix matches nothing
    with pytest.raises(ValueError, match="matches no leaf"):
        paths.assign_rules(TREE, [Rule("layers")])


def test_unmatched_rule_names_rule_and_lists_paths():
    with pytest.raises(ValueError, match=r"(?s)Rule\(pattern='.*v_proj.*'\) matches no leaf.*q_proj/kernel \(4, 4\)"):
        paths.assign_rules(TREE, [Rule(r"layers/\d+/attn/v_proj/kernel")])


def test_shadowed_rule_is_reported_as_such():
    with pytest.raises(ValueError, match="taken by an earlier rule"):
        paths.assign_rules(TREE, [Rule(".*"), Rule("embed")])


def test_invalid_regex_is_an_error():
    with pytest.raises(ValueError, match="not a valid regex"):
        paths.assign_rules(TREE, [Rule("layers/(")])


def test_map_rules_calls_fn_on_matched_leaves_only_first_match_wins():
    r1, r2 = Rule(r"layers/0/.*"), Rule(r".*kernel")
    seen = []

    def fn(path, leaf, rule):
        seen.append((path, rule))
        return str(leaf.shape)

    out = paths.map_rules(TREE, [r1, r2], fn)
    assert out["layers"][0]["attn"]["q_proj"]["kernel"] == "(4, 4)"
    assert out["embed"] is TREE["embed"]
    assert ("layers/0/attn/k_proj/kernel", r1) in seen and ("layers/1/attn/k_proj/kernel", r2) in seen
    assert len(seen) == 4 and jax.tree.structure(out) == jax.tree.structure(TREE)


@pytest.mark.parametrize(
    ("rules", "match"),
    [([Rule("layers")], "matches no leaf"), ([Rule(".*"), Rule("embed")], "taken by an earlier rule"),
     ([Rule("layers/(")], "not a valid regex")],
)
def test_map_rules_errors_are_assign_rules_errors(rules, match):
    from lora_jax.errors import RuleError

    with pytest.raises(RuleError, match=match):
        paths.map_rules(TREE, rules, lambda p, x, r: x)


def test_map_rules_checks_rule_type():
    with pytest.raises(ValueError, match=r"lora.init needs at least one LoraRule"):
        paths.map_rules(TREE, [], lambda p, x, r: x, rule_type=lj.LoraRule, caller="lora.init")
    with pytest.raises(TypeError, match="rules must be LoraRule instances"):
        paths.map_rules(TREE, [Rule(".*")], lambda p, x, r: x, rule_type=lj.LoraRule)


def test_combine_needs_a_tree():
    with pytest.raises(ValueError, match="at least one tree"):
        lj.combine()


def test_split_default_selects_lora_factors_only(key):
    p = lj.lora.init(key, {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}, [lj.LoraRule(pattern="w", rank=2)])
    t, f = lj.split(p)
    assert [x.shape for x in jax.tree.leaves(t)] == [(4, 2), (2, 3)]
    assert [x.shape for x in jax.tree.leaves(f)] == [(3,), (4, 3)]
    assert t["b"] is None and t["w"].base is None
    full_t, full_f = lj.split(p, paths.everything)
    assert jax.tree.leaves(full_f) == []
    assert len(jax.tree.leaves(full_t)) == 4


# Random nested trees of dicts / lists / tuples with array or scalar leaves.
leaf = st.one_of(
    hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=4), elements=st.floats(-10, 10, width=32)),
    st.integers(-5, 5),
)
trees = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text("abcdefgh_", min_size=1, max_size=5), children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(tree=trees, bits=st.lists(st.booleans(), min_size=64, max_size=64))
def test_combine_of_split_is_identity(tree, bits):
    n = len(jax.tree.leaves(tree))
    chosen = {p for i, (p, _) in enumerate(paths.leaves_with_paths(tree)) if bits[i % 64]}
    t, f = lj.split(tree, lambda p, x: p in chosen)
    back = lj.combine(t, f)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert a is b
    assert len(jax.tree.leaves(t)) + len(jax.tree.leaves(f)) == n
