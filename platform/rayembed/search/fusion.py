"""Rank fusion: combine the ranked lists of several retrieval methods into one.

Every function takes ``rankings``: method name -> that method's hits as ``(doc_id, score)``
pairs, best first (doc ids are the corpus ``doc_id`` strings). Both return one list of
``(doc_id, fused score)`` sorted by score, highest first, ties broken by doc id (ascending),
so the result does not depend on dict or thread order.

Example::

    rrf({"dense": [("d1", 0.9), ("d2", 0.8)], "bm25": [("d2", 12.0), ("d3", 7.5)]})
    # d2: 1/62 + 1/61, d1: 1/61, d3: 1/62  ->  [("d2", 0.03252...), ("d1", 0.01639...), ("d3", 0.01613...)]
    weighted_sum({"dense": [...], "bm25": [...]}, {"dense": 0.7, "bm25": 0.3})
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Ranking = Sequence[tuple[str, float]]

FUSIONS = ("rrf", "weighted_sum")


def _check_weights(rankings: Mapping[str, Ranking], weights: Mapping[str, float] | None) -> dict[str, float]:
    if weights is None:
        return {m: 1.0 for m in rankings}
    missing = [m for m in rankings if m not in weights]
    if missing:
        raise ValueError(
            f"No weight for method(s) {missing}; weights are given for {sorted(weights)}. "
            "Give every method a weight, or pass weights=None for equal weights."
        )
    out = {}
    for m in rankings:
        w = weights[m]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"The weight of method {m!r} must be a finite number >= 0, got {w!r}.")
        out[m] = float(w)
    return out


def _dedup(hits: Ranking) -> list[tuple[str, float]]:
    """The hits with each doc id kept once, at its best (first) position."""
    seen: set[str] = set()
    out = []
    for doc_id, score in hits:
        doc_id = str(doc_id)
        if doc_id in seen:
            continue
        seen.add(doc_id)
        out.append((doc_id, float(score)))
    return out


def _sorted(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def rrf(rankings: Mapping[str, Ranking], *, k: int = 60,
        weights: Mapping[str, float] | None = None) -> list[tuple[str, float]]:
    """Reciprocal rank fusion (Cormack et al., 2009): ``score(d) = sum_m w_m / (k + rank_m(d))``.

    Ranks start at 1 (the best hit of a list adds ``w / (k + 1)``); a document missing from a
    list adds nothing for that method. Only ranks count, so scores on different scales (cosine,
    BM25) fuse without normalisation. ``weights`` default to 1 per method.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"rrf k must be an integer >= 0, got {k!r} (60 is the usual value).")
    w = _check_weights(rankings, weights)
    fused: dict[str, float] = {}
    for method, hits in rankings.items():
        for rank, (doc_id, _) in enumerate(_dedup(hits), 1):
            fused[doc_id] = fused.get(doc_id, 0.0) + w[method] / (k + rank)
    return _sorted(fused)


def minmax(hits: Ranking) -> list[tuple[str, float]]:
    """Scores mapped onto [0, 1] within the list: ``(s - min) / (max - min)``.

    A list whose scores are all equal (one hit, or ties only) maps every hit to 1.0: each is
    as good as the best of its list.
    """
    hits = _dedup(hits)
    if not hits:
        return []
    values = [s for _, s in hits]
    lo, hi = min(values), max(values)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("min-max normalisation needs finite scores; a method returned inf or NaN.")
    if hi == lo:
        return [(d, 1.0) for d, _ in hits]
    return [(d, (s - lo) / (hi - lo)) for d, s in hits]


def weighted_sum(rankings: Mapping[str, Ranking], weights: Mapping[str, float] | None = None, *,
                 normalize: str = "minmax") -> list[tuple[str, float]]:
    """Score fusion: each method's scores normalised within its list, weighted, summed.

    ``normalize``: ``"minmax"`` (see :func:`minmax`) or ``"none"`` (raw scores, for methods
    already on one scale). A document missing from a list contributes 0 for that method.
    ``weights`` default to 1 per method.
    """
    if normalize not in ("minmax", "none"):
        raise ValueError(f"normalize must be 'minmax' or 'none', got {normalize!r}.")
    w = _check_weights(rankings, weights)
    fused: dict[str, float] = {}
    for method, hits in rankings.items():
        scored = minmax(hits) if normalize == "minmax" else _dedup(hits)
        for doc_id, s in scored:
            fused[doc_id] = fused.get(doc_id, 0.0) + w[method] * s
    return _sorted(fused)


def fuse(rankings: Mapping[str, Ranking], fusion: str = "rrf", weights: Mapping[str, float] | None = None, *,
         rrf_k: int = 60) -> list[tuple[str, float]]:
    """:func:`rrf` or :func:`weighted_sum` by name (``"weighted"`` is accepted for the latter)."""
    if fusion == "rrf":
        return rrf(rankings, k=rrf_k, weights=weights)
    if fusion in ("weighted_sum", "weighted"):
        return weighted_sum(rankings, weights)
    raise ValueError(f"Unknown fusion {fusion!r}; use one of {list(FUSIONS)}.")
