"""Hybrid search: dense, BM25 and learned sparse retrieval fused, with multi-vector reranking.

Public API::

    from rayembed.search import HybridSearcher, rrf, weighted_sum

    s = HybridSearcher.open("runs/idx", embedder=emb)
    hits = s.search(["query"], k=10, methods={"dense": 1, "bm25": 1}, fusion="rrf", rerank="multivector")

See :mod:`rayembed.search.fusion` for the fusion formulas and :mod:`rayembed.index.lexical` for
the index parts on disk. MaxSim over texts given with the query (not read from an index) is
:func:`rayembed.rerank.multivector.rerank_multivector`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rayembed.search.fusion import fuse, minmax, rrf, weighted_sum

if TYPE_CHECKING:
    from rayembed.search.hybrid import HybridSearcher

_LAZY = {"HybridSearcher": "rayembed.search.hybrid"}


def __getattr__(name: str) -> Any:
    # Lazy so that importing the fusion functions does not import faiss, torch or bm25s.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayembed.search' has no attribute {name!r}")


__all__ = ["HybridSearcher", "fuse", "minmax", "rrf", "weighted_sum"]
