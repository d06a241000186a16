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
3. Sharding: 8 shards against 1 index of the same vectors at equal recall@10 (goal: at most 1.3x
   the cost). On random vectors: flat, IVF (shards share one quantizer) and HNSW, whose 8 shards
   are searched at the ``ef_search`` of a sweep that reaches the single index's recall. On real
   MiniLM vectors (the MS MARCO subset, and a 100k corpus made from it, see ``expanded_corpus``):
   IVF and HNSW at the smallest nprobe / ef_search reaching recall@10 >= 0.95 against brute force.
   Timings are the best of 3 interleaved rounds; ``--threads 1`` on a shared, busy machine.

    python bench/index.py --skip encode random real --shard-n 100000 --threads 1   # sharding only
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
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from _common import REPO  # sets the environment before Ray or rayembed load

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


HNSW_EFS = (10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512)
NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TARGET_RECALL = 0.95
ROUNDS = 3


def per_query(idx, q: np.ndarray, k: int, params: dict) -> float:
    """Queries/s when queries arrive one at a time (the serving case)."""
    t = time.perf_counter()
    for row in q:
        idx.search(row[None], k, **params)
    return len(q) / (time.perf_counter() - t)


def race(contenders: dict[str, tuple[object, dict]], q: np.ndarray, k: int, *, single: np.ndarray,
         rounds: int = ROUNDS) -> dict[str, dict[str, float]]:
    """Batch and single-query q/s of each ``name: (index, search params)``, best of ``rounds``.

    The rounds are interleaved (every contender once per round) so that the load of a shared
    machine falls on all of them alike; the best round is the least disturbed one.
    """
    out = {name: {"batch_qps": 0.0, "single_qps": 0.0} for name in contenders}
    for idx, params in contenders.values():
        idx.search(q[:8], k, **params)  # warm-up
    for _ in range(rounds):
        for name, (idx, params) in contenders.items():
            t = time.perf_counter()
            idx.search(q, k, **params)
            out[name]["batch_qps"] = max(out[name]["batch_qps"], len(q) / (time.perf_counter() - t))
            out[name]["single_qps"] = max(out[name]["single_qps"], per_query(idx, single, k, params))
    return out


@contextmanager
def omp_threads(n: int):
    """FAISS's OpenMP threads set to ``n`` inside the block (0: left as they are)."""
    import faiss

    old = faiss.omp_get_max_threads()
    if n:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def recall_of(idx, q: np.ndarray, truth: np.ndarray, k: int, params: dict) -> float:
    return recall_at(idx.search(q, k, **params)[1], truth)


def smallest_reaching(idx, q: np.ndarray, truth: np.ndarray, k: int, name: str, values, target: float
                      ) -> tuple[dict, float, bool]:
    """The first of ``values`` (increasing) whose recall@k reaches ``target``: (params, recall, reached);
    the last value and its recall where none does."""
    r = 0.0
    for v in values:
        r = recall_of(idx, q, truth, k, {name: v})
        if r >= target:
            return {name: v}, r, True
    return {name: values[-1]}, r, False


def _build_pair(x: np.ndarray, work: Path, tag: str, itype: str, shards: int = 8):
    from rayembed.index import ShardedIndex, build_index_from_vectors

    docs = [{"id": str(i), "text": "d"} for i in range(len(x))]
    t = time.perf_counter()
    one = ShardedIndex.open(build_index_from_vectors(x, work / f"{tag}-1-{itype}", docs=docs, index_type=itype),
                            verify=False)
    many = ShardedIndex.open(build_index_from_vectors(x, work / f"{tag}-{shards}-{itype}", docs=docs,
                                                      index_type=itype, num_shards=shards), verify=False)
    return one, many, time.perf_counter() - t


def _setting(params: dict) -> str:
    return ", ".join(f"{a} {b}" for a, b in params.items()) or "exact"


TABLE_HEAD = (f"  {'type':<9}{'1 index':<15}{'8 shards':<15}{'recall@10 1/8':<15}{'batch q/s 1 / 8':<21}{'cost':<7}"
              f"{'single q/s 1 / 8':<19}{'cost':<6}")


