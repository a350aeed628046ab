"""Extents against a reference model (a set of covered byte offsets)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gstore.write.extents import Extents

ops = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "truncate"]), st.integers(0, 60), st.integers(0, 60)),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, 60), st.integers(0, 60))
def test_extents_match_a_set_model(operations, q1, q2):
    ext, model = Extents(), set()
    for op, a, b in operations:
        if op == "add":
            ext.add(a, b)
            model |= set(range(a, b))
        elif op == "remove":
            ext.remove(a, b)
            model -= set(range(a, b))
        else:
            ext.truncate(a)
            model = {x for x in model if x < a}
        pairs = list(ext)
        assert all(s < e for s, e in pairs)
        assert all(pairs[i][1] < pairs[i + 1][0] for i in range(len(pairs) - 1)), pairs
        assert {x for s, e in pairs for x in range(s, e)} == model
    lo, hi = min(q1, q2), max(q1, q2)
    want = set(range(lo, hi))
    assert ext.covers(lo, hi) == want.issubset(model)
    assert ext.overlaps(lo, hi) == bool(want & model)
    gaps = ext.gaps(lo, hi)
    assert {x for s, e in gaps for x in range(s, e)} == want - model
    pieces = ext.pieces(lo, hi)
    assert [x for s, e, _ in pieces for x in range(s, e)] == sorted(want)
    for s, e, covered in pieces:
        assert all((x in model) == covered for x in range(s, e))


def test_basic_merge():
    ext = Extents([(0, 5), (5, 10), (20, 30)])
    assert list(ext) == [(0, 10), (20, 30)]
    ext.remove(3, 25)
    assert list(ext) == [(0, 3), (25, 30)]
    assert ext.total() == 8
