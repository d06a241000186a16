"""The synth output folder and how a run resumes in it: file layout, progress markers, the config
fingerprint a folder belongs to, and recovery of a commit a kill interrupted.

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from rayembed.synth.prompts import PROMPT_VERSION, PromptSpec
from rayembed.synth.stats import SynthStats

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
# Keys added after runs were written, left out while at their default: a folder written before a
# key existed still resumes, and setting the key to anything else changes the fingerprint.
ADDED_AT_DEFAULT = {("corpus_queries", "max_corpus_docs"): 100_000}


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
        if isinstance(v, dict):
            v = {sk: sv for sk, sv in v.items() if ADDED_AT_DEFAULT.get((k, sk), object()) != sv}
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
