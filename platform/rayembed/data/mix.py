"""Mix the configured sources into shuffled Parquet shards plus a manifest (`rayembed data build`).

Steps, in bounded memory:

1. Each source is read row by row, validated (bad rows counted and skipped; too many fails the
   job naming the file and the first bad rows). A source whose rows have no negatives gets them
   mined within its own documents first (:mod:`rayembed.data.mine`; ``data.mine.in_build``), which
   holds that one source's rows in memory. Then rows are sampled by the source's ratio: a ratio r keeps
   ``floor(r)`` copies of every row plus one more with probability ``r - floor(r)``, seeded.
2. Each kept row goes to one of ``shuffle_buckets`` spill files, chosen by a hash of its
   normalised (query, positive) text, so duplicates across sources land in the same bucket.
3. Bucket by bucket: drop duplicates (first source in config order wins; repeats made by a ratio
   above 1 are kept), shuffle with a seeded RNG, send a stable-hash ``val_fraction`` to the
   validation split, and append to the output shards.

Output folder (written beside the final one, then renamed into place, so a reader never
sees half a mix)::

    train/part-00000.parquet ...   val/part-00000.parquet   manifest.json
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rayembed.data.formats import BadRows
from rayembed.data.schema import COLUMNS, SCHEMA, make_id, to_table
from rayembed.io import atomic_write_json, atomic_write_parquet, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def dedup_key(row: dict[str, Any]) -> str:
    norm = lambda s: " ".join(str(s).lower().split())  # noqa: E731
    return hashlib.sha256(f"{norm(row['query'])}\x1f{norm(row['positive'])}".encode()).hexdigest()


def _unit(key: str, salt: str) -> float:
    """A stable number in [0, 1) from a key (for the validation split)."""
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:12], 16) / float(1 << 48)


class _ShardWriter:
    """Accumulates rows and writes ``part-NNNNN.parquet`` shards of ``shard_rows`` rows, atomically."""

    def __init__(self, folder: Path, shard_rows: int):
        self.folder, self.shard_rows = folder, shard_rows
        self.buf: list[dict[str, Any]] = []
        self.files: list[dict[str, Any]] = []
        self.counts: dict[str, Counter] = {"source": Counter(), "task_type": Counter(), "language": Counter()}
        self.rows = 0

    def add(self, row: dict[str, Any]) -> None:
        self.buf.append(row)
        self.rows += 1
        for k, c in self.counts.items():
            c[row[k]] += 1
        if len(self.buf) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        path = self.folder / f"part-{len(self.files):05d}.parquet"
        atomic_write_parquet(path, to_table(self.buf))
        self.files.append({"path": str(path.relative_to(self.folder.parent)), "rows": len(self.buf),
                           "sha256": sha256_file(path)})
        self.buf = []

    def summary(self) -> dict[str, Any]:
        return {"rows": self.rows, "files": self.files, **{f"by_{k}": dict(sorted(c.items())) for k, c in self.counts.items()}}


def _mine_source(cfg, src, rows: list[dict[str, Any]], stage: Path) -> tuple[list[dict[str, Any]], dict | None]:
    """Hard negatives for the rows of one source that have none, mined within the source's documents."""
    from rayembed.data.mine import mine_negatives

    if not rows or all(r["negatives"] for r in rows):
        return rows, None
    mc = cfg.data.mine
    stats: dict[str, Any] = {"retriever": mc.retriever}
    work = f"{mc.work_dir.rstrip('/')}/{src.name}" if mc.work_dir else str(stage / "_mine" / src.name)
    rows = mine_negatives(rows, retriever=mc.retriever, top_k=mc.top_k, skip_top=mc.skip_top,
                          num_negatives=mc.num_negatives, seed=cfg.seed, batch_size=mc.batch_size,
                          max_length=mc.max_length, max_positive_ratio=mc.max_positive_ratio, only_missing=True,
                          cfg=cfg, work_dir=work, stats=stats)
    logger.info("source %s: mined negatives for %d rows (%d short of %d)", src.name, stats["rows_mined"],
                stats["rows_short"], mc.num_negatives)
    return rows, stats


