"""Helpers the synth tests import by name (conftest.py holds only fixtures: a module named
``conftest`` is whichever directory's conftest pytest imported last, so tests never import it)."""

from __future__ import annotations

from pathlib import Path

from scripted_server import Reply

API_KEY = "sk-test-NEVER-WRITE-THIS-0123456789"


def synth_cfg(tmp_path: Path, base_url: str, *overrides: str):
    """A small synth config pointed at ``base_url``, with fast retries."""
    from rayembed.config import load_config

    return load_config(
        None,
        [
            f"run_dir={tmp_path}",
            f"synth.base_url={base_url}",
            "synth.model=scripted",
            "synth.backoff_base_s=0.05",
            "synth.backoff_max_s=0.2",
            "synth.request_timeout_s=5",
            "synth.num_examples={sts: 4}",
            *overrides,
        ],
    )


__all__ = ["API_KEY", "Reply", "synth_cfg"]
