"""The ``QueryEncoder`` deployment: the embedder behind a continuous batcher, one bad text failing alone.

Concurrent requests' texts share forward passes. One batch runs at a time; every text that
arrives while it runs joins the next one, up to ``serve.max_batch_size`` texts and
``serve.max_batch_chars`` characters (as TEI does). ``@serve.batch`` is not used: it forms its
next batch from whatever arrived within ``batch_wait_timeout_s`` while the previous one still
runs, so under load it queues many one-text batches (mean batch size 1.1 at 32 clients)
instead of one full one. Where a batch raises, each of its texts is encoded alone, so only the
ones that fail by themselves get an error (a 400 naming the text); the rest of the batch is
answered. All model work (tokenising included) runs in a worker thread, never on the replica's
event loop.
"""

# No ``from __future__ import annotations``: Serve reads the deployment signatures at runtime.
import asyncio
import logging
import math
import os
import time
from collections import Counter, deque
from typing import Any

import numpy as np
from ray import serve

from rayembed.serving.schemas import InvalidRequest

logger = logging.getLogger(__name__)

ENCODER_NAME = "QueryEncoder"

# Errors a text can cause by itself (bad code points, odd input the tokenizer refuses); other
# errors (out of memory, a broken model) are the server's and fail the whole batch.
_TEXT_ERRORS = (UnicodeError, ValueError, TypeError)


def serve_cfg(settings: dict):
    from rayembed.config import ServeConfig, from_dict

    return from_dict(ServeConfig, settings, prefix="serve")


def replica_tag() -> str:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:
        return f"pid-{os.getpid()}"


class ItemError:
    """Stands in a batch's results for a text that could not be encoded on its own."""

    def __init__(self, exc: BaseException) -> None:
        self.kind = type(exc).__name__
        self.client = isinstance(exc, _TEXT_ERRORS)


class BatchStats:
    """Sizes of the batches the encoder ran: the evidence that batching happens."""

    def __init__(self) -> None:
        self.sizes: Counter[int] = Counter()
        self.texts = 0
        self.batches = 0
        self.encode_s = 0.0
        self.isolated = 0

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
            "batches_split_after_an_error": self.isolated,
        }


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


# The batch budget of this replica (set by QueryEncoder.__init__ from serve.max_batch_size and
# serve.max_batch_chars): a batch closes at whichever it reaches first.
_BUDGET = {"texts": 32, "chars": 1 << 16}


def batch_cost(items: list) -> int:
    """Cost of a batch in "texts": its count, or its share of the character budget if larger.

    A batch closes before its cost passes ``max_batch_size``, so a few long inputs do not ride
    with many short ones (as TEI's ``--max-batch-tokens``); characters stand in for tokens so
    that no tokenising happens on the event loop.
    """
    chars = sum(len(text) for text, _ in items)
    return max(len(items), math.ceil(_BUDGET["texts"] * chars / _BUDGET["chars"]))


class ContinuousBatcher:
    """Runs ``run(items) -> rows`` on one batch at a time; items submitted meanwhile form the next.

    With the encoder idle, a batch starts ``wait_s`` after its first item (to let a burst join);
    under load it starts as soon as the previous one ends, with everything that queued up to the
    budget (:func:`batch_cost` <= ``_BUDGET["texts"]``; a single item over it runs alone). A
    cancelled request's item is dropped before its batch runs.
    """

    def __init__(self, run, wait_s: float) -> None:
        self.run = run
        self.wait_s = wait_s
        self.queue: deque = deque()
        self.ready = asyncio.Event()
        self.worker: asyncio.Task | None = None

    async def submit(self, item):
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((item, fut))
        self.ready.set()
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._loop())
        return await fut

    def _take(self) -> list:
        batch: list = []
        while self.queue:
            item, fut = self.queue[0]
            if fut.cancelled():
                self.queue.popleft()
                continue
            if batch and batch_cost([i for i, _ in batch] + [item]) > _BUDGET["texts"]:
                break
            batch.append(self.queue.popleft())
        return batch

    async def _loop(self) -> None:
        idle = True
        while True:
            if not self.queue:
                self.ready.clear()
                idle = True
                await self.ready.wait()
            if idle and self.wait_s > 0:  # the first item of a burst: let the rest of it arrive
                await asyncio.sleep(self.wait_s)
            idle = False
            batch = self._take()
            if not batch:
                continue
            try:
                rows = await self.run([item for item, _ in batch])
            except BaseException as e:  # noqa: BLE001 - handed to every waiting request
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for (_, fut), row in zip(batch, rows):
                if not fut.done():
                    fut.set_result(row)


