"""One code path for ``/search``, plain and hybrid: check the options, search, format the answer.

:func:`plan_search` checks a request against the served index and the config (every error a
400 naming its field, limits taken from the index: ``nprobe <= nlist``, ``ef_search`` only on
HNSW, the MaxSim work bounded); the Retriever then encodes what the plan needs through the
batched QueryEncoder and :func:`run_search` (synchronous: FAISS, Parquet, MaxSim; run in a
worker thread) finds the hits, which :func:`format_search` turns into the response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rayembed.serving.schemas import (
    InvalidRequest,
    SearchRequest,
    check_instruction,
    check_range,
    check_texts,
)

# Weights are relative (rrf and weighted_sum scale linearly with them); a bound keeps their sum finite.
MAX_WEIGHT = 1e6


class Loaded:
    """One opened index (all its parts) and what search limits derive from it; swapped whole by ``reconfigure``.

    ``index`` is the dense ShardedIndex; ``searcher`` the HybridSearcher over the same opened
    shards plus the index's BM25, sparse and multi-vector parts.
    """

    def __init__(self, searcher, index_dir: str) -> None:
        self.searcher = searcher
        self.index = searcher.dense
        self.index_dir = index_dir
        self.version = str(self.index.version)
        self.index_type = str(self.index.spec.index_type)
        self.nlist = _nlist(self.index) if self.index_type.startswith("ivf") else 0

    def warm(self) -> None:
        """Read every id-map part now (in the opening thread), not lazily inside a request."""
        starts = [int(s["id_start"]) for s in self.index.manifest["shards"] if int(s.get("rows", 1)) > 0]
        if starts:
            self.index.get_documents(starts)

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "ntotal": int(self.index.ntotal), "type": self.index_type,
                "shards": self.index.num_shards, "methods": self.searcher.available_methods}


def _nlist(index) -> int:
    import faiss

    try:
        return int(faiss.extract_index_ivf(index.shards[0]).nlist)
    except Exception:
        return int(index.spec.nlist or 0)


@dataclass
class SearchPlan:
    queries: list[str]
    params: list[str]
    k: int
    instruction: str | None
    hybrid: bool
    methods: dict[str, float] = field(default_factory=dict)
    fusion: str = "rrf"
    rerank: str | None = None
    rerank_top: int = 0
    nprobe: int | None = None
    ef_search: int | None = None
    filter: dict[str, Any] | None = None
    allowed: Any = None  # (ntotal,) bool mask of the filter, checked at planning

    @property
    def needs(self) -> set[str]:
        """The query encodings this plan needs: dense, sparse, multivector."""
        out = {m for m in self.methods if m in ("dense", "sparse")}
        if self.rerank:
            out.add("multivector")
        return out


def text_params(value: str | list[str], param: str) -> list[str]:
    return [param] if isinstance(value, str) else [f"{param}[{i}]" for i in range(len(value))]


def plan_search(req: SearchRequest, cfg, loaded: Loaded) -> SearchPlan:
    """A checked plan for ``req`` against ``loaded``; :class:`InvalidRequest` names the bad field."""
    queries = check_texts(req.query, "query", max_items=cfg.max_queries_per_request, max_chars=cfg.max_input_chars)
    k = cfg.default_k if req.k is None else req.k
    check_range(k, "k", 1, cfg.max_k)
    check_instruction(req.instruction, "instruction", cfg.max_input_chars)
    instruction = cfg.default_instruction if req.instruction is None else (req.instruction or None)
    plan = SearchPlan(queries, text_params(req.query, "query"), k, instruction, hybrid=req.is_hybrid)
    if plan.hybrid:
        for name in ("nprobe", "ef_search"):
            if getattr(req, name) is not None:
                raise InvalidRequest(
                    name,
                    f"{name} tunes the plain dense search; it cannot be combined with methods, fusion, rerank or "
                    "rerank_top. Drop one or the other.",
                )
        _plan_hybrid(plan, req, cfg, loaded)
    else:
        plan.methods = {"dense": 1.0}
        plan.nprobe, plan.ef_search = _search_params(req, cfg, loaded)
    if req.filter is not None:
        from rayembed.index.filters import FilterError

        try:
            plan.allowed = loaded.index.filter_mask(req.filter)
        except FilterError as e:
            raise InvalidRequest(f"filter.{e.field}" if e.field else "filter", str(e)) from None
        plan.filter = req.filter
    return plan


def _search_params(req: SearchRequest, cfg, loaded: Loaded) -> tuple[int | None, int | None]:
    kind = loaded.index_type
    if req.nprobe is not None:
        if not kind.startswith("ivf"):
            raise InvalidRequest(
                "nprobe", f"nprobe applies to IVF indexes, and the served index is {kind}; omit nprobe."
            )
        check_range(req.nprobe, "nprobe", 1, loaded.nlist)
    if req.ef_search is not None:
        if kind != "hnsw":
            raise InvalidRequest(
                "ef_search", f"ef_search applies to HNSW indexes, and the served index is {kind}; omit ef_search."
            )
        check_range(req.ef_search, "ef_search", 1, min(cfg.max_ef_search, max(loaded.index.ntotal, 1)))
    return req.nprobe, req.ef_search


def _plan_hybrid(plan: SearchPlan, req: SearchRequest, cfg, loaded: Loaded) -> None:
    searcher = loaded.searcher
    have = searcher.available_methods
    if req.methods is None:
        methods = dict(searcher.default_methods)
    else:
        if not req.methods:
            raise InvalidRequest(
                "methods", f"methods is empty; give at least one of {have} with a weight, e.g. {{\"dense\": 1}}."
            )
        methods = {}
        for name, weight in req.methods.items():
            param = f"methods.{name}"
            if name not in have:
                known = "is not a retrieval method" if name not in ("dense", "bm25", "sparse") else (
                    "is not in the served index")
                raise InvalidRequest(
                    param,
                    f"{param}: '{name}' {known}; this index offers {have}"
                    + (" (multivector reranks: send rerank=\"multivector\")" if name == "multivector" else "")
                    + ".",
                )
            if not math.isfinite(weight) or weight < 0:
                raise InvalidRequest(param, f"{param}={weight} must be a finite number >= 0.")
            if weight > MAX_WEIGHT:
                raise InvalidRequest(
                    param,
                    f"{param}={weight:g} is too large; weights are relative, so keep each within [0, {MAX_WEIGHT:g}] "
                    "(e.g. 1 and 0.5).",
                )
            methods[name] = float(weight)
        if not any(methods.values()):
            raise InvalidRequest("methods", "methods gives every method weight 0; give one a positive weight.")
    if req.rerank is not None and "multivector" not in searcher.available_rerankers:
        raise InvalidRequest(
            "rerank",
            "rerank=\"multivector\" needs the index's multivector part (token vectors), which this index "
            "lacks; rebuild it with index.parts including multivector, or omit rerank.",
        )
    if req.rerank_top is not None and req.rerank is None:
        raise InvalidRequest("rerank_top", "rerank_top applies only with rerank=\"multivector\"; set rerank or drop it.")
    check_range(req.rerank_top, "rerank_top", 1, cfg.max_rerank_top)
    n = len(plan.queries)
    if req.rerank_top is None:
        rerank_top = max(1, min(100, cfg.max_rerank_top, cfg.max_rerank_docs // n))
    else:
        rerank_top = req.rerank_top
        if req.rerank is not None and rerank_top * n > cfg.max_rerank_docs:
            raise InvalidRequest(
                "rerank_top",
                f"rerank_top={rerank_top} over {n} queries re-scores {rerank_top * n} hits; at most "
                f"{cfg.max_rerank_docs} per request (serve.max_rerank_docs). Lower rerank_top or send fewer queries.",
                code="out_of_range",
            )
    plan.methods = methods
    plan.fusion = "weighted_sum" if req.fusion in ("weighted", "weighted_sum") else "rrf"
    plan.rerank = req.rerank
    plan.rerank_top = rerank_top


class Encoded:
    """Query encodings computed ahead (by the batched QueryEncoder), in the shape of an Embedder."""

    def __init__(self, dense=None, sparse=None, multivector=None) -> None:
        self.dense, self.sparse, self.multivector = dense, sparse, multivector

    def encode(self, texts, instruction=None, **_: Any) -> np.ndarray:
        return self.dense

    def encode_sparse(self, texts, instruction=None, **_: Any):
        return self.sparse

    def encode_multivector(self, texts, instruction=None, **_: Any):
        return self.multivector


def run_search(loaded: Loaded, plan: SearchPlan, enc: Encoded) -> list[list[dict[str, Any]]]:
    """Hits per query, ``{"doc_id", "score", "text", "title", "scores"}``: blocking, for a worker thread."""
    if not plan.hybrid:
        scores, ids = loaded.index.search(enc.dense, plan.k, nprobe=plan.nprobe, ef_search=plan.ef_search,
                                          allowed=plan.allowed)  # (n, k)
        out = []
        for qi in range(len(plan.queries)):
            row_ids = [int(i) for i in ids[qi] if i >= 0]
            docs = loaded.index.get_documents(row_ids) if row_ids else []
            out.append([
                {"doc_id": d["doc_id"], "score": float(s), "text": d.get("text"), "title": d.get("title"), "scores": None}
                for d, s in zip(docs, scores[qi][: len(row_ids)].tolist())
            ])
        return out
    from rayembed.search.hybrid import HybridSearcher

    s = loaded.searcher
    searcher = HybridSearcher(s.root, s.manifest, dense=s.dense, docs=s.docs, bm25=s.bm25, sparse=s.sparse,
                              multivector=s.multivector, embedder=enc)
    return searcher.search(
        plan.queries, plan.k, methods=plan.methods, fusion=plan.fusion, instruction=plan.instruction,
        rerank=plan.rerank, rerank_top=plan.rerank_top, candidates=max(100, plan.k), filter=plan.filter,
    )


def format_search(plan: SearchPlan, hits: list[list[dict[str, Any]]], model: str, version: str) -> dict[str, Any]:
    """The ``/search`` response; hybrid answers add each hit's per-method scores and the options used."""
    results = []
    for query, row in zip(plan.queries, hits):
        res = {
            "query": query,
            "ids": [str(h["doc_id"]) for h in row],
            "scores": [float(h["score"]) for h in row],
            "texts": [h.get("text") or "" for h in row],
            "titles": [h.get("title") or "" for h in row],
        }
        if plan.hybrid:
            res["method_scores"] = [{m: float(v) for m, v in (h.get("scores") or {}).items()} for h in row]
        results.append(res)
    body: dict[str, Any] = {"results": results, "k": plan.k, "model": model, "index_version": version}
    if plan.hybrid:
        body.update(methods=plan.methods, fusion=plan.fusion, rerank=plan.rerank)
    return body
