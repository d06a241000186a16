"""The synth driver: prompt specs -> Ray Data actor pool of LLM clients -> Parquet shards, in two
stages (brainstorm task lists, then generate rows), committing each chunk so a run resumes.

The folder it writes and how a run resumes there: :mod:`rayembed.synth.resume`; the actor:
:mod:`rayembed.synth.worker`; the counts and the summary: :mod:`rayembed.synth.stats`.

A run fails (:class:`SynthFailed`, naming the endpoint) when more than
``synth.max_failure_rate`` of its requests failed, when every request failed, or when a
brainstorm request failed (generation needs every task list).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rayembed.synth.client import ClientSettings, Secret
from rayembed.synth.corpus_queries import TASK_TYPE, CorpusQueries
from rayembed.synth.prompts import PromptSpec, brainstorm_specs, generation_specs
from rayembed.synth.resume import (
    check_manifest,
    chunk,
    fingerprint,
    folder_stats,
    is_done,
    marker_path,
    output_dir,
    part_path,
    pending_path,
    read_jsonl,
    read_marker,
    recover_parts,
    rejects_path,
    tasks_path,
    write_jsonl,
)
from rayembed.synth.stats import RunStats, SynthStats, build_summary
from rayembed.synth.worker import SynthWorker, client_settings, make_reject, validation_settings

logger = logging.getLogger(__name__)


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


class SynthFailed(RuntimeError):
    """Too many requests failed at the endpoint. Finished work is kept; the next run sends the
    failed requests again. The message names the endpoint and the failure reasons, never a key."""


class _Run:
    """One run_synth call: its folder, client settings and key, when it stops; its counts in ``stats``."""

    def __init__(self, cfg, out: Path, seed: int, settings: ClientSettings, key: Secret):
        from rayembed.security import redact_text

        self.cfg = cfg
        self.sc = cfg.synth
        self.out = out
        self.seed = seed
        self.settings = settings
        self.key = key
        self.stats = RunStats(output_dir=str(out), seed=seed,
                              endpoint=redact_text(str(settings.base_url or "https://api.openai.com/v1")))

    def over_budget(self) -> bool:
        b, st = self.sc.max_cost_usd, self.stats
        if b is not None and st.cost_usd >= b:
            st.stopped = f"budget reached: spent ${st.cost_usd:.4f} of max_cost_usd=${b}"
            return True
        return False

    def failing(self) -> bool:
        """Stop early: after at least two chunks' worth of requests, more than max_failure_rate failed."""
        st = self.stats
        n = sum(st.failed.values())
        if st.sent >= 2 * self.sc.chunk_size and n / st.sent > self.sc.max_failure_rate:
            st.stopped = f"{n} of {st.sent} requests failed, above synth.max_failure_rate={self.sc.max_failure_rate}"
            return True
        return False

    def failure_message(self, what: str) -> str:
        st = self.stats
        n = sum(st.failed.values())
        reasons = ", ".join(f"{r} x{c}" for r, c in st.failed.most_common(5))
        return (
            f"synth: {n} of {st.sent} requests failed at {st.endpoint} ({reasons}); {what}. Check "
            "synth.base_url, the API key and the server's logs, then run the same command again: finished "
            "chunks are kept and only the failed requests are sent again."
        )


