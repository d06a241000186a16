"""The Ray Serve retrieval application: its deployments bound together by a typed app builder.

Request path::

    HTTP proxy -> Retriever (FastAPI ingress: auth, limits, validation, FAISS search, id -> text)
                      \\-> QueryEncoder (Embedder, continuous batching: concurrent queries share a forward pass)
                      \\-> LLMRerankerDeployment (only with serve.reranker.path: POST /rerank, model llm)

The package holds one job per module: :mod:`~rayembed.serving.asgi` (HTTP plumbing: middlewares,
admission control, errors), :mod:`~rayembed.serving.encoder` and :mod:`~rayembed.serving.reranker`
(the model deployments), :mod:`~rayembed.serving.retriever` (the ingress and its routes),
:mod:`~rayembed.serving.query` (the one code path of plain and hybrid ``/search``) and this
module, the app builder.

Two deployments, so encoders (the costly part, on GPUs in production) scale apart from the
retrievers that hold the index in memory. The index is not a constructor argument but the
Retriever's ``user_config`` (``{"index_dir": ...}``): redeploying with another index directory
is then a *lightweight* update that calls ``reconfigure`` on the running replicas, which load
the new index beside the old one and swap a single reference. In-flight requests finish on the
index they started with; every response names the index version it was answered from.

Deploy with ``serve deploy serving/serve_config.local.yaml`` (import path
``rayembed.serving.app:build_app``), with ``rayembed serve``, or from Python with
:func:`rayembed.serving.start_server`.
"""

# No ``from __future__ import annotations`` here: Serve reads the builder's annotation at runtime.
import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from rayembed.serving.encoder import ENCODER_NAME, QueryEncoder
from rayembed.serving.reranker import RERANKER_NAME, LLMRerankerDeployment
from rayembed.serving.retriever import RETRIEVER_NAME, Retriever, api

__all__ = [
    "ENCODER_NAME", "RERANKER_NAME", "RETRIEVER_NAME", "LLMRerankerDeployment", "QueryEncoder", "Retriever",
    "ServeArgs", "api", "build_app", "build_app_from_config", "read_index_manifest", "resolve_embedder",
    "resolve_index_dir", "resolve_reranker",
]


