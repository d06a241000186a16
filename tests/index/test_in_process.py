"""build_index_in_process with a real (tiny) Embedder, and embedder identity checks on open."""

from __future__ import annotations

import pytest

from rayembed.index import IndexIntegrityError, ShardedIndex, build_index_in_process


def test_in_process_build_finds_each_document(tiny_embedder_dir, tmp_path):
    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(tiny_embedder_dir)
    docs = [{"id": f"doc-{i}", "text": f"document number {i} about topic {i % 7}", "title": f"T{i}"} for i in range(60)]
    docs.append({"id": "empty", "text": ""})
    m = build_index_in_process(emb, docs, tmp_path / "idx", index_type="hnsw", num_shards=3, batch_size=16)
    idx = ShardedIndex.open(m, expected_embedder=emb)
    assert idx.ntotal == 60 and idx.num_shards == 3
    assert idx.manifest["corpus"]["stats"]["empty"] == 1
    assert idx.embedder_identity["weights_sha256"] == emb.identity()["weights_sha256"]
    q = emb.encode_documents([f"T{i} {docs[i]['text']}" for i in range(0, 60, 7)])
    _, ids = idx.search(q, 1)
    assert ids[:, 0].tolist() == list(range(0, 60, 7))
    assert idx.get_documents([14])[0]["doc_id"] == "doc-14"


def test_index_refuses_another_embedder(tiny_embedder_dir, tmp_path):
    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(tiny_embedder_dir)
    m = build_index_in_process(emb, [{"id": "a", "text": "hello"}], tmp_path / "idx")
    other = Embedder.from_pretrained("tiny-bert")
    with pytest.raises(IndexIntegrityError, match="was built with embedder .* not with the expected"):
        ShardedIndex.open(m, expected_embedder=other)


def test_search_command_prints_ranked_hits(tiny_embedder_dir, tmp_path, capsys):
    import json

    from rayembed.cli import main

    docs = [{"id": f"doc-{i}", "text": f"document number {i}", "title": ""} for i in range(20)]
    m = build_index_in_process(str(tiny_embedder_dir), docs, tmp_path / "idx", num_shards=2)
    assert main(["search", "--index", str(m.parent), "--query", "document number 7", "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["query"] == "document number 7" and len(out["hits"]) == 3
    assert out["hits"][0]["doc_id"] == "doc-7" and out["hits"][0]["rank"] == 1
    assert main(["search", "--index", str(m.parent), "--query", "document number 7", "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "doc-7" in table and "query: document number 7" in table
    # Another embedder is refused with a clear error (exit 1), not wrong results.
    assert main(["search", "--index", str(m.parent), "--query", "x", "--embedder", "tiny-bert"]) == 1
    assert "not the one index" in capsys.readouterr().err
