"""The Ray Serve retrieval endpoint: batched query encoding, sharded search, OpenAI embeddings.

Public API::

    from rayembed.serving import start_server, swap_index, stop_server, build_app

    url = start_server(cfg, index_dir="runs/demo/index")   # deploys, waits for /healthz
    swap_index("runs/demo/index-v2")                        # live, via Retriever.reconfigure
    stop_server()

``build_app`` is the typed Serve app builder (``import_path: rayembed.serving.app:build_app``).
:mod:`rayembed.serving.auth` holds the bearer-key check, reusable by any ASGI app.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "build_app": "rayembed.serving.app",
    "build_app_from_config": "rayembed.serving.app",
    "ServeArgs": "rayembed.serving.app",
    "start_server": "rayembed.serving.server",
    "swap_index": "rayembed.serving.server",
    "stop_server": "rayembed.serving.server",
}


def __getattr__(name: str) -> Any:
    # Lazy so that importing rayembed.serving.auth does not import Ray Serve, torch or faiss.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayembed.serving' has no attribute {name!r}")


__all__ = list(_LAZY)
