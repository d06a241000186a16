"""``rayembed mine``: add mined hard negatives to schema rows (BM25 or a saved embedder + FAISS)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args

    p = sub.add_parser("mine", help="Mine hard negatives for training rows (top-k, minus positives, sample n).",
                       description="Reads unified-schema Parquet/JSONL, retrieves top data.mine.top_k documents per "
                                   "query with data.mine.retriever (bm25 or an embedder), drops positives and the "
                                   "top data.mine.skip_top, samples data.mine.num_negatives, writes Parquet.")
    p.add_argument("--input", required=True, help="Schema rows: a .parquet/.jsonl file or a folder of them.")
    p.add_argument("--output", required=True, help="Output .parquet file (written atomically).")
    p.add_argument("--corpus", help="Extra documents to mine from: a BEIR/SMART folder or JSONL of {title, text}.")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayembed.cli import load_from_args
    from rayembed.data.mine import mine_file

    cfg = load_from_args(args)
    out = mine_file(args.input, args.output, cfg.data.mine, seed=cfg.seed, corpus=args.corpus, cfg=cfg)
    print(out)
    return 0
