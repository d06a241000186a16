"""The Ray Serve retrieval application: ``QueryEncoder`` + ``Retriever`` behind one FastAPI app.

Request path::

    HTTP proxy -> Retriever (FastAPI ingress: auth, validation, FAISS search, id -> text)
                      \\-> QueryEncoder (Embedder, @serve.batch: concurrent queries share a forward pass)
                      \\-> LLMRerankerDeployment (only with serve.reranker.path: POST /rerank, model llm)

``/search`` without hybrid options is the plain dense search. With ``methods``, ``fusion``,
``rerank`` or ``rerank_top`` it runs :class:`rayembed.search.HybridSearcher` over every part the
index holds (dense, BM25, learned sparse; MaxSim over stored token vectors), the queries still
encoded by the QueryEncoder. ``/rerank`` scores given texts against a query with the LLM
reranker or with the embedder's multi-vector head.

Two deployments, so encoders (the costly part, on GPUs in production) scale apart from the
retrievers that hold the index in memory. The index is not a constructor argument but the
Retriever's ``user_config`` (``{"index_dir": ...}``): redeploying with another index directory
is then a *lightweight* update that calls ``reconfigure`` on the running replicas, which load
the new index beside the old one and swap a single reference. In-flight requests finish on the
index they started with; every response names the index version it was answered from.

Deploy with ``serve deploy serving/serve_config.local.yaml`` (import path
``rayembed.serving.app:build_app``), with ``rayembed serve``, or from Python with
:func:`rayembed.serving.start_server`.
"""

# No ``from __future__ import annotations`` here: FastAPI and Serve read the route and builder
# annotations at runtime, and string annotations inside the ingress class do not resolve.
import asyncio
import base64
import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayembed import __version__
from rayembed.serving.auth import ApiKeyMiddleware, resolve_api_key, send_json
from rayembed.serving.schemas import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    Health,
    InvalidRequest,
    ModelList,
    RerankRequest,
    RerankResponse,
    SearchRequest,
    SearchResponse,
    check_range,
    check_texts,
    error_body,
    validation_error_to_body,
)

logger = logging.getLogger(__name__)

ENCODER_NAME = "QueryEncoder"
RETRIEVER_NAME = "Retriever"
RERANKER_NAME = "LLMRerankerDeployment"


# ----------------------------------------------------------------------------- replica-local state
# Each Serve replica is its own process, so module state here belongs to one Retriever replica.
# The middlewares are built once, at import, and read it per request.


class _ReplicaState:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20


_STATE = _ReplicaState()


class BodyLimitMiddleware:
    """413 with a JSON error for bodies whose Content-Length exceeds the configured limit."""

    def __init__(self, app, limit_provider) -> None:
        self.app = app
        self.limit_provider = limit_provider

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope.get("headers") or ():
                if name == b"content-length":
                    limit = self.limit_provider()
                    try:
                        too_big = int(value) > limit
                    except ValueError:
                        too_big = False
                    if too_big:
                        body = error_body(
                            f"The request body is larger than {limit} bytes (serve.max_body_bytes); "
                            "send fewer or shorter texts per request.",
                            "body",
                            "body_too_large",
                        )
                        import json

                        return await send_json(send, 413, json.dumps(body).encode())
                    break
        return await self.app(scope, receive, send)


api = FastAPI(
    title="rayembed retrieval",
    version=__version__,
    description="Dense retrieval over a FAISS index, and OpenAI-compatible embeddings.",
)
# Starlette runs the last-added middleware first: auth, then the body limit.
api.add_middleware(BodyLimitMiddleware, limit_provider=lambda: _STATE.max_body_bytes)
api.add_middleware(ApiKeyMiddleware, key_provider=lambda: _STATE.api_key)