def encode_isolated(encode_items, items: list) -> list:
    """``encode_items(items)`` as a list of rows; if it raises, each item alone (ItemError where it fails)."""
    try:
        return list(encode_items(items))
    except Exception as batch_error:
        if len(items) == 1:
            return [ItemError(batch_error)]
        logger.warning("A batch of %d texts failed (%s); encoding them one by one.", len(items),
                       type(batch_error).__name__)
    out: list = []
    for item in items:
        try:
            out.append(encode_items([item])[0])
        except Exception as e:
            out.append(ItemError(e))
    return out


@serve.deployment(name=ENCODER_NAME)
class QueryEncoder:
    """Loads the Embedder once and encodes queries in batches built from concurrent requests.

    ``encode(texts, instruction)`` splits a request into single texts that join the shared
    batch queue, so ten one-query requests and one ten-query request cost one forward pass.
    """

    def __init__(self, embedder: str, settings: dict) -> None:
        from rayembed.modeling.embedder import Embedder

        cfg = serve_cfg(settings)
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        t0 = time.perf_counter()
        self.embedder_path = embedder
        self.emb = Embedder.from_pretrained(embedder)
        self._identity = self.emb.identity()
        if cfg.default_instruction and self.emb.config.query_instructions is False:
            logger.warning(
                "serve.default_instruction is set, but %s was trained without query instructions "
                "(data.stream.instructions=false): /search will put one on every query. Set "
                "serve.default_instruction= (empty) to encode queries as the model was trained.", embedder)
        _BUDGET.update(texts=cfg.max_batch_size, chars=cfg.max_batch_chars)
        self._batcher = ContinuousBatcher(self._run_batch, cfg.batch_wait_timeout_s)
        self.stats_ = BatchStats()
        self._metric = _batch_histogram()
        logger.info(
            "QueryEncoder ready in %.1f s: %s (dim %d), max_batch_size %d, max_batch_chars %d, "
            "batch_wait_timeout_s %.4f", time.perf_counter() - t0, embedder, self.emb.dim, cfg.max_batch_size,
            cfg.max_batch_chars, cfg.batch_wait_timeout_s,
        )

    async def _run_batch(self, items: list[tuple[str, str | None]]) -> list:
        t0 = time.perf_counter()
        rows = await asyncio.to_thread(encode_isolated, self._encode_items, items)
        seconds = time.perf_counter() - t0
        self.stats_.record(len(items), seconds)
        if any(isinstance(r, ItemError) for r in rows) and len(items) > 1:
            self.stats_.isolated += 1
        if self._metric is not None:
            self._metric.observe(len(items))
        return rows

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

    async def encode(self, texts: list[str], instruction: str | None = None,
                     params: list[str] | None = None) -> np.ndarray:
        """(n, dim) float32, L2-normalised, in input order.

        ``params`` names each text for errors (``query[2]``); a text that fails on its own raises
        :class:`InvalidRequest` naming it, while the texts batched with it are answered.
        """
        rows = await asyncio.gather(*(self._batcher.submit((t, instruction)) for t in texts))
        for i, row in enumerate(rows):
            if isinstance(row, ItemError):
                if not row.client:
                    raise RuntimeError(f"Encoding failed ({row.kind}).")
                name = params[i] if params else f"input[{i}]"
                raise InvalidRequest(
                    name, f"{name} could not be encoded ({row.kind}); send plain UTF-8 text.", code="unencodable"
                )
        return np.stack(rows)  # (n, D)

    async def embed(self, texts: list[str], instruction: str | None = None,
                    params: list[str] | None = None) -> tuple[np.ndarray, int]:
        """Vectors plus the number of input tokens (for the OpenAI ``usage`` field)."""
        vecs = await self.encode(texts, instruction, params)
        return vecs, await asyncio.to_thread(self._count_tokens, texts, instruction)

    def _count_tokens(self, texts: list[str], instruction: str | None) -> int:
        shown = [self.emb.format_query(t, instruction) for t in texts] if instruction is not None else texts
        return sum(len(ids) for ids in self.emb.tokenize_ids(shown))

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
        from rayembed.rerank.multivector import rerank_multivector

        return await asyncio.to_thread(rerank_multivector, self.emb, query, texts, instruction=instruction)

    def info(self) -> dict[str, Any]:
        return {
            "dim": int(self.emb.dim),
            "matryoshka_dims": list(self.emb.config.matryoshka_dims or []),
            "identity": self._identity,
            "embedder": self.embedder_path,
            "has_sparse": bool(getattr(self.emb, "has_sparse", False)),
            "has_multivector": bool(getattr(self.emb, "has_multivector", False)),
        }

    async def ping(self) -> bool:
        """Answered on the event loop while batches run in threads: /healthz's liveness probe."""
        return self.emb is not None

    def stats(self) -> dict[str, Any]:
        return {"replica": replica_tag(), "pid": os.getpid(), **self.stats_.snapshot()}

    def check_health(self) -> None:
        if getattr(self, "emb", None) is None:
            raise RuntimeError("QueryEncoder has no embedder loaded.")
