"""``rayembed pipeline``: synth -> data -> train -> index -> eval -> serve, in one run directory."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args
    from rayembed.config.pipeline import STAGES

    p = sub.add_parser(
        "pipeline",
        help="Run every stage end to end on one Ray and write <run_dir>/report.md.",
        description=(
            "Run the stages in pipeline.stages (default: all) in run_dir. Finished stages are reused "
            "on a rerun; --stages reruns the named ones. Examples:\n"
            "  rayembed pipeline --config jobs/configs/local/demo.yaml\n"
            "  rayembed pipeline --config jobs/configs/local/demo.yaml --stages eval serve"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--stages", nargs="+", choices=STAGES, help="Run (or rerun) only these stages.")
    p.add_argument("--force", action="store_true", help="Rerun stages that already finished.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rayembed.cli import load_from_args
    from rayembed.pipeline import run_pipeline

    cfg = load_from_args(args)
    report = run_pipeline(cfg, args.stages, force=True if args.force else None)
    print(f"\nreport: {report}")
    return 0