@api.exception_handler(InvalidRequest)
async def _invalid_request(request: Request, exc: InvalidRequest):
    return JSONResponse(error_body(exc.message, exc.param, exc.code), status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    _, body = validation_error_to_body(list(exc.errors()))
    return JSONResponse(body, status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    detail = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    if exc.status_code == 404:
        detail = f"No route {request.method} {request.url.path}; see /docs for the API."
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}; see /docs for the API."
    return JSONResponse(
        error_body(detail, None, f"http_{exc.status_code}"), status_code=exc.status_code, headers=exc.headers
    )


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    from rayembed.security import redact_text

    logger.error("Unhandled error on %s: %s", request.url.path, redact_text(repr(exc)), exc_info=exc)
    return JSONResponse(
        error_body("Internal server error; the server log has the details.", None, "internal_error", "server_error"),
        status_code=500,
    )


def _serve_cfg(settings: dict):
    from rayembed.config import ServeConfig, from_dict

    return from_dict(ServeConfig, settings, prefix="serve")


# ----------------------------------------------------------------------------- QueryEncoder


class _BatchStats:
    """Sizes of the batches the encoder ran: the evidence that batching happens."""

    def __init__(self) -> None:
        self.sizes: Counter[int] = Counter()
        self.texts = 0
        self.batches = 0
        self.encode_s = 0.0

    def record(self, size: int, seconds: float) -> None:
        self.sizes[size] += 1
        self.batches += 1
        self.texts += size
        self.encode_s += seconds

    def snapshot(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "texts": self.texts,
            "max_batch_size_seen": max(self.sizes, default=0),
            "mean_batch_size": (self.texts / self.batches) if self.batches else 0.0,
            "batch_size_counts": {str(k): v for k, v in sorted(self.sizes.items())},
            "encode_seconds": round(self.encode_s, 4),
        }


@serve.deployment(name=ENCODER_NAME)
class QueryEncoder:
    """Loads the Embedder once and encodes queries in batches built from concurrent requests.

    ``encode(texts, instruction)`` splits a request into single texts that join the shared
    batch queue, so ten one-query requests and one ten-query request cost one forward pass.
    """

    def __init__(self, embedder: str, settings: dict) -> None:
        from rayembed.modeling.embedder import Embedder

        cfg = _serve_cfg(settings)
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        t0 = time.perf_counter()
        self.embedder_path = embedder
        self.emb = Embedder.from_pretrained(embedder)
        self._identity = self.emb.identity()
        self._encode_batch.set_max_batch_size(cfg.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.stats_ = _BatchStats()
        self._metric = _batch_histogram()
        logger.info(
            "QueryEncoder ready in %.1f s: %s (dim %d), max_batch_size %d, batch_wait_timeout_s %.4f",
            time.perf_counter() - t0, embedder, self.emb.dim, cfg.max_batch_size, cfg.batch_wait_timeout_s,
        )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.003)
    async def _encode_batch(self, items: list[tuple[str, str | None]]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        vecs = await asyncio.to_thread(self._encode_items, items)  # (B, D)
        seconds = time.perf_counter() - t0
        self.stats_.record(len(items), seconds)
        if self._metric is not None:
            self._metric.observe(len(items))
        logger.debug("encoded a batch of %d texts in %.1f ms", len(items), 1000 * seconds)
        return list(vecs)

    def _encode_items(self, items: list[tuple[str, str | None]]) -> np.ndarray:
        """Encode (text, instruction) pairs; one forward pass per distinct instruction."""
        out = np.zeros((len(items), self.emb.dim), dtype=np.float32)  # (B, D)
        groups: dict[str | None, list[int]] = {}
        for i, (_, instruction) in enumerate(items):
            groups.setdefault(instruction, []).append(i)
        for instruction, rows in groups.items():
            texts = [items[i][0] for i in rows]
            out[rows] = self.emb.encode(texts, instruction=instruction, batch_size=len(texts))
        return out

    async def encode(self, texts: list[str], instruction: str | None = None) -> np.ndarray:
        """(n, dim) float32, L2-normalised, in input order."""
        vecs = await asyncio.gather(*(self._encode_batch((t, instruction)) for t in texts))
        return np.stack(vecs)  # (n, D)

    async def embed(self, texts: list[str], instruction: str | None = None) -> tuple[np.ndarray, int]:
        """Vectors plus the number of input tokens (for the OpenAI ``usage`` field)."""
        vecs = await self.encode(texts, instruction)
        shown = [self.emb.format_query(t, instruction) for t in texts] if instruction is not None else texts
        tokens = sum(len(ids) for ids in self.emb.tokenize_ids(shown))
        return vecs, tokens

    async def encode_sparse(self, texts: list[str], instruction: str | None = None):
        """Lexical weights (csr_matrix (n, vocab)) for hybrid search's ``sparse`` method."""
        return await asyncio.to_thread(self.emb.encode_sparse, texts, instruction=instruction, batch_size=len(texts))

    async def encode_multivector(self, texts: list[str], instruction: str | None = None) -> list[np.ndarray]:
        """Token vectors per text, for MaxSim reranking over an index's stored token vectors."""
        return await asyncio.to_thread(
            self.emb.encode_multivector, texts, instruction=instruction, batch_size=len(texts)
        )

    async def rerank_multivector(self, query: str, texts: list[str], instruction: str | None = None) -> np.ndarray:
        """MaxSim scores of ``texts`` against ``query`` (POST /rerank, model multivector)."""
        from rayembed.search.rerank import rerank_multivector

        return await asyncio.to_thread(rerank_multivector, self.emb, query, texts, instruction=instruction)

    def info(self) -> dict[str, Any]:
        return {
            "dim": int(self.emb.dim),
            "identity": self._identity,
            "embedder": self.embedder_path,
            "has_sparse": bool(getattr(self.emb, "has_sparse", False)),
            "has_multivector": bool(getattr(self.emb, "has_multivector", False)),
        }

    def stats(self) -> dict[str, Any]:
        return {"replica": _replica_tag(), **self.stats_.snapshot()}

    def check_health(self) -> None:
        if getattr(self, "emb", None) is None:
            raise RuntimeError("QueryEncoder has no embedder loaded.")


def _batch_histogram():
    """A Ray metric (exported where the cluster runs a metrics agent); None if unavailable."""
    try:
        from ray.serve.metrics import Histogram

        return Histogram(
            "rayembed_encoder_batch_size",
            description="Texts per QueryEncoder forward pass.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
        )
    except Exception as e:  # metrics are optional; batching works without them
        logger.debug("batch-size metric unavailable: %s", e)
        return None


def _replica_tag() -> str:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:
        return f"pid-{os.getpid()}"


# ----------------------------------------------------------------------------- LLM reranker


@serve.deployment(name=RERANKER_NAME)
class LLMRerankerDeployment:
    """Loads the LLMReranker of ``serve.reranker.path`` once and scores (query, texts) requests."""

    def __init__(self, path: str, settings: dict) -> None:
        from rayembed.rerank.llm import LLMReranker

        cfg = _serve_cfg(settings)
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        t0 = time.perf_counter()
        self.path = path
        self.batch_size = cfg.reranker.batch_size
        self.rr = LLMReranker.from_pretrained(path, max_length=cfg.reranker.max_length)
        self._lock = asyncio.Lock()
        logger.info(
            "LLM reranker ready in %.1f s: %s (base %s, max_length %d, batch_size %d)",
            time.perf_counter() - t0, path, self.rr.config.base_model, self.rr.config.max_length, self.batch_size,
        )

    async def score(self, query: str, texts: list[str], instruction: str | None = None) -> np.ndarray:
        # One request scores at a time: torch already uses every thread of the replica, and
        # concurrent forward passes would only compete for them. Queued requests count as
        # ongoing, which is what autoscaling adds replicas on.
        async with self._lock:
            return await asyncio.to_thread(
                self.rr.score, query, texts, instruction=instruction, batch_size=self.batch_size
            )

    def info(self) -> dict[str, Any]:
        return {"path": self.path, "base_model": self.rr.config.base_model, "max_length": self.rr.config.max_length}


# ----------------------------------------------------------------------------- Retriever


class _EncoderClient:
    """The QueryEncoder deployment in the shape of the Embedder that HybridSearcher calls.

    HybridSearcher is synchronous, so it runs in a worker thread of the Retriever; from there
    each call blocks on the QueryEncoder's answer (never on the replica's event loop). Query
    vectors thus come from the same batched encoder as the plain dense search.
    """

    def __init__(self, handle, info: dict[str, Any]) -> None:
        self._handle = handle
        self._info = info

    @property
    def has_sparse(self) -> bool:
        return bool(self._info.get("has_sparse"))

    @property
    def has_multivector(self) -> bool:
        return bool(self._info.get("has_multivector"))

    def identity(self) -> dict[str, Any]:
        return self._info["identity"]

    def encode(self, texts, instruction: str | None = None, **_: Any) -> np.ndarray:
        return self._handle.encode.remote(list(texts), instruction).result()

    def encode_sparse(self, texts, instruction: str | None = None, **_: Any):
        return self._handle.encode_sparse.remote(list(texts), instruction).result()

    def encode_multivector(self, texts, instruction: str | None = None, **_: Any) -> list[np.ndarray]:
        return self._handle.encode_multivector.remote(list(texts), instruction).result()


class _Loaded:
    """One opened index (all its parts) and its id -> text store; swapped as a whole by ``reconfigure``.

    ``index`` is the dense ShardedIndex the plain search uses; ``searcher`` the HybridSearcher
    over the same opened shards plus the index's BM25, sparse and multi-vector parts.
    """

    def __init__(self, searcher, index_dir: str) -> None:
        self.searcher = searcher
        self.index = searcher.dense
        self.index_dir = index_dir
        self.version = str(self.index.version)


class StatsResponse(BaseModel):
    index: dict[str, Any] = Field(description="The index being served.")
    encoder: dict[str, Any] = Field(description="Batch statistics of one QueryEncoder replica.")


@serve.deployment(name=RETRIEVER_NAME)
@serve.ingress(api)
class Retriever:
    """HTTP ingress: checks requests, asks the QueryEncoder for vectors, searches the index.

    ``user_config = {"index_dir": ...}`` names the index; changing it swaps indexes live.
    """

    def __init__(self, encoder, settings: dict, model_name: str, reranker=None) -> None:
        self.cfg = _serve_cfg(settings)
        self.encoder = encoder
        self.reranker = reranker
        self.model_name = model_name
        self._loaded: _Loaded | None = None
        self._swap_lock = asyncio.Lock()
        self._encoder_info: dict[str, Any] | None = None
        self._created = int(time.time())
        _STATE.api_key = resolve_api_key(self.cfg.api_key_env, self.cfg.api_key_file)
        _STATE.max_body_bytes = self.cfg.max_body_bytes
        if self.cfg.faiss_threads:
            import faiss

            faiss.omp_set_num_threads(self.cfg.faiss_threads)
        logger.info(
            "Retriever for model '%s' (API key %s)", model_name, "required" if _STATE.api_key else "not set"
        )

    async def reconfigure(self, user_config: dict) -> None:
        """Open the index named by ``user_config['index_dir']`` and swap it in.

        The new index is opened (and verified) in a thread while requests keep being served
        from the old one; the swap is one reference assignment. A failure leaves the old index
        in place and raises, so the deployment update is reported as failed.
        """
        index_dir = (user_config or {}).get("index_dir")
        if not index_dir:
            raise ValueError("Retriever user_config needs 'index_dir', the folder holding manifest.json.")
        async with self._swap_lock:
            if self._loaded is not None and self._loaded.index_dir == str(index_dir):
                return
            if self._encoder_info is None:
                self._encoder_info = await self.encoder.info.remote()
            t0 = time.perf_counter()
            loaded = await asyncio.to_thread(self._open, str(index_dir), self._encoder_info)
            old = self._loaded
            self._loaded = loaded
        if old is None:
            await self._warn_if_exposed()
        logger.info(
            "Serving index %s (version %s, %d vectors) after %.1f s%s",
            index_dir, loaded.version, loaded.index.ntotal, time.perf_counter() - t0,
            f"; replaced version {old.version}" if old else "",
        )

    async def _warn_if_exposed(self) -> None:
        """Under ``serve deploy`` the bind address is in the Serve config; check it from here."""
        if _STATE.api_key is not None:
            return
        try:
            import ray
            from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

            controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            http = await asyncio.wait_for(controller.get_http_config.remote(), timeout=5)
        except Exception as e:  # the check is advisory; never block serving on it
            logger.debug("Could not read the HTTP bind address: %s", e)
            return
        from rayembed.serving.auth import warn_if_exposed

        warn_if_exposed(http.host, None, self.cfg.api_key_env)

    def _open(self, index_dir: str, encoder_info: dict[str, Any]) -> _Loaded:
        from rayembed.search.hybrid import HybridSearcher

        client = _EncoderClient(self.encoder, encoder_info)
        searcher = HybridSearcher.open(
            index_dir, embedder=client if self.cfg.verify_index else None, verify=self.cfg.verify_index
        )
        if searcher.dense is None:
            raise ValueError(
                f"Index {index_dir} is BM25-only (no dense vectors); the endpoint serves indexes with a dense "
                "part. Rebuild it with index.parts including dense."
            )
        if not self.cfg.verify_index:  # queries still go through the QueryEncoder
            searcher = HybridSearcher(
                searcher.root, searcher.manifest, dense=searcher.dense, docs=searcher.docs, bm25=searcher.bm25,
                sparse=searcher.sparse, multivector=searcher.multivector, embedder=client,
            )
        index = searcher.dense
        if int(index.dim) != int(encoder_info["dim"]):
            raise ValueError(
                f"Index {index_dir} holds {index.dim}-d vectors but the QueryEncoder's embedder "
                f"({encoder_info['embedder']}) makes {encoder_info['dim']}-d ones. Serve the index with "
                "the embedder it was built with."
            )
        return _Loaded(searcher, index_dir)

    def check_health(self) -> None:
        if self._loaded is None:
            raise RuntimeError("Retriever has no index loaded.")

    # ------------------------------------------------------------------ routes

    @api.get("/healthz", response_model=Health, summary="Liveness: 200 once the index is loaded.")
    async def healthz(self):
        loaded = self._loaded
        if loaded is None:
            return JSONResponse({"status": "loading", "index_version": None, "model": self.model_name}, 503)
        return {"status": "ok", "index_version": loaded.version, "model": self.model_name}

    @api.get("/v1/models", response_model=ModelList, summary="The served embedding model (OpenAI format).")
    async def models(self):
        dim = self._encoder_info["dim"] if self._encoder_info else None
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": self._created, "owned_by": "rayembed", "dim": dim}],
        }

    @api.post("/search", response_model=SearchResponse, summary="Top-k documents for one query or a list.")
    async def search(self, req: SearchRequest):
        cfg = self.cfg
        queries = check_texts(req.query, "query", max_items=cfg.max_queries_per_request, max_chars=cfg.max_input_chars)
        k = cfg.default_k if req.k is None else req.k
        check_range(k, "k", 1, cfg.max_k)
        check_range(req.nprobe, "nprobe", 1, 65536)
        check_range(req.ef_search, "ef_search", 1, 65536)
        if req.instruction is not None and len(req.instruction) > cfg.max_input_chars:
            raise InvalidRequest("instruction", f"instruction is longer than {cfg.max_input_chars} characters.")
        instruction = cfg.default_instruction if req.instruction is None else (req.instruction or None)
        loaded = self._loaded  # one index for the whole request, even if a swap lands meanwhile
        if loaded is None:
            raise InvalidRequest("index", "No index is loaded yet; retry shortly.", status=503, code="not_ready")
        if req.is_hybrid:
            return await self._hybrid_search(req, queries, k, instruction, loaded)
        qvecs = await self.encoder.encode.remote(queries, instruction)  # (n, D)
        scores, ids = loaded.index.search(qvecs, k, nprobe=req.nprobe, ef_search=req.ef_search)  # (n, k)
        results = []
        for qi, query in enumerate(queries):
            row_ids = [int(i) for i in ids[qi] if i >= 0]
            docs = loaded.index.get_documents(row_ids) if row_ids else []
            results.append(
                {
                    "query": query,
                    "ids": [str(d["doc_id"]) for d in docs],
                    "scores": [float(s) for s in scores[qi][: len(row_ids)]],
                    "texts": [d.get("text") or "" for d in docs],
                    "titles": [d.get("title") or "" for d in docs],
                }
            )
        return JSONResponse(
            {"results": results, "k": k, "model": self.model_name, "index_version": loaded.version}
        )

    def _hybrid_options(self, req: SearchRequest, loaded: _Loaded) -> tuple[dict[str, float], str, str | None, int]:
        """Checked (methods, fusion, rerank, rerank_top), each error naming its field."""
        searcher = loaded.searcher
        have = searcher.available_methods
        for name in ("nprobe", "ef_search"):
            if getattr(req, name) is not None:
                raise InvalidRequest(
                    name,
                    f"{name} tunes the plain dense search; it cannot be combined with methods, fusion, rerank or "
                    "rerank_top. Drop one or the other.",
                )
        if req.methods is None:
            methods = dict(searcher.default_methods)
        else:
            if not req.methods:
                raise InvalidRequest(
                    "methods", f"methods is empty; give at least one of {have} with a weight, e.g. {{\"dense\": 1}}."
                )
            methods = {}
            for name, weight in req.methods.items():
                if name not in have:
                    known = "is not a retrieval method" if name not in ("dense", "bm25", "sparse") else (
                        "is not in the served index")
                    raise InvalidRequest(
                        f"methods.{name}",
                        f"methods.{name}: '{name}' {known}; this index offers {have}"
                        + (" (multivector reranks: send rerank=\"multivector\")" if name == "multivector" else "")
                        + ".",
                    )
                if not np.isfinite(weight) or weight < 0:
                    raise InvalidRequest(f"methods.{name}", f"methods.{name}={weight} must be a finite number >= 0.")
                methods[name] = float(weight)
            if not any(methods.values()):
                raise InvalidRequest("methods", "methods gives every method weight 0; give one a positive weight.")
        fusion = "weighted_sum" if req.fusion in ("weighted", "weighted_sum") else "rrf"
        if req.rerank is not None and "multivector" not in searcher.available_rerankers:
            raise InvalidRequest(
                "rerank",
                "rerank=\"multivector\" needs the index's multivector part (token vectors), which this index "
                "lacks; rebuild it with index.parts including multivector, or omit rerank.",
            )
        if req.rerank_top is not None and req.rerank is None:
            raise InvalidRequest("rerank_top", "rerank_top applies only with rerank=\"multivector\"; set rerank or drop it.")
        check_range(req.rerank_top, "rerank_top", 1, self.cfg.max_rerank_top)
        rerank_top = min(100, self.cfg.max_rerank_top) if req.rerank_top is None else req.rerank_top
        return methods, fusion, req.rerank, rerank_top

    async def _hybrid_search(self, req: SearchRequest, queries: list[str], k: int, instruction: str | None,
                             loaded: _Loaded) -> JSONResponse:
        methods, fusion, rerank, rerank_top = self._hybrid_options(req, loaded)
        try:
            hits = await asyncio.to_thread(
                loaded.searcher.search, queries, k, methods=methods, fusion=fusion, instruction=instruction,
                rerank=rerank, rerank_top=rerank_top, candidates=max(100, k),
            )
        except ValueError as e:  # an option the index cannot serve, caught by the library itself
            raise InvalidRequest("methods", str(e)) from e
        results = [
            {
                "query": query,
                "ids": [str(h["doc_id"]) for h in row],
                "scores": [float(h["score"]) for h in row],
                "texts": [h.get("text") or "" for h in row],
                "titles": [h.get("title") or "" for h in row],
                "method_scores": [{m: float(v) for m, v in (h.get("scores") or {}).items()} for h in row],
            }
            for query, row in zip(queries, hits)
        ]
        return JSONResponse(
            {
                "results": results, "k": k, "model": self.model_name, "index_version": loaded.version,
                "methods": methods, "fusion": fusion, "rerank": rerank,
            }
        )

    @api.post("/rerank", response_model=RerankResponse, summary="Score texts against a query (TEI-like).")
    async def rerank(self, req: RerankRequest):
        from rayembed.rerank import rank_results

        cfg = self.cfg
        query = check_texts(req.query, "query", max_items=1, max_chars=cfg.max_input_chars)[0]
        texts = check_texts(req.texts, "texts", max_items=cfg.reranker.max_texts, max_chars=cfg.max_input_chars)
        check_range(req.top_n, "top_n", 1)
        if req.instruction is not None and len(req.instruction) > cfg.max_input_chars:
            raise InvalidRequest("instruction", f"instruction is longer than {cfg.max_input_chars} characters.")
        model = req.model or ("llm" if self.reranker is not None else "multivector")
        instruction = req.instruction or None
        if model == "multivector" and req.instruction is None:
            instruction = cfg.default_instruction  # the query is encoded as /search encodes it
        if model == "llm":
            if self.reranker is None:
                raise InvalidRequest(
                    "model",
                    "model=\"llm\" needs an LLM reranker, and this endpoint has none: set serve.reranker.path "
                    "to a saved reranker folder (train.mode=rerank) and restart it, or send model=\"multivector\".",
                )
            scores = await self.reranker.score.remote(query, texts, instruction)
        else:
            if self._encoder_info is None:
                self._encoder_info = await self.encoder.info.remote()
            if not self._encoder_info.get("has_multivector"):
                raise InvalidRequest(
                    "model",
                    f"model=\"multivector\" needs the served embedder's multi-vector head, and "
                    f"'{self.model_name}' has none: train it with model.heads.multivector=true, or send "
                    "model=\"llm\" with serve.reranker.path set.",
                )
            scores = await self.encoder.rerank_multivector.remote(query, texts, instruction)
        return JSONResponse({"results": rank_results(scores, req.top_n), "model": model})

    @api.post("/v1/embeddings", response_model=EmbeddingsResponse, summary="OpenAI-compatible embeddings.")
    async def embeddings(self, req: EmbeddingsRequest):
        cfg = self.cfg
        if req.model != self.model_name:
            raise InvalidRequest(
                "model",
                f"The model '{req.model}' does not exist here; this endpoint serves '{self.model_name}' "
                "(see GET /v1/models).",
                status=404,
                code="model_not_found",
            )
        texts = check_texts(req.input, "input", max_items=cfg.max_queries_per_request, max_chars=cfg.max_input_chars)
        if req.dimensions is not None and self._encoder_info and req.dimensions != self._encoder_info["dim"]:
            raise InvalidRequest(
                "dimensions",
                f"dimensions={req.dimensions} is not supported; '{self.model_name}' makes "
                f"{self._encoder_info['dim']}-d vectors. Omit the field or send {self._encoder_info['dim']}.",
            )
        vecs, tokens = await self.encoder.embed.remote(texts, req.instruction or None)  # (n, D)
        if req.encoding_format == "base64":
            data = [
                {"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                for i, v in enumerate(vecs)
            ]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": self.model_name,
                "usage": {"prompt_tokens": int(tokens), "total_tokens": int(tokens)},
            }
        )

    @api.get("/stats", response_model=StatsResponse, summary="Index version and encoder batch statistics.")
    async def stats(self):
        loaded = self._loaded
        enc = await self.encoder.stats.remote()
        index = (
            {"version": loaded.version, "dir": loaded.index_dir, "ntotal": int(loaded.index.ntotal)}
            if loaded
            else {}
        )
        return {"index": index, "encoder": enc}


