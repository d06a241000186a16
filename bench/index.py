"""Index benchmark: Ray Data encoding vs in-process, search QPS/recall per index type, sharding cost.

    python bench/index.py                         # full sizes (1M random vectors)
    python bench/index.py --n-random 200000 --encode-docs 1000   # a loaded 2-core machine

Prints three comparisons and writes bench/out/index.json:
1. Encoding: docs/s of the Ray Data pipeline (one 1-CPU actor per core) against in-process
   ``Embedder.encode`` on all cores, same model: all-MiniLM-L6-v2 on the MS MARCO subset, and a
   LoRA SmolLM2-135M (merged once at load in the actors) on a slice of it. End to end includes
   actor start-up; steady state counts from the first batch back (goals: 0.7x and 0.85x).
2. Search: queries/s and recall@10 of Flat, IVF and HNSW against numpy brute force, on random
   384-d vectors and on real MiniLM vectors of the MS MARCO subset (5,000 passages: the real
   corpus available offline; its 50 real queries).
3. Sharding: searching 8 shards against 1 index of the same vectors (goal: at most 1.3x).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAYEMBED_CACHE", str(REPO / ".cache" / "rayembed"))

logger = logging.getLogger("bench.index")
MODEL = "all-minilm-l6-v2"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact top-k by numpy, in query chunks; returns ids and queries/s."""
    t = time.perf_counter()
    out = []
    for i in range(0, len(q), 64):
        s = q[i : i + 64] @ x.T  # (64, n)
        top = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out), len(q) / (time.perf_counter() - t)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def timed_search(idx, q: np.ndarray, k: int, repeat: int = 3, **params) -> tuple[np.ndarray, float]:
    idx.search(q[:8], k, **params)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        _, ids = idx.search(q, k, **params)
        best = min(best, time.perf_counter() - t)
    return ids, len(q) / best


# ----------------------------------------------------------------------------- 1. encoding


def _lora_smollm2(work: Path) -> str:
    """A SmolLM2-135M embedder with a LoRA adapter on every layer, saved as training saves it."""
    from rayembed.config.model import LoRAConfig
    from rayembed.modeling.embedder import Embedder

    path = work / "smollm2-lora"
    if not (path / "embedder_config.json").is_file():
        emb = Embedder.from_pretrained("smollm2-135m", lora=LoRAConfig(enabled=True, r=16, alpha=32, dropout=0.0))
        emb.save_pretrained(path)
    return str(path)


def bench_encoding(data_dir: Path, n_docs: int, work: Path, *, lora_docs: int = 300) -> dict:
    """Ray Data (actor pool sized to the machine) against in-process Embedder.encode, same model.

    End to end includes actor start-up (model load); steady state counts from the first batch
    that comes back to the last. MiniLM on ``n_docs`` passages; a LoRA SmolLM2 (merged once at
    load in the actors, as in the index build; unmerged in process, as ``from_pretrained`` loads
    it) on ``lora_docs``, since it encodes a few passages a second on 2 cores.
    """
    import ray

    from rayembed.config import ComputeConfig, load_config
    from rayembed.index.corpus import encode_text
    from rayembed.index.ray_build import _encode_dataset, _ordered, embedder_args
    from rayembed.modeling.embedder import Embedder
    from rayembed.runtime import init_ray

    rows_all = [json.loads(line) for line in (data_dir / "msmarco-subset/corpus.jsonl").open()]
    cores = os.cpu_count() or 1
    results: dict = {}
    for label, model, n, max_len in (("all-minilm-l6-v2", MODEL, n_docs, 256),
                                     ("smollm2-135m-lora", _lora_smollm2(work), lora_docs, 128)):
        rows = rows_all[:n]
        texts = [encode_text(r["text"], r.get("title"), True) for r in rows]
        import torch

        torch.set_num_threads(cores)
        emb = Embedder.from_pretrained(model, max_length=max_len)
        emb.encode(texts[:16], batch_size=16, show_progress=False)  # warm-up
        t = time.perf_counter()
        ref = emb.encode(texts, batch_size=32, show_progress=False)
        inproc = len(texts) / (time.perf_counter() - t)
        del emb
        cfg = load_config(None, [
            f"model.name_or_path={model}", f"index.encode.min_actors={cores}", f"index.encode.max_actors={cores}",
            "index.encode.num_cpus_per_actor=1", "index.encode.batch_size=32",
            f"index.encode.rows_per_block={max(32, len(rows) // (4 * cores))}", f"index.encode.max_length={max_len}",
        ])
        tmp = tempfile.mkdtemp(prefix="rayb", dir="/tmp")
        init_ray(ComputeConfig(num_cpus=cores + 1, object_store_memory_mb=256, temp_dir=tmp, log_to_driver=False))
        try:
            name, kw = embedder_args(cfg)
            import pyarrow as pa

            ds = ray.data.from_arrow(pa.table({"id": np.arange(len(rows)), "text": [r["text"] for r in rows],
                                               "title": [r.get("title") or "" for r in rows]}))
            t = time.perf_counter()
            got_ids, got, t_first, first_rows = [], [], None, 0
            with _ordered():
                for b in _encode_dataset(ds, cfg, name, kw).iter_batches(batch_size=None, batch_format="numpy"):
                    if t_first is None:
                        t_first, first_rows = time.perf_counter(), len(b["id"])
                    got_ids.append(b["id"])
                    got.append(b["vector"])
            end = time.perf_counter()
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
        order = np.argsort(np.concatenate(got_ids))
        vecs = np.concatenate(got)[order]
        e2e = len(texts) / (end - t)
        steady = (len(texts) - first_rows) / max(end - t_first, 1e-9)
        max_diff = float(np.abs(vecs - ref).max())
        print(f"[encode:{label}] {len(texts)} docs: in-process {inproc:.1f} docs/s ({cores} threads); Ray Data "
              f"{cores} actors x 1 CPU: end to end {e2e:.1f} docs/s ({e2e / inproc:.2f}x), steady state "
              f"{steady:.1f} docs/s ({steady / inproc:.2f}x); max |diff| {max_diff:.2e}")
        results[label] = {"docs": len(texts), "in_process_docs_per_s": inproc, "ray_end_to_end_docs_per_s": e2e,
                          "ray_steady_docs_per_s": steady, "end_to_end_ratio": e2e / inproc,
                          "steady_ratio": steady / inproc, "max_abs_diff": max_diff}
    return results


