"""The synthetic-data pipeline: prompt specs -> Ray Data actor pool of LLM clients -> Parquet shards.

Layout of ``output_dir`` (files starting with ``_`` are ignored by Parquet dataset readers, so
``ray.data.read_parquet(output_dir)`` sees only the shards)::

    part-00000.parquet ...      accepted rows, unified schema, one shard per chunk of specs
    _rejects/<stage>-part-*.jsonl   every rejected reply with its reason (secrets redacted)
    _brainstorm/part-*.json     brainstormed task lists (cached: never asked for twice)
    _pending/part-*.parquet     a shard being committed (never read as data)
    _progress/<stage>-part-*.json   per-chunk stats, the sha256 of its shard, and the specs whose
                                request failed; its presence means "committed"
    _manifest.json              fingerprint of the generation config this folder belongs to
    _summary.json               the end-of-run summary

Resuming: spec ids and prompts are pure functions of the seed and config; specs are cut into
fixed chunks; the driver commits chunks in order: rejects, the shard to ``_pending/``, the
progress marker (naming the shard's sha256), then the shard renamed into place. A shard is
therefore visible to readers only once committed, and a restart finishes (or discards) a
commit a kill interrupted. A request that failed (HTTP error after retries, endpoint down) is
not a reject: its spec is recorded in the chunk's marker and sent again by the next run, whose
new rows join that chunk's shard. A restarted run skips finished chunks, rebuilds its dedup state
from the committed shards, and continues; it never writes a row twice.

A run fails (:class:`SynthFailed`, naming the endpoint) when more than
``synth.max_failure_rate`` of its requests failed, when every request failed, or when a
brainstorm request failed (generation needs every task list).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rayembed.synth.client import ChatClient, ClientSettings, Completion, Secret
from rayembed.synth.prompts import PROMPT_VERSION, PromptSpec, brainstorm_specs, generation_specs
from rayembed.synth.validate import Rejected, parse_task_list, reply_to_row

logger = logging.getLogger(__name__)

MAX_REPLY_CHARS_IN_REJECTS = 4000


# ------------------------------------------------------------------------------ config helpers


def output_dir(cfg) -> Path:
    from rayembed.cluster.storage import local_folder

    return local_folder(cfg.synth.output_dir or f"{str(cfg.run_dir).rstrip('/')}/synth",
                        what="synth.output_dir" if cfg.synth.output_dir else "run_dir")


def resolve_endpoint(sc) -> tuple[str | None, Secret]:
    """(base_url, api key) from config, then the environment, as the openai SDK would."""
    from rayembed.config import ConfigError
    from rayembed.security import register_secret

    base_url = sc.base_url or os.environ.get("OPENAI_BASE_URL") or None
    key = sc.api_key or os.environ.get(sc.api_key_env) or None
    register_secret(key)
    if not key and base_url is None:
        raise ConfigError(
            f"synth: no API key for the default OpenAI endpoint. Set ${sc.api_key_env}, or point "
            "synth.base_url at an OpenAI-compatible server (vLLM, `rayembed serve-llm`), or set "
            "synth.launch_local_llm=true."
        )
    return base_url, Secret(key)


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


# ``synth`` keys that provably leave the rows unchanged: where output goes, the secret, which
# endpoint serves the model (fixing a broken endpoint must not refuse the resume), traffic
# control, budget and failure policy. Every other key, including any added later, is part of the
# fingerprint.
NON_ROW_KEYS = frozenset({
    "output_dir", "overwrite", "api_key", "api_key_env", "base_url", "launch_local_llm",
    "max_in_flight", "requests_per_minute", "tokens_per_minute", "request_timeout_s", "max_attempts",
    "backoff_base_s", "backoff_max_s", "max_retry_after_s", "price_table", "max_cost_usd", "max_failure_rate",
    "num_actors", "actor_num_cpus", "chunks_in_flight_per_actor",
})
# synth.llm_server keys that only place or guard the local server (the rest shape its replies).
NON_ROW_SERVER_KEYS = frozenset({
    "host", "port", "route_prefix", "app_name", "num_cpus", "num_gpus", "num_replicas", "api_key_env",
    "api_key_file", "torch_threads", "batch_wait_timeout_s", "max_body_bytes",
})


def _canonical(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _canonical(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    return v


def fingerprint(sc, seed: int) -> dict[str, Any]:
    """Everything that changes the rows: the whole ``synth`` section minus :data:`NON_ROW_KEYS`."""
    import dataclasses

    fields: dict[str, Any] = {"prompt_version": PROMPT_VERSION, "seed": seed}
    for k, v in dataclasses.asdict(sc).items():
        if k in NON_ROW_KEYS or k == "seed":
            continue
        if k == "llm_server":
            if not sc.launch_local_llm:
                continue
            v = {sk: sv for sk, sv in v.items() if sk not in NON_ROW_SERVER_KEYS}
        fields[k] = _canonical(v)
    fields["languages"] = sorted(sc.languages)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "fields": fields}


# ------------------------------------------------------------------------------ the actor


def _empty_stats() -> dict[str, Any]:
    return {
        "specs": 0,
        "requests": 0,
        "retries": 0,
        "retry_reasons": {},
        "failed_requests": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": 0.0,
        "accepted": 0,
        "rejected": 0,
        "rejected_by_reason": {},
        "rows_by_task_type": {},
        "rows_by_language": {},
        "tasks": 0,
        "peak_in_flight": 0,
        "elapsed_s": 0.0,
    }


def _merge_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    c = Counter(a)
    c.update(b)
    return dict(c)


def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = _merge_counts(a.get(k, {}), v)
        elif k == "peak_in_flight":
            out[k] = max(a.get(k, 0), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = a.get(k, 0) + v
    return out


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
        stats = _empty_stats()
        stats["specs"] = len(specs)
        rows: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        tasks: dict[str, list[str]] = {}
        rejected = Counter()
        for spec, c in zip(specs, comps):
            stats["requests"] += c.attempts
            stats["retries"] += len(c.retry_reasons)
            stats["retry_reasons"] = _merge_counts(stats["retry_reasons"], Counter(c.retry_reasons))
            stats["prompt_tokens"] += c.prompt_tokens
            stats["completion_tokens"] += c.completion_tokens
            stats["cost_usd"] += c.cost_usd
            if c.error:  # not the reply's fault: sent again by the next run, never a reject
                stats["failed_requests"] += 1
                failed.append({"spec_id": spec["id"], "reason": f"request_{c.error}",
                               "detail": c.error_detail[:MAX_REPLY_CHARS_IN_REJECTS]})
                continue
            try:
                if stage == "brainstorm":
                    tasks[spec["id"]] = parse_task_list(c.text or "", c.finish_reason)
                    stats["tasks"] += len(tasks[spec["id"]])
                else:
                    rows.append(reply_to_row(spec, c.text or "", finish_reason=c.finish_reason, **self.validation))
            except Rejected as r:
                rejected[r.reason] += 1
                rejects.append(make_reject(stage, spec, r.reason, r.detail, c.text, c.finish_reason))
        stats["accepted"] = len(rows)
        stats["rejected"] = sum(rejected.values())
        stats["rejected_by_reason"] = dict(rejected)
        stats["peak_in_flight"] = self.client.stats.peak_in_flight
        stats["elapsed_s"] = time.monotonic() - t0
        return {"stage": stage, "rows": rows, "rejects": rejects, "tasks": tasks, "failed": failed, "stats": stats}


def make_reject(stage, spec, reason, detail, text, finish_reason) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------ the driver


class SynthFailed(RuntimeError):
    """Too many requests failed at the endpoint. Finished work is kept; the next run sends the
    failed requests again. The message names the endpoint and the failure reasons, never a key."""


class _Run:
    """State of one run_synth call: paths, budget, running totals."""

    def __init__(self, cfg, out: Path, settings: ClientSettings, key: Secret):
        self.cfg = cfg
        self.sc = cfg.synth
        self.out = out
        self.settings = settings
        self.key = key
        self.cost = 0.0
        self.stopped: str | None = None
        self.resumed_chunks = 0
        self.new_chunks = 0
        self.sent = 0  # specs sent in this run, each counted once however many attempts it took
        self.failed: Counter = Counter()  # this run's failed requests by reason
        self.this_run: dict[str, Any] = {"requests": 0, "accepted": 0, "commit_times": {}, "chunk_requests": {}}

    def over_budget(self) -> bool:
        b = self.sc.max_cost_usd
        if b is not None and self.cost >= b:
            self.stopped = f"budget reached: spent ${self.cost:.4f} of max_cost_usd=${b}"
            return True
        return False

    def failing(self) -> bool:
        """Stop early: after at least two chunks' worth of requests, more than max_failure_rate failed."""
        n = sum(self.failed.values())
        if self.sent >= 2 * self.sc.chunk_size and n / self.sent > self.sc.max_failure_rate:
            self.stopped = f"{n} of {self.sent} requests failed, above synth.max_failure_rate={self.sc.max_failure_rate}"
            return True
        return False

    def endpoint(self) -> str:
        from rayembed.security import redact_text

        return redact_text(str(self.settings.base_url or "https://api.openai.com/v1"))

    def failure_message(self, what: str) -> str:
        n = sum(self.failed.values())
        reasons = ", ".join(f"{r} x{c}" for r, c in self.failed.most_common(5))
        return (
            f"synth: {n} of {self.sent} requests failed at {self.endpoint()} ({reasons}); {what}. Check "
            "synth.base_url, the API key and the server's logs, then run the same command again: finished "
            "chunks are kept and only the failed requests are sent again."
        )


