"""``rayembed submit <job>``: ``ray job submit`` with the right entrypoint and runtime env."""

from __future__ import annotations

import argparse

DESCRIPTION = (
    "Check the job and its config locally, then run `ray job submit` with jobs/<job>.py as the "
    "entrypoint, the working directory and the runtime env of cluster/runtime_env.yaml. Prints the "
    "job id and how to follow its logs. Authentication follows this shell's RAY_AUTH_MODE and token "
    "(see cluster/README.md). Flags and key=value overrides may come in any order after the job."
)
EPILOG = (
    "Example: rayembed submit train --config jobs/configs/gpu/train.yaml --address http://head:8265 "
    "run_dir=/mnt/shared/runs/e5 train.max_steps=500"
)


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML recipe inside the working directory, e.g. jobs/configs/gpu/train.yaml.")
    p.add_argument("--address", help="Job server (dashboard) URL. Default: $RAY_ADDRESS, else http://127.0.0.1:8265.")
    p.add_argument("--working-dir", default=".", help="Folder uploaded as the job's working directory (default: .).")
    p.add_argument("--runtime-env", default="cluster/runtime_env.yaml", help="Runtime env recipe (YAML).")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="Add an env var to the job (KEY alone copies it from this shell). Repeatable.")
    p.add_argument("--job-arg", action="append", default=[], metavar="ARG",
                   help="Extra argument for the job's own command line (e.g. --job-arg=--detach). Repeatable.")
    p.add_argument("--submission-id", help="Job id to use (default: rayembed-<job>-<time>-<random>).")
    p.add_argument("--python", default="python", help="Interpreter on the cluster (default: python).")
    p.add_argument("--wait", action="store_true", help="Stream the job's logs and wait; exit 1 unless it succeeds.")
    p.add_argument("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
    p.add_argument("--allow-relative-outputs", action="store_true",
                   help="Accept relative run_dir/output_dir (they vanish with the job's working directory).")
    p.add_argument("--dry-run", action="store_true", help="Print the `ray job submit` command and stop.")
    p.add_argument("--log-level", default="INFO", help="Logging level.")


def _inner_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayembed submit", description=DESCRIPTION, epilog=EPILOG)
    _add_options(p)
    p.add_argument("job_and_overrides", nargs="+", metavar="JOB [key.sub=value ...]")
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="Submit a job (train, index, synth, ...) to a Ray cluster with `ray job submit`.",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    _add_options(p)
    # Everything from the job name on is parsed again in run(), intermixed: argparse alone cannot
    # take flags between the job name and the key=value overrides.
    p.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="JOB [key.sub=value ...]",
        help="Job name: a file jobs/<job>.py (train, index, synth, eval, serve, ...) or 'smoke'; then "
        "config overrides passed to the job, e.g. train.lr=5e-5 run_dir=/mnt/shared/runs/e5.",
    )
    p.set_defaults(func=run)


def merged_args(args: argparse.Namespace) -> argparse.Namespace:
    """Flags given before the job name, overridden by those given after it."""
    inner = _inner_parser()
    if not args.rest:
        inner.error("name a job, e.g. rayembed submit train --config jobs/configs/gpu/train.yaml")
    late = inner.parse_intermixed_args(args.rest)
    for key, value in vars(late).items():
        default = inner.get_default(key)
        if key == "job_and_overrides":
            continue
        if isinstance(value, list):
            setattr(args, key, [*getattr(args, key, []), *value])
        elif value != default:
            setattr(args, key, value)
    args.job, *args.overrides = late.job_and_overrides
    return args


def run(args: argparse.Namespace) -> int:
    import shlex

    from rayembed.cluster.submit import SubmitError, plan_submission, submit

    args = merged_args(args)
    try:
        sub = plan_submission(
            args.job, config=args.config, overrides=args.overrides, job_args=args.job_arg,
            address=args.address, working_dir=args.working_dir, runtime_env=args.runtime_env,
            env=args.env, python=args.python, submission_id=args.submission_id,
            allow_relative_outputs=args.allow_relative_outputs,
        )
    except SubmitError as e:
        raise ValueError(str(e)) from None
    if args.dry_run:
        from rayembed.security import redact_text

        print(redact_text(shlex.join(sub.command())))
        return 0
    status = submit(sub, wait=args.wait, timeout_s=args.timeout)
    if args.wait:
        print(f"Job {sub.submission_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0
