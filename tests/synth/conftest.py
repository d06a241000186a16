"""Fixtures for synth tests: a scripted OpenAI-compatible server on 127.0.0.1 (helpers: synth_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from scripted_server import ScriptedLLM  # noqa: E402
from synth_helpers import API_KEY  # noqa: E402


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