def _chunk(specs: list[PromptSpec], size: int) -> list[list[PromptSpec]]:
    return [specs[i : i + size] for i in range(0, len(specs), size)]


def _marker(out: Path, stage: str, i: int) -> Path:
    return out / "_progress" / f"{stage}-part-{i:05d}.json"


def _part(out: Path, i: int) -> Path:
    return out / f"part-{i:05d}.parquet"


def _pending_part(out: Path, i: int) -> Path:
    return out / "_pending" / f"part-{i:05d}.parquet"


def _read_marker(out: Path, stage: str, i: int) -> dict[str, Any] | None:
    """A chunk's commit record: {"stats", "failed": [spec ids with reasons], "part_sha256"}, or None."""
    path = _marker(out, stage, i)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _is_done(marker: dict[str, Any] | None) -> bool:
    return marker is not None and not marker.get("failed")


def _folder_stats(out: Path, stage: str, n: int) -> dict[str, Any]:
    """The stage's totals over every committed chunk (failed_requests: those still to send again)."""
    totals = _empty_stats()
    for i in range(n):
        m = _read_marker(out, stage, i)
        if m is not None:
            totals = merge_stats(totals, m["stats"])
    return totals


def _cumulative(prev: dict[str, Any] | None, new: dict[str, Any], failed: list[dict[str, Any]]) -> dict[str, Any]:
    """A chunk's stats after this attempt: counts add up; failed_requests is what is left to retry."""
    st = merge_stats(prev["stats"], new) if prev else dict(new)
    if prev:
        st["specs"] = prev["stats"]["specs"]
    st["failed_requests"] = len(failed)
    return st