def _run_stage(run: _Run, stage: str, specs: list[PromptSpec], commit) -> SynthStats:
    """Send every chunk not yet done (all its specs, or only those whose request failed last
    time) through the actor pool; commit results in chunk order. Returns the stage's folder totals."""
    chunks = chunk(specs, run.sc.chunk_size)
    markers = [read_marker(run.out, stage, i) for i in range(len(chunks))]
    todo = [i for i, m in enumerate(markers) if not is_done(m)]
    done = len(chunks) - len(todo)
    for m in markers:
        if m is not None:
            run.stats.cost_usd += m["stats"].get("cost_usd", 0.0)
    run.stats.resumed_chunks += done
    retry = sum(1 for i in todo if markers[i] is not None)
    if done or retry:
        logger.info("%s: %d of %d chunks already done; %d with failed requests to send again",
                    stage, done, len(chunks), retry)
    if not todo or run.over_budget():
        return folder_stats(run.out, stage, len(chunks))
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
    new = SynthStats()
    it = ds.iter_rows()
    try:
        for row in it:
            res = json.loads(row["result"])
            pending[res["chunk_index"]] = res
            while pos < len(todo) and todo[pos] in pending:
                i = todo[pos]
                res = pending.pop(i)
                st = commit(i, res, markers[i])
                new += st
                run.stats.committed(stage, st, res["failed"], time.monotonic() - t0)
                pos += 1
                dt = max(time.monotonic() - t0, 1e-9)
                logger.info(
                    "%s: chunk %d (%d/%d), %d requests (%.1f/s), %d accepted, %d rejected, %d failed%s",
                    stage, i, pos, len(todo), new.requests, new.requests / dt,
                    new.accepted if stage == "generate" else new.tasks, new.rejected,
                    new.failed_requests, f", ${run.stats.cost_usd:.4f}" if run.settings.price_in is not None else "",
                )
                if run.over_budget() or run.failing():
                    logger.warning("%s: stopping early, %s", stage, run.stats.stopped)
                    break
            if run.stats.stopped:
                break
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    totals = folder_stats(run.out, stage, len(chunks))
    totals.elapsed_s = time.monotonic() - t0
    this_run = run.stats.this_run
    this_run.requests += new.requests
    this_run.accepted += new.accepted
    this_run.stage_s[stage] = totals.elapsed_s
    return totals


def _marker_record(prev: dict[str, Any] | None, st: SynthStats, failed: list[dict[str, Any]]) -> dict[str, Any]:
    """A chunk's progress marker after this attempt (the shard's sha256 is added by generate)."""
    prev_stats = SynthStats.from_dict(prev["stats"]) if prev else None
    return {"stats": st.after(prev_stats, len(failed)).to_dict(), "failed": failed}


def _brainstorm(run: _Run) -> dict[str, list[str]]:
    """Brainstorm task lists (cached in ``_brainstorm/``); return them per task type, repeats dropped."""
    from rayembed.io import atomic_write_json

    sc = run.sc
    specs = brainstorm_specs(
        sc.num_examples, run.seed, sc.tasks_per_brainstorm, sc.examples_per_task, sc.brainstorm_max_tokens,
        sc.structured_output,
    )
    type_of = {s.id: s.task_type for s in specs}

    def commit(i: int, res: dict[str, Any], prev: dict[str, Any] | None) -> SynthStats:
        rejects_file, tasks_file = rejects_path(run.out, "brainstorm", i), tasks_path(run.out, i)
        old_rejects = read_jsonl(rejects_file) if prev else []
        old_tasks = json.loads(tasks_file.read_text())["tasks"] if prev and tasks_file.exists() else {}
        write_jsonl(rejects_file, old_rejects + res["rejects"])
        atomic_write_json(tasks_file, {"tasks": {**old_tasks, **res["tasks"]}})
        st = SynthStats.from_dict(res["stats"])
        atomic_write_json(marker_path(run.out, "brainstorm", i), _marker_record(prev, st, res["failed"]))
        return st

    run.stats.brainstorm = _run_stage(run, "brainstorm", specs, commit)
    n_chunks = len(chunk(specs, sc.chunk_size))
    markers = [read_marker(run.out, "brainstorm", i) for i in range(n_chunks)]
    if run.stats.stopped is None and not all(is_done(m) for m in markers):
        # Generation specs depend on every task list: generating from a partial set would change
        # the specs (and the chunks already written) once the missing lists arrive.
        raise SynthFailed(run.failure_message("generation needs every brainstormed task list"))
    # Gather cached task lists in chunk order; drop exact repeats across brainstorms.
    tasks: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()
    for i in range(n_chunks):
        if markers[i] is None:
            break
        cached = json.loads(tasks_path(run.out, i).read_text())["tasks"]
        for s in specs[i * sc.chunk_size : (i + 1) * sc.chunk_size]:
            for t in cached.get(s.id, []):
                key = (type_of[s.id], " ".join(t.lower().split()))
                if key not in seen:
                    seen.add(key)
                    tasks.setdefault(type_of[s.id], []).append(t)
    run.stats.unique_tasks = {t: len(v) for t, v in tasks.items()}
    return tasks


