"""The endpoint over real HTTP on 127.0.0.1: answers, OpenAI compatibility, errors, batching,
auth, a live index swap and a killed replica. One Serve app serves the whole module; the tests
that change it (swap, kill) run last."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

QUERIES = ["rivers and item 3", "how do compilers work", "bread passage 12"]


@pytest.fixture(scope="module")
def local_embedder(served_embedder_dir):
    """The served embedder, in this process (the index update below checks it is the same one)."""
    from rayembed.modeling.embedder import Embedder

    return Embedder.from_pretrained(str(served_embedder_dir))


def test_search_equals_library(http, tiny_indexes, local_embedder):
    from rayembed.index import ShardedIndex

    r = http.post("/search", json={"query": QUERIES, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    idx = ShardedIndex.open(tiny_indexes["v1"])
    assert body["index_version"] == idx.version
    scores, ids = idx.search(local_embedder.encode(QUERIES), 5)
    for qi, res in enumerate(body["results"]):
        docs = idx.get_documents(ids[qi])
        assert res["query"] == QUERIES[qi]
        assert res["ids"] == [d["doc_id"] for d in docs]
        assert res["texts"] == [d["text"] for d in docs]
        np.testing.assert_allclose(res["scores"], scores[qi], rtol=0, atol=1e-4)
    one = http.post("/search", json={"query": QUERIES[1], "k": 3}).json()
    assert one["results"][0]["ids"] == body["results"][1]["ids"][:3]


def test_instruction_override_changes_the_query(http, local_embedder, tiny_indexes):
    from rayembed.index import ShardedIndex

    instr = "Given a topic, retrieve passages about it"
    res = http.post("/search", json={"query": QUERIES[0], "k": 4, "instruction": instr}).json()["results"][0]
    idx = ShardedIndex.open(tiny_indexes["v1"])
    _, ids = idx.search(local_embedder.encode([QUERIES[0]], instruction=instr), 4)
    assert res["ids"] == [d["doc_id"] for d in idx.get_documents(ids[0])]


def test_openai_client_embeddings(endpoint, local_embedder):
    import openai

    client = openai.OpenAI(base_url=endpoint["url"] + "/v1", api_key=endpoint["key"], max_retries=0)
    texts = ["a passage about glaciers", "violins", "orbits of moons and item 4"]
    got = client.embeddings.create(model=endpoint["model"], input=texts)  # base64 by default
    vecs = np.array([d.embedding for d in got.data], dtype=np.float32)
    np.testing.assert_allclose(vecs, local_embedder.encode(texts), atol=1e-5)
    assert [d.index for d in got.data] == [0, 1, 2]
    assert got.model == endpoint["model"] and got.usage.prompt_tokens > 0
    single = client.embeddings.create(model=endpoint["model"], input=texts[1], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, vecs[1], atol=1e-5)
    assert [m.id for m in client.models.list().data] == [endpoint["model"]]
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_dimensions_are_the_truncated_renormalised_vectors(http, endpoint, local_embedder):
    """The served folder records Matryoshka sizes 16 and 32 (conftest): those, and the full 64, are
    served; another size is a 400 unless force_dimensions is set; out-of-range sizes never pass."""
    import base64

    import openai

    texts = ["a passage about glaciers", "violins", "orbits of moons and item 4"]
    full = local_embedder.encode(texts)  # (3, 64)
    model = endpoint["model"]

    def cut(k: int) -> np.ndarray:
        return full[:, :k] / np.linalg.norm(full[:, :k], axis=1, keepdims=True)

    assert http.get("/v1/models").json()["data"][0]["matryoshka_dims"] == [16, 32]
    for k in (16, 32):
        r = http.post("/v1/embeddings", json={"model": model, "input": texts, "dimensions": k})
        assert r.status_code == 200, r.text
        vecs = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        assert vecs.shape == (3, k)
        np.testing.assert_allclose(vecs, cut(k), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    same = http.post("/v1/embeddings", json={"model": model, "input": texts, "dimensions": 64}).json()
    np.testing.assert_allclose([d["embedding"] for d in same["data"]], full, atol=1e-5)

    r = http.post("/v1/embeddings", json={"model": model, "input": texts, "dimensions": 24})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "dimensions" and err["code"] == "unsupported"
    assert "[16, 32, 64]" in err["message"] and "force_dimensions=true" in err["message"]
    forced = http.post("/v1/embeddings", json={"model": model, "input": texts, "dimensions": 24,
                                               "force_dimensions": True, "encoding_format": "base64"})
    assert forced.status_code == 200, forced.text
    raw = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in forced.json()["data"]]
    np.testing.assert_allclose(np.stack(raw), cut(24), atol=1e-5)

    for bad in (0, -3, 65):  # forcing never makes these possible
        r = http.post("/v1/embeddings", json={"model": model, "input": "a", "dimensions": bad, "force_dimensions": True})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "dimensions" and "between 1 and 64" in err["message"], err

    client = openai.OpenAI(base_url=endpoint["url"] + "/v1", api_key=endpoint["key"], max_retries=0)
    got = client.embeddings.create(model=model, input=texts, dimensions=32)  # base64 by default
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), cut(32), atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="force_dimensions"):
        client.embeddings.create(model=model, input=texts, dimensions=8)
    got = client.embeddings.create(model=model, input=texts, dimensions=8, extra_body={"force_dimensions": True})
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), cut(8), atol=1e-5)


def test_openapi_schema(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/search", "/v1/embeddings", "/v1/models", "/healthz"} <= set(paths)


BAD = [
    ("missing query", "/search", {"k": 3}, 400, "query"),
    ("empty query", "/search", {"query": "  "}, 400, "query"),
    ("empty list", "/search", {"query": []}, 400, "query"),
    ("blank item", "/search", {"query": ["ok", ""]}, 400, "query[1]"),
    ("k zero", "/search", {"query": "x", "k": 0}, 400, "k"),
    ("k negative", "/search", {"query": "x", "k": -2}, 400, "k"),
    ("k above limit", "/search", {"query": "x", "k": 21}, 400, "k"),
    ("k as string", "/search", {"query": "x", "k": "5"}, 400, "k"),
    ("k as float", "/search", {"query": "x", "k": 2.5}, 400, "k"),
    ("query as number", "/search", {"query": 42}, 400, "query"),
    ("list of numbers", "/search", {"query": [1, 2]}, 400, "query"),
    ("too many queries", "/search", {"query": ["q"] * 9}, 400, "query"),
    ("query too long", "/search", {"query": "x" * 301}, 400, "query"),
    ("nprobe zero", "/search", {"query": "x", "nprobe": 0}, 400, "nprobe"),
    ("unknown field", "/search", {"query": "x", "top_k": 3}, 400, "top_k"),
    ("body is a list", "/search", ["x"], 400, "body"),
    ("unknown model", "/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model"),
    ("missing input", "/v1/embeddings", {"model": "@model"}, 400, "input"),
    ("token ids", "/v1/embeddings", {"model": "@model", "input": [[1, 2, 3]]}, 400, "input"),
    ("empty input", "/v1/embeddings", {"model": "@model", "input": ""}, 400, "input"),
    ("too many inputs", "/v1/embeddings", {"model": "@model", "input": ["a"] * 9}, 400, "input"),
    ("input too long", "/v1/embeddings", {"model": "@model", "input": ["a", "b" * 400]}, 400, "input[1]"),
    ("bad format", "/v1/embeddings", {"model": "@model", "input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
    ("untrained dimensions", "/v1/embeddings", {"model": "@model", "input": "a", "dimensions": 3}, 400, "dimensions"),
    ("dimensions above the model", "/v1/embeddings", {"model": "@model", "input": "a", "dimensions": 65}, 400,
     "dimensions"),
    ("force_dimensions not a bool", "/v1/embeddings",
     {"model": "@model", "input": "a", "dimensions": 3, "force_dimensions": "yes"}, 400, "force_dimensions"),
]


def test_second_app_joins_the_running_proxy_port(endpoint):
    """Serve keeps its first HTTP options: a later app (serve-llm beside the endpoint) must be
    told the port requests really reach, not the one it asked for."""
    import socket

    import httpx

    from rayembed.serving.server import start_serve_http

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        other_port = sock.getsockname()[1]
    base = start_serve_http("127.0.0.1", other_port)
    assert endpoint["url"].startswith(base) and not base.endswith(f":{other_port}")
    assert httpx.get(base + "/-/healthz", timeout=30).status_code == 200


@pytest.mark.parametrize("name, path, body, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_naming_the_field(http, endpoint, name, path, body, status, param):
    if isinstance(body, dict) and body.get("model") == "@model":
        body = {**body, "model": endpoint["model"]}
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert param.split("[")[0] in err["message"]


def test_non_json_and_oversized_bodies(http):
    r = http.post("/search", content=b"query=hello", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    assert "not valid JSON" in r.json()["error"]["message"]
    r = http.post("/search", content=b"{not json", headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500 and "error" in r.json()
    r = http.post("/search", json={"query": "x" * 70000})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    r = http.get("/no-such-route")
    assert r.status_code == 404 and "error" in r.json()


def test_concurrent_requests_are_batched(endpoint):
    import httpx

    headers = {"Authorization": f"Bearer {endpoint['key']}"}

    async def burst():
        async with httpx.AsyncClient(base_url=endpoint["url"], headers=headers, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/search", json={"query": f"item {i}", "k": 2}) for i in range(24)))
            assert all(r.status_code == 200 for r in rs)
            return (await c.get("/stats")).json()

    stats = asyncio.run(burst())["encoder"]
    assert stats["max_batch_size_seen"] > 1, stats
    assert stats["texts"] >= 24


def test_auth_through_openai_client(endpoint):
    import httpx
    import openai

    url, model = endpoint["url"], endpoint["model"]
    for key in (None, "wrong-key-abcdefgh"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(url + "/search", json={"query": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "wrong-key" not in r.text
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong-key-abcdefgh", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=model, input="hello")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key=endpoint["key"], max_retries=0)
    assert len(good.embeddings.create(model=model, input="hello").data) == 1
    assert httpx.get(url + "/healthz").status_code == 200  # health stays open for probes


def test_updated_index_in_the_same_folder_swaps_under_load(http, endpoint, tiny_indexes, local_embedder, tmp_path):
    """`rayembed index update` on the folder being served, then a swap to its new manifest: no
    failed request, each client sees the old version then the new one (never back), the new one
    never returns a deleted document and finds the upserted ones. Serves a copy of v1, so the
    module's v1 folder stays as built; v1 is served again afterwards (the next test expects it)."""
    import shutil

    from rayembed.index.update import update_index
    from rayembed.serving.server import manifest_version, swap_index

    live = tmp_path / "live"
    shutil.copytree(tiny_indexes["v1"], live)
    old = manifest_version(live)
    assert old == manifest_version(tiny_indexes["v1"])  # same manifest bytes: same version
    assert swap_index(live) == old
    query = {"query": "rivers", "k": 5}
    before = http.post("/search", json=query).json()
    assert before["index_version"] == old
    deleted = before["results"][0]["ids"][:3]  # documents the clients are being answered with
    upserts = [
        {"id": "new0", "text": "rivers"},
        {"id": "new1", "text": "a new passage about rivers and their deltas"},
        {"id": "a5", "text": "a replaced passage about rivers"},  # an existing id: replaced
    ]
    answers: dict[int, list[tuple[str, list[str]]]] = {0: [], 1: []}
    failures, stop = [], threading.Event()

    def client_loop(n: int):
        import httpx

        with httpx.Client(base_url=endpoint["url"], headers={"Authorization": f"Bearer {endpoint['key']}"}, timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post("/search", json=query)
                    if r.status_code != 200:
                        failures.append((r.status_code, r.text))
                    else:
                        body = r.json()
                        answers[n].append((body["index_version"], body["results"][0]["ids"]))
                except Exception as e:  # any transport error is a failed request
                    failures.append(repr(e))

    def each_client_has(n: int, version: str) -> None:
        deadline = time.monotonic() + 60  # generous: a loaded 2-core machine answers slowly
        while time.monotonic() < deadline and not failures:
            if all(sum(v == version for v, _ in a) >= n for a in answers.values()):
                return
            time.sleep(0.05)

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in answers]
    for t in threads:
        t.start()
    try:
        each_client_has(2, old)
        summary = update_index(live, upsert=upserts, delete=deleted, embedder=local_embedder)
        assert (summary["upserted"], summary["replaced"], summary["deleted"]) == (3, 1, 3)
        new = manifest_version(live)
        assert new != old
        each_client_has(4, old)  # the new manifest is on disk; the old version is served until the swap
        assert {v for a in answers.values() for v, _ in a} == {old}
        assert swap_index(live) == new
        each_client_has(5, new)
    finally:
        stop.set()
        for t in threads:
            t.join()
    try:
        assert not failures, failures[:3]
        for n, seq in answers.items():
            versions = [v for v, _ in seq]
            assert set(versions) == {old, new}, (n, set(versions))
            switch = versions.index(new)
            assert versions[:switch] == [old] * switch and versions[switch:] == [new] * (len(versions) - switch), n
            for v, ids in seq:
                if v == old:
                    assert ids[:3] == deleted
                else:
                    assert ids[0] == "new0" and not set(ids) & set(deleted), ids
        for u in upserts[1:]:
            res = http.post("/search", json={"query": u["text"], "k": 3}).json()
            assert res["index_version"] == new
            assert res["results"][0]["ids"][0] == u["id"] and res["results"][0]["texts"][0] == u["text"]
    finally:
        assert swap_index(tiny_indexes["v1"]) == old


