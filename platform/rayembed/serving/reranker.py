"""The ``LLMRerankerDeployment``: the LLM reranker of ``serve.reranker.path`` behind ``POST /rerank``.

Prompt building and scoring run in a worker thread; an instruction too long for the prompt is
the client's error (400 naming ``instruction``), not the server's.
"""

# No ``from __future__ import annotations``: Serve reads the deployment signatures at runtime.
import asyncio
import logging
import time
from typing import Any

import numpy as np
from ray import serve

from rayembed.serving.encoder import serve_cfg
from rayembed.serving.schemas import InvalidRequest

logger = logging.getLogger(__name__)

RERANKER_NAME = "LLMRerankerDeployment"


@serve.deployment(name=RERANKER_NAME)
class LLMRerankerDeployment:
    """Loads the LLMReranker of ``serve.reranker.path`` once and scores (query, texts) requests."""

    def __init__(self, path: str, settings: dict) -> None:
        from rayembed.rerank.llm import LLMReranker

        cfg = serve_cfg(settings)
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
        # concurrent forward passes would only compete for them. The lock is an asyncio one and
        # the work runs in a thread, so the event loop stays free while requests queue.
        async with self._lock:
            try:
                return await asyncio.to_thread(
                    self.rr.score, query, texts, instruction=instruction, batch_size=self.batch_size
                )
            except ValueError as e:
                if instruction and "instruction" in str(e):
                    raise InvalidRequest(
                        "instruction",
                        f"instruction is too long for the reranker's prompt: it leaves no room for the query and "
                        f"texts within max_length={self.rr.config.max_length} tokens. Shorten it.",
                        code="too_long",
                    ) from None
                raise

    def info(self) -> dict[str, Any]:
        return {"base_model": self.rr.config.base_model, "max_length": self.rr.config.max_length}
