"""Hybrid search over one index directory: dense FAISS shards, BM25, learned sparse, fused; MaxSim reranking.

Example::

    s = HybridSearcher.open("runs/demo/index/msmarco", embedder=emb)   # or embedder=None: loaded on demand
    s.available_methods                                               # ['dense', 'bm25', 'sparse']
    hits = s.search(["what is a wing flap"], k=10, methods={"dense": 1, "bm25": 1}, fusion="rrf",
                    rerank="multivector", rerank_top=100)
    hits[0][0]   # {"doc_id", "score", "text", "title", "scores": {"dense": 0.71, "bm25": 11.2, "multivector": 0.83}}

Every method retrieves ``candidates`` documents per query (at least ``k``, and at least
``rerank_top`` when reranking); their lists are fused by doc id with :mod:`rayembed.search.fusion`.
One method alone is not fused: its own order and raw scores are returned. ``rerank="multivector"``
re-scores the fused top ``rerank_top`` with MaxSim against the token vectors stored in the
index; hits below ``rerank_top`` keep their fused order after the reranked ones.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayembed.index.lexical import MultivectorPart, SparsePart, open_bm25
from rayembed.index.manifest import (
    KIND_DENSE,
    MANIFEST,
    IndexIntegrityError,
    check_manifest,
    identity_of,
    kind_of,
    read_json,
    same_embedder,
)
from rayembed.search.fusion import FUSIONS, fuse

logger = logging.getLogger(__name__)

METHODS = ("dense", "bm25", "sparse")
RERANKERS = ("multivector",)


class HybridSearcher:
    """Every retrieval method an index directory holds, searched alone or fused."""

    def __init__(self, root: Path, manifest: dict[str, Any], *, dense: Any, docs: Any, bm25: Any = None,
                 sparse: SparsePart | None = None, multivector: MultivectorPart | None = None,
                 embedder: Any = None):
        self.root = root
        self.manifest = manifest
        self.dense = dense
        self.docs = docs
        self.bm25 = bm25
        self.sparse = sparse
        self.multivector = multivector
        self._embedder = embedder
        self._emb_lock = threading.Lock()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, index_dir: str | os.PathLike, embedder: Any = None, *, verify: bool = True,
             use_gpu: str | bool = "auto") -> HybridSearcher:
        """Open an index directory (or its ``manifest.json``), checking every file of every part.

        ``embedder``: the Embedder the index was built with (checked against the manifest). None:
        a BM25-only index needs none; a dense index loads its own (``manifest["embedder_name"]``)
        the first time a query must be encoded. With ``verify`` every file must match its
        recorded sha256 (a damaged file raises :class:`IndexIntegrityError` naming it).
        """
        from rayembed.index.manifest import local_index_dir
        from rayembed.index.sharded import DocStore, ShardedIndex

        p = local_index_dir(index_dir)
        manifest_path = p / MANIFEST if p.is_dir() else p
        root = manifest_path.parent.resolve()
        m = read_json(manifest_path, what="index manifest")
        check_manifest(m, manifest_path)
        parts = m.get("parts") or {}
        dense = None
        if kind_of(m) == KIND_DENSE:
            dense = ShardedIndex.open(manifest_path, verify=verify, expected_embedder=embedder, use_gpu=use_gpu)
            docs = dense.docs
        else:
            from rayembed.index.manifest import verify_file

            if embedder is not None:
                logger.info("Index %s is BM25-only; the embedder given is not used.", root)
                embedder = None
            for i, s in enumerate(m["shards"]):
                verify_file(root, s["docs"], what=f"id map of shard {i}", check_hash=verify)
            docs = DocStore(root, m["shards"], m["ntotal"])
        bm25 = open_bm25(root, parts["bm25"], verify=verify) if "bm25" in parts else None
        sparse = SparsePart(root, parts["sparse"], verify=verify) if "sparse" in parts else None
        multivector = MultivectorPart(root, parts["multivector"], verify=verify) if "multivector" in parts else None
        for name, part in (("bm25", bm25), ("sparse", sparse)):
            rows = getattr(part, "num_docs", None) if name == "bm25" else (
                sum(mat.shape[0] for _, mat in part.shards) if part is not None else None)
            if part is not None and rows != m["ntotal"]:
                raise IndexIntegrityError(
                    f"The {name} part of {root} covers {rows} documents but the index holds {m['ntotal']}; "
                    "rebuild it with `rayembed index`."
                )
        s = cls(root, m, dense=dense, docs=docs, bm25=bm25, sparse=sparse, multivector=multivector, embedder=embedder)
        logger.info("Opened %s: %d documents, methods %s%s", root, m["ntotal"], s.available_methods,
                    ", multivector reranking" if multivector is not None else "")
        return s

    # ------------------------------------------------------------------ properties

    @property
    def ntotal(self) -> int:
        return int(self.manifest["ntotal"])

    @property
    def kind(self) -> str:
        return kind_of(self.manifest)

    @property
    def available_methods(self) -> list[str]:
        """First-stage methods this index can search: a subset of ``dense``, ``bm25``, ``sparse``."""
        have = {"dense": self.dense is not None, "bm25": self.bm25 is not None, "sparse": self.sparse is not None}
        return [m for m in METHODS if have[m]]

    @property
    def available_rerankers(self) -> list[str]:
        return ["multivector"] if self.multivector is not None else []

    @property
    def default_methods(self) -> dict[str, float]:
        return {"dense": 1.0} if self.dense is not None else {"bm25": 1.0}

    @property
    def embedder(self) -> Any:
        """The Embedder that encodes queries (loaded from the manifest on first use when none was given)."""
        if self._embedder is None:
            if self.dense is None:
                raise ValueError(f"Index {self.root} is BM25-only; it has no embedder.")
            with self._emb_lock:
                if self._embedder is None:
                    self._embedder = self._load_embedder()
        return self._embedder

    def _load_embedder(self) -> Any:
        from rayembed.modeling.embedder import Embedder

        name = self.manifest.get("embedder_name")
        if not name:
            raise ValueError(f"Index {self.root} does not record its embedder; pass embedder= to HybridSearcher.open.")
        emb = Embedder.from_pretrained(name)
        if not same_embedder(self.manifest["embedder"], identity_of(emb)):
            raise IndexIntegrityError(
                f"Embedder {name} is not the one index {self.root} was built with; its vectors are not "
                "comparable. Pass the embedder the index was built with."
            )
        return emb

    def __repr__(self) -> str:
        return (f"HybridSearcher({str(self.root)!r}, ntotal={self.ntotal}, methods={self.available_methods}, "
                f"rerankers={self.available_rerankers})")

    # ------------------------------------------------------------------ search

    def _check(self, methods: Mapping[str, float] | None, fusion: str, rerank: str | None
               ) -> dict[str, float]:
        have = self.available_methods
        if methods is None:
            methods = self.default_methods
        if not isinstance(methods, Mapping) or not methods:
            raise ValueError(f"methods must be a non-empty mapping of method -> weight, e.g. {{'dense': 1, 'bm25': 1}}; "
                             f"this index holds {have}.")
        out: dict[str, float] = {}
        for name, w in methods.items():
            if name in RERANKERS:
                raise ValueError(f"'{name}' reranks, it does not retrieve: pass rerank='{name}' with first-stage "
                                 f"methods from {have}.")
            if name not in METHODS:
                raise ValueError(f"Unknown retrieval method {name!r}; methods are {list(METHODS)}, and this index "
                                 f"({self.root}) holds {have}.")
            if name not in have:
                raise ValueError(f"Method {name!r} is not in the index {self.root}, which holds {have}. Rebuild it "
                                 f"with index.parts including {name}, or search with {have}.")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
                raise ValueError(f"The weight of method {name!r} must be a finite number >= 0, got {w!r}.")
            out[name] = float(w)
        if fusion not in (*FUSIONS, "weighted"):
            raise ValueError(f"Unknown fusion {fusion!r}; use one of {list(FUSIONS)}.")
        if rerank is not None:
            if rerank not in RERANKERS:
                raise ValueError(f"Unknown reranker {rerank!r}; use one of {list(RERANKERS)} or None.")
            if self.multivector is None:
                raise ValueError(f"rerank={rerank!r} needs the multivector part, and index {self.root} holds "
                                 f"{have} only. Rebuild it with index.parts including multivector.")
        return out

    def _retrieve(self, method: str, queries: list[str], depth: int, instruction: str | None,
                  allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global ids) (nq, depth) of one method; id -1 where it found nothing.

        ``allowed`` ((ntotal,) bool, a metadata filter): applied inside FAISS for dense; bm25 and
        sparse drop the ids outside it from a deeper list.
        """
        if method == "dense":
            q = self.embedder.encode(queries, instruction=instruction)  # (nq, dim)
            return self.dense.search(q, depth, allowed=allowed)
        if method == "bm25":
            scores, ids = self.bm25.search(queries, depth if allowed is None else self.ntotal)
        else:
            q = self.embedder.encode_sparse(queries, instruction=instruction)  # csr (nq, vocab)
            scores, ids = self.sparse.search(q, depth if allowed is None else self.ntotal)
        if allowed is None:
            return scores, ids
        keep = (ids >= 0) & allowed[np.clip(ids, 0, None)]
        out_s = np.full((len(ids), depth), -np.inf, np.float32)
        out_i = np.full((len(ids), depth), -1, np.int64)
        for r in range(len(ids)):
            sel = np.flatnonzero(keep[r])[:depth]
            out_s[r, : len(sel)] = scores[r, sel]
            out_i[r, : len(sel)] = ids[r, sel]
        return out_s, out_i

    def search(self, queries: list[str], k: int, *, methods: Mapping[str, float] | None = None,
               fusion: str = "rrf", instruction: str | None = None, rerank: str | None = None,
               rerank_top: int = 100, candidates: int = 100, rrf_k: int = 60,
               filter: dict[str, Any] | None = None) -> list[list[dict]]:
        """Top-``k`` hits per query: ``{"doc_id", "score", "text", "title", "scores": {method: raw}}``.

        ``methods``: method -> weight (``None``: dense only, or bm25 only on a BM25-only index).
        ``fusion``: ``"rrf"`` (weights scale each method's 1/(rrf_k + rank)) or ``"weighted_sum"``
        (min-max normalised scores, weighted). ``instruction``: the query instruction for the
        model-encoded methods. ``rerank="multivector"``: MaxSim over the fused top ``rerank_top``.
        ``filter``: a metadata filter (:mod:`rayembed.index.filters`), e.g. ``{"lang": "en"}``.
        """
        if isinstance(queries, str):
            queries = [queries]
        queries = list(queries)
        if any(not isinstance(q, str) for q in queries):
            raise TypeError("queries must be a list of strings.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if rerank_top < 1 or candidates < 1:
            raise ValueError(f"rerank_top and candidates must be >= 1, got {rerank_top} and {candidates}.")
        weights = self._check(methods, fusion, rerank)
        if not queries:
            return []
        depth = k if len(weights) == 1 else max(k, candidates)
        if rerank:
            depth = max(depth, rerank_top)
        depth = min(depth, self.ntotal)
        allowed = None
        if filter is not None:
            if self.dense is None:
                raise ValueError("Metadata filters need the dense part's field index; this index is BM25-only.")
            allowed = self.dense.filter_mask(filter)
        raw = {m: self._retrieve(m, queries, depth, instruction, allowed) for m in weights}
        # Doc ids (and texts) of every global id any method returned, read once.
        gids = np.unique(np.concatenate([ids.ravel() for _, ids in raw.values()]))
        gids = gids[gids >= 0]
        docs = dict(zip(gids.tolist(), self.docs.get(gids)))
        q_mv = None
        if rerank:
            q_mv = self.embedder.encode_multivector(queries, instruction=instruction)
        out: list[list[dict]] = []
        for qi in range(len(queries)):
            rankings: dict[str, list[tuple[str, float]]] = {}
            raw_scores: dict[str, dict[str, float]] = {}
            gid_of: dict[str, int] = {}
            for m, (scores, ids) in raw.items():
                lst = []
                for s, g in zip(scores[qi].tolist(), ids[qi].tolist()):
                    if g < 0:
                        continue
                    did = docs[g]["doc_id"]
                    gid_of.setdefault(did, g)
                    lst.append((did, float(s)))
                    raw_scores.setdefault(did, {}).setdefault(m, float(s))
                rankings[m] = lst
            if len(rankings) == 1:
                fused = list(next(iter(rankings.values())))
            else:
                fused = fuse(rankings, fusion, weights, rrf_k=rrf_k)
            if rerank:
                fused = self._rerank(q_mv[qi], fused, gid_of, raw_scores, rerank_top)
            hits = []
            for did, score in fused[:k]:
                d = docs[gid_of[did]]
                hits.append({"doc_id": did, "score": float(score), "text": d["text"], "title": d["title"],
                             "scores": raw_scores.get(did, {})})
            out.append(hits)
        return out

    def _rerank(self, q_vecs: np.ndarray, fused: list[tuple[str, float]], gid_of: dict[str, int],
                raw_scores: dict[str, dict[str, float]], rerank_top: int) -> list[tuple[str, float]]:
        from rayembed.modeling.heads import maxsim

        top = fused[:rerank_top]
        vecs = self.multivector.get([gid_of[d] for d, _ in top])
        q = np.asarray(q_vecs, dtype=np.float32)
        rescored = []
        for (did, _), dv in zip(top, vecs):
            s = float(maxsim(q, dv))
            raw_scores.setdefault(did, {})["multivector"] = s
            rescored.append((did, s))
        rescored.sort(key=lambda x: (-x[1], x[0]))
        return rescored + list(fused[rerank_top:])

    def get_documents(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        return self.docs.get(ids)

    def close(self) -> None:
        if self.dense is not None:
            self.dense.close()
