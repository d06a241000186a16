"""Retrievers under evaluation: a dense embedder searched with FAISS, BM25 (bm25s), and hybrids.

Each returns a TREC-style run ``{query_id: {doc_id: score}}`` that :mod:`.metrics` scores.
Dense and hybrid search go through the platform's indexing and search code (``rayembed.index``,
``rayembed.search``), so evaluation measures the same encode-and-search path that
``rayembed index`` and serving use; BM25 uses the tokenisation of the index's bm25 part.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayembed.evaluate.datasets import RetrievalData
from rayembed.index.lexical import BM25Index, BM25Params

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

    The index and its tokenisation are :class:`rayembed.index.lexical.BM25Index`, the same as
    an index's bm25 part. The stemmer is PyStemmer's; without it the tokens go unstemmed and a
    warning says so.
    """

    name = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75, stopwords: str = "en", stemmer: str = "english"):
        self.params = BM25Params(k1=k1, b=b, stopwords=stopwords, stemmer=stemmer)._norm()
        self.k1, self.b = self.params.k1, self.params.b
        self.stopwords = self.params.stopwords

    @property
    def stemmer(self):
        from rayembed.index.lexical import make_stemmer

        return make_stemmer(self.params.stemmer)

    def describe(self) -> dict:
        return {"type": "bm25", "library": "bm25s", "k1": self.k1, "b": self.b,
                "stopwords": self.stopwords, "stemmer": type(self.stemmer).__name__ if self.stemmer else None}

    def search(self, data: RetrievalData, k: int) -> Run:
        doc_ids = data.doc_ids()
        query_ids = data.judged_query_ids()
        index = BM25Index.build(data.doc_texts(), self.params)
        # The instruction is for embedders; a lexical model has nothing to add on symmetric data.
        scores, idx = index.search([data.queries[q] for q in query_ids], min(k, len(doc_ids)))
        return _to_run(query_ids, doc_ids, idx, scores, data.ignore_identical_ids)


class DenseRetriever:
    """An :class:`~rayembed.modeling.embedder.Embedder`: encode the corpus, search it exactly.

    ``instruct``: whether queries get the dataset's instruction (documents never do, except
    on symmetric datasets). ``index_root``: keep each dataset's index in
    ``<index_root>/<dataset>`` and reuse it on the next run (default: a temporary folder).
    ``indexes``: ``{dataset name: index location}`` of indexes already built with this embedder
    (the pipeline's index stage); a dataset found there is searched through it, so its corpus is
    not encoded again. Such an index is used only when it is exact (flat, float32), was built by
    the same embedder and holds exactly the dataset's documents; otherwise a warning says why and
    the corpus is encoded as usual. ``index_used`` records which datasets were searched that way.
    """

    def __init__(self, embedder, *, instruct: bool = True, batch_size: int = 32,
                 max_length: int | None = None, index_type: str = "flat",
                 index_root: str | os.PathLike | None = None, indexes: dict[str, str] | None = None):
        self.embedder = embedder
        self.index_root = index_root
        self.indexes = dict(indexes or {})
        self.index_used: dict[str, str] = {}
        self.instruct = instruct
        self.batch_size = batch_size
        self.max_length = max_length
        self.index_type = index_type

    def describe(self) -> dict:
        cfg = self.embedder.config
        return {"type": "dense", "base_model": cfg.base_model, "pooling": cfg.pooling,
                "max_length": self.max_length or cfg.max_length, "instruct": self.instruct,
                "dim": self.embedder.dim, "dtype": str(self.embedder.dtype).removeprefix("torch."),
                "autocast": str(self.embedder.autocast_dtype).removeprefix("torch.") if self.embedder.autocast_dtype else None}

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
        prebuilt = prebuilt_index(self, data)
        if prebuilt is not None:
            self.index_used[data.name] = self.indexes[data.name]
        index_dir = Path(self.index_root) / data.name if self.index_root else None
        scores, hits = _dense_search(self, doc_ids, data.doc_texts(), doc_instruction, qvecs, k, index_dir,
                                     prebuilt=prebuilt)
        run: Run = {}
        for qi, qid in enumerate(query_ids):
            row = hits[qi * scores.shape[1] : (qi + 1) * scores.shape[1]]
            run[qid] = {d: float(s) for d, s in zip(row, scores[qi])
                        if d and not (data.ignore_identical_ids and d == qid)}
        return run