# ----------------------------------------------------------------------------- 2. search


def bench_search(name: str, x: np.ndarray, q: np.ndarray, work: Path, k: int = 10) -> dict:
    from rayembed.index import ShardedIndex, build_index_from_vectors

    truth, bf_qps = brute(x, q, k)
    res = {"n": len(x), "dim": x.shape[1], "queries": len(q), "brute_force_qps": bf_qps, "types": {}}
    print(f"[search:{name}] n={len(x)} d={x.shape[1]} queries={len(q)}: numpy brute force {bf_qps:.0f} q/s")
    configs = [
        ("flat", {}, {}),
        ("ivf_flat", {}, {"nprobe": 16}),
        ("ivf_flat", {}, {"nprobe": 64}),
        ("hnsw", {"hnsw_m": 32, "ef_construction": 80}, {"ef_search": 128}),
    ]
    built = {}
    for itype, opts, params in configs:
        key = (itype, tuple(sorted(opts.items())))
        if key not in built:
            t = time.perf_counter()
            out = work / f"{name}-{itype}"
            docs = [{"id": str(i), "text": "d"} for i in range(len(x))]
            built[key] = ShardedIndex.open(build_index_from_vectors(x, out, docs=docs, index_type=itype, **opts),
                                           verify=False)
            build_s = time.perf_counter() - t
        idx = built[key]
        ids, qps = timed_search(idx, q, k, **params)
        r = recall_at(ids, truth)
        label = f"{itype}" + "".join(f" {a}={b}" for a, b in params.items())
        res["types"][label] = {"qps": qps, "recall_at_10": r, "build_s": build_s, "factory": idx.manifest["factory"]}
        print(f"[search:{name}] {label:<22} {idx.manifest['factory']:<14} {qps:9.0f} q/s  recall@10 {r:.3f}  "
              f"(build {build_s:.1f}s)")
    return res


# ----------------------------------------------------------------------------- 3. sharding


def per_query(idx, q: np.ndarray, k: int, params: dict) -> float:
    """Queries/s when queries arrive one at a time (the serving case)."""
    t = time.perf_counter()
    for row in q:
        idx.search(row[None], k, **params)
    return len(q) / (time.perf_counter() - t)


def bench_sharding(x: np.ndarray, q: np.ndarray, work: Path, k: int = 10) -> dict:
    from rayembed.index import ShardedIndex, build_index_from_vectors

    res = {"n": len(x), "queries": len(q)}
    docs = [{"id": str(i), "text": "d"} for i in range(len(x))]
    for itype, params in (("flat", {}), ("ivf_flat", {"nprobe": 16}), ("hnsw", {"ef_search": 128})):
        one = ShardedIndex.open(build_index_from_vectors(x, work / f"s1-{itype}", docs=docs, index_type=itype), verify=False)
        eight = ShardedIndex.open(
            build_index_from_vectors(x, work / f"s8-{itype}", docs=docs, index_type=itype, num_shards=8), verify=False
        )
        out = {}
        for batch in (len(q), 1):
            qq = q if batch > 1 else q[:50]
            if batch == 1:
                qps1, qps8 = per_query(one, qq, k, params), per_query(eight, qq, k, params)
            else:
                _, qps1 = timed_search(one, qq, k, **params)
                _, qps8 = timed_search(eight, qq, k, **params)
            ratio = qps1 / qps8
            label = "batch" if batch > 1 else "single"
            out[label] = {"qps_1_shard": qps1, "qps_8_shards": qps8, "cost_ratio": ratio}
            print(f"[shard] {itype:<8} {label:<6} queries: 1 index {qps1:8.0f} q/s, 8 shards {qps8:8.0f} q/s, "
                  f"cost {ratio:.2f}x {'(goal <= 1.3x: met)' if ratio <= 1.3 else '(goal <= 1.3x: missed)'}")
        res[itype] = out
    return res