def _row(itype: str, p1: dict, p8: dict, r1: float, r8: float, speed: dict, note: str = "") -> dict:
    a, b = speed["1"], speed["8"]
    cb, cs = a["batch_qps"] / b["batch_qps"], a["single_qps"] / b["single_qps"]
    recall = f"{r1:.3f} / {r8:.3f}"
    batch_qps = f"{a['batch_qps']:.0f} / {b['batch_qps']:.0f}"
    single_qps = f"{a['single_qps']:.0f} / {b['single_qps']:.0f}"
    print(f"  {itype:<9}{_setting(p1):<15}{_setting(p8):<15}{recall:<15}{batch_qps:<21}{f'{cb:.2f}x':<7}"
          f"{single_qps:<19}{f'{cs:.2f}x':<6}{note}")
    return {"params_1": p1, "params_8": p8, "recall_1": r1, "recall_8": r8, "qps_1": a, "qps_8": b,
            "cost_batch": cb, "cost_single": cs}


def bench_sharding(x: np.ndarray, q: np.ndarray, work: Path, k: int = 10, *, single: int = 200, threads: int = 0
                   ) -> dict:
    """8 shards against 1 index of the same random vectors, at equal recall@10 (goal: cost <= 1.3x).

    Flat and IVF are compared at the same setting (IVF shards share one quantizer: each query is
    assigned to its lists once and every shard scans its own, the same results). HNSW shards each
    search a graph of their own, and 8 graphs at one ``ef_search`` find more than one graph does:
    the 8 shards are compared at the smallest ``ef_search`` of a sweep whose recall@10 reaches the
    single index's (and, for reference, at the same ``ef_search``).
    """
    truth, bf_qps = brute(x, q, k)
    res: dict = {"n": len(x), "dim": x.shape[1], "queries": len(q), "brute_force_qps": bf_qps, "rounds": ROUNDS,
                 "single_queries": single, "faiss_threads": threads or "all", "types": {}}
    print(f"[shard:random] n={len(x)} d={x.shape[1]} queries={len(q)}; recall@10 against numpy brute force; q/s: best "
          f"of {ROUNDS} interleaved rounds, batch = all queries in one call, single = one query a call (first "
          f"{single}); faiss threads: {threads or 'all'}; cost = 1-index q/s / 8-shard q/s (goal <= 1.3x)")
    print(TABLE_HEAD)
    for itype, params in (("flat", {}), ("ivf_flat", {"nprobe": 16}), ("hnsw", {"ef_search": 128})):
        one, eight, build_s = _build_pair(x, work, "rand", itype)
        with omp_threads(threads):
            r1 = recall_of(one, q, truth, k, params)
            r8 = recall_of(eight, q, truth, k, params)
            contenders = {"1": (one, params), "8": (eight, params)}
            if itype == "hnsw":
                p8, r8eq, _ = smallest_reaching(eight, q, truth, k, "ef_search", HNSW_EFS, r1)
                contenders["8eq"] = (eight, p8)
            speed = race(contenders, q, k, single=q[:single])
        if itype == "hnsw":
            out = {"same_ef": _row(itype, params, params, r1, r8, speed, "  same ef_search"),
                   "equal_recall": _row(itype, params, p8, r1, r8eq, {"1": speed["1"], "8": speed["8eq"]},
                                        "  equal recall")}
        else:
            out = {"equal_recall": _row(itype, params, params, r1, r8, speed)}
        res["types"][itype] = {**out, "build_s": build_s}
        del one, eight
    return res


