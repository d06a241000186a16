"""The Ray Data actor that sends chunks of prompt specs to the LLM and validates the replies, and
the client and validation settings it is built with from ``cfg.synth``."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from typing import Any

from rayembed.synth.client import ChatClient, ClientSettings, Completion, Secret
from rayembed.synth.stats import SynthStats, add_counts
from rayembed.synth.validate import Rejected, parse_task_list, reply_to_row

MAX_REPLY_CHARS_IN_REJECTS = 4000


def client_settings(sc, base_url: str | None, num_actors: int | None = None) -> ClientSettings:
    """Per-actor client settings: the rate limits are split evenly over the actors."""
    n = num_actors or sc.num_actors
    prices = sc.price_table.get(sc.model, {})
    return ClientSettings(
        model=sc.model,
        base_url=base_url,
        temperature=sc.temperature,
        top_p=sc.top_p,
        structured_output=sc.structured_output,
        max_in_flight=sc.max_in_flight,
        requests_per_minute=sc.requests_per_minute / n if sc.requests_per_minute else None,
        tokens_per_minute=sc.tokens_per_minute / n if sc.tokens_per_minute else None,
        request_timeout_s=sc.request_timeout_s,
        max_attempts=sc.max_attempts,
        backoff_base_s=sc.backoff_base_s,
        backoff_max_s=sc.backoff_max_s,
        max_retry_after_s=sc.max_retry_after_s,
        price_in=prices.get("input"),
        price_out=prices.get("output"),
    )


def validation_settings(sc) -> dict[str, Any]:
    return {
        "source": sc.source_name or f"synth:{sc.model}",
        "long_long_min_words": sc.long_long_min_words,
        "min_document_words": sc.min_document_words,
        "max_text_chars": sc.max_text_chars,
    }


class SynthWorker:
    """A Ray Data actor holding one :class:`ChatClient` on a background event loop.

    Each call gets chunks of specs; every spec in a chunk is sent concurrently. Several chunks
    may run at once in one actor (threaded calls): they share the client's in-flight limit and
    rate buckets, so the actor keeps ``max_in_flight`` requests busy across chunk boundaries.
    Usable without Ray too: ``SynthWorker(...).process(stage, specs)``.
    """

    def __init__(self, settings: ClientSettings, api_key: Secret, validation: dict[str, Any]):
        self.validation = validation
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="synth-client", daemon=True)
        self._thread.start()

        async def make() -> ChatClient:
            return ChatClient(settings, api_key)

        self.client = asyncio.run_coroutine_threadsafe(make(), self._loop).result()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        results = []
        for index, stage, specs_json in zip(batch["chunk_index"], batch["stage"], batch["specs_json"]):
            res = self.process(str(stage), json.loads(str(specs_json)))
            res["chunk_index"] = int(index)
            results.append(json.dumps(res))
        return {
            "chunk_index": np.asarray(batch["chunk_index"]),
            "result": np.asarray(results, dtype=object),
        }

    def process(self, stage: str, specs: list[dict[str, Any]]) -> dict[str, Any]:
        """``{"stage", "rows", "rejects", "tasks", "failed", "stats"}`` of one chunk (stats as a dict)."""
        return asyncio.run_coroutine_threadsafe(self._process(stage, specs), self._loop).result()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.client.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _process(self, stage: str, specs: list[dict[str, Any]]) -> dict[str, Any]:
        t0 = time.monotonic()
        comps: list[Completion] = await asyncio.gather(
            *(self.client.complete(s["prompt"], s["max_tokens"], s.get("schema")) for s in specs)
        )
        stats = SynthStats(specs=len(specs))
        rows: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        tasks: dict[str, list[str]] = {}
        rejected = Counter()
        for spec, c in zip(specs, comps):
            stats.requests += c.attempts
            stats.retries += len(c.retry_reasons)
            stats.retry_reasons = add_counts(stats.retry_reasons, Counter(c.retry_reasons))
            stats.prompt_tokens += c.prompt_tokens
            stats.completion_tokens += c.completion_tokens
            stats.cost_usd += c.cost_usd
            if c.error:  # not the reply's fault: sent again by the next run, never a reject
                stats.failed_requests += 1
                failed.append({"spec_id": spec["id"], "reason": f"request_{c.error}",
                               "detail": c.error_detail[:MAX_REPLY_CHARS_IN_REJECTS]})
                continue
            try:
                if stage == "brainstorm":
                    tasks[spec["id"]] = parse_task_list(c.text or "", c.finish_reason)
                    stats.tasks += len(tasks[spec["id"]])
                else:
                    rows.append(reply_to_row(spec, c.text or "", finish_reason=c.finish_reason, **self.validation))
            except Rejected as r:
                rejected[r.reason] += 1
                rejects.append(make_reject(stage, spec, r.reason, r.detail, c.text, c.finish_reason))
        stats.accepted = len(rows)
        stats.rejected = sum(rejected.values())
        stats.rejected_by_reason = dict(rejected)
        stats.peak_in_flight = self.client.stats.peak_in_flight
        stats.elapsed_s = time.monotonic() - t0
        return {"stage": stage, "rows": rows, "rejects": rejects, "tasks": tasks, "failed": failed,
                "stats": stats.to_dict()}


def make_reject(stage, spec, reason, detail, text, finish_reason) -> dict[str, Any]:
    """One line of ``_rejects/``: the spec, why its reply was refused, and the reply (secrets redacted)."""
    from rayembed.security import redact_text

    reply = redact_text(text or "")
    return {
        "stage": stage,
        "spec_id": spec["id"],
        "task_type": spec["task_type"],
        "language": spec.get("language"),
        "reason": reason,
        "detail": redact_text(detail or ""),
        "finish_reason": finish_reason,
        "reply": reply[:MAX_REPLY_CHARS_IN_REJECTS],
    }