# ----------------------------------------------------------------------------- main


def vectors_of_flat_index(path: Path) -> np.ndarray:
    """The stored vectors of a flat fp32 rayembed index, in global-id order."""
    import faiss

    from rayembed.index import ShardedIndex

    idx = ShardedIndex.open(path)
    if idx.manifest["factory"] != "Flat":
        raise ValueError(f"{path} is a {idx.manifest['factory']} index; --real-index needs a flat fp32 one.")
    out = np.zeros((idx.ntotal, idx.dim), np.float32)
    for shard in idx.shards:
        idmap = faiss.downcast_index(shard)
        out[faiss.vector_to_array(idmap.id_map)] = faiss.downcast_index(idmap.index).reconstruct_n(0, shard.ntotal)
    return out


def msmarco_vectors(data_dir: Path, cache: Path, real_index: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MiniLM vectors of the 5,000 MS MARCO passages and 50 queries (encoded once, cached).

    ``real_index``: a flat index of the subset built by ``rayembed index`` with all-MiniLM-L6-v2,
    whose stored vectors are reused instead of encoding the corpus again.
    """
    path = cache / "msmarco-minilm.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        return z["docs"], z["queries"]
    from rayembed.index.corpus import encode_text
    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(MODEL)
    queries = [json.loads(line)["text"] for line in (data_dir / "msmarco-subset/queries.jsonl").open()]
    if real_index:
        docs = vectors_of_flat_index(Path(real_index))
    else:
        rows = [json.loads(line) for line in (data_dir / "msmarco-subset/corpus.jsonl").open()]
        docs = emb.encode([encode_text(r["text"], r.get("title"), True) for r in rows], batch_size=64)
    qv = emb.encode(queries)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, docs=docs, queries=qv)
    return docs, qv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-random", type=int, default=1_000_000, help="Random 384-d vectors (default 1M).")
    p.add_argument("--queries", type=int, default=1000, help="Random queries (default 1000).")
    p.add_argument("--encode-docs", type=int, default=5000, help="MS MARCO passages for the MiniLM encoding figure.")
    p.add_argument("--lora-docs", type=int, default=300, help="Passages for the LoRA SmolLM2 encoding figure.")
    p.add_argument("--shard-n", type=int, default=200_000, help="Vectors in the sharding comparison.")
    p.add_argument("--real-index", help="A flat MiniLM index of the MS MARCO subset to take real vectors from.")
    p.add_argument("--skip", nargs="*", default=[], choices=["encode", "random", "real", "shard"])
    p.add_argument("--out", default=str(REPO / "bench/out/index.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from rayembed.io import atomic_write_json
    from rayembed.runtime import cache_dir, resolve_data_dir

    data_dir = resolve_data_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    results: dict = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}, "args": vars(args)}
    try:
        if "encode" not in args.skip:
            results["encoding"] = bench_encoding(data_dir, args.encode_docs, work, lora_docs=args.lora_docs)
        rng = np.random.default_rng(0)
        if "random" not in args.skip:
            x = unit(rng.standard_normal((args.n_random, 384), dtype=np.float32))
            q = unit(rng.standard_normal((args.queries, 384), dtype=np.float32))
            results["search_random"] = bench_search("random", x, q, work)
            del x
        if "real" not in args.skip:
            docs, queries = msmarco_vectors(data_dir, cache_dir() / "bench", args.real_index)
            results["search_msmarco_minilm"] = bench_search("msmarco-minilm", docs, queries, work)
        if "shard" not in args.skip:
            x = unit(rng.standard_normal((args.shard_n, 384), dtype=np.float32))
            q = unit(rng.standard_normal((args.queries, 384), dtype=np.float32))
            results["sharding"] = bench_sharding(x, q, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    if args.skip and Path(args.out).exists():
        # A partial run (--skip) updates its own sections and keeps the others.
        old = json.loads(Path(args.out).read_text())
        results = {**old, **results, "runs": [*old.get("runs", [old.get("args")]), vars(args)]}
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