def _generate(run: _Run, tasks: dict[str, list[str]], corpus: CorpusQueries | None = None) -> None:
    """Generate rows from the task lists (and the corpus-queries passages) into the shards,
    dropping rows already kept and corpus queries that do not find their passage again."""
    import pyarrow.parquet as pq

    from rayembed.data.schema import to_table
    from rayembed.io import atomic_write_json, atomic_write_parquet, sha256_file
    from rayembed.synth.languages import LanguageSampler, language_weights

    sc = run.sc
    langs = LanguageSampler(language_weights(sc.english_share, sc.tier_weights, sc.language_weights, sc.languages))
    specs = generation_specs(
        sc.num_examples, run.seed, tasks, langs, sc.examples_per_task, sc.max_tokens, sc.long_long_min_words,
        sc.structured_output, min_document_words=sc.min_document_words, max_text_chars=sc.max_text_chars,
    )
    if corpus is not None:
        specs += corpus.specs(sc.num_examples.get(TASK_TYPE, 0), run.seed, sc.max_tokens, sc.structured_output)
    chunks = chunk(specs, sc.chunk_size)
    recover_parts(run.out, len(chunks))
    seen: set[str] = set()
    for i in range(len(chunks)):
        if read_marker(run.out, "generate", i) is not None:
            seen.update(pq.read_table(part_path(run.out, i), columns=["id"]).column("id").to_pylist())

    def commit(i: int, res: dict[str, Any], prev: dict[str, Any] | None) -> SynthStats:
        st = SynthStats.from_dict(res["stats"])
        rows, rejects = [], list(res["rejects"])
        reasons = Counter(st.rejected_by_reason)
        generated = res["rows"]
        queries = [r for r in generated if r["task_type"] == TASK_TYPE]
        if queries and corpus is not None and sc.corpus_queries.filter != "none":
            ranks = corpus.ranks([r["query"] for r in queries], [r["id"].split("/", 1)[1] for r in queries])
            far = {r["id"]: int(k) for r, k in zip(queries, ranks) if k > sc.corpus_queries.top_k}
            for r in queries:
                if r["id"] in far:
                    reasons["round_trip"] += 1
                    rejects.append(make_reject(
                        "generate", {"id": "", "task_type": TASK_TYPE, "language": r["language"]}, "round_trip",
                        f"its passage {r['id']} ranked {far[r['id']]} under {sc.corpus_queries.filter} "
                        f"(top_k={sc.corpus_queries.top_k})", json.dumps({"query": r["query"]}), None))
            generated = [r for r in generated if r["id"] not in far]
        for row in generated:
            if row["id"] in seen:
                reasons["duplicate"] += 1
                dup = {"id": "", "task_type": row["task_type"], "language": row["language"]}
                rejects.append(make_reject("generate", dup, "duplicate", f"row id {row['id']} already kept",
                                           json.dumps(row, ensure_ascii=False), None))
                continue
            seen.add(row["id"])
            rows.append(row)
        st.accepted = len(rows)
        st.rejected = sum(reasons.values())
        st.rejected_by_reason = dict(reasons)
        st.rows_by_task_type = dict(Counter(r["task_type"] for r in rows))
        st.rows_by_language = dict(Counter(r["language"] for r in rows))
        rejects_file = rejects_path(run.out, "generate", i)
        kept = pq.read_table(part_path(run.out, i)).to_pylist() if prev else []
        write_jsonl(rejects_file, (read_jsonl(rejects_file) if prev else []) + rejects)
        # The shard waits in _pending/ until the marker naming its sha256 is written.
        pend = atomic_write_parquet(pending_path(run.out, i), to_table(kept + rows))
        atomic_write_json(marker_path(run.out, "generate", i),
                          {**_marker_record(prev, st, res["failed"]), "part_sha256": sha256_file(pend)})
        os.replace(pend, part_path(run.out, i))
        return st

    run.stats.generate = _run_stage(run, "generate", specs, commit)
    run.stats.planned_specs = len(specs)


