"""``rayembed train``: contrastive (E5), SimCSE or MNTP training on Ray Train."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from rayembed.cli import add_config_args

    p = sub.add_parser(
        "train",
        help="Train an embedder on Ray Train (DDP or DeepSpeed ZeRO-3, LoRA, resume).",
        description=(
            "Train the configured model on Parquet shards from `rayembed data build`. Writes the "
            "saved embedder to <train.output_dir>/model, plus metrics.jsonl, loss_curve.png and "
            "config.resolved.yaml. run_dir, train.output_dir, train.storage_path and --train-path "
            "may be local folders or URIs (s3://bucket/run, gs://...); prints the model's folder or "
            "URI. Re-running with the same train.run_name resumes from the latest checkpoint."
        ),
    )
    add_config_args(p)
    p.add_argument(
        "--train-path",
        action="append",
        help="Parquet file or folder of training rows, local or a URI such as s3://bucket/mix (repeatable). "
        "Default: data.output_dir or <run_dir>/data.",
    )
    p.add_argument("--print-deepspeed", action="store_true", help="Print the generated DeepSpeed JSON and exit.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from rayembed.cli import load_from_args

    cfg = load_from_args(args)
    if args.print_deepspeed:
        from rayembed.train.engine import deepspeed_config

        print(json.dumps(deepspeed_config(cfg.train, cfg.train.num_workers), indent=2))
        return 0
    from rayembed.train import run_training

    model_dir = run_training(cfg, args.train_path, log_level=args.log_level)
    print(model_dir)
    return 0
