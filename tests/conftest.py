"""Shared fixtures: environment, the local data directory, one tiny model, one local Ray.

Area-specific fixtures live in each area's own conftest (tests/<area>/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before anything imports Ray or transformers.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Ray started by the tests binds to 127.0.0.1 only, as the CLI's local Ray does.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAYEMBED_CACHE", str(REPO / ".cache" / "rayembed"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where CUDA is available and are skipped (with the reason) elsewhere."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu); none is visible to torch here")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real local datasets (../shared/data); CI has them beside the clone."""
    from rayembed.runtime import resolve_data_dir

    return resolve_data_dir()


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory) -> Path:
    """A tiny random Llama embedder saved once per session. Copy it before changing it."""
    from rayembed.modeling.embedder import Embedder

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    Embedder.from_pretrained("tiny-llama", max_length=128).save_pretrained(path)
    return path


@pytest.fixture
def tiny_embedder_copy(tiny_embedder_dir, tmp_path) -> Path:
    dst = tmp_path / "tiny-llama"
    shutil.copytree(tiny_embedder_dir, dst)
    return dst


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny models gain nothing from threads; on a shared, loaded machine they spin and stall."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_RAY_TMP_DIRS: list[str] = []


def start_local_ray():
    """The tests' local Ray: 4 logical CPUs on 2 cores, a small object store, its own temp dir.

    Logical CPUs above the core count keep Ray Data readers from being starved by actors.
    """
    import ray

    from rayembed.config import ComputeConfig
    from rayembed.runtime import init_ray

    if not ray.is_initialized():
        tmp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
        _RAY_TMP_DIRS.append(tmp)
        init_ray(ComputeConfig(num_cpus=4, object_store_memory_mb=256, temp_dir=tmp, log_to_driver=False))
    return ray


@pytest.fixture(scope="session", autouse=True)
def _ray_cleanup():
    """At the end of the session: shut down whatever Ray the tests left and remove its temp dirs."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for tmp in _RAY_TMP_DIRS:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local():
    """The local Ray, shared by the modules that use it; started again if a module (the
    multi-node tests) shut it down to run its own cluster."""
    return start_local_ray()


# ----------------------------------------------------------------------------- a cluster with object storage

S3_BUCKET = "rayembed-test"


@pytest.fixture(scope="module")
def s3_store():
    """A real S3 API on 127.0.0.1 (moto's server in a thread) with one bucket, reached through the
    usual AWS_* variables, which every Ray node started afterwards inherits. Yields the endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=S3_BUCKET)
        yield url
    srv.stop()


@pytest.fixture(scope="module")
def multinode(s3_store, tmp_path_factory):
    """A real multi-node Ray on 127.0.0.1: a head (1 CPU) and two worker nodes (1 CPU and one
    ``worker`` resource each), each with its own scratch folder; this process is its driver. The
    only storage they share is the S3 server. Stopped by its own handles at the end of the module.
    """
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    mem = 200 * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": mem, "include_dashboard": False,
        "resources": {"head": 1}})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=mem, resources={"worker": 1}) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}})
    cluster.wait_for_nodes()
    handle = MultiNode(cluster, workers, s3_store)
    yield handle
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def data_node(multinode):
    """A CPU node for Ray Data beside the fixture's 1-CPU nodes, as a real cluster's head or CPU
    pool has: Ray Data's listing, read and repartition tasks each reserve a whole CPU (not
    configurable in 2.60), and a 1-CPU node that holds half a Train worker, or a tokenising actor
    placed by SPREAD, has none left, so the stream would wait forever. It has no `worker`
    resource, so no Train worker lands on it."""
    import ray

    node = multinode.cluster.add_node(num_cpus=2, object_store_memory=200 * 1024 * 1024)
    multinode.cluster.wait_for_nodes()
    yield node
    if any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
        multinode.cluster.remove_node(node)


class MultiNode:
    """The running cluster: ``add_worker()``, ``kill(node)`` (removes it at once, as a lost machine)."""

    def __init__(self, cluster, workers, s3_url: str):
        self.cluster = cluster
        self.workers = list(workers)
        self.s3_url = s3_url
        self.bucket = S3_BUCKET

    def add_worker(self):
        node = self.cluster.add_node(num_cpus=1, object_store_memory=200 * 1024 * 1024, resources={"worker": 1})
        self.workers.append(node)
        self.cluster.wait_for_nodes()
        return node

    def kill(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def node_of(self, node_id: str):
        return next((n for n in self.workers if n.node_id == node_id), None)