def _run_stage(run: _Run, stage: str, specs: list[PromptSpec], commit) -> dict[str, Any]:
    """Send every chunk not yet done (all its specs, or only those whose request failed last
    time) through the actor pool; commit results in chunk order."""
    chunks = _chunk(specs, run.sc.chunk_size)
    markers = [_read_marker(run.out, stage, i) for i in range(len(chunks))]
    todo = [i for i, m in enumerate(markers) if not _is_done(m)]
    done = len(chunks) - len(todo)
    for m in markers:
        if m is not None:
            run.cost += m["stats"].get("cost_usd", 0.0)
    run.resumed_chunks += done
    retry = sum(1 for i in todo if markers[i] is not None)
    if done or retry:
        logger.info("%s: %d of %d chunks already done; %d with failed requests to send again",
                    stage, done, len(chunks), retry)
    if not todo or run.over_budget():
        totals = _folder_stats(run.out, stage, len(chunks))
        totals["elapsed_s"] = 0.0
        return totals
    import ray
    from ray.data import ActorPoolStrategy

    from rayembed.runtime import init_ray

    init_ray(run.cfg.compute)
    items = []
    for i in todo:
        send = chunks[i]
        if markers[i] is not None:
            again = {f["spec_id"] for f in markers[i]["failed"]}
            send = [s for s in chunks[i] if s.id in again]
        items.append({"chunk_index": i, "stage": stage, "specs_json": json.dumps([s.to_dict() for s in send])})
    k = run.sc.chunks_in_flight_per_actor
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        SynthWorker,
        compute=ActorPoolStrategy(
            size=min(run.sc.num_actors, len(items)),
            max_tasks_in_flight_per_actor=k,
            max_concurrent_calls_per_actor=k,
            enable_true_multi_threading=True,
        ),
        num_cpus=run.sc.actor_num_cpus,
        batch_size=1,
        batch_format="numpy",
        fn_constructor_kwargs={
            "settings": run.settings,
            "api_key": run.key,
            "validation": validation_settings(run.sc),
        },
    )
    t0 = time.monotonic()
    pending: dict[int, dict[str, Any]] = {}
    pos = 0  # next position in todo to commit
    new = _empty_stats()
    it = ds.iter_rows()
    try:
        for row in it:
            res = json.loads(row["result"])
            pending[res["chunk_index"]] = res
            while pos < len(todo) and todo[pos] in pending:
                i = todo[pos]
                res = pending.pop(i)
                st = commit(i, res, markers[i])
                new = merge_stats(new, st)
                run.sent += st["specs"]
                run.failed.update(f["reason"] for f in res["failed"])
                run.this_run["commit_times"].setdefault(stage, []).append(time.monotonic() - t0)
                run.this_run["chunk_requests"].setdefault(stage, []).append(st["requests"])
                run.cost += st.get("cost_usd", 0.0)
                run.new_chunks += 1
                pos += 1
                dt = max(time.monotonic() - t0, 1e-9)
                logger.info(
                    "%s: chunk %d (%d/%d), %d requests (%.1f/s), %d accepted, %d rejected, %d failed%s",
                    stage, i, pos, len(todo), new["requests"], new["requests"] / dt,
                    new["accepted"] if stage == "generate" else new["tasks"], new["rejected"],
                    new["failed_requests"], f", ${run.cost:.4f}" if run.settings.price_in is not None else "",
                )
                if run.over_budget() or run.failing():
                    logger.warning("%s: stopping early, %s", stage, run.stopped)
                    break
            if run.stopped:
                break
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    totals = _folder_stats(run.out, stage, len(chunks))
    totals["elapsed_s"] = time.monotonic() - t0
    run.this_run["requests"] += new["requests"]
    run.this_run["accepted"] += new["accepted"]
    run.this_run[f"{stage}_s"] = totals["elapsed_s"]
    return totals


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    from rayembed.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _brainstorm(run: _Run, seed: int) -> tuple[dict[str, list[str]], dict[str, Any]]:
    from rayembed.io import atomic_write_json

    sc = run.sc
    specs = brainstorm_specs(
        sc.num_examples, seed, sc.tasks_per_brainstorm, sc.examples_per_task, sc.brainstorm_max_tokens,
        sc.structured_output,
    )
    type_of = {s.id: s.task_type for s in specs}

    def commit(i: int, res: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
        rejects_path = run.out / "_rejects" / f"brainstorm-part-{i:05d}.jsonl"
        tasks_path = run.out / "_brainstorm" / f"part-{i:05d}.json"
        old_rejects = _read_jsonl(rejects_path) if prev else []
        old_tasks = json.loads(tasks_path.read_text())["tasks"] if prev and tasks_path.exists() else {}
        _write_jsonl(rejects_path, old_rejects + res["rejects"])
        atomic_write_json(tasks_path, {"tasks": {**old_tasks, **res["tasks"]}})
        atomic_write_json(_marker(run.out, "brainstorm", i),
                          {"stats": _cumulative(prev, res["stats"], res["failed"]), "failed": res["failed"]})
        return res["stats"]

    stats = _run_stage(run, "brainstorm", specs, commit)
    n_chunks = len(_chunk(specs, sc.chunk_size))
    markers = [_read_marker(run.out, "brainstorm", i) for i in range(n_chunks)]
    if run.stopped is None and not all(_is_done(m) for m in markers):
        # Generation specs depend on every task list: generating from a partial set would change
        # the specs (and the chunks already written) once the missing lists arrive.
        raise SynthFailed(run.failure_message("generation needs every brainstormed task list"))
    # Gather cached task lists in chunk order; drop exact repeats across brainstorms.
    tasks: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()
    for i in range(n_chunks):
        if markers[i] is None:
            break
        cached = json.loads((run.out / "_brainstorm" / f"part-{i:05d}.json").read_text())["tasks"]
        for s in specs[i * sc.chunk_size : (i + 1) * sc.chunk_size]:
            for t in cached.get(s.id, []):
                key = (type_of[s.id], " ".join(t.lower().split()))
                if key not in seen:
                    seen.add(key)
                    tasks.setdefault(type_of[s.id], []).append(t)
    stats["unique_tasks"] = {t: len(v) for t, v in tasks.items()}
    return tasks, stats


def _recover_parts(out: Path, n: int) -> None:
    """Make the visible shards exactly the committed ones.

    A kill after a chunk's marker but before its shard's rename leaves the shard in
    ``_pending/``: it is renamed into place when its sha256 is the one the marker names, and
    removed otherwise (the marker's own shard is then still in place). A shard without a marker
    was never committed: it is removed, and its chunk is generated again.
    """
    from rayembed.io import sha256_file

    for p in sorted(out.glob("part-*.parquet")):
        try:
            i = int(p.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if i >= n or _read_marker(out, "generate", i) is None:
            logger.warning("Removing %s: it was written but never committed (no progress marker)", p)
            p.unlink()
    for i in range(n):
        m = _read_marker(out, "generate", i)
        pend = _pending_part(out, i)
        if m is None:
            pend.unlink(missing_ok=True)
            continue
        if pend.exists():
            if sha256_file(pend) == m.get("part_sha256"):
                os.replace(pend, _part(out, i))
            else:
                pend.unlink()
        part = _part(out, i)
        if not part.exists() or sha256_file(part) != m.get("part_sha256"):
            logger.warning("Chunk %d's shard is missing or not the committed one; generating it again", i)
            part.unlink(missing_ok=True)
            _marker(out, "generate", i).unlink()


def _generate(run: _Run, seed: int, tasks: dict[str, list[str]]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from rayembed.data.schema import to_table
    from rayembed.io import atomic_write_json, atomic_write_parquet, sha256_file
    from rayembed.synth.languages import LanguageSampler, language_weights

    sc = run.sc
    langs = LanguageSampler(language_weights(sc.english_share, sc.tier_weights, sc.language_weights, sc.languages))
    specs = generation_specs(
        sc.num_examples, seed, tasks, langs, sc.examples_per_task, sc.max_tokens, sc.long_long_min_words,
        sc.structured_output, min_document_words=sc.min_document_words, max_text_chars=sc.max_text_chars,
    )
    chunks = _chunk(specs, sc.chunk_size)
    _recover_parts(run.out, len(chunks))
    seen: set[str] = set()
    for i in range(len(chunks)):
        if _read_marker(run.out, "generate", i) is not None:
            seen.update(pq.read_table(_part(run.out, i), columns=["id"]).column("id").to_pylist())

    def commit(i: int, res: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
        st = res["stats"]
        rows, rejects = [], list(res["rejects"])
        reasons = Counter(st["rejected_by_reason"])
        for row in res["rows"]:
            if row["id"] in seen:
                reasons["duplicate"] += 1
                dup = {"id": "", "task_type": row["task_type"], "language": row["language"]}
                rejects.append(make_reject("generate", dup, "duplicate", f"row id {row['id']} already kept",
                                           json.dumps(row, ensure_ascii=False), None))
                continue
            seen.add(row["id"])
            rows.append(row)
        st["accepted"] = len(rows)
        st["rejected"] = sum(reasons.values())
        st["rejected_by_reason"] = dict(reasons)
        st["rows_by_task_type"] = dict(Counter(r["task_type"] for r in rows))
        st["rows_by_language"] = dict(Counter(r["language"] for r in rows))
        rejects_path = run.out / "_rejects" / f"generate-part-{i:05d}.jsonl"
        kept = pq.read_table(_part(run.out, i)).to_pylist() if prev else []
        _write_jsonl(rejects_path, (_read_jsonl(rejects_path) if prev else []) + rejects)
        # The shard waits in _pending/ until the marker naming its sha256 is written.
        pend = atomic_write_parquet(_pending_part(run.out, i), to_table(kept + rows))
        atomic_write_json(_marker(run.out, "generate", i), {
            "stats": _cumulative(prev, st, res["failed"]), "failed": res["failed"], "part_sha256": sha256_file(pend),
        })
        os.replace(pend, _part(run.out, i))
        return st

    stats = _run_stage(run, "generate", specs, commit)
    stats["planned_specs"] = len(specs)
    return stats


def _check_manifest(out: Path, fp: dict[str, Any], overwrite: bool) -> None:
    from rayembed.config import ConfigError
    from rayembed.io import atomic_write_json

    path = out / "_manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != fp["fingerprint"]:
            changed = sorted(k for k in fp["fields"] if old.get("fields", {}).get(k) != fp["fields"][k])
            if not overwrite:
                raise ConfigError(
                    f"synth.output_dir {out} holds a run with a different generation config "
                    f"(changed: {', '.join(changed) or 'prompt version'}). Use a new synth.output_dir "
                    "to keep both, or set synth.overwrite=true to delete the old run."
                )
            logger.warning("synth.overwrite=true: deleting the previous run in %s", out)
            for p in out.iterdir():
                if p.name.startswith("_") or (p.name.startswith("part-") and p.suffix == ".parquet"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, fp)


def run_synth(cfg) -> dict[str, Any]:
    """Generate synthetic training data per ``cfg.synth``; return (and save) the run summary.

    Writes Parquet shards in the unified schema to ``cfg.synth.output_dir`` (default
    ``<run_dir>/synth``). Safe to call again on the same folder: finished chunks are skipped.
    With ``synth.launch_local_llm`` it starts ``serve-llm`` first and stops it at the end.
    """
    from rayembed.config import save_resolved
    from rayembed.io import atomic_write_json
    from rayembed.security import redact_text

    sc = cfg.synth
    out = output_dir(cfg)
    seed = sc.seed if sc.seed is not None else cfg.seed
    fp = fingerprint(sc, seed)
    _check_manifest(out, fp, sc.overwrite)
    save_resolved(cfg, out, name="_config.resolved.yaml")
    t0 = time.monotonic()
    server = None
    try:
        if sc.launch_local_llm:
            from rayembed.runtime import init_ray
            from rayembed.synth.llm_server import start_llm_server

            init_ray(cfg.compute)
            server = start_llm_server(sc.llm_server, model_name=sc.model)
            base_url, key = server.base_url, Secret(server.api_key)
        else:
            base_url, key = resolve_endpoint(sc)
        run = _Run(cfg, out, client_settings(sc, base_url), key)
        tasks, bs = _brainstorm(run, seed)
        gen = _generate(run, seed, tasks) if not run.stopped else _empty_stats()
    finally:
        if server is not None:
            server.stop()
    elapsed = time.monotonic() - t0
    summary = build_summary(sc, out, seed, base_url, bs, gen, run, elapsed)
    summary["base_url"] = redact_text(str(base_url or "https://api.openai.com/v1"))
    atomic_write_json(out / "_summary.json", summary)
    logger.info(
        "synth done: %d rows accepted, %d rejected, %d requests (%d retries), %d+%d tokens%s -> %s",
        summary["accepted"], summary["rejected"], summary["requests"], summary["retries"],
        summary["prompt_tokens"], summary["completion_tokens"],
        f", ${summary['cost_usd']:.4f}" if summary["cost_usd"] else "", out,
    )
    _check_failures(run)
    return summary


def _check_failures(run: _Run) -> None:
    """Fail the run when every request failed or more than synth.max_failure_rate of them did."""
    n = sum(run.failed.values())
    if not n:
        return
    if n >= run.sent:
        raise SynthFailed(run.failure_message("every request failed"))
    rate = n / run.sent
    if rate > run.sc.max_failure_rate:
        raise SynthFailed(run.failure_message(
            f"that is {rate:.0%}, above synth.max_failure_rate={run.sc.max_failure_rate}"))
    logger.warning("synth: %d of %d requests failed at %s (%s); run the same command again to send them again.",
                   n, run.sent, run.endpoint(), ", ".join(f"{r} x{c}" for r, c in run.failed.most_common(5)))


def _steady_rate(this_run: dict[str, Any], stage: str) -> float | None:
    """Requests/s between the first and the last chunk commit (leaves out actor start-up)."""
    times = this_run["commit_times"].get(stage, [])
    reqs = this_run["chunk_requests"].get(stage, [])
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return round(sum(reqs[1:]) / (times[-1] - times[0]), 3)


def build_summary(sc, out, seed, base_url, bs, gen, run, elapsed) -> dict[str, Any]:
    reasons = dict(gen.get("rejected_by_reason", {}))
    for r, n in bs.get("rejected_by_reason", {}).items():
        reasons[f"brainstorm:{r}"] = n
    requests = bs.get("requests", 0) + gen.get("requests", 0)
    return {
        "output_dir": str(out),
        "model": sc.model,
        "seed": seed,
        "requests": requests,
        "retries": bs.get("retries", 0) + gen.get("retries", 0),
        "retry_reasons": _merge_counts(bs.get("retry_reasons", {}), gen.get("retry_reasons", {})),
        # Requests whose spec is still to be sent again (the folder's), and this run's failures.
        "failed_requests": bs.get("failed_requests", 0) + gen.get("failed_requests", 0),
        "failed_by_reason": dict(run.failed),
        "accepted": gen.get("accepted", 0),
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "prompt_tokens": bs.get("prompt_tokens", 0) + gen.get("prompt_tokens", 0),
        "completion_tokens": bs.get("completion_tokens", 0) + gen.get("completion_tokens", 0),
        "cost_usd": round(run.cost, 6),
        "rows_by_task_type": dict(sorted(gen.get("rows_by_task_type", {}).items())),
        "rows_by_language": dict(sorted(gen.get("rows_by_language", {}).items(), key=lambda kv: -kv[1])),
        "brainstorm": {
            "requests": bs.get("requests", 0),
            "tasks": bs.get("tasks", 0),
            "unique_tasks": bs.get("unique_tasks", {}),
        },
        "planned_generation_specs": gen.get("planned_specs", 0),
        "chunks_resumed": run.resumed_chunks,
        "chunks_new": run.new_chunks,
        "stopped_early": run.stopped,
        "peak_in_flight": max(bs.get("peak_in_flight", 0), gen.get("peak_in_flight", 0)),
        "elapsed_s": round(elapsed, 3),
        "this_run": {
            "requests": run.this_run["requests"],
            "accepted": run.this_run["accepted"],
            "brainstorm_s": round(run.this_run.get("brainstorm_s", 0.0), 3),
            "generate_s": round(run.this_run.get("generate_s", 0.0), 3),
            "generate_steady_requests_per_s": _steady_rate(run.this_run, "generate"),
        },
    }
