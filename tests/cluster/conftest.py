"""Fixtures for the cluster tests: a real `ray start --head` cluster on 127.0.0.1, tiny inputs."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def token_cluster(s3_store, tmp_path_factory):
    """A one-node Ray cluster with token auth on (token in its own file, never ~/.ray). Its node
    has the S3 server's endpoint and credentials in its environment, as a cluster's nodes would."""
    from rayembed.cluster.local import LocalCluster

    token_file = tmp_path_factory.mktemp("auth") / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    cluster = LocalCluster(num_cpus=4, object_store_mb=256, auth_mode="token", token_path=token_file)
    cluster.start()
    yield cluster
    cluster.stop()
    assert cluster.processes() == []


@pytest.fixture
def train_rows(data_dir, tmp_path) -> Path:
    """32 training rows in one Parquet file."""
    return write_train_rows(data_dir, tmp_path / "mix", 32)


@pytest.fixture
def rows_writer(data_dir):
    """``write(out, n_rows, n_files)``: training rows from real passages, in ``n_files`` Parquet files."""
    return lambda out, n_rows, n_files=1: write_train_rows(data_dir, out, n_rows, n_files)


@pytest.fixture
def tiny_corpus(data_dir, tmp_path) -> Path:
    """120 real passages as a JSONL corpus."""
    return _write_corpus(data_dir, tmp_path / "corpus" / "corpus.jsonl", 120)


def write_train_rows(data_dir: Path, out: Path, n_rows: int, n_files: int = 1) -> Path:
    """Unified-schema rows from real MS MARCO passages: first sentence -> rest, another passage as
    negative; in ``n_files`` Parquet files."""
    from rayembed.data.schema import make_row, to_table
    from rayembed.io import atomic_write_parquet

    pairs = []
    with open(data_dir / "msmarco-subset" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            head, _, rest = json.loads(line)["text"].partition(". ")
            if len(head.split()) >= 4 and len(rest.split()) >= 8:
                pairs.append((head, rest))
            if len(pairs) > n_rows:
                break
    rows = [
        make_row(instruction="Given the opening sentence of a passage, retrieve its continuation",
                 query=h, positive=r, negatives=[pairs[(i + 3) % len(pairs)][1]], task_type="retrieval",
                 source="msmarco-crops")
        for i, (h, r) in enumerate(pairs[:n_rows])
    ]
    out.mkdir(parents=True, exist_ok=True)
    per = (len(rows) + n_files - 1) // n_files
    for k in range(n_files):
        atomic_write_parquet(out / f"part-{k:05d}.parquet", to_table(rows[k * per:(k + 1) * per]))
    return out


def _write_corpus(data_dir: Path, out: Path, n_docs: int) -> Path:
    """The first ``n_docs`` real MS MARCO passages as a JSONL corpus (_id, title, text)."""
    lines = (data_dir / "msmarco-subset" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:n_docs]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