def test_hot_swap_under_load_has_no_failed_requests(http, endpoint, tiny_indexes):
    from rayembed.serving.server import manifest_version, swap_index

    v1, v2 = manifest_version(tiny_indexes["v1"]), manifest_version(tiny_indexes["v2"])
    assert http.get("/healthz").json()["index_version"] == v1
    seen, failures, stop = [], [], threading.Event()

    def client_loop():
        import httpx

        with httpx.Client(base_url=endpoint["url"], headers={"Authorization": f"Bearer {endpoint['key']}"}, timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post("/search", json={"query": "rivers", "k": 3})
                    if r.status_code != 200:
                        failures.append((r.status_code, r.text))
                    else:
                        body = r.json()
                        seen.append(body["index_version"])
                        prefix = "a" if body["index_version"] == v1 else "b"
                        assert all(i.startswith(prefix) for i in body["results"][0]["ids"])
                except Exception as e:  # any transport error is a failed request
                    failures.append(repr(e))

    threads = [threading.Thread(target=client_loop) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert swap_index(tiny_indexes["v2"]) == v2
    n_after = len(seen)
    deadline = time.monotonic() + 60  # generous: a loaded 2-core machine answers slowly
    while len(seen) < n_after + 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert seen[0] == v1 and seen[-1] == v2 and set(seen) == {v1, v2}
    assert len(seen) >= 10
    assert http.post("/search", json={"query": "x"}).json()["index_version"] == v2


def test_killed_replica_is_replaced(http):
    import ray

    def encoder_replicas():
        return {
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "rayembed-test" in a["name"] and "QueryEncoder" in a["name"]
        }

    before = encoder_replicas()
    assert len(before) == 1
    assert http.get("/healthz").json()["status"] == "ok"
    ray.kill(ray.get_actor(next(iter(before)), namespace="serve"), no_restart=True)
    # /healthz reflects the dead encoder (503) until its replacement answers.
    health, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline and not (503 in health and health[-1] == 200):
        health.append(http.get("/healthz", timeout=10).status_code)
        time.sleep(0.1)
    assert 503 in health and health[-1] == 200, health
    deadline = time.monotonic() + 90
    ok = 0
    while time.monotonic() < deadline and ok < 3:
        try:
            r = http.post("/search", json={"query": "glaciers", "k": 2}, timeout=10)
            ok = ok + 1 if r.status_code == 200 else 0
        except Exception:
            ok = 0
        time.sleep(0.2)
    assert ok == 3, "the endpoint did not recover after its encoder replica was killed"
    after = encoder_replicas()
    assert len(after) == 1 and after != before
