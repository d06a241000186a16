"""Retrievers under evaluation: a dense embedder searched with FAISS, and BM25 (bm25s).

Both return a TREC-style run ``{query_id: {doc_id: score}}`` that :mod:`.metrics` scores.
Dense search goes through the platform's indexing code (``rayembed.index``), so evaluation
measures the same encode-and-search path that ``rayembed index`` and serving use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rayembed.evaluate.datasets import RetrievalData

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]


def _to_run(
    query_ids: Sequence[str], doc_ids: Sequence[str], idx: np.ndarray, scores: np.ndarray, drop_self: bool
) -> Run:
    run: Run = {}
    for qi, qid in enumerate(query_ids):
        hits = {}
        for j, s in zip(idx[qi], scores[qi]):
            if j < 0:  # FAISS pads with -1 when fewer than k vectors exist
                continue
            did = doc_ids[int(j)]
            if drop_self and did == qid:
                continue
            hits[did] = float(s)
        run[qid] = hits
    return run


class BM25Retriever:
    """Lexical BM25 from ``bm25s`` (Lucene scoring), English stopwords, Snowball stemming.

    The stemmer is PyStemmer's; without it the tokens go unstemmed and a warning says so.
    """

    name = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75, stopwords: str = "en", stemmer: str = "english"):
        self.k1, self.b = k1, b
        self.stopwords = None if stopwords in ("none", "", None) else stopwords
        self.stemmer = None
        if stemmer not in ("none", "", None):
            try:
                import Stemmer

                self.stemmer = Stemmer.Stemmer(stemmer)
            except ImportError:
                logger.warning("PyStemmer is not installed; BM25 runs unstemmed (pip install PyStemmer).")

    def describe(self) -> dict:
        return {"type": "bm25", "library": "bm25s", "k1": self.k1, "b": self.b,
                "stopwords": self.stopwords, "stemmer": type(self.stemmer).__name__ if self.stemmer else None}

    def _tokens(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(
            texts, stopwords=self.stopwords, stemmer=self.stemmer, return_ids=False, show_progress=False
        )

    def search(self, data: RetrievalData, k: int) -> Run:
        import bm25s

        doc_ids = data.doc_ids()
        texts = data.doc_texts()
        query_ids = data.judged_query_ids()
        queries = [data.queries[q] for q in query_ids]
        if data.symmetric:  # nothing to add for a lexical model; the instruction is for embedders
            pass
        retriever = bm25s.BM25(k1=self.k1, b=self.b)
        retriever.index(self._tokens(texts), show_progress=False)
        k = min(k, len(doc_ids))
        q_tokens = self._tokens(queries)
        idx = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        nonempty = [i for i, t in enumerate(q_tokens) if t]  # bm25s rejects a query with no tokens left
        if nonempty:
            res, sc = retriever.retrieve([q_tokens[i] for i in nonempty], k=k, show_progress=False)
            idx[nonempty], scores[nonempty] = res, sc
        # BM25 gives 0 to documents sharing no term with the query: they were not retrieved.
        idx[scores <= 0] = -1
        return _to_run(query_ids, doc_ids, idx, scores, data.ignore_identical_ids)


class DenseRetriever:
    """An :class:`~rayembed.modeling.embedder.Embedder`: encode the corpus, search it exactly.

    ``instruct``: whether queries get the dataset's instruction (documents never do, except
    on symmetric datasets). ``index_root``: keep each dataset's index in
    ``<index_root>/<dataset>`` and reuse it on the next run (default: a temporary folder).
    """

    def __init__(self, embedder, *, instruct: bool = True, batch_size: int = 32,
                 max_length: int | None = None, index_type: str = "flat",
                 index_root: str | os.PathLike | None = None):
        self.embedder = embedder
        self.index_root = index_root
        self.instruct = instruct
        self.batch_size = batch_size
        self.max_length = max_length
        self.index_type = index_type

    def describe(self) -> dict:
        cfg = self.embedder.config
        return {"type": "dense", "base_model": cfg.base_model, "pooling": cfg.pooling,
                "max_length": self.max_length or cfg.max_length, "instruct": self.instruct,
                "dim": self.embedder.dim}

    def encode(self, texts: list[str], instruction: str | None) -> np.ndarray:
        t0 = time.perf_counter()
        vecs = self.embedder.encode(
            texts, instruction=instruction if self.instruct else None,
            batch_size=self.batch_size, max_length=self.max_length,
        )
        dt = time.perf_counter() - t0
        logger.info("encoded %d texts in %.1f s (%.1f texts/s)", len(texts), dt, len(texts) / max(dt, 1e-9))
        return vecs

    def search(self, data: RetrievalData, k: int) -> Run:
        doc_ids = data.doc_ids()
        query_ids = data.judged_query_ids()
        logger.info("%s: encoding %d documents and %d queries", data.name, len(doc_ids), len(query_ids))
        qvecs = self.encode([data.queries[q] for q in query_ids], data.instruction)  # (nq, dim)
        k = min(k, len(doc_ids))
        doc_instruction = data.instruction if data.symmetric else None
        index_dir = Path(self.index_root) / data.name if self.index_root else None
        scores, hits = _dense_search(self, doc_ids, data.doc_texts(), doc_instruction, qvecs, k, index_dir)
        run: Run = {}
        for qi, qid in enumerate(query_ids):
            row = hits[qi * scores.shape[1] : (qi + 1) * scores.shape[1]]
            run[qid] = {d: float(s) for d, s in zip(row, scores[qi])
                        if d and not (data.ignore_identical_ids and d == qid)}
        return run


def _dense_search(retriever: DenseRetriever, doc_ids: list[str], texts: list[str],
                  doc_instruction: str | None, qvecs: np.ndarray, k: int,
                  index_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, list[str]]:
    """Top-``k`` of each query: scores (nq, k) and the hit document ids (row-major, "" for none).

    Documents go through the indexing code (``build_index_in_process`` then
    ``ShardedIndex.search``), the same path ``rayembed index`` and serving use. Empty documents
    are not indexed (the index refuses them); they can never be retrieved anyway. With
    ``index_dir`` the index is kept there and a later run with the same corpus and embedder
    reuses it; otherwise it lives in a temporary folder.
    """
    from rayembed.index import ShardedIndex, build_index_in_process
    from rayembed.index.corpus import ColumnMapping

    docs = [{"id": d, "text": t} for d, t in zip(doc_ids, texts) if t.strip()]
    if not docs:
        raise ValueError("Every document of this corpus is empty; there is nothing to index.")
    with contextlib.ExitStack() as stack:
        root = Path(index_dir) if index_dir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="rayembed-eval-")))
        t0 = time.perf_counter()
        build_index_in_process(
            retriever.embedder, docs, root, index_type=retriever.index_type,
            batch_size=retriever.batch_size, max_length=retriever.max_length,
            doc_instruction=doc_instruction, mapping=ColumnMapping(include_title=False),
            overwrite=index_dir is None,
        )
        dt = time.perf_counter() - t0
        logger.info("indexed %d documents in %.1f s (%.1f docs/s)", len(docs), dt, len(docs) / max(dt, 1e-9))
        index = ShardedIndex.open(root, expected_embedder=retriever.embedder if index_dir else None)
        try:
            scores, gids = index.search(qvecs, min(k, index.ntotal))  # (nq, k) each
            id_of = [d["doc_id"] for d in index.get_documents(np.arange(index.ntotal))]
        finally:
            index.close()
    hits = [id_of[g] if g >= 0 else "" for g in gids.ravel().tolist()]
    return scores, hits
