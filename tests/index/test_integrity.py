"""Resumable builds, checksums, path escapes and embedder identity: every failure names its file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rayembed.index import IndexIntegrityError, ShardedIndex, UnsafePathError, build_index_from_vectors


@pytest.fixture
def four_shards(vectors, tmp_path):
    x, _ = vectors
    return build_index_from_vectors(x[:400], tmp_path / "idx", index_type="flat", num_shards=4)


class Crash(Exception):
    pass


def test_killed_build_resumes_only_missing_shards(vectors, tmp_path):
    x, q = vectors
    x = x[:400]
    out = tmp_path / "idx"
    written: list[str] = []

    def die_after_two(side):
        written.append(side["file"])
        if len(written) == 2:
            raise Crash("killed")

    with pytest.raises(Crash):
        build_index_from_vectors(x, out, index_type="ivf_flat", nlist=8, num_shards=4, on_shard=die_after_two)
    assert not (out / "manifest.json").exists()
    before = {f: os.stat(out / f).st_mtime_ns for f in written}
    trained_before = os.stat(out / "trained.index").st_mtime_ns

    rebuilt: list[str] = []
    m = build_index_from_vectors(x, out, index_type="ivf_flat", nlist=8, num_shards=4, on_shard=lambda s: rebuilt.append(s["file"]))
    assert rebuilt == ["shards/shard-00002.faiss", "shards/shard-00003.faiss"]
    assert {f: os.stat(out / f).st_mtime_ns for f in written} == before
    assert os.stat(out / "trained.index").st_mtime_ns == trained_before  # not retrained

    # A deleted shard is the only one rebuilt; a complete build is a no-op.
    (out / "shards/shard-00001.faiss").unlink()
    rebuilt.clear()
    build_index_from_vectors(x, out, index_type="ivf_flat", nlist=8, num_shards=4, on_shard=lambda s: rebuilt.append(s["file"]))
    assert rebuilt == ["shards/shard-00001.faiss"]
    rebuilt.clear()
    build_index_from_vectors(x, out, index_type="ivf_flat", nlist=8, num_shards=4, on_shard=lambda s: rebuilt.append(s["file"]))
    assert rebuilt == []
    idx = ShardedIndex.open(m)
    assert idx.ntotal == 400
    _, ids = idx.search(x[[7, 399]], 1, nprobe=8)
    assert ids[:, 0].tolist() == [7, 399]


def test_different_build_in_same_dir_is_refused(vectors, tmp_path, four_shards):
    x, _ = vectors
    with pytest.raises(IndexIntegrityError, match="different spec.*index.overwrite=true"):
        build_index_from_vectors(x[:400], tmp_path / "idx", index_type="hnsw", num_shards=4)
    build_index_from_vectors(x[:400], tmp_path / "idx", index_type="hnsw", num_shards=4, overwrite=True)
    assert ShardedIndex.open(tmp_path / "idx").manifest["index_type"] == "hnsw"


def test_flipped_byte_is_detected(four_shards):
    shard = four_shards.parent / "shards/shard-00002.faiss"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=r"shard-00002\.faiss fails its sha256 check"):
        ShardedIndex.open(four_shards)


def test_truncated_and_missing_shards(four_shards):
    root = four_shards.parent
    shard = root / "shards/shard-00001.faiss"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(IndexIntegrityError, match=r"shard-00001\.faiss has 100 bytes .*truncated"):
        ShardedIndex.open(four_shards)
    # Without hash verification a truncated file still fails cleanly when faiss reads it.
    m = json.loads(four_shards.read_text())
    m["shards"][1]["bytes"] = 100
    four_shards.write_text(json.dumps(m))
    with pytest.raises(IndexIntegrityError, match=r"shard-00001\.faiss cannot be read by faiss"):
        ShardedIndex.open(four_shards, verify=False)
    shard.unlink()
    with pytest.raises(IndexIntegrityError, match=r"shard-00001\.faiss is missing"):
        ShardedIndex.open(four_shards)


def test_damaged_id_map_is_detected(four_shards):
    part = four_shards.parent / "docs/docs-00003.parquet"
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=r"docs-00003\.parquet fails its sha256"):
        ShardedIndex.open(four_shards)


def test_manifest_that_does_not_match(four_shards):
    m = json.loads(four_shards.read_text())
    m["shards"][2]["rows"] += 1
    m["shards"][2]["id_end"] += 1
    four_shards.write_text(json.dumps(m))
    with pytest.raises(IndexIntegrityError, match="does not continue from id|ntotal"):
        ShardedIndex.open(four_shards)
    m["shards"][2]["rows"] -= 1
    m["shards"][2]["id_end"] -= 1
    m["dim"] = 64
    four_shards.write_text(json.dumps(m))
    with pytest.raises(IndexIntegrityError, match=r"shard-00000\.faiss holds 100 vectors of dim 32.*dim 64"):
        ShardedIndex.open(four_shards)
    four_shards.write_text("{not json")
    with pytest.raises(IndexIntegrityError, match="manifest.json is not valid JSON"):
        ShardedIndex.open(four_shards)


@pytest.mark.parametrize(
    "bad,match",
    [
        ("../../etc/passwd", "contains '..'"),
        ("/etc/passwd", "is absolute"),
        ("shards/link.faiss", "outside the index directory"),
    ],
)
def test_manifest_path_escape_is_refused(four_shards, tmp_path, bad, match):
    outside = tmp_path / "outside.faiss"
    outside.write_bytes((four_shards.parent / "shards/shard-00000.faiss").read_bytes())
    (four_shards.parent / "shards/link.faiss").symlink_to(outside)
    m = json.loads(four_shards.read_text())
    m["shards"][0]["file"] = bad
    four_shards.write_text(json.dumps(m))
    with pytest.raises(UnsafePathError, match=match):
        ShardedIndex.open(four_shards)


def test_other_embedder_is_refused(vectors, tmp_path):
    x, _ = vectors
    ident = {"path": "/models/a", "config_sha256": "c" * 64, "weights_sha256": "a" * 64}
    m = build_index_from_vectors(x[:50], tmp_path / "idx", identity=ident)
    assert ShardedIndex.open(m, expected_embedder=dict(ident, path="/elsewhere/a")).ntotal == 50
    with pytest.raises(IndexIntegrityError, match=r"manifest.json was built with embedder /models/a.*not comparable"):
        ShardedIndex.open(m, expected_embedder=dict(ident, weights_sha256="b" * 64))


def test_empty_documents_are_counted_and_skipped(tmp_path):
    from rayembed.index.builder import build_with_encoder

    docs = [{"id": "a", "text": "alpha"}, {"id": "b", "text": "   "}, {"id": "c", "text": "gamma", "title": ""},
            {"id": "d", "text": ""}]

    def encode(ids, texts):
        return np.stack([np.eye(4, dtype=np.float32)[len(t) % 4] for t in texts])

    m = build_with_encoder(encode, {"path": "x"}, 4, docs, tmp_path / "idx")
    idx = ShardedIndex.open(m)
    assert idx.ntotal == 2 and idx.manifest["corpus"]["stats"] == {"read": 4, "empty": 2}
    assert [d["doc_id"] for d in idx.get_documents([0, 1])] == ["a", "c"]
    with pytest.raises(ValueError, match="no non-empty documents"):
        build_with_encoder(encode, {"path": "x"}, 4, docs[1:2], tmp_path / "none")


def test_a_truncated_shard_write_is_never_recorded(vectors, tmp_path, monkeypatch):
    """A full disk: FAISS only prints its fclose error and leaves a short file. The build checks
    the size and re-reads the file before naming it, so the shard is neither kept nor recorded,
    and the next build writes it again."""
    import faiss

    x, _ = vectors
    x = x[:400]
    out = tmp_path / "idx"
    real_write = faiss.write_index

    def disk_full_on_shard_1(index, where):
        real_write(index, where)
        if isinstance(where, str) and "shard-00001" in os.path.basename(where):
            os.truncate(where, os.path.getsize(where) // 2)  # what ENOSPC at fclose leaves behind

    monkeypatch.setattr(faiss, "write_index", disk_full_on_shard_1)
    with pytest.raises(IndexIntegrityError, match=r"shard-00001.*truncated \(is the disk full\?\)"):
        build_index_from_vectors(x, out, index_type="flat", num_shards=4)
    monkeypatch.undo()
    assert not [p.name for p in (out / "shards").iterdir() if "shard-00001" in p.name]
    rebuilt: list[str] = []
    m = build_index_from_vectors(x, out, index_type="flat", num_shards=4, on_shard=lambda s: rebuilt.append(s["file"]))
    assert "shards/shard-00001.faiss" in rebuilt
    _, ids = ShardedIndex.open(m).search(x[[150, 399]], 1)
    assert ids[:, 0].tolist() == [150, 399]
