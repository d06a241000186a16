"""Fixtures for the training tests: real MS MARCO passages turned into small training shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_crop_pairs(data_dir: Path, out: Path, n_rows: int, n_files: int = 2) -> list[dict]:
    """Unified-schema rows from real passages: the first sentence is the query, the rest the
    positive, and a different passage the hard negative (weak supervision, Contriever-style)."""
    from rayembed.data.schema import make_row, to_table
    from rayembed.io import atomic_write_parquet

    passages = []
    with open(data_dir / "msmarco-subset" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            head, _, rest = text.partition(". ")
            if len(head.split()) >= 4 and len(rest.split()) >= 8:
                passages.append((head, rest))
            if len(passages) >= n_rows + 1:
                break
    rows = [
        make_row(
            instruction="Given the opening sentence of a passage, retrieve its continuation",
            query=head,
            positive=rest,
            negatives=[passages[(i + 7) % len(passages)][1]],
            task_type="retrieval",
            source="msmarco-crops" if i % 2 else "msmarco-crops-b",
        )
        for i, (head, rest) in enumerate(passages[:n_rows])
    ]
    out.mkdir(parents=True, exist_ok=True)
    per = (len(rows) + n_files - 1) // n_files
    for k in range(n_files):
        atomic_write_parquet(out / f"part-{k:05d}.parquet", to_table(rows[k * per : (k + 1) * per]))
    return rows


@pytest.fixture(scope="session")
def train_shards(data_dir, tmp_path_factory) -> Path:
    """256 training rows in two Parquet files."""
    out = tmp_path_factory.mktemp("train-data") / "shards"
    write_crop_pairs(data_dir, out, 256)
    return out


@pytest.fixture(scope="session")
def ray_train_local():
    """A fresh local Ray for Train fits: logical CPUs above the cores so 2 workers + Ray Data fit.

    The session's Ray is shut down first: actor pools, replicas and placement groups that earlier
    tests leave behind would otherwise hold the CPUs a fit asks for, and it would wait forever.
    The training tests run last, so nothing needs the session's Ray afterwards.
    """
    import shutil
    import tempfile

    import ray

    from rayembed.config import ComputeConfig
    from rayembed.runtime import init_ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="rtr", dir="/tmp")
    init_ray(ComputeConfig(num_cpus=4, object_store_memory_mb=256, temp_dir=tmp, log_to_driver=False))
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_leftover_serve_apps():
    """Ray Train fits need the session Ray's CPUs: drop Serve apps earlier tests may have left."""
    import ray

    if ray.is_initialized():
        from ray import serve

        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 - nothing to shut down
            pass
    yield
