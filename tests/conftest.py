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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: 4 logical CPUs on 2 cores, a small object store.

    Logical CPUs above the core count keep Ray Data readers from being starved by actors.
    """
    import ray

    from rayembed.config import ComputeConfig
    from rayembed.runtime import init_ray

    if ray.is_initialized():
        yield ray
        return
    tmp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
    init_ray(
        ComputeConfig(num_cpus=4, object_store_memory_mb=256, temp_dir=tmp, log_to_driver=False)
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
