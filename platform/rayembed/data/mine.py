"""Hard-negative mining (`rayembed mine`): retrieve top-k per query, drop positives, sample n.

The corpus is every distinct document of the input rows (positives and existing negatives),
plus an optional extra corpus (a BEIR/SMART folder or a JSONL of {title, text}). The retriever
is BM25 (``bm25s``) or any saved embedder, whose vectors go into an exact FAISS inner-product
index. For each query, the candidates are its top ``top_k`` documents minus *every* positive of
that query (rows sharing a query text share positives), minus the first ``skip_top`` remaining
results (likely unlabelled positives), minus every candidate scoring above ``max_positive_ratio``
times the positive's own score (NV-Retriever's false-negative filter, 0.95 by default in the config);
``num_negatives`` are sampled from the rest with an RNG seeded by (seed, row id), so a rerun gives
the same negatives.

`rayembed data build` calls this for every source whose rows have no negatives, over that source's
own documents (``data.mine.in_build``; a source opts out with ``mine: false``).

With ``data.mine.engine=local`` an embedder encodes in this process and FAISS is used directly.
With ``engine=ray`` mining scales with the cluster: the documents are written as a JSONL corpus
under ``data.mine.work_dir`` (a shared folder or a URI), the distributed index build encodes them
on the encoder actor pool (``index.encode``) into fixed shards written by the workers, the queries
are encoded on the same kind of pool, and one Ray task per shard searches it; the driver only
merges each shard's top-k ids per query.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _bm25_search(docs: list[str], queries: list[str], k: int,
                 pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` BM25 documents per query: (ids, scores), and the score of each (query, document) pair."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
    k = min(k, len(docs))
    tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False, return_ids=False)
    # A query of stopwords or punctuation only has no BM25 token: BM25 ranks nothing for it, so it
    # gets no candidates (id -1) and its row stays short of negatives (bm25s fails on it besides).
    ids = np.full((len(queries), k), -1, np.int64)
    scores = np.zeros((len(queries), k), np.float32)
    has = [i for i, t in enumerate(tokens) if t]
    if has:
        got_ids, got_scores = retriever.retrieve([tokens[i] for i in has], k=k, show_progress=False)
        ids[has], scores[has] = got_ids, got_scores
    by_query: dict[int, list[int]] = defaultdict(list)
    for n, (qi, _) in enumerate(pairs):
        by_query[qi].append(n)
    pair_scores = np.zeros(len(pairs), np.float32)
    for qi, ns in by_query.items():
        if tokens[qi]:
            row = retriever.get_scores(tokens[qi])  # (n_docs,): the same scoring as retrieve
            pair_scores[ns] = row[[pairs[n][1] for n in ns]]
    return ids, scores, pair_scores


def _dense_search(docs: list[str], queries: list[str], instructions: list[str], k: int, retriever: str,
                  batch_size: int, max_length: int,
                  pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_bm25_search` with an embedder's inner products (an exact FAISS index)."""
    import faiss

    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(retriever, max_length=max_length)
    d = emb.encode(docs, batch_size=batch_size).astype(np.float32)  # (n_docs, dim)
    formatted = [emb.format_query(q, i) if i else q for q, i in zip(queries, instructions)]
    q = emb.encode(formatted, batch_size=batch_size).astype(np.float32)  # (n_queries, dim)
    index = faiss.IndexFlatIP(d.shape[1])
    index.add(d)
    scores, ids = index.search(q, min(k, len(docs)))
    qi = np.asarray([p[0] for p in pairs], np.int64)
    di = np.asarray([p[1] for p in pairs], np.int64)
    pair_scores = np.einsum("ij,ij->i", q[qi], d[di]) if len(pairs) else np.zeros(0, np.float32)
    return ids, scores, pair_scores.astype(np.float32)  # (n_queries, k) twice, (n_pairs,)


def _write_mining_corpus(docs: list[str], work: Any, shard_size: int) -> list[int]:
    """The non-empty documents as JSONL files ``corpus/part-NNNNN.jsonl`` below ``work``, in order,
    one file per shard; ``_id`` is the document's position. Returns the positions written."""
    written = [i for i, d in enumerate(docs) if d.strip()]
    for n, start in enumerate(range(0, len(written), shard_size)):
        lines = "".join(json.dumps({"_id": str(i), "title": "", "text": docs[i]}, ensure_ascii=False) + "\n"
                        for i in written[start:start + shard_size])
        work.write_bytes(f"corpus/part-{n:05d}.jsonl", lines.encode("utf-8"))
    return written