def expanded_corpus(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors made from the real ones in ``x``: ``x`` itself, then half of the rest
    perturbed copies (a random row plus Gaussian noise of norm 0.5, re-normalised: cosine about 0.89
    to its source) and half sums of two random rows, re-normalised."""
    rng = np.random.default_rng(seed)
    extra = n - len(x)
    copies, pairs = extra // 2, extra - extra // 2
    noise = rng.standard_normal((copies, x.shape[1]), dtype=np.float32)
    noise *= 0.5 / np.linalg.norm(noise, axis=1, keepdims=True)
    a = x[rng.integers(0, len(x), copies)] + noise
    b = x[rng.integers(0, len(x), pairs)] + x[rng.integers(0, len(x), pairs)]
    return np.concatenate([x, unit(a), unit(b)])


def bench_sharding_real(name: str, x: np.ndarray, q: np.ndarray, work: Path, k: int = 10, *, batch: int = 1000,
                        single: int = 200, threads: int = 0) -> dict:
    """Real vectors: flat, IVF (nprobe sweep) and HNSW (ef_search sweep), 1 index and 8 shards, each
    at the smallest setting whose recall@10 against brute force reaches 0.95, and its q/s there.

    The real queries are few (50): recall is taken over them; the timing repeats them (tiled to
    ``batch`` rows for a batch, ``single`` one-query calls)."""
    truth, bf_qps = brute(x, q, k)
    qb = np.tile(q, (-(-batch // len(q)), 1))[:batch]
    qs = np.tile(q, (-(-single // len(q)), 1))[:single]
    res: dict = {"n": len(x), "dim": x.shape[1], "queries": len(q), "brute_force_qps": bf_qps, "rounds": ROUNDS,
                 "target_recall": TARGET_RECALL, "faiss_threads": threads or "all", "types": {}}
    print(f"[shard:{name}] n={len(x)} d={x.shape[1]} real queries={len(q)}; each at the smallest setting of a sweep "
          f"reaching recall@10 >= {TARGET_RECALL} against brute force; q/s: best of {ROUNDS} interleaved rounds, "
          f"queries tiled to {batch} (batch) and {single} one-query calls (single); faiss threads: "
          f"{threads or 'all'}; numpy brute force {bf_qps:.0f} q/s")
    print(TABLE_HEAD)
    for itype, pname, values in (("flat", None, None), ("ivf_flat", "nprobe", NPROBES), ("hnsw", "ef_search", HNSW_EFS)):
        one, eight, build_s = _build_pair(x, work, name, itype)
        with omp_threads(threads):
            if pname is None:
                p1 = p8 = {}
                r1, r8 = recall_of(one, q, truth, k, {}), recall_of(eight, q, truth, k, {})
                ok1 = ok8 = True
            else:
                if pname == "nprobe":
                    nlist = int(one.spec.nlist)
                    values = tuple(v for v in values if v < nlist) + (nlist,)
                p1, r1, ok1 = smallest_reaching(one, q, truth, k, pname, values, TARGET_RECALL)
                p8, r8, ok8 = smallest_reaching(eight, q, truth, k, pname, values, TARGET_RECALL)
            speed = race({"1": (one, p1), "8": (eight, p8)}, qb, k, single=qs)
        note = "" if ok1 and ok8 else "  (target not reached by the sweep)"
        res["types"][itype] = {**_row(itype, p1, p8, r1, r8, speed, note), "build_s": build_s}
        del one, eight
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
    p.add_argument("--threads", type=int, default=0,
                   help="FAISS (OpenMP) threads for the sharding searches; 0: all cores. On a shared, busy "
                   "machine 1 measures the work itself: two OpenMP threads on oversubscribed cores wait on "
                   "each other at every barrier, and single queries slow down 5-20x.")
    p.add_argument("--expanded-n", type=int, default=100_000,
                   help="Vectors of the corpus made from the MS MARCO MiniLM vectors (see expanded_corpus).")
    p.add_argument("--skip", nargs="*", default=[], choices=["encode", "random", "real", "shard", "shard-real"])
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
            results["sharding"] = bench_sharding(x, q, work, threads=args.threads)
            del x
        if "shard-real" not in args.skip:
            docs, queries = msmarco_vectors(data_dir, cache_dir() / "bench", args.real_index)
            results["sharding_msmarco_minilm"] = bench_sharding_real("msmarco-minilm", docs, queries, work,
                                                                     threads=args.threads)
            big = expanded_corpus(docs, args.expanded_n)
            results["sharding_msmarco_expanded"] = bench_sharding_real(f"msmarco-{len(big) // 1000}k", big, queries,
                                                                       work, threads=args.threads)
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
