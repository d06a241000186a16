"""Rank fusion on hand-made lists: RRF to the last digit, min-max weighted sums, ties by doc id."""

from __future__ import annotations

import pytest

from rayembed.search.fusion import fuse, minmax, rrf, weighted_sum

A = [("x", 10.0), ("y", 5.0), ("z", 0.0)]
B = [("y", 0.9), ("w", 0.5)]


def test_rrf_values_and_order():
    got = rrf({"a": A, "b": B})
    assert got == [
        ("y", 0.03252247488101534),  # 1/62 + 1/61
        ("x", 0.01639344262295082),  # 1/61
        ("w", 0.016129032258064516),  # 1/62
        ("z", 0.015873015873015872),  # 1/63
    ]


def test_rrf_weights_and_k():
    got = dict(rrf({"a": A, "b": B}, weights={"a": 2.0, "b": 0.5}))
    assert got == {"y": 0.04045478582760444, "x": 0.03278688524590164, "z": 0.031746031746031744,
                   "w": 0.008064516129032258}
    assert rrf({"a": A}, k=0) == [("x", 1.0), ("y", 0.5), ("z", 1 / 3)]


def test_rrf_ties_break_by_doc_id_and_duplicates_keep_best_rank():
    assert rrf({"m1": [("b", 3.0)], "m2": [("a", 1.0)]}) == [("a", 1 / 61), ("b", 1 / 61)]
    assert rrf({"m": [("d", 1.0), ("e", 0.5), ("d", 0.1)]}) == [("d", 1 / 61), ("e", 1 / 62)]


def test_weighted_sum_minmax_single_hit_and_ties():
    got = weighted_sum({"a": A, "b": B, "c": [("q", 3.2)]}, {"a": 1.0, "b": 2.0, "c": 0.5})
    # a: x 1, y 0.5, z 0; b: y 1, w 0; c (one hit): q 1.
    assert got == [("y", 2.5), ("x", 1.0), ("q", 0.5), ("w", 0.0), ("z", 0.0)]
    assert minmax([("p", 2.0), ("o", 2.0)]) == [("p", 1.0), ("o", 1.0)]  # all equal: each is the best
    assert minmax([]) == []
    # Equal weights by default; a missing document contributes 0 for that method.
    assert weighted_sum({"a": [("x", 4.0), ("y", 2.0)], "b": [("x", 1.0), ("z", 0.0)]}) == [
        ("x", 2.0), ("y", 0.0), ("z", 0.0)]
    assert weighted_sum({"a": [("x", 4.0), ("y", 2.0)]}, normalize="none") == [("x", 4.0), ("y", 2.0)]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"No weight for method\(s\) \['b'\]"):
        weighted_sum({"a": A, "b": B}, {"a": 1.0})
    with pytest.raises(ValueError, match="weight of method 'a' must be a finite number >= 0"):
        rrf({"a": A}, weights={"a": -1})
    with pytest.raises(ValueError, match="rrf k must be an integer >= 0"):
        rrf({"a": A}, k=-5)
    with pytest.raises(ValueError, match="normalize must be 'minmax' or 'none'"):
        weighted_sum({"a": A}, normalize="zscore")
    with pytest.raises(ValueError, match="Unknown fusion 'borda'"):
        fuse({"a": A}, "borda")
    with pytest.raises(ValueError, match="finite scores"):
        weighted_sum({"a": [("x", float("inf")), ("y", 1.0)]})
    assert fuse({"a": A, "b": B}, "weighted") == weighted_sum({"a": A, "b": B})
