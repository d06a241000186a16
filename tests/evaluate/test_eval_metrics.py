"""The metrics equal values computed by hand on tiny qrels."""

from __future__ import annotations

import math

import pytest

from rayembed.evaluate.metrics import retrieval_metrics, spearman

QRELS = {
    "q1": {"d1": 2, "d2": 1, "d3": 0},  # graded: d1 best, d3 judged not relevant
    "q2": {"d4": 1},
    "q3": {"d9": 0},  # no relevant document: not counted
}
RUN = {
    "q1": {"d3": 0.9, "d1": 0.8, "d5": 0.7, "d2": 0.6},
    "q2": {"d5": 0.5},
    "q3": {"d9": 0.1},
}


def test_metrics_equal_hand_computed_values():
    m = retrieval_metrics(QRELS, RUN, per_query=True)
    # q1 ranks d3 (0), d1 (2), d5 (-), d2 (1). DCG uses linear gains, as trec_eval does.
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    q1 = m["per_query"]["q1"]
    assert q1["ndcg@10"] == pytest.approx(dcg / idcg, abs=1e-4)
    assert q1["recall@10"] == pytest.approx(1.0)
    assert q1["mrr@10"] == pytest.approx(0.5)
    assert q1["map"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["per_query"]["q2"] == {"ndcg@10": 0.0, "recall@10": 0.0, "recall@100": 0.0, "map": 0.0, "mrr@10": 0.0}
    assert m["num_queries"] == 2
    assert m["ndcg@10"] == pytest.approx(dcg / idcg / 2, abs=1e-4)
    assert m["recall@10"] == pytest.approx(0.5)
    assert m["mrr@10"] == pytest.approx(0.25)
    assert m["map"] == pytest.approx(0.25)


def test_mrr_is_cut_at_ten_and_recall_at_100_is_not():
    qrels = {"q": {"rel": 1}}
    run = {"q": {**{f"x{i:02d}": 1.0 - i / 100 for i in range(10)}, "rel": 0.5}}  # relevant at rank 11
    m = retrieval_metrics(qrels, run)
    assert m["mrr@10"] == 0.0
    assert m["recall@10"] == 0.0
    assert m["recall@100"] == 1.0
    assert m["map"] == pytest.approx(1 / 11)


def test_a_judged_query_missing_from_the_run_scores_zero():
    m = retrieval_metrics({"q1": {"d1": 1}, "q2": {"d2": 1}}, {"q1": {"d1": 1.0}})
    assert m["num_queries"] == 2
    assert m["ndcg@10"] == pytest.approx(0.5)


def test_qrels_without_any_relevant_document_are_refused():
    with pytest.raises(ValueError, match="No query in qrels has a relevant document"):
        retrieval_metrics({"q": {"d": 0}}, {"q": {"d": 1.0}})


def test_spearman_matches_hand_value():
    # ranks of gold: 1 2 4 3 -> d^2 sum 2 -> 1 - 6*2 / (4*15) = 0.8
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="equally long"):
        spearman([1, 2], [1, 2, 3])


def test_correlation_of_constant_scores_is_nan_not_zero():
    """A model that gives every pair the same score has no ranking: NaN, never a measured 0.0."""
    import math

    from rayembed.evaluate.metrics import pearson

    assert math.isnan(spearman([0.5, 0.5, 0.5], [1.0, 2.0, 3.0]))
    assert math.isnan(pearson([0.5, 0.5, 0.5], [1.0, 2.0, 3.0]))
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
