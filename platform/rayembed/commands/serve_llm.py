"""``rayembed serve-llm``: an OpenAI-compatible chat endpoint around a local causal LM."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args

    p = sub.add_parser(
        "serve-llm",
        help="Serve a Hugging Face causal LM as /v1/chat/completions on Ray Serve (synth.llm_server).",
        description=(
            "Deploys synth.llm_server.checkpoint (SmolLM2-135M-Instruct by default) behind "
            "GET /v1/models and POST /v1/chat/completions on 127.0.0.1:synth.llm_server.port, "
            "then blocks until Ctrl-C or SIGTERM. Point synth.base_url at the printed URL."
        ),
    )
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from rayembed.cli import load_from_args
    from rayembed.runtime import init_ray
    from rayembed.synth.llm_server import start_llm_server

    cfg = load_from_args(args)
    init_ray(cfg.compute)
    handle = start_llm_server(cfg.synth.llm_server)
    print(f"serve-llm: model '{handle.model_name}' at {handle.base_url} (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        handle.stop()
        import ray

        ray.shutdown()
    return 0