# ----------------------------------------------------------------------------- builders


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args:`` of a Serve config file)."""

    config: str | None = Field(None, description="A rayembed YAML recipe; its `serve` section is used.")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides, e.g. serve.max_k=50.")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Config mapping merged over the recipe (as a resolved config would be)."
    )
    index_dir: str | None = Field(None, description="Index folder to serve; overrides serve.index_dir.")
    embedder: str | None = Field(None, description="Embedder folder or name; overrides serve.embedder.")
    index_version: str | None = Field(
        None, description="Manifest version to serve: changing it in a Serve config redeploys an updated index in "
        "the same folder (swap_index sets the Retriever's user_config instead)."
    )


def build_app(args: ServeArgs):
    """Typed Serve app builder: ``import_path: rayembed.serving.app:build_app``."""
    from rayembed.config import RayembedConfig, from_dict, load_config, to_dict

    if isinstance(args, dict):
        args = ServeArgs(**args)
    cfg = load_config(args.config, args.overrides)
    if args.settings:
        cfg = from_dict(RayembedConfig, _merge(to_dict(cfg), args.settings))
    return build_app_from_config(cfg, index_dir=args.index_dir, embedder=args.embedder)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_index_dir(cfg, index_dir: str | os.PathLike | None = None) -> Path | str:
    """The index to serve: the argument, then serve.index_dir, index.output_dir, <run_dir>/index.

    A URI (``s3://bucket/idx``) stays a URI: each replica downloads and verifies it into its own
    node's cache (see :func:`rayembed.index.manifest.local_index_dir`).
    """
    from rayembed.cluster.storage import is_remote

    chosen = str(index_dir or cfg.serve.index_dir or cfg.index.output_dir or Path(cfg.run_dir) / "index")
    if is_remote(chosen):
        return chosen.rstrip("/").removesuffix("/manifest.json")
    path = Path(chosen.removeprefix("file://")).expanduser().resolve()
    return path.parent if path.name == "manifest.json" and path.is_file() else path


def read_index_manifest(index_dir: Path | str) -> dict[str, Any]:
    """The manifest of ``index_dir`` (a folder or a URI), with an error that says how to build one."""
    from rayembed.cluster.storage import is_remote, resolve_storage
    from rayembed.index.manifest import MANIFEST, check_manifest, read_json

    if is_remote(str(index_dir)):
        st = resolve_storage(str(index_dir))
        if not st.exists(MANIFEST):
            raise FileNotFoundError(
                f"No index at {index_dir} (no {MANIFEST}: not built, or its build has not finished). Build one "
                "with `rayembed index` or pass --index-dir / serve.index_dir pointing at an index."
            )
        manifest = json.loads(st.read_bytes(MANIFEST))
        check_manifest(manifest, Path(MANIFEST))
        return manifest
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"No index at {index_dir} (no {MANIFEST}). Build one with `rayembed index` or pass "
            "--index-dir / serve.index_dir pointing at an index folder."
        )
    manifest = read_json(path, what="Index manifest")
    check_manifest(manifest, path)
    return manifest


def resolve_embedder(cfg, manifest: dict[str, Any], embedder: str | None = None) -> str:
    """The query embedder: the argument, then serve.embedder, then the one the index records."""
    chosen = embedder or cfg.serve.embedder
    if chosen:
        p = Path(chosen).expanduser()
        return str(p.resolve()) if p.exists() else str(chosen)
    recorded = (manifest.get("embedder") or {}).get("path")
    if not recorded:
        raise ValueError(
            "The index manifest records no embedder path; set serve.embedder to the embedder the "
            "index was built with."
        )
    return str(recorded)


def build_app_from_config(cfg, *, index_dir: str | os.PathLike | None = None, embedder: str | None = None):
    """Bind QueryEncoder and Retriever from a :class:`RayembedConfig`."""
    from rayembed.config import to_dict

    s = cfg.serve
    idx_dir = resolve_index_dir(cfg, index_dir)
    manifest = read_index_manifest(idx_dir)
    emb = resolve_embedder(cfg, manifest, embedder)
    model_name = s.model_name or Path(emb).name
    # Only settings that do not name the index go into constructor arguments, so that a new
    # index is a user_config change (reconfigure) and never a replica restart.
    settings = to_dict(s)
    settings.update(index_dir=None, embedder=None)
    encoder = QueryEncoder.options(**s.encoder.serve_options()).bind(emb, settings)
    reranker = None
    if s.reranker.path:
        reranker = LLMRerankerDeployment.options(**s.reranker.serve_options()).bind(
            resolve_reranker(s.reranker.path), settings
        )
    # The version makes an updated manifest in the same folder (`rayembed index update`) a new user_config.
    user_config = {"index_dir": str(idx_dir), "version": manifest_version(idx_dir)}
    return Retriever.options(**s.retriever.serve_options(), user_config=user_config).bind(
        encoder, settings, model_name, reranker
    )


def manifest_version(index_dir: str | os.PathLike) -> str:
    """The version an index reports once opened (the hash of its manifest file)."""
    import hashlib

    from rayembed.cluster.storage import is_remote, resolve_storage
    from rayembed.index.manifest import MANIFEST

    if is_remote(str(index_dir)):
        return hashlib.sha256(resolve_storage(str(index_dir)).read_bytes(MANIFEST)).hexdigest()[:16]
    return hashlib.sha256((Path(index_dir) / MANIFEST).read_bytes()).hexdigest()[:16]


def resolve_reranker(path: str) -> str:
    """serve.reranker.path as an absolute folder, or a causal LM name as given; a missing folder fails here."""
    from rayembed.modeling import backbones

    p = Path(path).expanduser()
    if p.exists():
        return str(p.resolve())
    if path in backbones.registered_names() or re.fullmatch(r"[A-Za-z0-9_][\w.-]*(/[\w.-]+)?", path):
        return path  # a registered name or a hub id (org/name)
    raise FileNotFoundError(
        f"serve.reranker.path={path!r} does not exist; point it at a saved reranker folder "
        "(train.mode=rerank writes <train.output_dir>/model) or leave it empty."
    )
