"""``rayembed data build|list``: build the training mix, or list the registered public sets."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args

    p = sub.add_parser("data", help="Build the training mix (data build) or list public datasets (data list).",
                       description="`data build` mixes data.sources into Parquet shards + manifest.json; "
                                   "`data list` prints the registered public datasets.")
    p.add_argument("action", choices=["build", "list"], help="build: write the mix; list: show registered sets.")
    add_config_args(p)
    p.add_argument("--out", help="Output folder (default: data.output_dir, else <run_dir>/data).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        from rayembed.data import registry

        for name in registry.names():
            ds = registry.get(name)
            print(f"{name:18s} ratio {ds.ratio:<4} {ds.instruction}")
            print(f"{'':18s} offline: {ds.layout}; online: {ds.hub_id or 'none (download the files above)'}")
        return 0
    from rayembed.cli import load_from_args
    from rayembed.config import save_resolved
    from rayembed.data.mix import build_mix, read_manifest

    cfg = load_from_args(args)
    manifest = build_mix(cfg, out_dir=args.out)
    save_resolved(cfg, manifest.parent)
    m = read_manifest(manifest)
    print(f"{manifest}: {m['train']['rows']} train rows, {m['val']['rows']} validation rows")
    for src, n in m["train"]["by_source"].items():
        print(f"  {src}: {n}")
    return 0
