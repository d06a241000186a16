"""The ``data`` section."""

from __future__ import annotations

from dataclasses import dataclass

from rayembed.config.base import ConfigError, option  # noqa: F401


@dataclass
class DataConfig:
    """Settings for the data stage."""

    output_dir: str | None = option(None, "Where this stage writes. Empty: <run_dir>/data.")
