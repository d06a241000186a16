"""Retrieval and STS metrics, computed with the tools the literature uses.

Retrieval metrics come from ``pytrec_eval`` (trec_eval's C code), so the numbers match BEIR and
MTEB: nDCG@10 with graded gains, Recall@10, Recall@100, MRR@10 and MAP. A query counts only
when it has at least one relevant judgement; that is the number reported as ``num_queries``.

Example::

    qrels = {"q1": {"d1": 1, "d2": 0}}
    run = {"q1": {"d2": 0.9, "d1": 0.5}}
    retrieval_metrics(qrels, run)["ndcg@10"]   # 1 / log2(3) = 0.6309...
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

RETRIEVAL_METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10", "map")

# Our name -> the pytrec_eval measure that computes it (on the full run unless noted).
_TREC = {"ndcg@10": "ndcg_cut_10", "recall@10": "recall_10", "recall@100": "recall_100", "map": "map"}


def _ranked(hits: Mapping[str, float]) -> list[tuple[str, float]]:
    """Hits in trec_eval's order: score descending, ties broken by document id descending."""
    return sorted(((d, float(s)) for d, s in hits.items()), key=lambda x: (x[1], x[0]), reverse=True)


def retrieval_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    *,
    per_query: bool = False,
) -> dict:
    """Mean retrieval metrics of ``run`` against ``qrels``.

    qrels: ``{query_id: {doc_id: gain}}``, gain > 0 relevant (graded), 0 judged not relevant.
    run: ``{query_id: {doc_id: score}}``; a judged query missing from ``run`` scores 0.
    Returns ``{"ndcg@10", "recall@10", "recall@100", "mrr@10", "map", "num_queries"}`` and,
    with ``per_query``, ``"per_query": {qid: {metric: value}}``.
    """
    import pytrec_eval

    judged = {
        str(q): {str(d): int(g) for d, g in docs.items()}
        for q, docs in qrels.items()
        if any(int(g) > 0 for g in docs.values())
    }
    if not judged:
        raise ValueError("No query in qrels has a relevant document (gain > 0); check the qrels file.")
    # pytrec_eval skips a query with an empty run; a real empty result list must score 0 instead.
    full = {q: {str(d): float(s) for d, s in run.get(q, {}).items()} for q in judged}
    top10 = {q: dict(_ranked(hits)[:10]) for q, hits in full.items()}
    full_eval = pytrec_eval.RelevanceEvaluator(judged, set(_TREC.values()))
    mrr_eval = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"})
    res_full = full_eval.evaluate({q: h for q, h in full.items() if h})
    res_top10 = mrr_eval.evaluate({q: h for q, h in top10.items() if h})

    per: dict[str, dict[str, float]] = {}
    for q in judged:
        row = {name: float(res_full.get(q, {}).get(m, 0.0)) for name, m in _TREC.items()}
        row["mrr@10"] = float(res_top10.get(q, {}).get("recip_rank", 0.0))
        per[q] = row
    out: dict = {m: float(np.mean([per[q][m] for q in per])) for m in RETRIEVAL_METRICS}
    out["num_queries"] = len(per)
    if per_query:
        out["per_query"] = per
    return out


def spearman(predicted, gold) -> float:
    """Spearman rank correlation (ties averaged), as STS benchmarks report it."""
    from scipy.stats import spearmanr

    predicted, gold = np.asarray(predicted, dtype=float), np.asarray(gold, dtype=float)
    if predicted.shape != gold.shape or predicted.size < 2:
        raise ValueError(
            f"spearman needs two equally long score lists of at least 2, got {predicted.shape} and {gold.shape}."
        )
    # NaN when either list is constant (no ranking to correlate): reported as NaN, never as 0.0,
    # which would read as a measured "no correlation".
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about constant input; the NaN says it
        return float(spearmanr(predicted, gold).statistic)


def pearson(predicted, gold) -> float:
    """Pearson correlation; NaN when either list is constant (see :func:`spearman`)."""
    from scipy.stats import pearsonr

    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(pearsonr(np.asarray(predicted, dtype=float), np.asarray(gold, dtype=float)).statistic)