def _dense_search(retriever: DenseRetriever, doc_ids: list[str], texts: list[str],
                  doc_instruction: str | None, qvecs: np.ndarray, k: int,
                  index_dir: str | os.PathLike | None = None, *,
                  prebuilt: Path | None = None) -> tuple[np.ndarray, list[str]]:
    """Top-``k`` of each query: scores (nq, k) and the hit document ids (row-major, "" for none).

    Documents go through the indexing code (``build_index_in_process`` then
    ``ShardedIndex.search``), the same path ``rayembed index`` and serving use. Empty documents
    are not indexed (the index refuses them); they can never be retrieved anyway. With
    ``index_dir`` the index is kept there and a later run with the same corpus and embedder
    reuses it; otherwise it lives in a temporary folder. ``prebuilt``: an index folder checked by
    :func:`prebuilt_index`, searched as it is (nothing is encoded or written).
    """
    from rayembed.index import ShardedIndex

    with (contextlib.nullcontext(prebuilt) if prebuilt is not None
          else eval_index(retriever, doc_ids, texts, doc_instruction, index_dir)) as root:
        checked = index_dir is not None or prebuilt is not None
        index = ShardedIndex.open(root, expected_embedder=retriever.embedder if checked else None)
        try:
            scores, gids = index.search(qvecs, min(k, index.ntotal))  # (nq, k) each
            id_of = [d["doc_id"] for d in index.get_documents(np.arange(index.ntotal))]
        finally:
            index.close()
    hits = [id_of[g] if g >= 0 else "" for g in gids.ravel().tolist()]
    return scores, hits


def prebuilt_index(retriever: DenseRetriever, data: RetrievalData, parts: Sequence[str] = ("dense",),
                   bm25: BM25Params | None = None) -> Path | None:
    """The local folder of ``retriever.indexes[data.name]`` when that index can stand in for
    encoding the dataset's corpus here, else None (with a warning saying why): it must be exact
    (Flat, float32, the embedder's full dimension), built by the same embedder, hold exactly the
    dataset's non-empty documents, and have ``parts`` (a bm25 part with the same ``bm25``
    settings). The encoding itself is checked, not the settings it was made with: the four
    longest and four other documents are encoded here and must match their stored vectors
    (cosine >= 0.999), which catches another max_length, title rule or precision."""
    from rayembed.index import ShardedIndex
    from rayembed.index.manifest import IndexIntegrityError

    location = retriever.indexes.get(data.name)
    if not location or data.symmetric:
        return None
    try:
        index = ShardedIndex.open(location, expected_embedder=retriever.embedder)
    except (IndexIntegrityError, FileNotFoundError, ValueError) as e:
        logger.warning("not searching %s: %s; encoding the corpus instead.", location, e)
        return None
    try:
        m = index.manifest
        have = {name: rec.get("settings") for name, rec in (m.get("parts") or {}).items()}
        id_of = [d["doc_id"] if d else "" for d in index.get_documents(np.arange(index.ntotal))]
        wanted = {d for d, t in zip(data.doc_ids(), data.doc_texts()) if t.strip()}
        if m.get("factory") != "Flat" or index.index_dim != retriever.embedder.dim:
            why = (f"it is a {m.get('factory')} index of {index.index_dim}-d vectors, and evaluation searches the "
                   f"embedder's {retriever.embedder.dim}-d vectors exactly (Flat, float32)")
        elif set(id_of) != wanted or len(id_of) != len(wanted):
            why = (f"it holds {len(id_of)} documents and the dataset {len(wanted)} non-empty ones "
                   f"({len(wanted & set(id_of))} in common; was index.limit set?)")
        elif [p for p in parts if p != "dense" and p not in have]:
            why = f"it lacks the parts {[p for p in parts if p != 'dense' and p not in have]}"
        elif "bm25" in parts and bm25 is not None and have["bm25"] != {**bm25.to_dict(), "include_title": True}:
            why = f"its bm25 part has settings {have['bm25']}, and evaluation uses {bm25.to_dict()}"
        else:
            cos = _stored_vs_fresh(retriever, index, id_of, dict(zip(data.doc_ids(), data.doc_texts())))
            if cos >= 0.999:
                return index.root
            why = (f"its stored vectors differ from this evaluation's encoding of the same documents (cosine "
                   f"{cos:.4f} < 0.999: another max_length, title rule or precision; set index.encode.max_length "
                   "to eval.max_length to share the encoding)")
    finally:
        index.close()
    logger.warning("not searching %s: %s; encoding the corpus instead.", location, why)
    return None


