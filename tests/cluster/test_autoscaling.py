"""The proof that the index build's encoder pool autoscales: a head whose Ray autoscaler (v2, the
fake multi-node provider) adds worker nodes on this machine, and the real ``build_index`` with
encoder actors that ask for a custom resource (``encoder``) only those worker nodes offer.

Checked from Ray's own state (``ray.nodes()``, polled in a thread during the build, and the
autoscaler's status), never from logs: worker nodes came up for the pool, the index is complete,
and once the pool is gone the autoscaler removes the nodes after its idle timeout.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

pytestmark = pytest.mark.slow

N_DOCS = 3000
SHARD_SIZE = 100  # 30 shards: work for up to index.encode.max_actors=3 actors, i.e. 2 worker nodes
WORKER_RESOURCES = {"CPU": 1, "encoder": 1}  # two 0.5-encoder actors per worker node
MAX_WORKERS = 2
IDLE_TIMEOUT_MIN = 0.2  # 12 s
RELEASE_DEADLINE_S = 90.0


@pytest.fixture(scope="module")
def autoscaling_cluster():
    """A 1-CPU head with no `encoder`, autoscaling 0-2 worker nodes of {CPU: 1, encoder: 1}."""
    import ray

    from rayembed.cluster.local import AutoscalingLocalCluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = AutoscalingLocalCluster(num_cpus=1, worker_resources=WORKER_RESOURCES, min_workers=0,
                                      max_workers=MAX_WORKERS, idle_timeout_minutes=IDLE_TIMEOUT_MIN)
    cluster.start()
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        t0 = time.monotonic()
        cluster.stop(grace_s=3.0)  # a test cluster: no need to wait long for Ray's own orderly exit
        print(f"cluster stopped in {time.monotonic() - t0:.1f} s")
    assert cluster.processes() == []  # the head's processes and the autoscaled nodes' alike


def _encoder_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("encoder", 0) > 0]


class _NodeWatcher(threading.Thread):
    """Polls ``ray.nodes()`` until stopped; records the most alive `encoder` nodes seen at once."""

    def __init__(self, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.every_s = every_s
        self.max_alive = 0
        self.seen: set[str] = set()
        self.first_up_s: float | None = None  # seconds after the watcher started
        self.max_at_s: float | None = None
        self.errors: list[str] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                alive = _encoder_nodes()
            except Exception as e:  # keep polling; reported if nothing was ever seen
                self.errors.append(repr(e))
            else:
                self.seen.update(alive)
                if len(alive) > self.max_alive:
                    self.max_alive, self.max_at_s = len(alive), time.monotonic() - self._t0
                if alive and self.first_up_s is None:
                    self.first_up_s = self.max_at_s
            self._stop_event.wait(self.every_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


def _secs(t: float | None) -> str:
    return "-" if t is None else f"{t:.1f} s"


def _corpus(path, n: int) -> None:
    rows = [{"_id": f"d{i}", "title": f"title {i % 17}", "text": f"passage {i} about subject {i * 7 % 131} and topic {i % 29}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_encoder_pool_autoscales_worker_nodes_and_releases_them(autoscaling_cluster, tiny_embedder_dir, tmp_path):
    import ray

    from rayembed.cluster.local import FAKE_HEAD_NODE_ID
    from rayembed.config import load_config
    from rayembed.index import ShardedIndex, build_index
    from rayembed.runtime import init_ray

    cluster = autoscaling_cluster
    corpus = tmp_path / "corpus.jsonl"
    _corpus(corpus, N_DOCS)
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"index.embedder={tiny_embedder_dir}", f"index.corpus={corpus}",
        "index.format=jsonl", f"index.output_dir={tmp_path / 'index'}", "index.index_type=flat",
        f"index.shard_size={SHARD_SIZE}", "index.encode.min_actors=1", "index.encode.max_actors=3",
        "index.encode.num_cpus_per_actor=0.5", "index.encode.resources_per_actor={encoder: 0.5}",
        "index.encode.batch_size=16",
        f"compute.address={cluster.gcs_address}", "compute.log_to_driver=false",
    ])
    assert dict(cfg.index.encode.resources_per_actor) == {"encoder": 0.5}

    if ray.is_initialized():
        ray.shutdown()
    init_ray(cfg.compute)  # the driver attaches through compute.address, as build_index would
    assert ray.get_runtime_context().gcs_address == cluster.gcs_address
    assert _encoder_nodes() == []  # nothing offers `encoder` before the build asks for it

    watcher = _NodeWatcher()
    watcher.start()
    t0 = time.monotonic()
    try:
        manifest = build_index(cfg)  # same driver: init_ray finds Ray already attached
    finally:
        watcher.stop()
    build_s = time.monotonic() - t0

    idx = ShardedIndex.open(manifest)
    assert idx.ntotal == N_DOCS
    assert idx.num_shards == N_DOCS // SHARD_SIZE
    per_node = (idx.manifest.get("build") or {}).get("docs_per_node")
    if per_node is not None:  # the shards were encoded by actors on the autoscaled nodes only
        assert sum(per_node.values()) == N_DOCS
        assert FAKE_HEAD_NODE_ID not in per_node and set(per_node) <= watcher.seen, (per_node, watcher.seen)

    print(f"build {build_s:.1f} s; first encoder node up after {_secs(watcher.first_up_s)}; "
          f"max alive encoder nodes {watcher.max_alive} (at {_secs(watcher.max_at_s)}); "
          f"encoder nodes seen {len(watcher.seen)}; "
          f"documents per node {per_node}")
    assert watcher.max_alive >= 1, f"no worker node with `encoder` came up; poll errors: {watcher.errors[-3:]}"
    assert watcher.max_alive <= MAX_WORKERS
    assert all(n != FAKE_HEAD_NODE_ID for n in watcher.seen)

    # The pool is gone with the dataset: after the idle timeout the autoscaler removes the nodes.
    t1 = time.monotonic()
    deadline = t1 + RELEASE_DEADLINE_S
    while _encoder_nodes() and time.monotonic() < deadline:
        time.sleep(1.0)
    released_s = time.monotonic() - t1
    print(f"encoder nodes released {released_s:.1f} s after the build")
    assert _encoder_nodes() == [], f"worker nodes still alive after {RELEASE_DEADLINE_S:.0f} s"
    status = cluster.status()
    workers = [n for n in status.active_nodes + status.idle_nodes if n.ray_node_type_name == cluster.worker_type]
    assert workers == [], workers
    ray.shutdown()
