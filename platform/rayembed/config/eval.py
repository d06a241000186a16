"""The ``eval`` section."""

from __future__ import annotations

from dataclasses import dataclass

from rayembed.config.base import ConfigError, option  # noqa: F401


@dataclass
class EvalConfig:
    """Settings for the eval stage."""

    output_dir: str | None = option(None, "Where this stage writes. Empty: <run_dir>/eval.")