def _search_shard(index_uri: str, shard: dict[str, Any], queries: np.ndarray, k: int,
                  pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` of one shard for every query: (scores, document positions), -1 where fewer; and
    the inner product of each (query, document position) row of ``pairs`` whose document is in
    this shard (NaN for the others)."""
    import tempfile

    import faiss
    import pyarrow.parquet as pq

    from rayembed.cluster.storage import resolve_storage
    from rayembed.io import sha256_file

    st = resolve_storage(index_uri)
    with tempfile.TemporaryDirectory(prefix="rayembed-mine-") as d:
        local = {}
        for rec in (shard, shard["docs"]):
            path = Path(d) / Path(rec["file"]).name
            with st.filesystem.open_input_stream(st.join(rec["file"]).path) as fin, open(path, "wb") as fout:
                fout.write(fin.read())
            if sha256_file(path) != rec["sha256"]:
                raise ValueError(f"{index_uri}/{rec['file']} does not match its manifest's sha256; rerun the mining.")
            local[rec["file"]] = path
        index = faiss.read_index(str(local[shard["file"]]))
        doc_ids = pq.read_table(local[shard["docs"]["file"]], columns=["id", "doc_id"])
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores, ids = index.search(queries, min(k, index.ntotal))
    start = shard["id_start"]
    positions = np.asarray([int(x) for x in doc_ids.column("doc_id").to_pylist()], dtype=np.int64)
    mapped = np.where(ids >= 0, positions[np.clip(ids - start, 0, len(positions) - 1)], -1)
    # The positives' scores: their vectors, read back from the flat shard by internal position.
    idmap = faiss.downcast_index(index)
    labels = faiss.vector_to_array(idmap.id_map)  # internal position -> global id
    internal = {int(positions[g - start]): j for j, g in enumerate(labels)}
    flat = faiss.downcast_index(idmap.index)
    pair_scores = np.full(len(pairs), np.nan, np.float32)
    for n, (qi, dp) in enumerate(pairs):
        j = internal.get(int(dp))
        if j is not None:
            pair_scores[n] = float(queries[qi] @ flat.reconstruct(j))
    return scores, mapped, pair_scores


def _dense_search_ray(docs: list[str], queries: list[str], instructions: list[str], k: int, retriever: str,
                      cfg: Any, work_dir: str,
                      pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_dense_search` on the cluster (see the module docstring)."""
    import copy

    import ray
    import ray.data

    from rayembed.cluster.storage import check_location
    from rayembed.index.ray_build import EncoderActor, _ordered, _remote_args, build_index, embedder_args
    from rayembed.runtime import init_ray

    init_ray(cfg.compute)
    mc = cfg.data.mine
    work = check_location(work_dir, what="data.mine.work_dir")
    t0 = time.perf_counter()
    _write_mining_corpus(docs, work, mc.shard_size)
    icfg = copy.deepcopy(cfg)
    icfg.index.embedder, icfg.index.corpus, icfg.index.format = retriever, work.join("corpus").uri, "jsonl"
    icfg.index.output_dir, icfg.index.index_type, icfg.index.shard_size = work.join("index").uri, "flat", mc.shard_size
    icfg.index.include_title, icfg.index.doc_instruction, icfg.index.parts = False, None, ["dense"]
    icfg.index.overwrite = True
    icfg.index.encode.batch_size, icfg.index.encode.max_length = mc.batch_size, mc.max_length
    manifest_uri = str(build_index(icfg))
    manifest = work.join("index").read_json("manifest.json")
    t_index = time.perf_counter() - t0

    # Queries: encoded on the pool, each with its own instruction, in order.
    name, load_kwargs = embedder_args(icfg)
    enc = icfg.index.encode
    items = [{"id": i, "text": q, "instruction": ins} for i, (q, ins) in enumerate(zip(queries, instructions))]
    with _ordered():
        ds = ray.data.from_items(items).repartition(target_num_rows_per_block=enc.rows_per_block).map_batches(
            EncoderActor, compute=ray.data.ActorPoolStrategy(min_size=enc.min_actors, max_size=enc.max_actors),
            batch_size=enc.rows_per_block, batch_format="numpy",  # whole blocks: sorted by length in the actor
            fn_constructor_kwargs=dict(name_or_path=name, load_kwargs=load_kwargs, batch_size=mc.batch_size,
                                       max_length=mc.max_length, include_title=False,
                                       num_threads=max(1, int(round(enc.num_cpus_per_actor)))),
            **_remote_args(enc))
        qvecs = np.concatenate([b["vector"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
    # One search task per shard; the driver merges each query's top-k over the shards.
    search = ray.remote(num_cpus=1)(_search_shard)
    qref = ray.put(qvecs)
    where = manifest_uri.rsplit("/", 1)[0]
    pref = ray.put(np.asarray(pairs, np.int64).reshape(-1, 2))
    parts = ray.get([search.remote(where, s, qref, k, pref) for s in manifest["shards"]])
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    # Each pair's document lives in exactly one shard: the others answered NaN.
    pair_scores = np.fmax.reduce(np.stack([p[2] for p in parts]), axis=0) if pairs else np.zeros(0, np.float32)
    logger.info("mined on the cluster: %d documents in %d shards (index %.1f s), %d queries, %.1f s in all",
                len(docs), len(manifest["shards"]), t_index, len(queries), time.perf_counter() - t0)
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1), pair_scores


def mine_negatives(rows: list[dict[str, Any]], *, retriever: str = "bm25", top_k: int = 100, skip_top: int = 0,
                   num_negatives: int = 1, seed: int = 0, extra_docs: list[str] | None = None,
                   batch_size: int = 64, max_length: int = 256, keep_existing: bool = False,
                   max_positive_ratio: float = 0.0, only_missing: bool = False,
                   cfg: Any = None, work_dir: str | None = None,
                   stats: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Return copies of ``rows`` with mined ``negatives`` (see the module docstring).

    ``max_positive_ratio`` (0: off): drop every candidate scoring above that fraction of the row's
    positive's score (NV-Retriever's false-negative filter; 0.95 there), or above the positive
    itself when that score is not positive. ``only_missing``: mine only rows that have no
    negatives; the others are returned as they are (their documents still join the corpus).
    ``stats``, when given, is filled with counts: rows mined, rows short of ``num_negatives``,
    candidates dropped by the ratio filter.

    With ``cfg`` whose ``data.mine.engine`` is ``ray``, an embedder retriever runs on the cluster
    and writes its corpus and index below ``work_dir``.
    """
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
    targets = [r for r in rows if not (only_missing and r.get("negatives"))]
    uniq_q = list(dict.fromkeys(r["query"] for r in targets))
    q_index = {q: i for i, q in enumerate(uniq_q)}
    instr = {r["query"]: (r.get("instruction") or "") for r in targets}
    pair_of = {(q_index[r["query"]], doc_ids[r["positive"]]) for r in targets} if max_positive_ratio else set()
    pairs = sorted(pair_of)
    if not targets:
        hits = scores = pair_scores = np.zeros((0, 0))
    elif retriever == "bm25":
        hits, scores, pair_scores = _bm25_search(docs, uniq_q, top_k, pairs)
    elif cfg is not None and cfg.data.mine.engine == "ray":
        if not work_dir:
            raise ValueError("data.mine.engine=ray needs data.mine.work_dir (a folder every node sees, or a URI).")
        hits, scores, pair_scores = _dense_search_ray(docs, uniq_q, [instr[q] for q in uniq_q], top_k, retriever,
                                                      cfg, work_dir, pairs)
    else:
        hits, scores, pair_scores = _dense_search(docs, uniq_q, [instr[q] for q in uniq_q], top_k, retriever,
                                                  batch_size, max_length, pairs)
    pos_score = dict(zip(pairs, (float(s) for s in pair_scores)))
    out, short, mined, dropped = [], 0, 0, 0
    for r in rows:
        if only_missing and r.get("negatives"):
            out.append(dict(r))
            continue
        mined += 1
        qi = q_index[r["query"]]
        pos = positives[r["query"]]
        cands = [(int(h), float(s)) for h, s in zip(hits[qi], scores[qi]) if int(h) >= 0 and int(h) not in pos]
        cands = cands[skip_top:]
        if max_positive_ratio:
            ps = pos_score[(qi, doc_ids[r["positive"]])]
            limit = max_positive_ratio * ps if ps > 0 else ps
            kept = [c for c in cands if c[1] <= limit]
            dropped += len(cands) - len(kept)
            cands = kept
        rng = random.Random(f"{seed}:{r.get('id') or r['query']}")
        picked = rng.sample([c[0] for c in cands], min(num_negatives, len(cands)))
        short += len(picked) < num_negatives
        negs = [docs[i] for i in picked]
        if keep_existing:
            negs = [*(r.get("negatives") or []), *negs]
        out.append({**r, "negatives": negs})
    if stats is not None:
        stats.update(rows_mined=mined, rows_short=short, false_negatives_dropped=dropped)
    logger.info("mined %d of %d rows over %d documents with %s in %.1f s (%d rows got fewer than %d negatives; "
                "%d candidates above %.2f x the positive's score dropped)", mined, len(rows), len(docs), retriever,
                time.perf_counter() - t0, short, num_negatives, dropped, max_positive_ratio)
    return out


def mine_file(input_path: str | Path, output_path: str | Path, mcfg, *, seed: int = 0,
              corpus: str | Path | None = None, cfg: Any = None) -> Path:
    """Mine negatives for the schema rows in a Parquet/JSONL file or folder; write Parquet atomically.

    ``cfg`` (the whole config) is needed for ``data.mine.engine=ray``: its ``index.encode`` sizes
    the encoder pool.
    """
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
    work = mcfg.work_dir or f"{Path(output_path).resolve()}.work"
    mined = mine_negatives(rows, retriever=mcfg.retriever, top_k=mcfg.top_k, skip_top=mcfg.skip_top,
                           num_negatives=mcfg.num_negatives, seed=seed, extra_docs=extra,
                           batch_size=mcfg.batch_size, max_length=mcfg.max_length,
                           max_positive_ratio=mcfg.max_positive_ratio, cfg=cfg, work_dir=work)
    return atomic_write_parquet(output_path, to_table(mined))
