"""Multi-vector (late-interaction) reranking of given texts: MaxSim over token vectors encoded on the fly
by an embedder with the multivector head.

Example::

    scores = rerank_multivector(emb, "what is a wing flap", ["A flap is ...", "Wings ..."])  # (2,) float32
    order = np.argsort(-scores)

For documents already in an index, :meth:`rayembed.search.HybridSearcher.search` with
``rerank="multivector"`` uses the token vectors stored beside the shards instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def rerank_multivector(embedder: Any, query: str, documents: Sequence[str], *, instruction: str | None = None,
                       batch_size: int = 32, max_length: int | None = None) -> np.ndarray:
    """MaxSim score of ``query`` against each document, (len(documents),) float32, in input order.

    The query is encoded with ``instruction`` (as ``Embedder.encode`` formats queries), the
    documents without. Raises ValueError when the embedder has no multivector head.
    """
    from rayembed.modeling.heads import maxsim

    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}.")
    documents = list(documents)
    if not documents:
        return np.zeros(0, dtype=np.float32)
    q = embedder.encode_multivector([query], instruction=instruction, batch_size=batch_size,
                                    max_length=max_length)[0]  # (Lq, D)
    docs = embedder.encode_multivector(documents, batch_size=batch_size, max_length=max_length)
    return np.array([maxsim(q, d) for d in docs], dtype=np.float32)
