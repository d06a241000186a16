"""rayembed: train LLM text embedders, build FAISS indexes and serve retrieval, on Ray.

The public surface is small::

    from rayembed import Embedder, load_config
    emb = Embedder.from_pretrained("all-minilm-l6-v2")
    vecs = emb.encode(["a passage"])                       # (1, 384) float32, L2-normalised
    q = emb.encode(["a query"], instruction="Given a web search query, retrieve ...")
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Embedder", "load_config", "__version__"]


def __getattr__(name: str):
    # Lazy: importing rayembed must not import torch (the CLI's --help stays fast).
    if name == "Embedder":
        from rayembed.modeling.embedder import Embedder

        return Embedder
    if name == "load_config":
        from rayembed.config import load_config

        return load_config
    raise AttributeError(name)