def build_mix(cfg, out_dir: str | os.PathLike | None = None) -> Path:
    """Build the training mix from ``cfg.data.sources``; return the path of ``manifest.json``."""
    from rayembed.cluster.storage import local_folder
    from rayembed.config import to_dict
    from rayembed.data.sources import iter_source
    from rayembed.runtime import resolve_data_dir

    dcfg = cfg.data
    out = local_folder(out_dir or dcfg.output_dir or f"{str(cfg.run_dir).rstrip('/')}/data",
                       what="data.output_dir" if (out_dir or dcfg.output_dir) else "run_dir")
    if not dcfg.sources:
        raise ValueError(
            "data.sources is empty; list at least one source, e.g. data.sources=[{name: stsb, format: stsb, "
            "path: stsb/sts-train.csv}] (see jobs/configs/local/data.yaml)."
        )
    try:
        data_dir = resolve_data_dir(cfg.data_dir)
    except FileNotFoundError:
        data_dir = None
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        spill = stage / "_spill"
        nb = dcfg.shuffle_buckets if dcfg.shuffle else 1
        bucket_bufs: dict[int, list[dict[str, Any]]] = defaultdict(list)
        bucket_parts: dict[int, int] = Counter()
        per_source: dict[str, dict[str, Any]] = {}
        order = 0

        def spill_bucket(b: int) -> None:
            rows = bucket_bufs.pop(b, [])
            if rows:
                path = spill / f"b{b:04d}" / f"{bucket_parts[b]:06d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                tb = pa.Table.from_pylist(rows)
                pq.write_table(tb, path)
                bucket_parts[b] += 1

        for si, src in enumerate(dcfg.sources):
            from rayembed.data import registry

            ratio = src.ratio
            if ratio is None:
                ratio = registry.get(src.name).ratio if src.format == "registry" else 1.0
            bad = BadRows(src.name)
            rng = random.Random(f"{cfg.seed}:ratio:{src.name}")
            read = kept = 0
            rows = iter_source(src, data_dir=data_dir, bad=bad, seed=cfg.seed)
            mined = None
            if dcfg.mine.in_build and src.mine:
                rows, mined = _mine_source(cfg, src, list(rows), stage)
            for row in rows:
                read += 1
                copies = int(math.floor(ratio)) + (1 if rng.random() < ratio - math.floor(ratio) else 0)
                if not row.get("id"):
                    row["id"] = make_id(row["source"], row["instruction"], row["query"], row["positive"], *row["negatives"])
                key = dedup_key(row)
                for c in range(copies):
                    r = dict(row)
                    if c:
                        r["id"] = make_id(row["id"], str(c))
                    r["_key"], r["_src"], r["_order"], r["_copy"] = key, si, order, c
                    order += 1
                    b = int(key[:8], 16) % nb
                    bucket_bufs[b].append(r)
                    if len(bucket_bufs[b]) >= 4096:
                        spill_bucket(b)
                    kept += 1
            bad.check(dcfg.max_bad_fraction)
            per_source[src.name] = {"format": src.format, "ratio": ratio, "read": read, "sampled": kept,
                                    "bad": bad.as_dict()}
            if mined is not None:
                per_source[src.name]["mined"] = mined
            logger.info("source %s: read %d rows, sampled %d (ratio %.3g), %d bad", src.name, read, kept, ratio, bad.bad)
        for b in list(bucket_bufs):
            spill_bucket(b)

        train_w = _ShardWriter(stage / "train", dcfg.shard_rows)
        val_w = _ShardWriter(stage / "val", dcfg.shard_rows)
        dup_dropped: Counter = Counter()
        for b in range(nb):
            folder = spill / f"b{b:04d}"
            if not folder.exists():
                continue
            rows = pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))],
                                    promote_options="default").to_pylist()
            rows.sort(key=lambda r: r["_order"])
            first_src: dict[str, int] = {}
            kept_first: set[str] = set()
            kept_rows = []
            for r in rows:
                key, src_i = r["_key"], r["_src"]
                if dcfg.dedup:
                    owner = first_src.setdefault(key, src_i)
                    # Another source had it first, or the same text repeats within a source
                    # (copies made by a ratio above 1 are not repeats).
                    if owner != src_i or (r["_copy"] == 0 and key in kept_first):
                        dup_dropped[r["source"]] += 1
                        continue
                    if r["_copy"] == 0:
                        kept_first.add(key)
                kept_rows.append(r)
            if dcfg.shuffle:
                random.Random(f"{cfg.seed}:shuffle:{b}").shuffle(kept_rows)
            for r in kept_rows:
                is_val = dcfg.val_fraction > 0 and _unit(r["_key"], f"val{cfg.seed}") < dcfg.val_fraction
                clean = {c: r[c] for c in COLUMNS}
                (val_w if is_val else train_w).add(clean)
        train_w.flush()
        val_w.flush()
        shutil.rmtree(spill)
        shutil.rmtree(stage / "_mine", ignore_errors=True)
        manifest = {
            "format": "rayembed-mix/1",
            "schema": [f.name for f in SCHEMA],
            "seed": cfg.seed,
            "train": train_w.summary(),
            "val": val_w.summary(),
            "sources": per_source,
            "duplicates_dropped": dict(dup_dropped),
            "config": to_dict(dcfg),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        atomic_write_json(stage / MANIFEST, manifest)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    logger.info("mix: %d train rows, %d val rows -> %s (%.1f s)", manifest["train"]["rows"], manifest["val"]["rows"],
                out, manifest["seconds"])
    return out / MANIFEST


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    import json

    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"No {MANIFEST} at '{p}'; build the mix with `rayembed data build` first.")
    return json.loads(p.read_text())
