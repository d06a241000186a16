"""Start, swap and stop the retrieval endpoint from Python (used by ``rayembed serve`` and the demo).

The application is deployed declaratively, exactly as ``serve deploy serving/serve_config.*.yaml``
does: import path ``rayembed.serving.app:build_app`` plus arguments. That is what makes
:func:`swap_index` a lightweight update: Serve sees the same code and only a new Retriever
``user_config``, so it calls ``reconfigure`` on the running replicas instead of restarting them.

Example::

    from rayembed.serving import start_server, swap_index, stop_server

    url = start_server(cfg, index_dir="runs/demo/index")      # "http://127.0.0.1:8000"
    httpx.post(url + "/search", json={"query": "what is faiss", "k": 5}).json()
    swap_index("runs/demo/index-v2")                           # no failed requests meanwhile
    stop_server()
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from rayembed.serving.app import RETRIEVER_NAME, manifest_version  # noqa: F401 - public here too

logger = logging.getLogger(__name__)

IMPORT_PATH = "rayembed.serving.app:build_app"

_RUN: dict[str, Any] | None = None


def app_args(cfg, index_dir: str | os.PathLike, embedder: str) -> dict[str, Any]:
    """``args`` for :func:`rayembed.serving.app.build_app`: only what serving needs, no secrets."""
    from rayembed.config import to_dict

    serve_settings = to_dict(cfg.serve)
    reranker = serve_settings.get("reranker") or {}
    if reranker.get("path") and Path(reranker["path"]).expanduser().exists():
        # Replicas may run elsewhere, in another working directory: pass an absolute folder.
        reranker["path"] = str(Path(reranker["path"]).expanduser().resolve())
    return {
        "settings": {"run_dir": cfg.run_dir, "serve": serve_settings},
        "index_dir": str(index_dir),
        "embedder": str(embedder),
    }


def deploy_schema(cfg, index_dir: str | os.PathLike, embedder: str) -> dict[str, Any]:
    """The Serve config (what a ``serve deploy`` YAML holds) of this application."""
    s = cfg.serve
    return {
        "applications": [
            {
                "name": s.app_name,
                "route_prefix": s.route_prefix,
                "import_path": IMPORT_PATH,
                "args": app_args(cfg, index_dir, embedder),
                "logging_config": {"enable_access_log": s.access_log},
            }
        ]
    }


def _apply(schema: dict[str, Any]) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema(**schema))


def _app_status(name: str) -> tuple[str, str]:
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return "NOT_STARTED", ""
    message = app.message or ""
    for dep_name, dep in (app.deployments or {}).items():
        if dep.message:
            message += f" [{dep_name}: {dep.message}]"
    return str(getattr(app.status, "value", app.status)), message


def wait_for_app(name: str, timeout_s: float = 180.0) -> None:
    """Block until the application is RUNNING; raise with Serve's message if it fails."""
    from rayembed.security import redact_text

    deadline = time.monotonic() + timeout_s
    last_log = 0.0
    while True:
        status, message = _app_status(name)
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve application '{name}' failed to deploy: {redact_text(message)}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Serve application '{name}' is still {status} after {timeout_s:.0f} s: {redact_text(message)}"
            )
        if time.monotonic() - last_log > 10:
            logger.info("Waiting for application '%s' (%s)", name, status)
            last_log = time.monotonic()
        time.sleep(0.25)


def _health(base_url: str, timeout: float = 5.0) -> dict[str, Any] | None:
    import httpx

    try:
        r = httpx.get(base_url + "/healthz", timeout=timeout)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def _wait_healthy(base_url: str, timeout_s: float, want_version: str | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        h = _health(base_url)
        if h and (want_version is None or h.get("index_version") == want_version):
            return h
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}/healthz did not report {want_version or 'ok'} within {timeout_s:.0f} s.")
        time.sleep(0.2)


