"""``rayembed search``: query an index from the terminal."""

from __future__ import annotations

import argparse
import json
import logging

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args

    p = sub.add_parser(
        "search",
        help="Query a built index: ranked ids, scores and text snippets.",
        description=(
            "Encode --query with the embedder the index was built with (or --embedder) and print the "
            "top-k documents. The index is --index, else index.output_dir, else <run_dir>/index. "
            "Example:\n"
            "  rayembed search --config jobs/configs/local/index.yaml --query \"what is a wing flap\" -k 5"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--query", "-q", action="append", required=True, help="Query text (repeat for several).")
    p.add_argument("-k", type=int, default=10, help="Results per query (default 10).")
    p.add_argument("--index", help="Index directory or manifest.json (default: from the config).")
    p.add_argument("--embedder", help="Embedder to encode queries with (default: the index's own).")
    p.add_argument("--instruction", help="Query instruction (E5-style models); empty for none.")
    p.add_argument("--nprobe", type=int, help="IVF lists to probe.")
    p.add_argument("--ef-search", type=int, help="HNSW efSearch.")
    p.add_argument("--rescore-k", type=int,
                   help="sq8/binary indexes: candidates re-scored with the float vectors (0: none; default: the index's).")
    p.add_argument("--json", action="store_true", help="Print JSON lines instead of a table.")
    p.add_argument("--snippet", type=int, default=100, help="Characters of text shown (default 100).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rayembed.cli import load_from_args
    from rayembed.index import IndexIntegrityError, ShardedIndex
    from rayembed.index.manifest import same_embedder
    from rayembed.modeling.embedder import Embedder

    cfg = load_from_args(args)
    # A folder, its manifest.json, or a URI (s3://...): ShardedIndex.open downloads and verifies a URI.
    where = str(args.index or cfg.index.output_dir or Path(cfg.run_dir) / "index")
    try:
        idx = ShardedIndex.open(where, verify=cfg.index.verify, use_gpu=cfg.index.use_gpu)
        name = args.embedder or idx.manifest.get("embedder_name")
        if not name:
            raise ValueError(f"Index {where} does not record its embedder; pass --embedder.")
        emb = Embedder.from_pretrained(name, device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code,
                                       cache=cfg.model.cache_dir)
        if not same_embedder(idx.embedder_identity, emb.identity()):
            raise IndexIntegrityError(
                f"Embedder {name} is not the one index {where} was built with "
                f"({idx.embedder_identity.get('path') or idx.embedder_identity.get('base_model')}); "
                "its vectors are not comparable. Pass the embedder the index was built with."
            )
    except IndexIntegrityError as e:
        raise ValueError(str(e)) from e
    vecs = emb.encode(args.query, instruction=args.instruction or None)
    scores, ids = idx.search(vecs, args.k, nprobe=args.nprobe, ef_search=args.ef_search, rescore_k=args.rescore_k)
    for q, row_s, row_i in zip(args.query, scores, ids):
        docs = idx.get_documents(row_i)
        if args.json:
            hits = [{"rank": r + 1, "score": float(s), **d} for r, (s, d) in enumerate(zip(row_s, docs)) if d]
            print(json.dumps({"query": q, "hits": hits}, ensure_ascii=False))
            continue
        print(f"query: {q}")
        for r, (s, d) in enumerate(zip(row_s, docs)):
            if d is None:
                continue
            text = " ".join((f"{d['title']}: {d['text']}" if d["title"] else d["text"]).split())
            if len(text) > args.snippet:
                text = text[: args.snippet - 1] + "…"
            print(f"{r + 1:3d}  {s:.4f}  {d['doc_id']:>12}  {text}")
    return 0
