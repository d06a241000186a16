"""Hard-negative mining (`rayembed mine`): retrieve top-k per query, drop positives, sample n.

The corpus is every distinct document of the input rows (positives and existing negatives),
plus an optional extra corpus (a BEIR/SMART folder or a JSONL of {title, text}). The retriever
is BM25 (``bm25s``) or any saved embedder, whose vectors go into an exact FAISS inner-product
index. For each query, the candidates are its top ``top_k`` documents minus *every* positive of
that query (rows sharing a query text share positives), minus the first ``skip_top`` remaining
results (likely unlabelled positives); ``num_negatives`` are sampled from the rest with an RNG
seeded by (seed, row id), so a rerun gives the same negatives.

Encoding runs in-process in batches (``Embedder.encode``); FAISS is used directly here.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _bm25_search(docs: list[str], queries: list[str], k: int) -> np.ndarray:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
    k = min(k, len(docs))
    ids, _ = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=k, show_progress=False)
    return np.asarray(ids)  # (n_queries, k)


def _dense_search(docs: list[str], queries: list[str], instructions: list[str], k: int, retriever: str,
                  batch_size: int, max_length: int) -> np.ndarray:
    import faiss

    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(retriever, max_length=max_length)
    d = emb.encode(docs, batch_size=batch_size).astype(np.float32)  # (n_docs, dim)
    formatted = [emb.format_query(q, i) if i else q for q, i in zip(queries, instructions)]
    q = emb.encode(formatted, batch_size=batch_size).astype(np.float32)  # (n_queries, dim)
    index = faiss.IndexFlatIP(d.shape[1])
    index.add(d)
    _, ids = index.search(q, min(k, len(docs)))
    return ids  # (n_queries, k)


def mine_negatives(rows: list[dict[str, Any]], *, retriever: str = "bm25", top_k: int = 100, skip_top: int = 0,
                   num_negatives: int = 1, seed: int = 0, extra_docs: list[str] | None = None,
                   batch_size: int = 64, max_length: int = 256, keep_existing: bool = False) -> list[dict[str, Any]]:
    """Return copies of ``rows`` with mined ``negatives`` (see the module docstring)."""
    t0 = time.perf_counter()
    doc_ids: dict[str, int] = {}
    for r in rows:
        for text in [r["positive"], *(r.get("negatives") or [])]:
            doc_ids.setdefault(text, len(doc_ids))
    for text in extra_docs or []:
        if text and text.strip():
            doc_ids.setdefault(text, len(doc_ids))
    docs = list(doc_ids)
    positives: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        positives[r["query"]].add(doc_ids[r["positive"]])
    uniq_q = list(dict.fromkeys(r["query"] for r in rows))
    instr = {r["query"]: (r.get("instruction") or "") for r in rows}
    if retriever == "bm25":
        hits = _bm25_search(docs, uniq_q, top_k)
    else:
        hits = _dense_search(docs, uniq_q, [instr[q] for q in uniq_q], top_k, retriever, batch_size, max_length)
    q_index = {q: i for i, q in enumerate(uniq_q)}
    out, short = [], 0
    for r in rows:
        pos = positives[r["query"]]
        cands = [int(h) for h in hits[q_index[r["query"]]] if int(h) >= 0 and int(h) not in pos]
        cands = cands[skip_top:]
        rng = random.Random(f"{seed}:{r.get('id', r['query'])}")
        picked = rng.sample(cands, min(num_negatives, len(cands)))
        short += len(picked) < num_negatives
        negs = [docs[i] for i in picked]
        if keep_existing:
            negs = [*(r.get("negatives") or []), *negs]
        out.append({**r, "negatives": negs})
    logger.info("mined %d rows over %d documents with %s in %.1f s (%d rows got fewer than %d negatives)",
                len(rows), len(docs), retriever, time.perf_counter() - t0, short, num_negatives)
    return out


def mine_file(input_path: str | Path, output_path: str | Path, mcfg, *, seed: int = 0,
              corpus: str | Path | None = None) -> Path:
    """Mine negatives for the schema rows in a Parquet/JSONL file or folder; write Parquet atomically."""
    from rayembed.data.formats import iter_records
    from rayembed.data.schema import to_table
    from rayembed.data.sources import _corpus_docs
    from rayembed.io import atomic_write_parquet

    p = Path(input_path)
    files = sorted(x for x in p.rglob("*") if x.suffix in (".parquet", ".jsonl")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"No .parquet or .jsonl files under '{p}' to mine negatives for.")
    rows = [r for f in files for r in iter_records(f)]
    extra = None
    if corpus:
        extra = [(f"{d['title']}\n{d['text']}" if d.get("title") else d["text"]) for d in _corpus_docs(Path(corpus))]
    mined = mine_negatives(rows, retriever=mcfg.retriever, top_k=mcfg.top_k, skip_top=mcfg.skip_top,
                           num_negatives=mcfg.num_negatives, seed=seed, extra_docs=extra,
                           batch_size=mcfg.batch_size, max_length=mcfg.max_length)
    return atomic_write_parquet(output_path, to_table(mined))
