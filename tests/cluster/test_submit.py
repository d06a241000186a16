"""rayembed submit: the `ray job submit` command it builds and the checks it makes before uploading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rayembed.cluster.submit import SubmitError, parse_env, plan_submission

REPO = Path(__file__).resolve().parents[2]


def test_command_has_entrypoint_runtime_env_and_our_id():
    sub = plan_submission(
        "train", config="jobs/configs/local/train.yaml", overrides=["run_dir=/mnt/shared/runs/a", "train.max_steps=3"],
        job_args=["--train-path", "/mnt/shared/data"], address="http://head:8265", working_dir=REPO,
        env=["HF_HUB_OFFLINE=1"], submission_id="rayembed-train-x",
    )
    cmd = sub.command(ray="ray")
    assert cmd[:3] == ["ray", "job", "submit"]
    assert cmd[cmd.index("--address") + 1] == "http://head:8265"
    assert cmd[cmd.index("--submission-id") + 1] == "rayembed-train-x"
    assert "--no-wait" in cmd
    entry = cmd[cmd.index("--") + 1 :]
    assert entry == ["python", "jobs/train.py", "--config", "jobs/configs/local/train.yaml",
                     "run_dir=/mnt/shared/runs/a", "train.max_steps=3", "--train-path", "/mnt/shared/data"]
    renv = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert renv["working_dir"] == str(REPO)
    assert renv["py_modules"] == [str(REPO / "platform" / "rayembed")]
    assert renv["env_vars"]["HF_HUB_OFFLINE"] == "1" and renv["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert "ray job logs --address http://head:8265 --follow rayembed-train-x" in sub.follow_hints()


def test_relative_outputs_are_refused_with_the_fix():
    with pytest.raises(SubmitError, match=r"run_dir=runs/demo.*lost.*run_dir=/mnt/shared/"):
        plan_submission("train", config="jobs/configs/local/train.yaml", working_dir=REPO)
    with pytest.raises(SubmitError, match=r"train.storage_path=ckpt"):
        plan_submission("train", config="jobs/configs/local/train.yaml", working_dir=REPO,
                        overrides=["run_dir=/mnt/shared/r", "train.storage_path=ckpt"])
    # A URI is fine where the key takes one, and the escape hatch works.
    plan_submission("train", config="jobs/configs/local/train.yaml", working_dir=REPO,
                    overrides=["run_dir=/mnt/shared/r", "train.storage_path=s3://bucket/ckpt"])
    plan_submission("train", config="jobs/configs/local/train.yaml", working_dir=REPO, allow_relative_outputs=True)


def test_bad_jobs_configs_and_env_are_refused(tmp_path, monkeypatch):
    with pytest.raises(SubmitError, match=r"Unknown job 'trian'.*train"):
        plan_submission("trian", working_dir=REPO)
    with pytest.raises(SubmitError, match="not found"):
        plan_submission("train", config="jobs/configs/local/nope.yaml", working_dir=REPO)
    outside = tmp_path / "mine.yaml"
    shutil.copy(REPO / "jobs/configs/local/train.yaml", outside)
    with pytest.raises(SubmitError, match="outside the working directory"):
        plan_submission("train", config=str(outside), working_dir=REPO)
    with pytest.raises(SubmitError, match="does not load.*train.nope"):
        plan_submission("train", config="jobs/configs/local/train.yaml", working_dir=REPO,
                        overrides=["run_dir=/x", "train.nope=1"])
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN.*shown by the job API"):
        parse_env(["RAY_AUTH_TOKEN=abc"])
    monkeypatch.delenv("RAYEMBED_NOT_SET", raising=False)
    with pytest.raises(SubmitError, match="not set in this shell"):
        parse_env(["RAYEMBED_NOT_SET"])
    assert parse_env(["A=1", "B"], {"B": "2"}) == {"A": "1", "B": "2"}


def test_secret_like_env_vars_warn():
    sub = plan_submission("smoke", working_dir=REPO, env=["OPENAI_API_KEY=sk-test"])
    assert any("OPENAI_API_KEY" in w and "dashboard" in w for w in sub.warnings)


def test_cli_takes_flags_between_job_and_overrides(capsys):
    from rayembed.cli import main

    rc = main(["submit", "train", "--address", "http://h:8265", "run_dir=/mnt/shared/r",
               "--config", "jobs/configs/local/train.yaml", "train.max_steps=2", "--dry-run",
               "--job-arg=--train-path=/mnt/shared/d", "--working-dir", str(REPO)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "--address http://h:8265" in out
    assert out.rstrip().endswith(
        "-- python jobs/train.py --config jobs/configs/local/train.yaml run_dir=/mnt/shared/r "
        "train.max_steps=2 --train-path=/mnt/shared/d"
    )


def test_cli_reports_refusals_as_errors(capsys):
    from rayembed.cli import main

    rc = main(["submit", "train", "--config", "jobs/configs/local/train.yaml", "--dry-run",
               "--working-dir", str(REPO)])
    assert rc == 1 and "Relative output location" in capsys.readouterr().err
