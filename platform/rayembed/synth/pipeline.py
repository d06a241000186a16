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

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rayembed.synth.client import ClientSettings, Secret
from rayembed.synth.prompts import PROMPT_VERSION, PromptSpec, brainstorm_specs, generation_specs
from rayembed.synth.stats import RunStats, SynthStats, build_summary
from rayembed.synth.worker import SynthWorker, client_settings, make_reject, validation_settings

logger = logging.getLogger(__name__)


def output_dir(cfg) -> Path:
    from rayembed.cluster.storage import local_folder

    return local_folder(cfg.synth.output_dir or f"{str(cfg.run_dir).rstrip('/')}/synth",
                        what="synth.output_dir" if cfg.synth.output_dir else "run_dir")


# ------------------------------------------------------------------------------ fingerprint


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


def check_manifest(out: Path, fp: dict[str, Any], overwrite: bool) -> None:
    """Claim ``out`` for the config of fingerprint ``fp``: refuse a folder of another config, or
    with ``overwrite`` delete that run first."""
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


# ------------------------------------------------------------------------------ chunks and their files


def chunk(specs: list[PromptSpec], size: int) -> list[list[PromptSpec]]:
    return [specs[i : i + size] for i in range(0, len(specs), size)]


def marker_path(out: Path, stage: str, i: int) -> Path:
    return out / "_progress" / f"{stage}-part-{i:05d}.json"


def rejects_path(out: Path, stage: str, i: int) -> Path:
    return out / "_rejects" / f"{stage}-part-{i:05d}.jsonl"


def tasks_path(out: Path, i: int) -> Path:
    return out / "_brainstorm" / f"part-{i:05d}.json"


def part_path(out: Path, i: int) -> Path:
    return out / f"part-{i:05d}.parquet"


def pending_path(out: Path, i: int) -> Path:
    return out / "_pending" / f"part-{i:05d}.parquet"


def read_marker(out: Path, stage: str, i: int) -> dict[str, Any] | None:
    """A chunk's commit record: {"stats", "failed": [spec ids with reasons], "part_sha256"}, or None."""
    path = marker_path(out, stage, i)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def is_done(marker: dict[str, Any] | None) -> bool:
    return marker is not None and not marker.get("failed")


def folder_stats(out: Path, stage: str, n: int) -> SynthStats:
    """The stage's totals over every committed chunk (failed_requests: those still to send again)."""
    totals = SynthStats()
    for i in range(n):
        m = read_marker(out, stage, i)
        if m is not None:
            totals += SynthStats.from_dict(m["stats"])
    return totals


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    from rayembed.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def recover_parts(out: Path, n: int) -> None:
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
        if i >= n or read_marker(out, "generate", i) is None:
            logger.warning("Removing %s: it was written but never committed (no progress marker)", p)
            p.unlink()
    for i in range(n):
        m = read_marker(out, "generate", i)
        pend = pending_path(out, i)
        if m is None:
            pend.unlink(missing_ok=True)
            continue
        if pend.exists():
            if sha256_file(pend) == m.get("part_sha256"):
                os.replace(pend, part_path(out, i))
            else:
                pend.unlink()
        part = part_path(out, i)
        if not part.exists() or sha256_file(part) != m.get("part_sha256"):
            logger.warning("Chunk %d's shard is missing or not the committed one; generating it again", i)
            part.unlink(missing_ok=True)
            marker_path(out, "generate", i).unlink()


# ------------------------------------------------------------------------------ the driver


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


def _generate(run: _Run, tasks: dict[str, list[str]]) -> None:
    """Generate rows from the task lists into the shards, dropping rows already kept."""
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
        for row in res["rows"]:
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
            _generate(run, tasks)
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
    return summary


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
