"""``ray job submit`` for our jobs: the right entrypoint, the runtime env recipe, checks before upload.

:func:`plan_submission` turns ``job + config + overrides`` into the exact ``ray job submit``
command line; :func:`submit` runs it. Both fail before anything is uploaded when a job cannot
work on a cluster:

- the entrypoint or the config is not inside the working directory (the job sees nothing else);
- the config does not load (an unknown key, a bad value);
- an output location is relative: under ``ray job submit`` the job's working directory is a
  temporary copy that disappears with the job, so relative outputs are lost;
- a Ray token would be written into the job's runtime env (where the job API shows it).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_RUNTIME_ENV = "cluster/runtime_env.yaml"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Jobs that are not in jobs/: name -> entrypoint relative to the working directory.
EXTRA_JOBS = {"smoke": "cluster/smoke.py"}
# Never into a runtime env: it is stored with the job and shown by `ray job list` and the dashboard.
FORBIDDEN_ENV = ("RAY_AUTH_TOKEN",)
SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


class SubmitError(ValueError):
    """A submission that cannot work on a cluster; the message says how to fix it."""


@dataclass
class Submission:
    """Everything ``ray job submit`` needs, resolved and checked."""

    job: str
    entrypoint: list[str]
    runtime_env: dict[str, Any]
    address: str
    working_dir: Path
    submission_id: str
    warnings: list[str] = field(default_factory=list)

    def command(self, *, ray: str = "ray", wait: bool = False) -> list[str]:
        cmd = [
            ray, "job", "submit",
            "--address", self.address,
            "--submission-id", self.submission_id,
            "--runtime-env-json", json.dumps(self.runtime_env, sort_keys=True),
        ]
        if not wait:
            cmd.append("--no-wait")
        return [*cmd, "--", *self.entrypoint]

    def follow_hints(self) -> str:
        a = shlex.quote(self.address)
        i = self.submission_id
        return (
            f"  follow logs: ray job logs --address {a} --follow {i}\n"
            f"  status:      ray job status --address {a} {i}\n"
            f"  stop:        ray job stop --address {a} {i}"
        )


def available_jobs(working_dir: str | os.PathLike) -> dict[str, str]:
    """Job name -> entrypoint (relative to the working directory) for every job present there."""
    wd = Path(working_dir)
    jobs = {p.stem: f"jobs/{p.name}" for p in sorted((wd / "jobs").glob("*.py")) if not p.name.startswith("_")}
    jobs.update({k: v for k, v in EXTRA_JOBS.items() if (wd / v).is_file()})
    return jobs


def load_runtime_env(path: str | os.PathLike, working_dir: Path) -> dict[str, Any]:
    """The runtime env recipe with its local paths made absolute (working_dir, py_modules)."""
    import yaml

    p = Path(path)
    if not p.is_absolute():
        p = working_dir / p
    if not p.is_file():
        raise SubmitError(f"Runtime env recipe {p} not found; pass --runtime-env cluster/runtime_env.yaml.")
    env = yaml.safe_load(p.read_text()) or {}
    if not isinstance(env, dict):
        raise SubmitError(f"{p} must hold a mapping of runtime_env fields.")
    env["working_dir"] = str(working_dir)
    mods = []
    for m in env.get("py_modules") or []:
        local = working_dir / m
        if "://" not in str(m) and not local.exists():
            raise SubmitError(f"runtime env py_modules names {m}, which is not in {working_dir}.")
        mods.append(m if "://" in str(m) else str(local))
    if mods:
        env["py_modules"] = mods
    env["env_vars"] = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
    return env


def parse_env(items: Sequence[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """``KEY=VALUE`` as given, or ``KEY`` copied from this machine's environment."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key or not key.replace("_", "").isalnum():
            raise SubmitError(f"--env {item!r}: use KEY=VALUE or KEY (copied from this shell).")
        if not eq:
            if key not in environ:
                raise SubmitError(f"--env {key}: {key} is not set in this shell; use {key}=VALUE.")
            value = environ[key]
        if key in FORBIDDEN_ENV:
            raise SubmitError(
                f"--env {key}: a Ray token in the runtime env is stored with the job and shown by the job "
                "API. Put it on the cluster instead (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token on every node) "
                "and in this shell for the submission."
            )
        out[key] = value
    return out


def _relative_outputs(cfg_dict: dict[str, Any]) -> list[str]:
    """Config keys naming output locations that are relative paths (lost under ray job submit)."""
    from rayembed.cluster.storage import uri_scheme

    bad = []

    def rel(v: Any) -> bool:
        return isinstance(v, str) and v and uri_scheme(v) is None and not Path(v).expanduser().is_absolute()

    if rel(cfg_dict.get("run_dir")):
        bad.append(f"run_dir={cfg_dict['run_dir']}")
    for section, body in cfg_dict.items():
        if not isinstance(body, dict):
            continue
        for key in ("output_dir", "storage_path"):
            if rel(body.get(key)):
                bad.append(f"{section}.{key}={body[key]}")
    return bad


