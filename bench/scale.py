"""Scale benchmark: index builds of growing corpora on a local multi-node Ray with S3 storage.

    python bench/scale.py                          # 10k, 50k and 200k documents
    python bench/scale.py --sizes 10000 50000      # fewer

A head and two worker nodes (``ray.cluster_utils.Cluster``, 1 CPU each, a ``worker`` resource on
the workers) share nothing but an S3 server on 127.0.0.1 (moto, in its own process). For each size
the corpus (short documents, JSONL files of 10k) is put in the bucket and a **fresh driver
process** builds the index with a tiny embedder (``tiny-llama`` published to the bucket), encoder
actors pinned to the worker nodes, shards of 5k documents, output in the bucket. Printed per size:
docs/s, the driver's peak RSS, the records and bytes the driver received from Ray (recorded in the
manifest), and how many documents each node encoded.

Goal: the driver's peak RSS grows by less than 10% from 10k to 200k documents, and every worker
node encodes a share. Writes bench/out/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO  # sets the environment before Ray or rayembed load

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
BUCKET = "rayembed-bench"
WORDS = ["wing", "lift", "bread", "oven", "chess", "rook", "river", "delta", "engine", "valve", "stone", "glass"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process, so that the driver's memory is the driver's alone."""
    port = _free_port()
    code = ("import logging,time;logging.getLogger('werkzeug').setLevel(logging.ERROR);"
            "from moto.server import ThreadedMotoServer as S;"
            f"s=S(ip_address='127.0.0.1',port={port},verbose=False);s.start();time.sleep(10**6)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the S3 server did not start")


def put_corpus(prefix: str, n: int, per_file: int = 10_000) -> None:
    from rayembed.cluster.storage import resolve_storage

    st = resolve_storage(prefix)
    for k, start in enumerate(range(0, n, per_file)):
        lines = []
        for i in range(start, min(n, start + per_file)):
            lines.append(json.dumps({"_id": f"d{i}", "text": f"{WORDS[i % 12]} {WORDS[(i * 7) % 12]} note {i} "
                                     f"on {WORDS[(i * 5) % 12]} and {WORDS[(i * 11) % 12]}"}))
        st.write_bytes(f"part-{k:04d}.jsonl", ("\n".join(lines) + "\n").encode())


def driver(args: argparse.Namespace) -> None:
    """One build, in this (fresh) process; prints a JSON line with its figures."""
    from rayembed.config import load_config
    from rayembed.index import build_index
    from rayembed.runtime import setup_logging

    setup_logging("WARNING")
    cfg = load_config(None, [
        f"run_dir={args.run}", f"index.embedder={args.embedder}", f"index.corpus={args.run}/corpus",
        f"index.output_dir={args.run}/index", "index.shard_size=5000", "index.encode.min_actors=2",
        "index.encode.max_actors=2", "index.encode.num_cpus_per_actor=1", "index.encode.batch_size=512",
        "index.encode.max_length=24", "index.encode.resources_per_actor={worker: 1}", f"compute.address={args.address}",
        "compute.log_to_driver=false",
    ])
    t = time.perf_counter()
    manifest_uri = build_index(cfg)
    wall = time.perf_counter() - t
    from rayembed.cluster.storage import resolve_storage

    m = resolve_storage(args.run + "/index").read_json("manifest.json")
    print("RESULT " + json.dumps({
        "docs": m["ntotal"], "shards": m["num_shards"], "wall_s": wall, "docs_per_s": m["ntotal"] / wall,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "driver_received": m["build"]["driver_received"], "docs_per_node": m["build"]["docs_per_node"],
        "manifest": manifest_uri,
    }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--embedder", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        driver(args)
        return

    s3, url = start_s3()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"})
    import boto3
    from ray.cluster_utils import Cluster

    from rayembed.cluster.storage import publish_folder
    from rayembed.modeling.embedder import Embedder

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    tmp = Path(tempfile.mkdtemp(prefix="scale", dir="/tmp"))
    Embedder.from_pretrained("tiny-llama", max_length=64).save_pretrained(tmp / "tiny")
    embedder = f"s3://{BUCKET}/models/tiny-llama"
    publish_folder(tmp / "tiny", embedder)
    mem = 300 * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": mem,
                                                             "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=mem, resources={"worker": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    names = {n.node_id: f"worker-{i + 1}" for i, n in enumerate(workers)}
    rows = []
    try:
        for n in args.sizes:
            run = f"s3://{BUCKET}/scale-{n}"
            put_corpus(f"{run}/corpus", n)
            print(f"[scale] {n} documents: building ...", flush=True)
            res = subprocess.run([sys.executable, __file__, "--driver", "--run", run, "--embedder", embedder,
                                  "--address", cluster.address], capture_output=True, text=True)
            line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
            if res.returncode != 0 or line is None:
                print(res.stdout[-3000:], res.stderr[-3000:])
                raise SystemExit(f"the {n}-document build failed")
            r = json.loads(line[len("RESULT "):])
            r["docs_per_node"] = {names.get(k, k[:8]): v for k, v in r["docs_per_node"].items()}
            rows.append(r)
            print(f"[scale] {n:>7} docs  {r['docs_per_s']:8.0f} docs/s  driver peak RSS {r['driver_peak_rss_mb']:6.0f} MB  "
                  f"driver received {r['driver_received']['records']} records / {r['driver_received']['bytes']} B  "
                  f"per node {r['docs_per_node']}", flush=True)
    finally:
        cluster.shutdown()
        s3.kill()
        s3.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n| documents | shards | docs/s | driver peak RSS (MB) | records to driver | bytes to driver | documents per node |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        per = ", ".join(f"{k}: {v}" for k, v in sorted(r["docs_per_node"].items()))
        print(f"| {r['docs']:,} | {r['shards']} | {r['docs_per_s']:.0f} | {r['driver_peak_rss_mb']:.0f} | "
              f"{r['driver_received']['records']} | {r['driver_received']['bytes']:,} | {per} |")
    growth = rows[-1]["driver_peak_rss_mb"] / rows[0]["driver_peak_rss_mb"] - 1
    shares = all(len(r["docs_per_node"]) >= 2 for r in rows)
    print(f"\ndriver peak RSS growth {rows[0]['docs']:,} -> {rows[-1]['docs']:,} documents: {growth:+.1%} "
          f"(goal < +10%); every worker node encoded a share: {shares}")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"builds": rows, "driver_rss_growth": growth}, indent=2))


if __name__ == "__main__":
    main()
