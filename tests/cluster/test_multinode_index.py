"""The index build on a real multi-node Ray whose nodes share nothing but an S3 server.

The corpus, the embedder and the index all live in the bucket; the driver (this process) only
plans and writes the manifest. One module-scoped cluster and S3 server serve every test here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from rayembed.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _put_corpus(prefix: str, n_docs: int, n_files: int) -> list[dict]:
    """``n_docs`` short documents as JSONL files under ``prefix`` in the bucket."""
    from rayembed.cluster.storage import resolve_storage

    st = resolve_storage(prefix)
    words = ["wing", "lift", "bread", "oven", "chess", "rook", "river", "delta", "engine", "valve"]
    docs = [{"_id": f"d{i}", "title": "", "text": f"{words[i % 10]} {words[(i * 7) % 10]} note {i} on {words[(i * 3) % 10]}"}
            for i in range(n_docs)]
    per = (n_docs + n_files - 1) // n_files
    for k in range(n_files):
        part = docs[k * per : (k + 1) * per]
        st.write_bytes(f"part-{k:03d}.jsonl", "".join(json.dumps(d) + "\n" for d in part).encode())
    return docs


@pytest.fixture(scope="module")
def bucket_embedder(multinode, tiny_embedder_dir) -> str:
    """The tiny embedder published to the bucket: nodes load it from there, not from this disk."""
    from rayembed.cluster.storage import publish_folder

    uri = f"s3://{multinode.bucket}/models/tiny-llama"
    publish_folder(tiny_embedder_dir, uri)
    return uri


def _cfg(tmp_path, corpus: str, out: str, embedder: str, *extra: str):
    return load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"index.embedder={embedder}", f"index.corpus={corpus}",
        f"index.output_dir={out}", "index.encode.num_cpus_per_actor=0.5", "index.encode.batch_size=64",
        "index.encode.resources_per_actor={worker: 1}", "compute.log_to_driver=false", *extra,
    ])


def test_node_lost_during_the_build_and_a_fresh_process_searches_the_bucket(multinode, bucket_embedder, tmp_path):
    """A worker node that runs encoder actors dies halfway; the build still finishes, every id once."""
    import ray

    from rayembed.cluster.storage import resolve_storage
    from rayembed.index import ShardedIndex, build_index

    run = f"s3://{multinode.bucket}/{uuid.uuid4().hex[:8]}"
    docs = _put_corpus(f"{run}/corpus", 1200, 3)
    out = f"{run}/index"
    cfg = _cfg(tmp_path, f"{run}/corpus", out, bucket_embedder, "index.shard_size=50",
               "index.encode.min_actors=1", "index.encode.max_actors=2")
    st = resolve_storage(out)
    killed: dict = {}

    def kill_when_half_done():
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                done = [n for n in st.listdir("shards") if n.endswith(".json")]
                sides = [st.read_json(f"shards/{n}") for n in done] if len(done) >= 6 else []
            except OSError as e:  # the build may be writing; look again
                killed.setdefault("poll_errors", []).append(str(e)[:200])
                continue
            if sides:
                for side in sides:
                    node = multinode.node_of(side["node"])
                    if node is not None:
                        killed["node"] = side["node"]
                        killed["at_shards"] = len(done)
                        multinode.kill(node)
                        return

    killer = threading.Thread(target=kill_when_half_done, daemon=True)
    killer.start()
    manifest_uri = build_index(cfg)
    killer.join(timeout=5)
    multinode.add_worker()  # the replacement a cluster's autoscaler would bring, for the next tests
    assert "node" in killed, f"no worker node was killed during the build: {killed}"
    assert killed["at_shards"] < 24
    assert manifest_uri == f"{out}/manifest.json"

    idx = ShardedIndex.open(out)  # downloads into the local cache, every file checked against its sha256
    m = idx.manifest
    assert idx.ntotal == 1200 and m["num_shards"] == 24
    assert [(s["id_start"], s["id_end"]) for s in m["shards"]] == [(50 * i, 50 * i + 50) for i in range(24)]
    got = []
    for s in range(0, 1200, 100):
        got.extend(d["doc_id"] for d in idx.get_documents(range(s, s + 100)))
    assert got == [d["_id"] for d in docs]  # every id exactly once, in corpus order
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert killed["node"] not in alive
    # Nothing of the index lives on this machine's disk but the verified download cache.
    assert str(idx.root).startswith(os.environ["RAYEMBED_CACHE"])

    # A fresh process (no Ray, nothing shared but the bucket) searches it with the CLI.
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    res = subprocess.run(
        [str(Path(sys.executable).parent / "rayembed"), "search", "--index", out, "--json", "-k", "3",
         "--query", docs[7]["text"]],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    answers = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert answers and answers[0]["hits"][0]["doc_id"] == "d7"

    # And a fresh process serves /search from the bucket (its own local Ray, replicas download it).
    _serve_from_bucket(out, docs, tmp_path, env)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_from_bucket(index_uri: str, docs: list[dict], tmp_path: Path, env: dict) -> None:
    import shutil
    import tempfile

    import httpx

    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rsv", dir="/tmp")  # AF_UNIX paths must stay short
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "rayembed"), "serve", "--index-dir", index_uri, "--port", str(port),
         "compute.num_cpus=2", "compute.object_store_memory_mb=128", f"compute.temp_dir={ray_tmp}",
         "compute.log_to_driver=false", "serve.encoder.num_cpus=0.25", "serve.retriever.num_cpus=0.25"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
    )
    try:
        deadline = time.time() + 240
        body = None
        while time.time() < deadline and proc.poll() is None:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/search", json={"query": docs[11]["text"], "k": 3}, timeout=10)
                if r.status_code == 200:
                    body = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert body is not None, (tmp_path / "serve.log").read_text()[-3000:]
        assert body["results"][0]["ids"][0] == "d11"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_driver_traffic_does_not_grow_with_the_corpus(multinode, bucket_embedder, tmp_path):
    """2k and 20k documents in 4 shards: the driver receives the same records, and no vector."""
    from rayembed.index import ShardedIndex, build_index

    received = {}
    for n in (2_000, 20_000):
        run = f"s3://{multinode.bucket}/{uuid.uuid4().hex[:8]}"
        _put_corpus(f"{run}/corpus", n, 2)
        cfg = _cfg(tmp_path, f"{run}/corpus", f"{run}/index", bucket_embedder, "index.num_shards=4",
                   "index.encode.min_actors=2", "index.encode.max_actors=2", "index.encode.batch_size=256",
                   "index.encode.max_length=16")
        m = ShardedIndex.open(build_index(cfg)).manifest
        assert m["ntotal"] == n and m["num_shards"] == 4
        received[n] = m["build"]["driver_received"]
        assert sum(m["build"]["docs_per_node"].values()) == n
    small, big = received[2_000], received[20_000]
    assert small["records"] == big["records"] <= 4 + 2 + 1  # 4 sidecars, 2 file counts, the probe
    # Sidecars, counts and the probe: a few kB whatever the size; one vector alone would be 256 bytes.
    assert big["bytes"] < 1.1 * small["bytes"] + 64 and big["bytes"] < 12_000


def test_bad_locations_fail_before_any_work(multinode, bucket_embedder, tmp_path, monkeypatch):
    from rayembed.index import build_index

    corpus = f"s3://{multinode.bucket}/bad/corpus"
    _put_corpus(corpus, 10, 1)
    cases = [
        ("ftp://host/x", r"index.output_dir.*scheme 'ftp'.*s3://"),
        (f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/x", r"bucket 'no-such-bucket-\w+' does not exist"),
    ]
    for out, match in cases:
        with pytest.raises(ValueError, match=match):
            build_index(_cfg(tmp_path, corpus, out, bucket_embedder))
    with pytest.raises(FileNotFoundError, match=r"index.corpus=s3://.*/missing does not exist"):
        build_index(_cfg(tmp_path, f"s3://{multinode.bucket}/missing", f"s3://{multinode.bucket}/o", bucket_embedder))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"no AWS credentials.*AWS_ACCESS_KEY_ID"):
        build_index(_cfg(tmp_path, corpus, f"s3://{multinode.bucket}/o2", bucket_embedder))
    from rayembed.cluster.storage import resolve_storage

    monkeypatch.undo()
    st = resolve_storage(f"s3://{multinode.bucket}")
    assert not st.exists("o") and not st.exists("o2")  # nothing was written


def test_vectors_match_the_in_process_build(multinode, bucket_embedder, tiny_embedder_dir, tmp_path):
    """Same documents, same model: the cluster's shards hold the in-process build's vectors."""
    from rayembed.index import ShardedIndex, build_index, build_index_in_process
    from rayembed.modeling.embedder import Embedder

    run = f"s3://{multinode.bucket}/{uuid.uuid4().hex[:8]}"
    docs = _put_corpus(f"{run}/corpus", 90, 2)
    idx = ShardedIndex.open(build_index(_cfg(tmp_path, f"{run}/corpus", f"{run}/index", bucket_embedder,
                                             "index.shard_size=40", "index.encode.min_actors=1",
                                             "index.encode.max_actors=2")))
    ref = ShardedIndex.open(build_index_in_process(str(tiny_embedder_dir), docs, tmp_path / "ref", shard_size=45))
    emb = Embedder.from_pretrained(bucket_embedder)
    assert emb.identity()["path"] == bucket_embedder
    q = emb.encode([docs[3]["text"], docs[61]["text"]])
    s1, i1 = idx.search(q, 5)
    s2, i2 = ref.search(q, 5)
    np.testing.assert_allclose(s1, s2, atol=1e-4)
    assert [d["doc_id"] for d in idx.get_documents(i1[:, 0])] == ["d3", "d61"]


def test_mining_on_the_cluster_matches_mining_in_process(multinode, bucket_embedder, tiny_embedder_dir, tmp_path):
    """data.mine.engine=ray: the mining corpus is indexed by the workers in the bucket, each shard
    searched by its own task; the negatives are the ones in-process mining picks."""
    from rayembed.cluster.storage import resolve_storage
    from rayembed.data.mine import mine_negatives
    from rayembed.data.schema import make_row

    words = ["wing", "lift", "bread", "oven", "chess", "rook", "river", "delta", "engine", "valve"]
    rows = [make_row(instruction="Find the note", query=f"{words[i % 10]} {words[(i * 3) % 10]} question {i}",
                     positive=f"{words[i % 10]} {words[(i * 7) % 10]} note {i} on {words[(i * 3) % 10]}",
                     task_type="retrieval", source="s") for i in range(90)]
    extra = [f"{words[i % 10]} extra passage {i}" for i in range(60)]
    work = f"s3://{multinode.bucket}/{uuid.uuid4().hex[:8]}/mine-work"
    cfg = _cfg(tmp_path, "unused", "unused", bucket_embedder, "data.mine.engine=ray", "data.mine.shard_size=40",
               "index.encode.max_actors=1")
    kw = dict(retriever=bucket_embedder, top_k=8, num_negatives=2, seed=3, extra_docs=extra, max_length=64)
    on_cluster = mine_negatives(rows, cfg=cfg, work_dir=work, **kw)
    manifest = resolve_storage(f"{work}/index").read_json("manifest.json")
    assert len(manifest["shards"]) == 4 and manifest["ntotal"] == 150  # 90 positives + 60 extra, 40 a shard
    in_process = mine_negatives(rows, **{**kw, "retriever": str(tiny_embedder_dir)})
    same = sum(a["negatives"] == b["negatives"] for a, b in zip(on_cluster, in_process))
    assert same >= 0.9 * len(rows), f"{same} of {len(rows)} rows got the same negatives"
    for r in on_cluster:
        assert len(r["negatives"]) == 2 and r["positive"] not in r["negatives"]