def plan_submission(
    job: str,
    *,
    config: str | None = None,
    overrides: Sequence[str] = (),
    job_args: Sequence[str] = (),
    address: str | None = None,
    working_dir: str | os.PathLike = ".",
    runtime_env: str | os.PathLike = DEFAULT_RUNTIME_ENV,
    env: Sequence[str] = (),
    python: str = "python",
    submission_id: str | None = None,
    allow_relative_outputs: bool = False,
) -> Submission:
    """Resolve and check one submission; raise :class:`SubmitError` naming the fix."""
    from rayembed.config import ConfigError, load_config, to_dict

    wd = Path(working_dir).resolve()
    if not wd.is_dir():
        raise SubmitError(f"--working-dir {wd} is not a folder.")
    jobs = available_jobs(wd)
    if job not in jobs:
        raise SubmitError(f"Unknown job {job!r}; jobs in {wd}: {', '.join(sorted(jobs)) or 'none'}.")
    entry = [python, jobs[job]]
    warnings: list[str] = []

    if config:
        cpath = Path(config)
        absolute = cpath if cpath.is_absolute() else (Path.cwd() / cpath)
        if not absolute.is_file() and not cpath.is_absolute():
            absolute = wd / cpath
        if not absolute.is_file():
            raise SubmitError(f"--config {config} not found.")
        try:
            rel_cfg = absolute.resolve().relative_to(wd)
        except ValueError:
            raise SubmitError(
                f"--config {config} is outside the working directory {wd}; the job only sees files "
                "inside it. Copy the recipe into it (e.g. jobs/configs/) and pass that path."
            ) from None
        entry += ["--config", rel_cfg.as_posix()]
        config_path: str | None = str(absolute)
    else:
        config_path = None
    if job in EXTRA_JOBS:
        entry += list(overrides)
    else:
        try:
            cfg = load_config(config_path, list(overrides))
        except ConfigError as e:
            raise SubmitError(f"The config does not load: {e}") from e
        bad = _relative_outputs(to_dict(cfg))
        if bad and not allow_relative_outputs:
            fix = " ".join(f"{b.split('=')[0]}=/mnt/shared/..." for b in bad)
            raise SubmitError(
                f"Relative output location(s) {', '.join(bad)}: under ray job submit they land in the "
                "job's temporary copy of the working directory and are lost when it ends. Give absolute "
                f"paths on storage every node sees, e.g. {fix} (or s3://... where the key takes a URI)."
            )
        entry += list(overrides)
    entry += list(job_args)

    renv = load_runtime_env(runtime_env, wd)
    extra = parse_env(env)
    for key in extra:
        if any(h in key.upper() for h in SECRET_HINTS):
            warnings.append(
                f"{key} goes into the job's runtime env, which `ray job list` and the dashboard show; "
                "prefer a secret set on the cluster nodes (a Kubernetes Secret as an env var)."
            )
    renv["env_vars"].update(extra)

    sid = submission_id or f"rayembed-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    return Submission(
        job=job,
        entrypoint=entry,
        runtime_env=renv,
        address=address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
        working_dir=wd,
        submission_id=sid,
        warnings=warnings,
    )


def ray_cli() -> str:
    from rayembed.cluster.local import ray_executable

    return ray_executable()


def submit(sub: Submission, *, wait: bool = False, poll_s: float = 2.0, timeout_s: float | None = None,
           agent_wait_s: float = 120.0) -> str:
    """Run ``ray job submit`` (never waiting on its log tail), then optionally wait for the end.

    Returns the final status with ``wait`` (SUCCEEDED, FAILED, STOPPED) or PENDING without.
    Raises RuntimeError when the submission itself fails (cluster unreachable, auth refused).
    """
    for w in sub.warnings:
        logger.warning(w)
    cmd = sub.command(ray=ray_cli(), wait=False)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # --address wins; a stale GCS address here confuses the CLI
    deadline = time.monotonic() + agent_wait_s
    while True:
        proc = subprocess.run(cmd, cwd=sub.working_dir, env=env, capture_output=True, text=True)
        # A head that just started answers before its job agent is up; that one is worth a retry.
        if proc.returncode == 0 or "No available agent" not in proc.stderr + proc.stdout:
            break
        if time.monotonic() > deadline:
            break
        logger.info("The cluster's job agent is not up yet; retrying the submission")
        time.sleep(3)
    if proc.returncode != 0:
        from rayembed.security import redact_text

        raise RuntimeError(
            f"`ray job submit` failed ({proc.returncode}):\n{redact_text(proc.stderr[-3000:] or proc.stdout[-3000:])}\n"
            "Check --address (the dashboard URL, port 8265) and that RAY_AUTH_MODE and the token match the cluster."
        )
    print(f"Submitted job {sub.submission_id} to {sub.address}", flush=True)
    print(sub.follow_hints(), flush=True)
    if not wait:
        return "PENDING"
    return wait_for(sub.address, sub.submission_id, poll_s=poll_s, timeout_s=timeout_s, stream_logs=True)


def wait_for(address: str, submission_id: str, *, poll_s: float = 2.0, timeout_s: float | None = None,
             stream_logs: bool = False) -> str:
    """Poll a job until it ends; with ``stream_logs`` print its new log lines as they come."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown = 0
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while True:
        status = client.get_job_status(submission_id)
        if stream_logs:
            logs = client.get_job_logs(submission_id)
            if len(logs) > shown:
                sys.stdout.write(logs[shown:])
                sys.stdout.flush()
                shown = len(logs)
        if status in terminal:
            return str(status.value if hasattr(status, "value") else status)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"Job {submission_id} still {status} after {timeout_s:.0f} s.")
        time.sleep(poll_s)
