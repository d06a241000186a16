"""``rayembed <command> --config X.yaml [key.sub=value ...]``: one entrypoint, one subcommand per capability.

Each subcommand lives in ``rayembed/commands/<name>.py`` and defines ``register(subparsers)``,
which adds its parser and sets ``func``. Heavy imports happen inside ``func``, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Order is the order shown in --help.
COMMANDS = [
    "embed",
    "data",
    "mine",
    "train",
    "synth",
    "serve_llm",
    "serve",
    "index",
    "search",
    "eval",
    "submit",
    "pipeline",
    "config",
]

logger = logging.getLogger("rayembed")


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The arguments every stage takes: a recipe, overrides, and the data directory."""
    p.add_argument("--config", "-c", help="YAML recipe, e.g. jobs/configs/local/demo.yaml. Omit for defaults.")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="Config overrides, e.g. train.lr=5e-5 model.max_length=256.",
    )
    p.add_argument("--data-dir", help="Local data directory (overrides data_dir and $RAYEMBED_DATA_DIR).")
    p.add_argument("--log-level", default="INFO", help="Logging level (DEBUG, INFO, WARNING).")


def load_from_args(args: argparse.Namespace):
    """The resolved config of a parsed command line."""
    from rayembed.config import load_config

    overrides = list(args.overrides or [])
    if getattr(args, "data_dir", None):
        overrides.append(f"data_dir={args.data_dir}")
    return load_config(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayembed",
        description="Train text embedders on Ray, build FAISS indexes, serve retrieval.",
        epilog="Run `rayembed <command> --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        module = importlib.import_module(f"rayembed.commands.{name}")
        module.register(sub)
    return parser


def _subcommand(argv: list[str]) -> argparse.Namespace | None:
    """A command module's own ``parse_subcommand(argv)`` (``rayembed index update ...``), if it has one.

    Looked up by name, as :func:`build_parser` loads the commands, so that the CLI imports no
    command module by name (they import the CLI's helpers).
    """
    if not argv or argv[0] not in COMMANDS:
        return None
    module = importlib.import_module(f"rayembed.commands.{argv[0]}")
    parse = getattr(module, "parse_subcommand", None)
    return parse(argv) if parse is not None else None


def _version() -> str:
    from rayembed import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from rayembed.config import ConfigError
    from rayembed.runtime import prefer_loopback, setup_logging
    from rayembed.security import redact_text

    prefer_loopback()  # before any command imports ray
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _subcommand(argv) or parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(getattr(args, "log_level", "INFO"))
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"rayembed {args.command}: config error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"rayembed {args.command}: error: {redact_text(str(e))}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