def _stored_vs_fresh(retriever: DenseRetriever, index: Any, id_of: list[str], text_of: dict[str, str]) -> float:
    """The lowest cosine between stored and freshly encoded vectors of 8 documents (-1 if unreadable)."""
    import faiss

    gids = sorted(range(len(id_of)), key=lambda g: -len(text_of.get(id_of[g], "")))[:4]
    gids += [int(g) for g in np.random.default_rng(0).choice(len(id_of), size=min(4, len(id_of)), replace=False)]
    stored = {}
    try:
        for shard in index.shards:
            idmap = faiss.downcast_index(shard)
            labels = faiss.vector_to_array(idmap.id_map)
            flat = faiss.downcast_index(idmap.index)
            for j in np.flatnonzero(np.isin(labels, gids)):
                stored[int(labels[j])] = flat.reconstruct(int(j))
    except (AttributeError, RuntimeError) as e:
        logger.warning("cannot read vectors back from the index (%s)", e)
        return -1.0
    gids = sorted(set(gids) & set(stored))
    if not gids:
        return -1.0
    fresh = retriever.encode([text_of[id_of[g]] for g in gids], None)  # (n, dim), documents get no instruction
    old = np.stack([stored[g] for g in gids])
    cos = np.sum(fresh * old, axis=1) / np.maximum(np.linalg.norm(fresh, axis=1) * np.linalg.norm(old, axis=1), 1e-12)
    return float(cos.min())


@contextlib.contextmanager
def eval_index(retriever: DenseRetriever | None, doc_ids: list[str], texts: list[str], doc_instruction: str | None,
               index_dir: str | os.PathLike | None = None, *, parts: Sequence[str] = ("dense",),
               bm25: BM25Params | None = None):
    """Build (or reuse) the index of one evaluation corpus and yield its folder.

    The same build settings for every caller, so a dense model's index and a hybrid row over
    the same model share one folder and the hybrid only adds its parts. ``retriever`` None: a
    BM25-only index.
    """
    from rayembed.index import build_index_in_process
    from rayembed.index.corpus import ColumnMapping

    docs = [{"id": d, "text": t} for d, t in zip(doc_ids, texts) if t.strip()]
    if not docs:
        raise ValueError("Every document of this corpus is empty; there is nothing to index.")
    with contextlib.ExitStack() as stack:
        root = Path(index_dir) if index_dir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="rayembed-eval-")))
        t0 = time.perf_counter()
        opts = dict(batch_size=retriever.batch_size, max_length=retriever.max_length,
                    index_type=retriever.index_type, doc_instruction=doc_instruction) if retriever else {}
        build_index_in_process(
            retriever.embedder if retriever else None, docs, root, mapping=ColumnMapping(include_title=False),
            overwrite=index_dir is None, parts=parts, bm25=bm25, **opts,
        )
        dt = time.perf_counter() - t0
        logger.info("indexed %d documents (%s) in %.1f s (%.1f docs/s)", len(docs), "+".join(parts), dt,
                    len(docs) / max(dt, 1e-9))
        yield root


