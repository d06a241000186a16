"""Compact vectors benchmark: memory per vector, QPS and recall@10 against float32 Flat.

    python bench/compact.py                       # MiniLM vectors of MS MARCO + 200k random 384-d
    python bench/compact.py --n-random 50000      # a loaded 2-core machine

Representations (rayembed.index.quantize.CompactIndex): float32 Flat, float16, int8 (SQ8),
binary (sign bits of mean-centred vectors, Hamming), binary + rescore and int8 + rescore (top
rescore_k = 4k candidates re-scored with the float32 vectors memory-mapped from disk), and
Matryoshka truncations (first d coordinates, re-normalised; all-MiniLM-L6-v2 was not trained
with nested dims, so these show the cost of truncating an ordinary model).
Queries: the 50 real queries plus 200 passages used as queries. Writes bench/out/compact.json.
Goal: binary + rescore at least 8x smaller than float32 at recall@10 >= 0.95.

The "built" rows go through a real index (``build_index_from_vectors`` -> manifest ->
``ShardedIndex.search``, ``--shards`` shards): ``index.storage`` fp32, sq8 and binary, with
``rescore_k`` = 4k re-scored from the shards' ``.npy`` float copies. ``B/vec`` there is the
shard files per vector (the codes plus the id map's 8-byte ids: what search holds in memory);
``disk B/vec`` adds the float copy. QPS is one thread-pool search of all queries, best of 3;
on a loaded machine it is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO  # sets the environment before Ray or rayembed load

sys.path.insert(0, str(REPO / "tests" / "index"))  # the cached-vector helper the tests use


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def truth_of(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    import faiss

    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    return flat.search(q, k)[1]


def timed(fn, q, reps: int = 3):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn(q)
        best = min(best, time.perf_counter() - t)
    return out, len(q) / best


def run_set(name: str, x: np.ndarray, q: np.ndarray, k: int, tmp: Path, matryoshka: list[int]) -> list[dict]:
    from rayembed.index.quantize import CompactIndex, save_vectors, truncate

    path = save_vectors(x, tmp / f"{name}.npy")
    truth = truth_of(x, q, k)
    rows = []
    for kind, rescore in (("fp32", 0), ("fp16", 0), ("int8", 0), ("int8", 4 * k), ("binary", 0), ("binary", 4 * k),
                          ("binary", 10 * k)):
        idx = CompactIndex.build(path, kind=kind)
        (s, ids), qps = timed(lambda qq, idx=idx, rescore=rescore: idx.search(qq, k, rescore_k=rescore), q)
        label = kind + (f"+rescore{rescore}" if rescore else "")
        rows.append({"set": name, "index": label, "bytes_per_vector": idx.memory_bytes_per_vector(),
                     "x_smaller": 4 * x.shape[1] / idx.memory_bytes_per_vector(), "qps": round(qps),
                     f"recall@{k}": round(recall(ids, truth), 4)})
    for d in matryoshka:
        if d >= x.shape[1]:
            continue
        xt, qt = truncate(x, d), truncate(q, d)
        idx = CompactIndex.build(xt, kind="fp32")
        (s, ids), qps = timed(lambda qq, idx=idx: idx.search(qq, k), qt)
        rows.append({"set": name, "index": f"fp32 first {d} dims", "bytes_per_vector": 4 * d,
                     "x_smaller": x.shape[1] / d, "qps": round(qps), f"recall@{k}": round(recall(ids, truth), 4)})
    return rows


def run_built(name: str, x: np.ndarray, q: np.ndarray, k: int, tmp: Path, shards: int) -> list[dict]:
    """The built-index path: build, open, search, for fp32 and the compact storages with rescoring."""
    from rayembed.index import ShardedIndex, build_index_from_vectors

    truth = truth_of(x, q, k)
    rows = []
    fp32_mem = None
    for storage, rescore in (("fp32", None), ("sq8", 0), ("sq8", 4 * k), ("binary", 0), ("binary", 4 * k)):
        opts = {"storage": storage} if storage == "fp32" else {"storage": storage, "rescore_k": rescore}
        t = time.perf_counter()
        idx = ShardedIndex.open(build_index_from_vectors(x, tmp / f"{name}-{storage}-{rescore}", num_shards=shards,
                                                         **opts))
        build_s = time.perf_counter() - t
        mem = sum(s["bytes"] for s in idx.manifest["shards"]) / idx.ntotal
        disk = mem + sum(s["vectors"]["bytes"] for s in idx.manifest["shards"] if s.get("vectors")) / idx.ntotal
        fp32_mem = fp32_mem or mem
        (s, ids), qps = timed(lambda qq, idx=idx: idx.search(qq, k), q)
        label = f"built {storage}" + (f"+rescore{rescore}" if rescore else "")
        rows.append({"set": name, "index": label, "bytes_per_vector": mem, "disk_bytes_per_vector": disk,
                     "x_smaller": fp32_mem / mem, "qps": round(qps), f"recall@{k}": round(recall(ids, truth), 4),
                     "build_s": round(build_s, 2), "shards": shards})
        idx.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("RAYEMBED_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--n-random", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--shards", type=int, default=2, help="Shards of the built indexes (default 2).")
    args = ap.parse_args()
    from minilm_vectors import minilm_msmarco

    docs, queries = minilm_msmarco(Path(args.data_dir))
    q = np.ascontiguousarray(np.concatenate([queries, docs[::25]]))
    dims = [int(d) for d in args.dims.split(",") if d]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-compact-") as tmp:
        rows += run_set("minilm-msmarco-5k", docs, q, args.k, Path(tmp), dims)
        rows += run_built("minilm-msmarco-5k", docs, q, args.k, Path(tmp), args.shards)
        if args.n_random:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((args.n_random, 384)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            qr = rng.standard_normal((200, 384)).astype(np.float32)
            qr /= np.linalg.norm(qr, axis=1, keepdims=True)
            rows += run_set(f"random-{args.n_random // 1000}k", x, qr, args.k, Path(tmp), dims)
            rows += run_built(f"random-{args.n_random // 1000}k", x, qr, args.k, Path(tmp), args.shards)
    hdr = (f"{'set':<20} {'index':<26} {'B/vec':>7} {'disk B/vec':>10} {'x smaller':>9} {'QPS':>8} "
           f"{'recall@' + str(args.k):>10}")
    print(hdr)
    for r in rows:
        disk = f"{r['disk_bytes_per_vector']:>10.0f}" if "disk_bytes_per_vector" in r else f"{'':>10}"
        print(f"{r['set']:<20} {r['index']:<26} {r['bytes_per_vector']:>7.0f} {disk} {r['x_smaller']:>9.1f} "
              f"{r['qps']:>8} {r[f'recall@{args.k}']:>10.4f}")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compact.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
