"""Fixtures for the data tests: small schema shards written to a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest


def write_schema_shards(folder: Path, n_rows: int, n_files: int = 3, sources=("a", "b"), negatives: bool = True) -> list[dict]:
    """Write ``n_rows`` unified-schema rows over ``n_files`` Parquet files; return the rows."""
    from rayembed.data.schema import make_row, to_table
    from rayembed.io import atomic_write_parquet

    rows = []
    for i in range(n_rows):
        src = sources[i % len(sources)]
        negs = [f"negative text {i} {k}" for k in range(2)] if negatives and i % 3 else []
        rows.append(
            make_row(
                instruction=f"Retrieve things for {src}",
                query=f"query number {i}",
                positive=f"positive passage {i} about {src}",
                negatives=negs,
                task_type="retrieval",
                source=src,
                symmetric=(i % 5 == 0),
            )
        )
    folder.mkdir(parents=True, exist_ok=True)
    per = (n_rows + n_files - 1) // n_files
    for f in range(n_files):
        chunk = rows[f * per : (f + 1) * per]
        if chunk:
            atomic_write_parquet(folder / f"part-{f:05d}.parquet", to_table(chunk))
    return rows


@pytest.fixture
def schema_shards(tmp_path):
    return lambda n, **kw: (tmp_path / "shards", write_schema_shards(tmp_path / "shards", n, **kw))
