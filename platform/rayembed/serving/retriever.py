"""The ``Retriever`` deployment: the HTTP ingress and its routes, holding the index in memory.

``/search`` (plain and hybrid, one path: :mod:`rayembed.serving.query`), ``/rerank``,
``/v1/embeddings``, ``/v1/models``, ``/healthz`` and ``/stats``. Requests are checked at the
edge; model work goes to the QueryEncoder (and the LLM reranker), index work to a worker
thread, so the event loop stays free for ``/healthz``. ``user_config = {"index_dir": ...}``
names the index; changing it swaps indexes live (:meth:`Retriever.reconfigure`).
"""

# No ``from __future__ import annotations`` here: FastAPI and Serve read the route annotations at
# runtime, and string annotations inside the ingress class do not resolve.
import asyncio
import base64
import logging
import os
import time
from typing import Any

from pydantic import BaseModel, Field
from ray import serve

from rayembed.serving.asgi import STATE, SafeJSONResponse, Unavailable, make_api, scrub_paths
from rayembed.serving.auth import resolve_api_key
from rayembed.serving.encoder import serve_cfg
from rayembed.serving.query import Encoded, Loaded, format_search, plan_search, run_search, text_params
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
    check_dimensions,
    check_instruction,
    check_range,
    check_texts,
)

logger = logging.getLogger(__name__)

RETRIEVER_NAME = "Retriever"

api = make_api(STATE)


class StatsResponse(BaseModel):
    index: dict[str, Any] = Field(description="The index being served (version, size, type; no paths).")
    retriever: dict[str, Any] = Field(description="This Retriever replica: pid and admission counters.")
    encoder: dict[str, Any] = Field(description="Batch statistics of one QueryEncoder replica.")


