"""Rows/s that Ray Data delivers to 2 training consumers, tokenisation included, vs a plain loop.

Ray path:   build_train_dataset -> streaming_split(2, equal=True) -> iter_train_batches in two
            consumer threads of this process (what two Ray Train workers run, minus the model).
Plain path: the same Parquet read with pyarrow and tokenised in one loop (LocalShard), fed to
            the same iter_train_batches.
Both produce the same padded torch batches. Goal: Ray path >= 0.8x the plain loop.

    .venv/bin/python bench/data_stream.py                       # tiny-llama tokenizer, demo mix
    .venv/bin/python bench/data_stream.py --model smollm2-135m  # the real BPE tokenizer

Writes bench/out/data_stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import REPO  # sets the environment before Ray or rayembed load


def _saved_tokenizer(model: str, work: Path) -> Path:
    """A saved embedder folder (the stream loads only its tokenizer)."""
    if Path(model).is_dir():
        return Path(model)
    from rayembed.modeling.embedder import Embedder

    out = work / "embedder"
    Embedder.from_pretrained(model, max_length=512).save_pretrained(out)
    return out


def _mix(work: Path, rows: int) -> Path:
    """The local demo mix, repeated until it holds ``rows`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayembed.config import load_config
    from rayembed.data.mix import build_mix, read_manifest

    cfg = load_config(REPO / "jobs/configs/local/data.yaml", [f"run_dir={work}", "data.val_fraction=0"])
    manifest = build_mix(cfg)
    m = read_manifest(manifest)
    table = pa.concat_tables([pq.read_table(manifest.parent / f["path"]) for f in m["train"]["files"]])
    reps = -(-rows // table.num_rows)
    table = pa.concat_tables([table] * reps).slice(0, rows)
    out = work / "stream"
    out.mkdir()
    per = -(-rows // 8)
    for i in range(8):
        pq.write_table(table.slice(i * per, per), out / f"part-{i:05d}.parquet")
    return out


def _count(batch) -> tuple[int, int]:
    return len(batch["id"]), int(batch["num_tokens"])


def run_plain(spec) -> dict:
    from rayembed.data.stream import LocalShard, iter_train_batches

    t0 = time.perf_counter()
    rows = toks = 0
    for b in iter_train_batches(LocalShard(spec), spec):
        r, t = _count(b)
        rows += r
        toks += t
    dt = time.perf_counter() - t0
    return {"rows": rows, "tokens": toks, "seconds": dt, "rows_per_s": rows / dt, "tokens_per_s": toks / dt}


def run_ray(spec, workers: int = 2) -> dict:
    from rayembed.data.stream import build_train_dataset, iter_train_batches, split_for_workers

    t0 = time.perf_counter()
    splits = split_for_workers(build_train_dataset(spec), workers)
    counts = [[0, 0] for _ in range(workers)]
    first = [None] * workers

    def consume(i):
        for b in iter_train_batches(splits[i], spec, rank=i):
            if first[i] is None:
                first[i] = time.perf_counter() - t0
            r, t = _count(b)
            counts[i][0] += r
            counts[i][1] += t

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    rows, toks = sum(c[0] for c in counts), sum(c[1] for c in counts)
    warm = max(f or 0 for f in first)
    return {"rows": rows, "tokens": toks, "seconds": dt, "rows_per_s": rows / dt, "tokens_per_s": toks / dt,
            "per_worker_rows": [c[0] for c in counts], "first_batch_s": warm,
            # After both consumers got their first batch: the rate once actors are up.
            "steady_rows_per_s": rows / max(dt - warm, 1e-9), "steady_tokens_per_s": toks / max(dt - warm, 1e-9)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama", help="Embedder whose tokenizer is used (name or saved folder).")
    ap.add_argument("--rows", type=int, default=20000, help="Rows streamed.")
    ap.add_argument("--batch-size", type=int, default=32, help="Per-worker batch size.")
    ap.add_argument("--max-length", type=int, default=256, help="Query and document max length, in tokens.")
    ap.add_argument("--num-cpus", type=float, default=4, help="Logical CPUs of the local Ray.")
    args = ap.parse_args()

    from rayembed.config import ComputeConfig
    from rayembed.data.stream import StreamSpec
    from rayembed.runtime import init_ray, setup_logging

    setup_logging("WARNING")
    work = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    try:
        tok_dir = _saved_tokenizer(args.model, work)
        data = _mix(work, args.rows)
        spec = StreamSpec(paths=[str(data)], tokenizer_dir=str(tok_dir), batch_size=args.batch_size,
                          query_max_length=args.max_length, doc_max_length=args.max_length, num_negatives=1,
                          tokenize_batch_rows=512, tokenize_num_cpus=0.5, log_every_s=0)
        plain = run_plain(spec)
        init_ray(ComputeConfig(num_cpus=args.num_cpus, object_store_memory_mb=256, temp_dir=ray_tmp,
                               log_to_driver=False))
        ray_res = run_ray(spec)
        import ray

        ray.shutdown()
        ratio = ray_res["rows_per_s"] / plain["rows_per_s"]
        result = {"model": args.model, "rows": args.rows, "batch_size": args.batch_size, "max_length": args.max_length,
                  "cpu_cores": os.cpu_count(), "plain_loop": plain, "ray_2_workers": ray_res,
                  "ratio_ray_over_plain": ratio, "goal": 0.8, "meets_goal": ratio >= 0.8}
        print(f"plain loop : {plain['rows_per_s']:8.1f} rows/s  {plain['tokens_per_s']:10.0f} tokens/s  "
              f"({plain['rows']} rows in {plain['seconds']:.1f} s)")
        print(f"ray, 2 wkr : {ray_res['rows_per_s']:8.1f} rows/s  {ray_res['tokens_per_s']:10.0f} tokens/s  "
              f"({ray_res['rows']} rows in {ray_res['seconds']:.1f} s, per worker {ray_res['per_worker_rows']}, "
              f"first batch after {ray_res['first_batch_s']:.1f} s)")
        print(f"ray steady : {ray_res['steady_rows_per_s']:8.1f} rows/s  {ray_res['steady_tokens_per_s']:10.0f} tokens/s "
              "(after start-up)")
        result["steady_ratio"] = ray_res["steady_rows_per_s"] / plain["rows_per_s"]
        print(f"ratio ray/plain = {ratio:.2f} end to end, {result['steady_ratio']:.2f} after start-up (goal >= 0.8)")
        out = REPO / "bench" / "out"
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_stream.json").write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "platform"))
    sys.exit(main())
