"""``rayembed index``: encode a corpus on Ray Data into verified FAISS shards (resumable);
``rayembed index update`` and ``rayembed index compact`` keep a built index current."""

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
            "  rayembed index --config jobs/configs/local/index.yaml index.index_type=hnsw\n\n"
            "Keep a built index current without a rebuild (see `rayembed index update --help`):\n"
            "  rayembed index update --index runs/idx --upsert changed.jsonl --delete gone.txt\n"
            "  rayembed index compact --index runs/idx"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.set_defaults(func=run)


def _update_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rayembed index update",
        description=(
            "Upsert and delete documents of a built index (a folder or a URI) without a rebuild: new and "
            "changed documents are encoded into delta shards, deleted and replaced ids become tombstones, "
            "and a new manifest version lists them (written last, so a killed update changes nothing). "
            "A server reloading the index moves to the new version without downtime."
        ),
    )
    p.add_argument("--index", required=True, help="Index folder or URI (s3://bucket/idx) holding manifest.json.")
    p.add_argument("--upsert", help="Documents to add or replace: JSONL, Parquet or BEIR corpus.jsonl, read with "
                   "the index's own column mapping (id, text, title, metadata fields).")
    p.add_argument("--delete", help="Text file with one document id a line to delete.")
    p.add_argument("--embedder", help="Embedder folder or registered name. Default: the one in the manifest.")
    p.add_argument("--format", default="auto", help="Format of --upsert (auto, jsonl, parquet, beir).")
    p.add_argument("--batch-size", type=int, default=32, help="Documents per encoder call.")
    p.add_argument("--log-level", default="INFO")
    return p


def _compact_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rayembed index compact",
        description="Fold the delta shards and tombstones of an updated index into new base shards "
        "(a new manifest version; answers stay the same).",
    )
    p.add_argument("--index", required=True, help="Index folder or URI holding manifest.json.")
    p.add_argument("--log-level", default="INFO")
    return p


def run_update(a: argparse.Namespace) -> int:
    import json

    from rayembed.index import IndexIntegrityError
    from rayembed.index.update import update_index

    if not a.upsert and not a.delete:
        raise ValueError("rayembed index update needs --upsert FILE and/or --delete FILE.")
    try:
        summary = update_index(a.index, upsert=a.upsert, delete=a.delete, embedder=a.embedder, format=a.format,
                               batch_size=a.batch_size)
    except IndexIntegrityError as e:
        raise ValueError(str(e)) from e
    print(json.dumps(summary))
    return 0


def run_compact(a: argparse.Namespace) -> int:
    import json

    from rayembed.index import IndexIntegrityError
    from rayembed.index.update import compact_index

    try:
        summary = compact_index(a.index)
    except IndexIntegrityError as e:
        raise ValueError(str(e)) from e
    print(json.dumps(summary))
    return 0


def parse_subcommand(argv: list[str]) -> argparse.Namespace | None:
    """``rayembed index update|compact ...`` parsed by their own parsers; None for other command lines.

    The ``index`` parser's positional list holds config overrides, so its subcommands are
    recognised before it parses.
    """
    if len(argv) < 2 or argv[0] != "index" or argv[1] not in ("update", "compact"):
        return None
    if argv[1] == "update":
        args = _update_parser().parse_args(argv[2:])
        args.func = run_update
    else:
        args = _compact_parser().parse_args(argv[2:])
        args.func = run_compact
    args.command = f"index {argv[1]}"
    return args


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