async def call(response, what: str):
    """Await a deployment handle call, turning Ray's errors into client (4xx) or 503 answers."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return await response
    except InvalidRequest:
        raise
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, InvalidRequest):
            raise cause from None
        raise
    except RayActorError:
        raise Unavailable(f"The {what} replica stopped; retry shortly while it is replaced.", "unavailable") from None
    except Exception as e:
        name = type(e).__name__
        if name in ("BackPressureError", "DeploymentUnavailableError"):
            raise Unavailable(f"The {what} is at capacity; retry after a second.") from None
        raise


def truncate_normalize(vecs, dim: int):
    """The first ``dim`` coordinates of each row, L2-normalised again, float32: (n, D) -> (n, dim)."""
    import numpy as np

    cut = np.ascontiguousarray(vecs[:, :dim], dtype=np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)


@serve.deployment(name=RETRIEVER_NAME)
@serve.ingress(api)
class Retriever:
    """HTTP ingress: checks requests, asks the QueryEncoder for vectors, searches the index."""

    def __init__(self, encoder, settings: dict, model_name: str, reranker=None) -> None:
        self.cfg = cfg = serve_cfg(settings)
        self.encoder = encoder
        self.reranker = reranker
        self.model_name = model_name
        self._loaded: Loaded | None = None
        self._swap_lock = asyncio.Lock()
        self._encoder_info: dict[str, Any] | None = None
        self._created = int(time.time())
        self._encoder_ok_at = 0.0
        self._ping: asyncio.Task | None = None
        STATE.api_key = resolve_api_key(cfg.api_key_env, cfg.api_key_file)
        STATE.max_body_bytes = cfg.max_body_bytes
        STATE.max_concurrent = cfg.max_concurrent_requests
        STATE.max_waiting = cfg.max_waiting_requests
        STATE.queue_timeout_s = cfg.queue_timeout_s
        STATE.request_timeout_s = cfg.request_timeout_s
        if cfg.faiss_threads:
            import faiss

            faiss.omp_set_num_threads(cfg.faiss_threads)
        logger.info(
            "Retriever for model '%s' (API key %s)", model_name, "required" if STATE.api_key else "not set"
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
            if (self._loaded is not None and self._loaded.index_dir == str(index_dir)
                    and (user_config or {}).get("version") in (None, self._loaded.version)):
                return
            info = await self._info()
            t0 = time.perf_counter()
            loaded = await asyncio.to_thread(self._open, str(index_dir), info)
            old = self._loaded
            self._loaded = loaded
        if old is None:
            await self._warn_if_exposed()
        logger.info(
            "Serving index %s (version %s, %d vectors) after %.1f s%s",
            index_dir, loaded.version, loaded.index.ntotal, time.perf_counter() - t0,
            f"; replaced version {old.version}" if old else "",
        )

    async def _info(self) -> dict[str, Any]:
        if self._encoder_info is None:
            self._encoder_info = await call(self.encoder.info.remote(), "query encoder")
        return self._encoder_info

    async def _warn_if_exposed(self) -> None:
        """Under ``serve deploy`` the bind address is in the Serve config; check it from here."""
        if STATE.api_key is not None:
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

    def _open(self, index_dir: str, encoder_info: dict[str, Any]) -> Loaded:
        from rayembed.search.hybrid import HybridSearcher

        verify = self.cfg.verify_index
        searcher = HybridSearcher.open(index_dir, embedder=encoder_info["identity"] if verify else None, verify=verify)
        if searcher.dense is None:
            raise ValueError(
                f"Index {index_dir} is BM25-only (no dense vectors); the endpoint serves indexes with a dense "
                "part. Rebuild it with index.parts including dense."
            )
        index = searcher.dense
        if int(index.dim) != int(encoder_info["dim"]):
            raise ValueError(
                f"Index {index_dir} holds {index.dim}-d vectors but the QueryEncoder's embedder "
                f"({encoder_info['embedder']}) makes {encoder_info['dim']}-d ones. Serve the index with "
                "the embedder it was built with."
            )
        loaded = Loaded(searcher, index_dir)
        loaded.warm()
        return loaded

    def check_health(self) -> None:
        if self._loaded is None:
            raise RuntimeError("Retriever has no index loaded.")

    def _require_loaded(self) -> Loaded:
        loaded = self._loaded  # one index for the whole request, even if a swap lands meanwhile
        if loaded is None:
            raise Unavailable("No index is loaded yet; retry shortly.", "not_ready")
        return loaded

    async def _encoder_call(self, response):
        out = await call(response, "query encoder")
        self._encoder_ok_at = time.monotonic()
        return out

    async def _encoder_alive(self) -> bool:
        """Whether the QueryEncoder answers: recent traffic proves it, else one shared ping."""
        if time.monotonic() - self._encoder_ok_at < 1.0:
            return True
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self._ping_encoder())
        return await asyncio.shield(self._ping)

    async def _ping_encoder(self) -> bool:
        try:
            ok = await asyncio.wait_for(call(self.encoder.ping.remote(), "query encoder"), self.cfg.health_timeout_s)
        except Exception as e:
            logger.warning("QueryEncoder did not answer the health probe: %s", type(e).__name__)
            return False
        if ok:
            self._encoder_ok_at = time.monotonic()
        return bool(ok)

    # ------------------------------------------------------------------ routes

    @api.get("/healthz", response_model=Health, summary="200 when the index is loaded and the encoder answers.")
    async def healthz(self):
        loaded = self._loaded
        if loaded is None:
            return SafeJSONResponse({"status": "loading", "index_version": None, "model": self.model_name}, 503,
                                    headers={"Retry-After": "1"})
        if not await self._encoder_alive():
            return SafeJSONResponse(
                {"status": "encoder_unavailable", "index_version": loaded.version, "model": self.model_name}, 503,
                headers={"Retry-After": "1"},
            )
        return {"status": "ok", "index_version": loaded.version, "model": self.model_name}

    @api.get("/v1/models", response_model=ModelList, summary="The served embedding model (OpenAI format).")
    async def models(self):
        info = self._encoder_info or {}
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": self._created, "owned_by": "rayembed",
                      "dim": info.get("dim"), "matryoshka_dims": info.get("matryoshka_dims")}],
        }

    @api.post("/search", response_model=SearchResponse, summary="Top-k documents for one query or a list.")
    async def search(self, req: SearchRequest):
        loaded = self._require_loaded()
        plan = plan_search(req, self.cfg, loaded)
        needs = plan.needs
        jobs = {}
        if "dense" in needs:
            jobs["dense"] = self._encoder_call(self.encoder.encode.remote(plan.queries, plan.instruction, plan.params))
        if "sparse" in needs:
            jobs["sparse"] = self._encoder_call(self.encoder.encode_sparse.remote(plan.queries, plan.instruction))
        if "multivector" in needs:
            jobs["multivector"] = self._encoder_call(
                self.encoder.encode_multivector.remote(plan.queries, plan.instruction))
        done = await asyncio.gather(*jobs.values())
        enc = Encoded(**dict(zip(jobs, done)))
        try:
            hits = await asyncio.to_thread(run_search, loaded, plan, enc)
        except ValueError as e:  # an option the index cannot serve, caught by the library itself
            raise InvalidRequest("methods", scrub_paths(str(e))) from None
        return SafeJSONResponse(format_search(plan, hits, self.model_name, loaded.version))

    @api.post("/rerank", response_model=RerankResponse, summary="Score texts against a query (TEI-like).")
    async def rerank(self, req: RerankRequest):
        from rayembed.rerank import rank_results

        cfg = self.cfg
        query = check_texts(req.query, "query", max_items=1, max_chars=cfg.max_input_chars)[0]
        texts = check_texts(req.texts, "texts", max_items=cfg.reranker.max_texts, max_chars=cfg.max_input_chars)
        check_range(req.top_n, "top_n", 1)
        check_instruction(req.instruction, "instruction", cfg.max_input_chars)
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
            scores = await call(self.reranker.score.remote(query, texts, instruction), "reranker")
        else:
            info = await self._info()
            if not info.get("has_multivector"):
                raise InvalidRequest(
                    "model",
                    f"model=\"multivector\" needs the served embedder's multi-vector head, and "
                    f"'{self.model_name}' has none: train it with model.heads.multivector=true, or send "
                    "model=\"llm\" with serve.reranker.path set.",
                )
            scores = await self._encoder_call(self.encoder.rerank_multivector.remote(query, texts, instruction))
        return SafeJSONResponse({"results": rank_results(scores, req.top_n), "model": model})

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
        if isinstance(req.input, list) and req.input and not isinstance(req.input[0], str):
            raise InvalidRequest(
                "input",
                "input holds token ids; this endpoint embeds text and does not accept token arrays. Send the "
                "text itself: a string or a list of strings.",
                code="unsupported",
            )
        texts = check_texts(req.input, "input", max_items=cfg.max_queries_per_request, max_chars=cfg.max_input_chars)
        check_instruction(req.instruction, "instruction", cfg.max_input_chars)
        cut = None
        if req.dimensions is not None:
            info = await self._info()
            cut = check_dimensions(
                req.dimensions, int(info["dim"]), info.get("matryoshka_dims"), req.force_dimensions, self.model_name
            )
        vecs, tokens = await self._encoder_call(
            self.encoder.embed.remote(texts, req.instruction or None, text_params(req.input, "input"))
        )  # (n, D)
        if cut is not None:
            vecs = truncate_normalize(vecs, cut)  # (n, cut)
        if req.encoding_format == "base64":
            data = [
                {"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                for i, v in enumerate(vecs)
            ]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]
        return SafeJSONResponse(
            {
                "object": "list",
                "data": data,
                "model": self.model_name,
                "usage": {"prompt_tokens": int(tokens), "total_tokens": int(tokens)},
            }
        )

    @api.get("/stats", response_model=StatsResponse, summary="Index version, admission and encoder batch statistics.")
    async def stats(self):
        loaded = self._loaded
        enc = await self._encoder_call(self.encoder.stats.remote())
        return {
            "index": loaded.summary() if loaded else {},
            "retriever": {"pid": os.getpid(), **STATE.snapshot()},
            "encoder": enc,
        }
