"""Process-level set-up shared by every entrypoint: logging, data directory, Ray."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rayembed.config import ComputeConfig

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV = "RAYEMBED_DATA_DIR"
CACHE_ENV = "RAYEMBED_CACHE"


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once (entrypoints only; library code never calls this)."""
    from rayembed.security import RedactingFilter

    root = logging.getLogger()
    if getattr(root, "_rayembed_configured", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level)
    root._rayembed_configured = True  # type: ignore[attr-defined]
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The local data directory: the flag, then $RAYEMBED_DATA_DIR, then ../shared/data.

    Raises FileNotFoundError naming all three when none exists.
    """
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("--data-dir / data_dir", Path(explicit)))
    elif os.environ.get(DATA_ENV):
        candidates.append((f"${DATA_ENV}", Path(os.environ[DATA_ENV])))
    else:
        candidates.append(("../shared/data beside the repository", REPO_ROOT.parent / "shared" / "data"))
        candidates.append(("../shared/data beside the working directory", Path.cwd().parent / "shared" / "data"))
    for _, path in candidates:
        if path.is_dir():
            return path.resolve()
    tried = "; ".join(f"{how}: {p}" for how, p in candidates)
    raise FileNotFoundError(
        f"No local data directory found (tried {tried}). Pass data_dir=/path/to/data or set "
        f"${DATA_ENV}; online users can instead name hub datasets in the config."
    )


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where converted checkpoints and other reusable artifacts live."""
    path = Path(explicit or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rayembed")
    path.mkdir(parents=True, exist_ok=True)
    return path


def prefer_loopback() -> None:
    """Make a Ray started by this process bind to 127.0.0.1 only, unless attaching to a cluster.

    Ray reads this switch once, at import: call before anything imports ray. Under
    ``ray job submit`` (RAY_ADDRESS set) nothing changes.
    """
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(compute: ComputeConfig | None = None, **overrides):
    """Attach to a Ray cluster, or start a local one when there is none to attach to.

    Under ``ray job submit`` RAY_ADDRESS is set and this is a plain ``ray.init()``: passing
    resources while attaching raises in Ray. Locally it starts Ray with a logical CPU count
    above the core count, because on 2 cores two 1-CPU actors would starve Ray Data's readers.
    """
    import ray

    from rayembed.config import ComputeConfig

    compute = compute or ComputeConfig()
    if ray.is_initialized():
        return ray
    address = compute.address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": compute.log_to_driver, "configure_logging": False}
    if address:
        logger.info("Attaching to Ray at %s", address)
        ray.init(address=address, **quiet, **overrides)
        return ray
    num_cpus = compute.num_cpus or max(4, 2 * (os.cpu_count() or 1))
    kwargs = dict(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=compute.object_store_memory_mb * 1024 * 1024,
        include_dashboard=compute.include_dashboard,
        **quiet,
    )
    if compute.num_gpus is not None:
        kwargs["num_gpus"] = compute.num_gpus
    if compute.temp_dir:
        kwargs["_temp_dir"] = str(Path(compute.temp_dir).resolve())
    kwargs.update(overrides)
    # Ray's own helpers inside workers (Ray Train's placement-group cleaner, the state API) find
    # "the" cluster by scanning for GCS processes when RAY_ADDRESS is unset, and fail when another
    # Ray runs on the machine; a stuck cleaner then leaves a restarted fit waiting for CPUs.
    # So the GCS gets a known port and every worker of this job is told it.
    port = _free_port()
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {"RAY_ADDRESS": f"127.0.0.1:{port}", **runtime_env.get("env_vars", {})}
    kwargs["runtime_env"] = runtime_env
    logger.info("Starting a local Ray (%s logical CPUs)", num_cpus)
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(**kwargs)
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    return ray


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
