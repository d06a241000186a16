"""The ``compute`` section: where Ray runs and with what resources."""

from __future__ import annotations

from dataclasses import dataclass

from rayembed.config.base import ConfigError, option


@dataclass
class ComputeConfig:
    """How a job connects to Ray. Empty address: attach to $RAY_ADDRESS or start a local Ray."""

    address: str | None = option(
        None,
        "Ray address to attach to ('auto', 'ray://host:10001'). Empty: $RAY_ADDRESS if set "
        "(as under `ray job submit`), else start a local Ray inside the job.",
    )
    num_cpus: float | None = option(
        None,
        "Logical CPUs for a local Ray. Empty: twice the cores, at least 4, so Ray Data "
        "readers are not starved by actors (see cluster/README.md).",
    )
    num_gpus: int | None = option(None, "GPUs for a local Ray. Empty: detected.")
    object_store_memory_mb: int = option(512, "Object store size for a local Ray, in MB.")
    include_dashboard: bool = option(False, "Start the dashboard with a local Ray (costs ~1 GB).")
    temp_dir: str | None = option(None, "Ray's session folder for a local Ray. Empty: Ray's default.")
    log_to_driver: bool = option(True, "Forward worker logs to the driver.")

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus <= 0:
            raise ConfigError(f"compute.num_cpus must be positive, got {self.num_cpus}.")
        if self.object_store_memory_mb < 64:
            raise ConfigError(
                f"compute.object_store_memory_mb={self.object_store_memory_mb} is too small; use at least 64."
            )
