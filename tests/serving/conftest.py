"""Serving fixtures: two tiny indexes and ONE running endpoint shared by the HTTP tests.

The endpoint runs on the session's local Ray (``ray_local``), on a free 127.0.0.1 port, with an
API key read from a file, so the auth tests and the functional tests use the same app.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

API_KEY = "test-key-0123456789abcdef"


def tiny_docs(n: int, tag: str) -> list[dict]:
    topics = ["rivers", "volcanoes", "bread", "compilers", "orbits", "violins", "glaciers"]
    return [
        {"id": f"{tag}{i}", "text": f"{tag} passage {i} about {topics[i % len(topics)]} and item {i * 7 % 13}",
         "title": f"{topics[i % len(topics)]} {i}"}
        for i in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The served copy of the tiny embedder says it was trained for these Matryoshka sizes, so
# /v1/embeddings accepts them as `dimensions` (its weights, and so its vectors, are the original's).
SERVED_MATRYOSHKA_DIMS = [16, 32]


@pytest.fixture(scope="module")
def served_embedder_dir(tiny_embedder_dir, tmp_path_factory) -> Path:
    """The session's tiny embedder, copied, with matryoshka_dims recorded in embedder_config.json."""
    import json
    import shutil

    dst = tmp_path_factory.mktemp("served") / Path(tiny_embedder_dir).name  # same name: same model id
    shutil.copytree(tiny_embedder_dir, dst)
    cfg = dst / "embedder_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "matryoshka_dims": SERVED_MATRYOSHKA_DIMS}))
    return dst


@pytest.fixture(scope="module")
def tiny_indexes(served_embedder_dir, tmp_path_factory) -> dict[str, Path]:
    """v1 and v2: same embedder, different corpora (so different versions and answers)."""
    from rayembed.index import build_index_in_process

    root = tmp_path_factory.mktemp("serve-idx")
    out = {}
    for name, docs in (("v1", tiny_docs(120, "a")), ("v2", tiny_docs(90, "b"))):
        manifest = build_index_in_process(str(served_embedder_dir), docs, root / name, index_type="flat", num_shards=2)
        out[name] = Path(manifest).parent
    return out


@pytest.fixture(scope="module")
def endpoint(ray_local, tiny_indexes, tiny_embedder_dir, tmp_path_factory):
    """One running retrieval endpoint (key required) for the whole module."""
    from rayembed.config import load_config
    from rayembed.serving import start_server, stop_server

    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(API_KEY + "\n")
    cfg = load_config(
        None,
        [
            f"serve.port={free_port()}",
            f"serve.api_key_file={key_file}",
            "serve.app_name=rayembed-test",
            "serve.max_k=20",
            "serve.max_queries_per_request=8",
            "serve.max_input_chars=300",
            "serve.max_body_bytes=65536",
            "serve.batch_wait_timeout_s=0.05",
            "serve.encoder.num_cpus=0.5",
            "serve.access_log=false",
        ],
    )
    url = start_server(cfg, index_dir=tiny_indexes["v1"])
    yield {"url": url, "cfg": cfg, "model": Path(tiny_embedder_dir).name, "key": API_KEY}
    stop_server()


@pytest.fixture(scope="module")
def http(endpoint):
    import httpx

    with httpx.Client(
        base_url=endpoint["url"], headers={"Authorization": f"Bearer {endpoint['key']}"}, timeout=60
    ) as client:
        yield client