class HybridRetriever:
    """One ``eval.hybrid`` row: an embedder's index with extra parts, searched by :class:`HybridSearcher`.

    ``dense``: the :class:`DenseRetriever` of the embedder (None for a BM25-only row); its
    settings (instruction, batch size, max length, index type) and index folder are shared, so
    the dense shards are encoded once for the dense row and the hybrid rows over it.
    Run scores are rank-based (n, n-1, ...): the hybrid's order is what the metrics see.
    """

    def __init__(self, name: str, methods: dict[str, float], *, dense: DenseRetriever | None = None,
                 fusion: str = "rrf", rerank: str | None = None, rerank_top: int = 100, candidates: int = 100,
                 bm25: BM25Params | None = None, index_root: str | os.PathLike | None = None):
        from rayembed.search.hybrid import METHODS, RERANKERS

        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ValueError(f"hybrid {name!r}: methods {dict(methods)} must be one or more of {list(METHODS)}.")
        if rerank is not None and rerank not in RERANKERS:
            raise ValueError(f"hybrid {name!r}: unknown reranker {rerank!r}; use one of {list(RERANKERS)}.")
        if dense is None and (set(methods) - {"bm25"} or rerank):
            raise ValueError(f"hybrid {name!r} uses {sorted(set(methods) - {'bm25'}) or [rerank]} and needs an "
                             "embedding model; set its model.")
        self.name = name
        self.methods = dict(methods)
        self.dense = dense
        self.fusion, self.rerank = fusion, rerank
        self.rerank_top, self.candidates = rerank_top, candidates
        self.bm25 = bm25 or BM25Params()
        self.index_root = index_root

    @property
    def parts(self) -> tuple[str, ...]:
        parts = set(self.methods) | ({"multivector"} if self.rerank else set())
        if self.dense is not None:
            parts.add("dense")
        from rayembed.index.lexical import check_parts

        return check_parts(sorted(parts))

    def describe(self) -> dict:
        out = {"type": "hybrid", "methods": self.methods, "fusion": self.fusion, "rerank": self.rerank,
               "rerank_top": self.rerank_top if self.rerank else None, "candidates": self.candidates,
               "parts": list(self.parts)}
        if self.dense is not None:
            out["dense"] = self.dense.describe()
        if "bm25" in self.methods:
            out["bm25"] = self.bm25.to_dict()
        return out

    def search(self, data: RetrievalData, k: int) -> Run:
        from rayembed.search.hybrid import HybridSearcher

        doc_ids = data.doc_ids()
        query_ids = data.judged_query_ids()
        doc_instruction = data.instruction if data.symmetric else None
        instruction = data.instruction if (self.dense is not None and self.dense.instruct) else None
        index_dir = Path(self.index_root) / data.name if self.index_root else None
        prebuilt = prebuilt_index(self.dense, data, self.parts, self.bm25) if self.dense is not None else None
        if prebuilt is not None:
            self.dense.index_used[data.name] = self.dense.indexes[data.name]
        k = min(k, len(doc_ids))
        with (contextlib.nullcontext(prebuilt) if prebuilt is not None else
              eval_index(self.dense, doc_ids, data.doc_texts(), doc_instruction, index_dir, parts=self.parts,
                         bm25=self.bm25)) as root:
            searcher = HybridSearcher.open(root, embedder=self.dense.embedder if self.dense else None)
            try:
                t0 = time.perf_counter()
                hits = searcher.search([data.queries[q] for q in query_ids], k, methods=self.methods,
                                       fusion=self.fusion, instruction=instruction, rerank=self.rerank, rerank_top=self.rerank_top,
                                       candidates=max(self.candidates, k))
                logger.info("%s: searched %d queries in %.1f s", self.name, len(query_ids), time.perf_counter() - t0)
            finally:
                searcher.close()
        run: Run = {}
        for qid, row in zip(query_ids, hits):
            row = [h for h in row if not (data.ignore_identical_ids and h["doc_id"] == qid)]
            run[qid] = {h["doc_id"]: float(len(row) - r) for r, h in enumerate(row)}
        return run