def run_synth(cfg) -> dict[str, Any]:
    """Generate synthetic training data per ``cfg.synth``; return (and save) the run summary.

    Writes Parquet shards in the unified schema to ``cfg.synth.output_dir`` (default
    ``<run_dir>/synth``). Safe to call again on the same folder: finished chunks are skipped.
    With ``synth.launch_local_llm`` it starts ``serve-llm`` first and stops it at the end.
    """
    from rayembed.config import save_resolved
    from rayembed.io import atomic_write_json

    sc = cfg.synth
    out = output_dir(cfg)
    seed = sc.seed if sc.seed is not None else cfg.seed
    check_manifest(out, fingerprint(sc, seed), sc.overwrite)
    save_resolved(cfg, out, name="_config.resolved.yaml")
    t0 = time.monotonic()
    corpus = None
    if sc.num_examples.get(TASK_TYPE, 0) > 0:  # read (and refused if unusable) before any request
        from rayembed.runtime import resolve_data_dir

        try:
            data_dir = resolve_data_dir(cfg.data_dir)
        except FileNotFoundError:
            data_dir = None
        corpus = CorpusQueries.load(sc.corpus_queries, data_dir)
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
        run = _Run(cfg, out, seed, client_settings(sc, base_url), key)
        tasks = _brainstorm(run)
        if not run.stats.stopped:
            _generate(run, tasks, corpus)
    finally:
        if server is not None:
            server.stop()
    run.stats.elapsed_s = time.monotonic() - t0
    summary = build_summary(run.stats, sc)
    atomic_write_json(out / "_summary.json", summary)
    logger.info(
        "synth done: %d rows accepted, %d rejected, %d requests (%d retries), %d+%d tokens%s -> %s",
        summary["accepted"], summary["rejected"], summary["requests"], summary["retries"],
        summary["prompt_tokens"], summary["completion_tokens"],
        f", ${summary['cost_usd']:.4f}" if summary["cost_usd"] else "", out,
    )
    _check_failures(run)
    _check_round_trip(summary, sc)
    return summary


def _check_round_trip(summary: dict[str, Any], sc) -> None:
    """End the stage when corpus queries were written but the round-trip filter kept none."""
    asked = sc.num_examples.get(TASK_TYPE, 0)
    dropped = summary.get("rejected_by_reason", {}).get("round_trip", 0)
    if asked and dropped and not summary.get("rows_by_task_type", {}).get(TASK_TYPE):
        cq = sc.corpus_queries
        raise SynthFailed(
            f"synth: the round-trip filter kept none of the {dropped} corpus queries that parsed (no passage "
            f"ranked in the top {cq.top_k} of {cq.filter} for its own query). Raise "
            f"synth.corpus_queries.top_k, set synth.corpus_queries.filter=none to keep every query, or use a "
            "stronger LLM; the queries are in _rejects/ with their ranks, and the other rows are kept."
        )


def _check_failures(run: _Run) -> None:
    """Fail the run when every request failed or more than synth.max_failure_rate of them did."""
    st = run.stats
    n = sum(st.failed.values())
    if not n:
        return
    if n >= st.sent:
        raise SynthFailed(run.failure_message("every request failed"))
    rate = n / st.sent
    if rate > run.sc.max_failure_rate:
        raise SynthFailed(run.failure_message(
            f"that is {rate:.0%}, above synth.max_failure_rate={run.sc.max_failure_rate}"))
    logger.warning("synth: %d of %d requests failed at %s (%s); run the same command again to send them again.",
                   n, st.sent, st.endpoint, ", ".join(f"{r} x{c}" for r, c in st.failed.most_common(5)))
