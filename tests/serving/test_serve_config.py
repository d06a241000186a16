"""The serve config section and the shipped Serve YAMLs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayembed.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "override, match",
    [
        ("serve.max_k=0", r"serve.max_k must be >= 1"),
        ("serve.default_k=500", r"default_k=500 exceeds serve.max_k"),
        ("serve.batch_wait_timeout_s=5", r"batch_wait_timeout_s must be within"),
        ("serve.port=70000", r"serve.port must be in"),
        ("serve.api_key_env=not a name", r"api_key_env must be an environment variable name"),
        ("serve.encoder.max_replicas=0", r"serve.encoder.max_replicas=0 must be >= 1"),
        ("serve.retriever.num_cpus=0", r"serve.retriever reserves no CPU and no GPU"),
        ("serve.encoder.max_ongoing_requests=4", r"below serve.max_batch_size"),
        ("serve.max_batch_chars=100", r"max_batch_chars=100 is below serve.max_input_chars"),
        ("serve.max_concurrent_requests=100", r"exceeds serve.retriever.max_ongoing_requests=128"),
        ("serve.encoder.max_queued_requests=0", r"max_queued_requests must be >= 1, or -1"),
        ("serve.request_timeout_s=0", r"serve.request_timeout_s must be a positive number"),
    ],
)
def test_bad_serve_config(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_partial_deployment_override_keeps_its_defaults():
    cfg = load_config(None, ["serve.encoder.max_replicas=3"])
    assert cfg.serve.encoder.num_cpus == 1.0 and cfg.serve.encoder.max_replicas == 3
    opts = cfg.serve.encoder.serve_options()
    assert opts["autoscaling_config"]["max_replicas"] == 3
    assert opts["ray_actor_options"] == {"num_cpus": 1.0}


def test_defaults_bind_loopback():
    cfg = load_config(None)
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.is_loopback


def _shape(node):
    """The key structure of a YAML tree (lists of mappings matched by position)."""
    if isinstance(node, dict):
        return {k: _shape(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_shape(v) for v in node] if node and all(isinstance(v, dict) for v in node) else "list"
    return "value"


def test_serve_yamls_are_valid_and_differ_in_values_only():
    from ray.serve.schema import ServeDeploySchema

    from rayembed.serving.app import ServeArgs

    local = yaml.safe_load((REPO / "serving/serve_config.local.yaml").read_text())
    gpu = yaml.safe_load((REPO / "serving/serve_config.gpu.yaml").read_text())
    for doc in (local, gpu):
        ServeDeploySchema(**doc)
        app = doc["applications"][0]
        assert app["import_path"] == "rayembed.serving.app:build_app"
        ServeArgs(**app["args"])
        load_config(REPO / app["args"]["config"], app["args"]["overrides"])
        assert [d["name"] for d in app["deployments"]] == ["QueryEncoder", "Retriever"]
    assert _shape(local) == _shape(gpu)
    assert local["http_options"]["host"] == "127.0.0.1"
    gpu_cfg = load_config(REPO / gpu["applications"][0]["args"]["config"])
    assert gpu_cfg.serve.api_key_file, "the 0.0.0.0 config must require a key"
    assert "api_key:" not in (REPO / "jobs/configs/gpu/serve.yaml").read_text()


def test_thin_reexport_matches_package():
    import importlib
    import sys

    sys.path.insert(0, str(REPO))
    try:
        mod = importlib.import_module("serving.app")
    finally:
        sys.path.remove(str(REPO))
    from rayembed.serving.app import build_app

    assert mod.build_app is build_app


def test_serve_command_parses():
    import argparse

    from rayembed.commands import serve

    parser = argparse.ArgumentParser(prog="rayembed")
    serve.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--index-dir", "runs/x/index", "--port", "8123", "serve.max_k=5"])
    assert args.func is serve.run and args.port == 8123 and args.overrides == ["serve.max_k=5"]
    assert args.host is None  # the config's 127.0.0.1 applies


def test_batches_close_at_the_text_or_the_character_budget():
    from rayembed.serving.encoder import _BUDGET, batch_cost

    _BUDGET.update(texts=32, chars=1000)
    assert batch_cost([("short", None)] * 10) == 10  # counted by texts
    assert batch_cost([("x" * 500, None), ("y", None)]) == 17  # 501 of 1000 characters: 17 of 32 slots
    assert batch_cost([("x" * 1000, None)]) == 32  # one input at the limit fills a batch alone
    opts = load_config(None, ["serve.retriever.max_queued_requests=8"]).serve.retriever.serve_options()
    assert opts["max_queued_requests"] == 8
