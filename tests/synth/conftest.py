"""Fixtures for synth tests: a scripted OpenAI-compatible server on 127.0.0.1 and config helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from scripted_server import Reply, ScriptedLLM  # noqa: E402

API_KEY = "sk-test-NEVER-WRITE-THIS-0123456789"


@pytest.fixture
def scripted_llm():
    """A fresh scripted server per test; ``server.script`` injects faults, ``server.log`` records requests."""
    server = ScriptedLLM()
    server.base_url = server.start()
    yield server
    server.stop()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    return API_KEY


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


@pytest.fixture
def make_worker():
    """An in-process SynthWorker (the same class the Ray actors run) for a config."""
    from rayembed.synth.client import Secret
    from rayembed.synth.worker import SynthWorker, client_settings, validation_settings

    workers = []

    def make(cfg, key=API_KEY):
        w = SynthWorker(client_settings(cfg.synth, cfg.synth.base_url), Secret(key), validation_settings(cfg.synth))
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.close()


__all__ = ["API_KEY", "Reply", "ScriptedLLM", "synth_cfg"]