# ----------------------------------------------------------------------------- builders


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args:`` of a Serve config file)."""

    config: str | None = Field(None, description="A rayembed YAML recipe; its `serve` section is used.")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides, e.g. serve.max_k=50.")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Config mapping merged over the recipe (as a resolved config would be)."
    )
    index_dir: str | None = Field(None, description="Index folder to serve; overrides serve.index_dir.")
    embedder: str | None = Field(None, description="Embedder folder or name; overrides serve.embedder.")


def build_app(args: ServeArgs):
    """Typed Serve app builder: ``import_path: rayembed.serving.app:build_app``."""
    from rayembed.config import RayembedConfig, from_dict, load_config, to_dict

    if isinstance(args, dict):
        args = ServeArgs(**args)
    cfg = load_config(args.config, args.overrides)
    if args.settings:
        cfg = from_dict(RayembedConfig, _merge(to_dict(cfg), args.settings))
    return build_app_from_config(cfg, index_dir=args.index_dir, embedder=args.embedder)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_index_dir(cfg, index_dir: str | os.PathLike | None = None) -> Path | str:
    """The index to serve: the argument, then serve.index_dir, index.output_dir, <run_dir>/index.

    A URI (``s3://bucket/idx``) stays a URI: each replica downloads and verifies it into its own
    node's cache (see :func:`rayembed.index.manifest.local_index_dir`).
    """
    from rayembed.cluster.storage import is_remote

    chosen = str(index_dir or cfg.serve.index_dir or cfg.index.output_dir or Path(cfg.run_dir) / "index")
    if is_remote(chosen):
        return chosen.rstrip("/").removesuffix("/manifest.json")
    path = Path(chosen.removeprefix("file://")).expanduser().resolve()
    return path.parent if path.name == "manifest.json" and path.is_file() else path


def read_index_manifest(index_dir: Path | str) -> dict[str, Any]:
    """The manifest of ``index_dir`` (a folder or a URI), with an error that says how to build one."""
    from rayembed.cluster.storage import is_remote, resolve_storage
    from rayembed.index.manifest import MANIFEST, check_manifest, read_json

    if is_remote(str(index_dir)):
        st = resolve_storage(str(index_dir))
        if not st.exists(MANIFEST):
            raise FileNotFoundError(
                f"No index at {index_dir} (no {MANIFEST}: not built, or its build has not finished). Build one "
                "with `rayembed index` or pass --index-dir / serve.index_dir pointing at an index."
            )
        manifest = json.loads(st.read_bytes(MANIFEST))
        check_manifest(manifest, Path(MANIFEST))
        return manifest
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"No index at {index_dir} (no {MANIFEST}). Build one with `rayembed index` or pass "
            "--index-dir / serve.index_dir pointing at an index folder."
        )
    manifest = read_json(path, what="Index manifest")
    check_manifest(manifest, path)
    return manifest


def resolve_embedder(cfg, manifest: dict[str, Any], embedder: str | None = None) -> str:
    """The query embedder: the argument, then serve.embedder, then the one the index records."""
    chosen = embedder or cfg.serve.embedder
    if chosen:
        p = Path(chosen).expanduser()
        return str(p.resolve()) if p.exists() else str(chosen)
    recorded = (manifest.get("embedder") or {}).get("path")
    if not recorded:
        raise ValueError(
            "The index manifest records no embedder path; set serve.embedder to the embedder the "
            "index was built with."
        )
    return str(recorded)


def build_app_from_config(cfg, *, index_dir: str | os.PathLike | None = None, embedder: str | None = None):
    """Bind QueryEncoder and Retriever from a :class:`RayembedConfig`."""
    from rayembed.config import to_dict

    s = cfg.serve
    idx_dir = resolve_index_dir(cfg, index_dir)
    manifest = read_index_manifest(idx_dir)
    emb = resolve_embedder(cfg, manifest, embedder)
    model_name = s.model_name or Path(emb).name
    # Only settings that do not name the index go into constructor arguments, so that a new
    # index is a user_config change (reconfigure) and never a replica restart.
    settings = to_dict(s)
    settings.update(index_dir=None, embedder=None)
    encoder = QueryEncoder.options(**s.encoder.serve_options()).bind(emb, settings)
    reranker = None
    if s.reranker.path:
        reranker = LLMRerankerDeployment.options(**s.reranker.serve_options()).bind(
            resolve_reranker(s.reranker.path), settings
        )
    return Retriever.options(**s.retriever.serve_options(), user_config={"index_dir": str(idx_dir)}).bind(
        encoder, settings, model_name, reranker
    )


def resolve_reranker(path: str) -> str:
    """serve.reranker.path as an absolute folder, or a causal LM name as given; a missing folder fails here."""
    from rayembed.modeling import backbones

    p = Path(path).expanduser()
    if p.exists():
        return str(p.resolve())
    if path in backbones.registered_names() or re.fullmatch(r"[A-Za-z0-9_][\w.-]*(/[\w.-]+)?", path):
        return path  # a registered name or a hub id (org/name)
    raise FileNotFoundError(
        f"serve.reranker.path={path!r} does not exist; point it at a saved reranker folder "
        "(train.mode=rerank writes <train.output_dir>/model) or leave it empty."
    )