def start_server(
    cfg=None,
    *,
    index_dir: str | os.PathLike | None = None,
    embedder: str | None = None,
    host: str | None = None,
    port: int | None = None,
    timeout_s: float = 300.0,
) -> str:
    """Start (or update) the endpoint and return its base URL once ``/healthz`` answers.

    Attaches to Ray if it is running (or $RAY_ADDRESS is set), else starts a local Ray from
    ``cfg.compute``. ``host``/``port`` override ``cfg.serve``. A Serve instance already running
    in this Ray keeps its own host and port; the returned URL is the one actually in use.
    """
    global _RUN
    import ray

    from rayembed.config import RayembedConfig
    from rayembed.runtime import init_ray
    from rayembed.serving.app import read_index_manifest, resolve_embedder, resolve_index_dir
    from rayembed.serving.auth import resolve_api_key, warn_if_exposed

    cfg = cfg or RayembedConfig()
    changes = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if changes:
        cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, **changes))
    s = cfg.serve
    idx_dir = resolve_index_dir(cfg, index_dir)
    manifest = read_index_manifest(idx_dir)
    emb = resolve_embedder(cfg, manifest, embedder)
    # Resolve the key here too: an unreadable key file fails now, not inside a replica.
    key = resolve_api_key(s.api_key_env, s.api_key_file)
    warn_if_exposed(s.host, key, s.api_key_env)

    started_ray = not ray.is_initialized()
    if started_ray:
        init_ray(cfg.compute)
    # The proxy's own timeout is a backstop a little above the replicas' (which answer 503 first).
    base_url = start_serve_http(s.host, s.port, request_timeout_s=s.request_timeout_s + 10) + s.route_prefix.rstrip("/")
    schema = deploy_schema(cfg, idx_dir, emb)
    t0 = time.perf_counter()
    _apply(schema)
    _RUN = {"cfg": cfg, "schema": schema, "base_url": base_url, "started_ray": started_ray, "index_dir": str(idx_dir)}
    try:
        wait_for_app(s.app_name, timeout_s)
        _wait_healthy(base_url, timeout_s=60.0)
    except Exception:
        stop_server()
        raise
    logger.info(
        "Endpoint up at %s in %.1f s (index %s, embedder %s, API key %s)",
        base_url, time.perf_counter() - t0, idx_dir, emb, "required" if key else "off",
    )
    return base_url


def start_serve_http(host: str, port: int, request_timeout_s: float | None = None) -> str:
    """Start Serve's HTTP proxy on host:port, or join the one already running in this Ray.

    Returns the ``http://host:port`` where requests actually reach Serve: Serve keeps the HTTP
    options it was first started with, so an app added later lives on that port, not ``port``.
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    options: dict[str, Any] = {"host": host, "port": port}
    if request_timeout_s is not None:
        options["request_timeout_s"] = request_timeout_s
    serve.start(http_options=options)
    http = _get_global_client().http_config
    if (http.host, http.port) != (host, port):
        logger.warning(
            "Serve is already running in this Ray on %s:%s; serving there instead of %s:%s.",
            http.host, http.port, host, port,
        )
    url_host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return f"http://{url_host}:{http.port}"


def swap_index(index_dir: str | os.PathLike, timeout_s: float = 300.0) -> str:
    """Point the running endpoint at another index; returns its version once served.

    The new manifest is checked here first (same embedder as the one being served), so a
    mistaken swap fails in the caller, not in the replicas.
    """
    from rayembed.index.manifest import same_embedder
    from rayembed.serving.app import read_index_manifest

    if _RUN is None:
        raise RuntimeError("No endpoint started by start_server() in this process; start one first.")
    from rayembed.cluster.storage import is_remote

    if is_remote(str(index_dir)):
        new_dir: Path | str = str(index_dir).rstrip("/").removesuffix("/manifest.json")
    else:
        new_dir = Path(index_dir).expanduser().resolve()
        if new_dir.name == "manifest.json" and new_dir.is_file():
            new_dir = new_dir.parent
    new = read_index_manifest(new_dir)
    old = read_index_manifest(_RUN["index_dir"] if is_remote(str(_RUN["index_dir"])) else Path(_RUN["index_dir"]))
    if not same_embedder(old["embedder"], new["embedder"]):
        raise ValueError(
            f"Index {new_dir} was built with embedder {new['embedder'].get('path')}, but the endpoint "
            f"encodes queries with {old['embedder'].get('path')}; their vectors are not comparable. "
            "Restart the endpoint with the new index instead of swapping."
        )
    version = manifest_version(new_dir)
    schema = _RUN["schema"]
    app = schema["applications"][0]
    # Only the Retriever's user_config changes (its version too: an updated manifest in the same
    # folder is still a swap). With the app's args untouched Serve applies it as an override,
    # without running the app builder again, and calls reconfigure on the running replicas.
    app["deployments"] = [{"name": RETRIEVER_NAME, "user_config": {"index_dir": str(new_dir), "version": version}}]
    name = app["name"]
    t0 = time.perf_counter()
    _apply(schema)
    _wait_healthy(_RUN["base_url"], timeout_s, want_version=version)
    wait_for_app(name, timeout_s)
    _RUN["index_dir"] = str(new_dir)
    logger.info("Swapped to index %s (version %s) in %.1f s", new_dir, version, time.perf_counter() - t0)
    return version


def stop_server() -> None:
    """Delete the application; shut Serve and Ray down too if :func:`start_server` started Ray."""
    global _RUN
    import ray
    from ray import serve

    run, _RUN = _RUN, None
    if run is None or not ray.is_initialized():
        return
    name = run["schema"]["applications"][0]["name"]
    try:
        if run["started_ray"]:
            serve.shutdown()
        else:
            serve.delete(name)
    finally:
        if run["started_ray"]:
            ray.shutdown()
    logger.info("Endpoint %s stopped", run["base_url"])


def current() -> dict[str, Any] | None:
    """What :func:`start_server` started in this process (base_url, index_dir), or None."""
    return None if _RUN is None else {"base_url": _RUN["base_url"], "index_dir": _RUN["index_dir"]}
