"""The synthetic-data pipeline: prompt specs -> Ray Data actor pool of LLM clients -> Parquet shards.

Layout of ``output_dir`` (files starting with ``_`` are ignored by Parquet dataset readers, so
``ray.data.read_parquet(output_dir)`` sees only the shards)::

    part-00000.parquet ...      accepted rows, unified schema, one shard per chunk of specs
    _rejects/<stage>-part-*.jsonl   every rejected reply with its reason (secrets redacted)
    _brainstorm/part-*.json     brainstormed task lists (cached: never asked for twice)
    _progress/part-*.json       per-chunk stats; written last, so its presence means "done"
    _manifest.json              fingerprint of the generation config this folder belongs to
    _summary.json               the end-of-run summary

Resuming: spec ids and prompts are pure functions of the seed and config; specs are cut into
fixed chunks; the driver commits chunks strictly in order (rejects, shard, then progress
marker, each atomic). The committed chunks therefore always form a prefix, and a restarted run
skips that prefix, rebuilds its dedup state from those shards, and continues. A killed run
loses at most the chunks that were in flight, and never writes a row twice.
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
        json_mode=sc.json_mode,
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


def fingerprint(sc, seed: int) -> dict[str, Any]:
    """Everything that changes which prompts are sent or how chunks are cut."""
    fields = {
        "prompt_version": PROMPT_VERSION,
        "seed": seed,
        "num_examples": dict(sorted(sc.num_examples.items())),
        "tasks_per_brainstorm": sc.tasks_per_brainstorm,
        "examples_per_task": sc.examples_per_task,
        "english_share": sc.english_share,
        "tier_weights": dict(sorted(sc.tier_weights.items())),
        "language_weights": dict(sorted(sc.language_weights.items())),
        "languages": sorted(sc.languages),
        "long_long_min_words": sc.long_long_min_words,
        "model": sc.model,
        "max_tokens": sc.max_tokens,
        "brainstorm_max_tokens": sc.brainstorm_max_tokens,
        "json_mode": sc.json_mode,
        "chunk_size": sc.chunk_size,
    }
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
            *(self.client.complete(s["prompt"], s["max_tokens"]) for s in specs)
        )
        stats = _empty_stats()
        stats["specs"] = len(specs)
        rows: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        tasks: dict[str, list[str]] = {}
        rejected = Counter()
        for spec, c in zip(specs, comps):
            stats["requests"] += c.attempts
            stats["retries"] += len(c.retry_reasons)
            stats["retry_reasons"] = _merge_counts(stats["retry_reasons"], Counter(c.retry_reasons))
            stats["prompt_tokens"] += c.prompt_tokens
            stats["completion_tokens"] += c.completion_tokens
            stats["cost_usd"] += c.cost_usd
            try:
                if c.error:
                    stats["failed_requests"] += 1
                    raise Rejected(f"request_{c.error}", c.error_detail)
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
        return {"stage": stage, "rows": rows, "rejects": rejects, "tasks": tasks, "stats": stats}


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
        self.this_run: dict[str, Any] = {"requests": 0, "accepted": 0, "commit_times": {}, "chunk_requests": {}}

    def over_budget(self) -> bool:
        b = self.sc.max_cost_usd
        if b is not None and self.cost >= b:
            self.stopped = f"budget reached: spent ${self.cost:.4f} of max_cost_usd=${b}"
            return True
        return False


def _chunk(specs: list[PromptSpec], size: int) -> list[list[PromptSpec]]:
    return [specs[i : i + size] for i in range(0, len(specs), size)]


def _marker(out: Path, stage: str, i: int) -> Path:
    return out / "_progress" / f"{stage}-part-{i:05d}.json"


def _done_prefix(out: Path, stage: str, n: int) -> int:
    k = 0
    while k < n and _marker(out, stage, k).exists():
        k += 1
    return k


def _run_stage(run: _Run, stage: str, specs: list[PromptSpec], commit) -> dict[str, Any]:
    """Send every not-yet-committed chunk through the actor pool; commit results in order."""
    chunks = _chunk(specs, run.sc.chunk_size)
    done = _done_prefix(run.out, stage, len(chunks))
    totals = _empty_stats()
    for i in range(done):
        st = json.loads(_marker(run.out, stage, i).read_text())
        totals = merge_stats(totals, st)
        run.cost += st.get("cost_usd", 0.0)
    run.resumed_chunks += done
    if done:
        logger.info("%s: %d of %d chunks already done; resuming at chunk %d", stage, done, len(chunks), done)
    totals["elapsed_s"] = 0.0
    if done == len(chunks) or run.over_budget():
        return totals
    import ray
    from ray.data import ActorPoolStrategy

    from rayembed.runtime import init_ray

    init_ray(run.cfg.compute)
    items = [
        {"chunk_index": i, "stage": stage, "specs_json": json.dumps([s.to_dict() for s in chunks[i]])}
        for i in range(done, len(chunks))
    ]
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
    next_i = done
    new = _empty_stats()
    it = ds.iter_rows()
    try:
        for row in it:
            res = json.loads(row["result"])
            pending[res["chunk_index"]] = res
            while next_i in pending:
                st = commit(next_i, pending.pop(next_i))
                new = merge_stats(new, st)
                run.this_run["commit_times"].setdefault(stage, []).append(time.monotonic() - t0)
                run.this_run["chunk_requests"].setdefault(stage, []).append(st["requests"])
                run.cost += st.get("cost_usd", 0.0)
                run.new_chunks += 1
                next_i += 1
                dt = max(time.monotonic() - t0, 1e-9)
                logger.info(
                    "%s: %d/%d chunks, %d requests (%.1f/s), %d accepted, %d rejected%s",
                    stage, next_i, len(chunks), new["requests"], new["requests"] / dt,
                    new["accepted"] if stage == "generate" else new["tasks"], new["rejected"],
                    f", ${run.cost:.4f}" if run.settings.price_in is not None else "",
                )
                if run.over_budget():
                    logger.warning("%s: stopping early, %s", stage, run.stopped)
                    break
            if run.stopped:
                break
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    totals = merge_stats(totals, new)
    totals["elapsed_s"] = time.monotonic() - t0
    run.this_run["requests"] += new["requests"]
    run.this_run["accepted"] += new["accepted"]
    run.this_run[f"{stage}_s"] = totals["elapsed_s"]
    return totals


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    from rayembed.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _brainstorm(run: _Run, seed: int) -> tuple[dict[str, list[str]], dict[str, Any]]:
    from rayembed.io import atomic_write_json

    sc = run.sc
    specs = brainstorm_specs(
        sc.num_examples, seed, sc.tasks_per_brainstorm, sc.examples_per_task, sc.brainstorm_max_tokens, sc.json_mode
    )
    type_of = {s.id: s.task_type for s in specs}

    def commit(i: int, res: dict[str, Any]) -> dict[str, Any]:
        _write_jsonl(run.out / "_rejects" / f"brainstorm-part-{i:05d}.jsonl", res["rejects"])
        atomic_write_json(run.out / "_brainstorm" / f"part-{i:05d}.json", {"tasks": res["tasks"]})
        atomic_write_json(_marker(run.out, "brainstorm", i), res["stats"])
        return res["stats"]

    stats = _run_stage(run, "brainstorm", specs, commit)
    # Gather cached task lists in chunk order; drop exact repeats across brainstorms.
    tasks: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()
    n_chunks = _done_prefix(run.out, "brainstorm", len(_chunk(specs, sc.chunk_size)))
    for i in range(n_chunks):
        cached = json.loads((run.out / "_brainstorm" / f"part-{i:05d}.json").read_text())["tasks"]
        for s in specs[i * sc.chunk_size : (i + 1) * sc.chunk_size]:
            for t in cached.get(s.id, []):
                key = (type_of[s.id], " ".join(t.lower().split()))
                if key not in seen:
                    seen.add(key)
                    tasks.setdefault(type_of[s.id], []).append(t)
    stats["unique_tasks"] = {t: len(v) for t, v in tasks.items()}
    return tasks, stats


def _generate(run: _Run, seed: int, tasks: dict[str, list[str]]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from rayembed.data.schema import to_table
    from rayembed.io import atomic_write_json, atomic_write_parquet
    from rayembed.synth.languages import LanguageSampler, language_weights

    sc = run.sc
    langs = LanguageSampler(language_weights(sc.english_share, sc.tier_weights, sc.language_weights, sc.languages))
    specs = generation_specs(
        sc.num_examples, seed, tasks, langs, sc.examples_per_task, sc.max_tokens, sc.long_long_min_words, sc.json_mode
    )
    chunks = _chunk(specs, sc.chunk_size)
    seen: set[str] = set()
    for i in range(_done_prefix(run.out, "generate", len(chunks))):
        seen.update(pq.read_table(run.out / f"part-{i:05d}.parquet", columns=["id"]).column("id").to_pylist())

    def commit(i: int, res: dict[str, Any]) -> dict[str, Any]:
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
        _write_jsonl(run.out / "_rejects" / f"generate-part-{i:05d}.jsonl", rejects)
        atomic_write_parquet(run.out / f"part-{i:05d}.parquet", to_table(rows))
        atomic_write_json(_marker(run.out, "generate", i), st)
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
    return summary


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
        "failed_requests": bs.get("failed_requests", 0) + gen.get("failed_requests", 0),
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
