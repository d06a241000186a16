"""``rayembed index``: encode a corpus on Ray Data into verified FAISS shards (resumable)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args

    p = sub.add_parser(
        "index",
        help="Encode a corpus with an autoscaling Ray Data actor pool into FAISS shards.",
        description=(
            "Read index.corpus (JSONL, Parquet, BEIR corpus.jsonl or SMART), encode it with the "
            "embedder (index.embedder, else model.*) on an autoscaling pool of Ray Data actors, and "
            "write FAISS shards with global ids, a Parquet id map and manifest.json to "
            "index.output_dir (default <run_dir>/index). Rerunning resumes: only shards whose "
            "verified files are missing are rebuilt. Example:\n"
            "  rayembed index --config jobs/configs/local/index.yaml index.index_type=hnsw"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayembed.cli import load_from_args
    from rayembed.index import IndexIntegrityError, build_index

    cfg = load_from_args(args)
    try:
        manifest = build_index(cfg)
    except IndexIntegrityError as e:
        raise ValueError(str(e)) from e
    print(manifest)
    return 0
