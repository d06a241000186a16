"""``rayembed config``: print the resolved config, or every key with its help text."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args

    p = sub.add_parser(
        "config",
        help="Print the resolved config (or --keys: every key with its help).",
        description="Resolve a recipe plus overrides and print it as YAML; --keys lists every key.",
    )
    add_config_args(p)
    p.add_argument("--keys", action="store_true", help="List every config key, its type, default and help.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from rayembed.cli import load_from_args
    from rayembed.config import iter_help, to_dict
    from rayembed.security import redact_config

    if args.keys:
        for key, tp, default, help_ in iter_help():
            print(f"{key} ({tp}, default {default!r})\n    {help_}")
        return 0
    cfg = load_from_args(args)
    print(yaml.safe_dump(redact_config(to_dict(cfg)), sort_keys=False), end="")
    return 0
