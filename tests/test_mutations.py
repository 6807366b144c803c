"""The mutation table of experiments/reliability/mutations.py still points at real code and real tests.

Running the mutations takes minutes (the script does it); this only checks that
each mutation's old text occurs exactly once in its file of the current tree and
that the tests named to kill it exist, so a refactor that moves the code is noticed.
"""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "reliability"))

import mutations  # noqa: E402


def test_ids_are_unique_and_every_issue_item_has_a_mutation():
    ids = [m.id for m in mutations.MUTATIONS]
    assert len(ids) == len(set(ids))
    assert {re.match(r"M\d+", i).group() for i in ids} == {f"M{k}" for k in range(1, 16)}


@pytest.mark.parametrize("m", mutations.MUTATIONS, ids=lambda m: m.id)
def test_old_text_occurs_once_and_the_killing_tests_exist(m):
    text = (ROOT / m.file).read_text()
    assert text.count(m.old) == 1, f"{m.id}: old text found {text.count(m.old)} times in {m.file}"
    assert m.new != m.old and m.tests and m.what
    for node in m.tests:
        file, _, name = node.partition("::")
        name = name.split("[", 1)[0]
        assert (ROOT / file).is_file(), node
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / file).read_text(), re.M), node


def test_the_copy_holds_what_the_tests_need():
    assert all((ROOT / name).exists() for name in mutations.COPIED)
    assert not any(Path(m.file).parts[0] not in mutations.COPIED for m in mutations.MUTATIONS)
