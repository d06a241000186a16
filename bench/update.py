"""Update benchmark: upserting 1% of a corpus (plus deleting 0.1%) against a full rebuild.

    python bench/update.py                     # 100k documents, tiny model
    python bench/update.py --n 20000           # a loaded 2-core machine

Both sides run in a fresh process-like path from the saved tiny embedder: the full build is
``build_index_in_process`` over the whole corpus; the update is ``update_index`` (what
``rayembed index update`` runs), start-up included (loading the embedder, reading the id map).
Goal: the update takes under 5% of the full build's time. Writes bench/out/update.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO  # sets the environment before Ray or rayembed load


def docs(n: int, tag: str = "") -> list[dict]:
    words = ["river", "wing", "index", "tax", "jazz", "volcano", "chess", "glacier", "faiss", "ray"]
    return [{"id": f"doc-{i}", "text": f"{tag}document {i} about {words[i % 10]} and {words[i * 7 % 10]} number {i % 97}"}
            for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--model", default="tiny-bert", help="Registered embedder name or saved folder.")
    ap.add_argument("--index-type", default="flat")
    args = ap.parse_args()
    from rayembed.index import ShardedIndex, build_index_in_process
    from rayembed.index.update import update_index
    from rayembed.modeling.embedder import Embedder

    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp:
        tmp = Path(tmp)
        Embedder.from_pretrained(args.model).save_pretrained(tmp / "model")
        corpus = docs(args.n)
        t = time.perf_counter()
        build_index_in_process(str(tmp / "model"), corpus, tmp / "idx", index_type=args.index_type,
                               shard_size=max(1, args.n // 4), batch_size=64)
        full_s = time.perf_counter() - t
        n_up = max(1, args.n // 100)
        half = n_up // 2
        ups = docs(half, tag="changed ") + [{"id": f"new-{i}", "text": f"new document {i}"} for i in range(n_up - half)]
        gone = [f"doc-{i}" for i in range(args.n - max(1, args.n // 1000), args.n)]
        (tmp / "ups.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ups))
        t = time.perf_counter()
        summary = update_index(tmp / "idx", upsert=tmp / "ups.jsonl", delete=gone, embedder=str(tmp / "model"),
                               batch_size=64)
        upd_s = time.perf_counter() - t
        live = ShardedIndex.open(tmp / "idx").live_count
    row = {"n": args.n, "model": args.model, "index_type": args.index_type, "full_build_s": round(full_s, 2),
           "upserted": n_up, "deleted": len(gone), "update_s": round(upd_s, 2),
           "update_share_of_build": round(upd_s / full_s, 4), "live_after": live, "summary": summary}
    print(f"full build of {args.n} docs: {full_s:.1f}s; upsert {n_up} (+ delete {len(gone)}): {upd_s:.2f}s "
          f"= {100 * upd_s / full_s:.1f}% of the build (goal < 5%)")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "update.json").write_text(json.dumps(row, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
