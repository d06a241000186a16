"""``rayembed serve``: start the retrieval endpoint on Ray Serve and keep it up until stopped.

Locally the command starts its own Ray and binds 127.0.0.1; Ctrl-C or SIGTERM shuts it down.
Under ``ray job submit`` it attaches to the cluster; ``--detach`` deploys and returns, leaving
the application running in the cluster's Serve.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args

    p = sub.add_parser(
        "serve",
        help="Serve retrieval (POST /search) and OpenAI embeddings (POST /v1/embeddings) on Ray Serve.",
        description=(
            "Deploy the retrieval endpoint over an index built by `rayembed index`, then block until "
            "Ctrl-C / SIGTERM. Set $RAYEMBED_API_KEY (or serve.api_key_file) to require "
            "'Authorization: Bearer <key>'. Example:\n"
            "  rayembed serve --config jobs/configs/local/serve.yaml --index-dir runs/demo/index\n"
            "  curl -s localhost:8000/search -d '{\"query\": \"what is faiss\", \"k\": 3}'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--index-dir", help="Index folder to serve (overrides serve.index_dir).")
    p.add_argument("--embedder", help="Query embedder (overrides serve.embedder; default: the index's).")
    p.add_argument("--host", help="Bind address (overrides serve.host; default 127.0.0.1).")
    p.add_argument("--port", type=int, help="HTTP port (overrides serve.port; default 8000).")
    p.add_argument(
        "--detach",
        action="store_true",
        help="Deploy and exit, leaving the app running (only when attached to a running Ray cluster).",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    import ray

    from rayembed.cli import load_from_args
    from rayembed.serving.server import start_server, stop_server

    cfg = load_from_args(args)
    if args.detach and not (cfg.compute.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        raise ValueError(
            "--detach needs a running Ray cluster to leave the endpoint in (set compute.address or "
            "$RAY_ADDRESS, as `ray job submit` does); without one the endpoint would stop on exit."
        )
    url = start_server(cfg, index_dir=args.index_dir, embedder=args.embedder, host=args.host, port=args.port)
    print(f"Serving on {url}  (POST /search, POST /v1/embeddings, GET /v1/models, GET /healthz, /docs)", flush=True)
    if args.detach:
        return 0
    stop = threading.Event()

    def _on_signal(signum, _frame):
        logger.info("Got signal %d; shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        stop_server()
    return 0
