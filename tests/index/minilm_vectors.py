"""all-MiniLM-L6-v2 vectors of the MS MARCO subset (5,000 passages, 50 queries), cached on disk.

Encoding all 5,000 takes about half a minute on 2 idle CPU cores; the cache (under $RAYEMBED_CACHE) is keyed by
the corpus file's size and modification time, so later runs load it in milliseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def minilm_msmarco(data_dir: Path, n_docs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(docs (n_docs or 5000, 384), queries (50, 384)) float32 unit vectors, title + text as the
    index encodes them; ``n_docs`` takes the corpus's first passages."""
    root = Path(data_dir) / "msmarco-subset"
    st = (root / "corpus.jsonl").stat()
    cache = Path(os.environ.get("RAYEMBED_CACHE", Path.home() / ".cache" / "rayembed")) / "vectors"
    path = cache / f"minilm-msmarco-{st.st_size}-{st.st_mtime_ns}{f'-{n_docs}' if n_docs else ''}.npz"
    if path.is_file():
        z = np.load(path)
        return z["docs"], z["queries"]
    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained("all-minilm-l6-v2")
    docs = [json.loads(line) for line in (root / "corpus.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
    docs = docs[:n_docs] if n_docs else docs
    queries = [json.loads(line) for line in (root / "queries.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
    texts = [f"{d.get('title') or ''} {d['text']}".strip() for d in docs]
    d = np.asarray(emb.encode(texts, batch_size=64, show_progress=False), dtype=np.float32)
    q = np.asarray(emb.encode([x["text"] for x in queries], show_progress=False), dtype=np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, docs=d, queries=q)
    os.replace(tmp, path)
    return d, q
