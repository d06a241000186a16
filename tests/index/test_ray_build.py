"""The Ray Data path: actor-pool encoding gives the in-process vectors, resumes, reads real corpora."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rayembed.config import load_config
from rayembed.index import ShardedIndex, build_index, build_index_in_process


def _corpus(path, n=100):
    rows = [{"_id": f"d{i}", "title": f"title {i % 9}", "text": f"passage {i} about subject {i * 7 % 13}"} for i in range(n)]
    rows.insert(17, {"_id": "blank", "title": "", "text": " "})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _cfg(tmp_path, embedder, corpus, out, *extra):
    return load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"index.embedder={embedder}", f"index.corpus={corpus}",
        f"index.output_dir={out}", "index.shard_size=40", "index.encode.min_actors=1",
        "index.encode.max_actors=2", "index.encode.num_cpus_per_actor=0.5", "index.encode.batch_size=16",
        "index.encode.rows_per_block=20", "compute.log_to_driver=false", *extra,
    ])


def test_ray_build_matches_in_process_and_resumes(ray_local, tiny_embedder_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    _corpus(corpus)
    out = tmp_path / "ray_idx"
    cfg = _cfg(tmp_path, tiny_embedder_dir, corpus, out)
    manifest = build_index(cfg)
    idx = ShardedIndex.open(manifest)
    assert idx.ntotal == 100 and idx.num_shards == 3
    assert idx.manifest["corpus"]["stats"] == {"read": 101, "empty": 1}
    assert idx.manifest["embedder_name"] == str(tiny_embedder_dir)
    assert (out / "config.resolved.yaml").is_file()

    ref = ShardedIndex.open(build_index_in_process(str(tiny_embedder_dir), str(corpus), tmp_path / "ref", shard_size=40))
    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(tiny_embedder_dir)
    assert ShardedIndex.open(manifest, expected_embedder=emb).version == idx.version
    q = emb.encode(["passage 5 about subject 9", "title 3 passage 30 about subject 2"])
    s_ray, i_ray = idx.search(q, 5)
    s_ref, i_ref = ref.search(q, 5)
    np.testing.assert_allclose(s_ray, s_ref, atol=1e-4)
    assert i_ray[:, 0].tolist() == i_ref[:, 0].tolist()
    assert idx.get_documents(i_ray[:, 0]) == ref.get_documents(i_ref[:, 0])

    # Delete one shard: the rerun re-encodes only it and leaves the others untouched.
    mtimes = {p.name: os.stat(p).st_mtime_ns for p in (out / "shards").glob("*.faiss")}
    (out / "shards/shard-00001.faiss").unlink()
    build_index(cfg)
    after = {p.name: os.stat(p).st_mtime_ns for p in (out / "shards").glob("*.faiss")}
    assert after["shard-00000.faiss"] == mtimes["shard-00000.faiss"]
    assert after["shard-00002.faiss"] == mtimes["shard-00002.faiss"]
    assert after["shard-00001.faiss"] != mtimes["shard-00001.faiss"]
    assert ShardedIndex.open(out).ntotal == 100


def test_ray_build_trains_ivf_once(ray_local, tiny_embedder_dir, tmp_path):
    corpus = tmp_path / "corpus.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _corpus(tmp_path / "c.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), corpus)
    out = tmp_path / "ivf"
    cfg = _cfg(tmp_path, tiny_embedder_dir, corpus, out, "index.index_type=ivf_flat", "index.nlist=4",
               "index.storage=fp16")
    idx = ShardedIndex.open(build_index(cfg))
    assert idx.manifest["factory"] == "IVF4,SQfp16" and (out / "trained.index").is_file()
    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(tiny_embedder_dir)
    docs = idx.get_documents(range(0, 100, 11))
    q = emb.encode([f"{d['title']} {d['text']}" for d in docs])
    _, ids = idx.search(q, 1, nprobe=4)
    assert ids[:, 0].tolist() == list(range(0, 100, 11))


def test_ray_build_binary_with_dims_and_float_vectors(ray_local, tiny_embedder_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    _corpus(corpus)
    out = tmp_path / "bin"
    opts = {"storage": "binary", "dims": 16, "rescore_k": 20}
    cfg = _cfg(tmp_path, tiny_embedder_dir, corpus, out, *(f"index.{k}={v}" for k, v in opts.items()))
    idx = ShardedIndex.open(build_index(cfg))
    m = idx.manifest
    assert m["factory"] == "BFlat" and m["dim"] == idx.index_dim == 16 and len(m["center"]) == 16
    assert [s["vectors"]["file"] for s in m["shards"]] == [f"shards/shard-0000{i}.npy" for i in range(3)]
    ref = ShardedIndex.open(build_index_in_process(str(tiny_embedder_dir), str(corpus), tmp_path / "ref",
                                                   shard_size=40, **opts))
    np.testing.assert_allclose(m["center"], ref.manifest["center"], atol=1e-6)  # the whole corpus is the sample
    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(tiny_embedder_dir)
    assert idx.dim == ref.dim == emb.dim  # queries of the embedder's dimension, cut by the index
    q = emb.encode(["passage 5 about subject 9", "title 3 passage 30 about subject 2"])
    s_ray, i_ray = idx.search(q, 5)
    s_ref, i_ref = ref.search(q, 5)
    np.testing.assert_allclose(s_ray, s_ref, atol=1e-4)
    assert i_ray[:, 0].tolist() == i_ref[:, 0].tolist()


def test_missing_corpus_and_bad_columns(tmp_path):
    from rayembed.config import ConfigError
    from rayembed.index.builder import build_with_encoder

    cfg = load_config(None, [f"index.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="index.corpus is empty"):
        build_index(cfg)
    cfg = load_config(None, [f"index.output_dir={tmp_path}", "index.corpus=/nonexistent/c.jsonl"])
    with pytest.raises(FileNotFoundError, match="Corpus '/nonexistent/c.jsonl' not found"):
        build_index(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "1", "body": "x"}\n')
    with pytest.raises(ValueError, match="has no 'text' column.*index.text_field"):
        build_with_encoder(lambda ids, t: np.zeros((len(t), 2), np.float32), {"path": "x"}, 2, str(bad), tmp_path / "i")
    with pytest.raises(ConfigError, match="storage=sq8 does not apply to ivf_pq"):
        load_config(None, ["index.index_type=ivf_pq", "index.storage=sq8"])


def test_cranfield_smart_corpus_is_read(data_dir, tmp_path):
    from rayembed.index.builder import build_with_encoder

    seen = []

    def encode(ids, texts):
        seen.extend(texts)
        return np.ones((len(texts), 4), np.float32) / 2

    m = build_with_encoder(encode, {"path": "x"}, 4, str(data_dir / "cranfield"), tmp_path / "cran", shard_size=500)
    idx = ShardedIndex.open(m)
    assert idx.manifest["corpus"]["format"] == "smart"
    assert idx.ntotal == 1398 and idx.manifest["corpus"]["stats"]["empty"] == 2  # docs 471 and 995
    first = idx.get_documents([0])[0]
    assert first["doc_id"] == "1" and first["title"].startswith("experimental investigation of the aerodynamics")
    assert seen[0].startswith("experimental investigation")
