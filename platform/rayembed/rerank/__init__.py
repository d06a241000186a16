"""Reranking a short list of texts for one query: an LLM judge, or MaxSim over token vectors.

Two models, one call::

    from rayembed.rerank import rerank

    rerank("what do bees make", ["Bees make honey.", "Paris is in France."], model="llm",
           reranker="runs/x/reranker")                # -> [{"index": 0, "score": 2.1}, {"index": 1, ...}]
    rerank(query, texts, model="multivector", embedder="runs/x/train/model")

- ``llm``: :class:`~rayembed.rerank.llm.LLMReranker`, a causal LM scoring each pair by
  logit(" yes") - logit(" no") (trained with ``train.mode=rerank``).
- ``multivector``: ColBERT-style MaxSim with the embedder's multivector head
  (:func:`rayembed.rerank.multivector.rerank_multivector`); the embedder must have that head.

The HTTP endpoint's ``POST /rerank`` answers with exactly this function's output.

The package holds all of reranking: :mod:`~rayembed.rerank.llm` (the LLM reranker model),
:mod:`~rayembed.rerank.multivector` (MaxSim over texts given with the query) and
:mod:`~rayembed.rerank.task` (``train.mode=rerank``'s training task).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

MODELS = ("multivector", "llm")

__all__ = ["MODELS", "LLMReranker", "rank_results", "rerank"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package does not import torch or transformers.
    if name in ("LLMReranker", "RerankerConfig"):
        from rayembed.rerank import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'rayembed.rerank' has no attribute {name!r}")


def rank_results(scores: np.ndarray | Sequence[float], top_n: int | None = None) -> list[dict[str, Any]]:
    """``[{"index", "score"}]`` sorted by score, highest first (ties: lower index first), cut to top_n."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if top_n is not None:
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}.")
        order = order[:top_n]
    return [{"index": int(i), "score": float(scores[i])} for i in order]


def rerank(
    query: str,
    texts: Sequence[str],
    *,
    model: str = "llm",
    reranker: Any = None,
    embedder: Any = None,
    top_n: int | None = None,
    instruction: str | None = None,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Score ``texts`` against ``query`` and return them best first as ``{"index", "score"}``.

    ``model="llm"`` needs ``reranker`` (an LLMReranker, or a folder / causal-LM name to load);
    ``model="multivector"`` needs ``embedder`` (an Embedder with the multivector head, or its
    folder). ``instruction`` goes into the LLM prompt, or formats the query for the embedder.
    """
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query must be a non-empty string.")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string; wrap it in a list.")
    texts = list(texts)
    if model == "llm":
        if reranker is None:
            raise ValueError("model='llm' needs reranker= (an LLMReranker, or a saved reranker folder).")
        if isinstance(reranker, (str, os.PathLike)):
            from rayembed.rerank.llm import LLMReranker

            reranker = LLMReranker.from_pretrained(reranker)
        scores = reranker.score(query, texts, instruction=instruction, batch_size=batch_size)
    elif model == "multivector":
        if embedder is None:
            raise ValueError("model='multivector' needs embedder= (an Embedder with the multivector head, or its folder).")
        if isinstance(embedder, (str, os.PathLike)):
            from rayembed.modeling.embedder import Embedder

            embedder = Embedder.from_pretrained(embedder)
        if not getattr(embedder, "has_multivector", False):
            raise ValueError(
                "model='multivector' needs an embedder trained with its multivector head "
                "(model.heads.multivector=true); this one has none. Use model='llm', or train the head first."
            )
        from rayembed.rerank.multivector import rerank_multivector

        scores = rerank_multivector(embedder, query, texts, instruction=instruction) if texts else np.zeros(0)
    else:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}.")
    return rank_results(scores, top_n)
