"""The proof: a real `ray start --head` cluster on 127.0.0.1 (token auth on), a tiny training job
and a tiny index job sent with `rayembed submit` (which runs `ray job submit`), exactly as users
do on a GPU cluster; then the artifacts are checked where the config said they land: the model
and the index in an S3 bucket (a real S3 server on 127.0.0.1), queried with `rayembed search`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAYEMBED = str(Path(sys.executable).with_name("rayembed"))
# Passed to the jobs through the runtime env: offline, and the test session's model cache.
JOB_ENV = ["HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", f"RAYEMBED_CACHE={os.environ['RAYEMBED_CACHE']}"]


def _submit(cluster, job: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [RAYEMBED, "submit", job, "--address", cluster.dashboard_url, "--wait", "--timeout", str(timeout),
           *[f"--env={e}" for e in JOB_ENV], *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=cluster.client_env(), capture_output=True, text=True,
                          timeout=timeout + 60)
    print(f"{job}: {time.perf_counter() - t0:.1f} s\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_submission_without_the_token_is_refused(token_cluster):
    env = token_cluster.client_env()
    env["RAY_AUTH_MODE"] = "disabled"
    env.pop("RAY_AUTH_TOKEN_PATH")
    env["HOME"] = str(Path(token_cluster.temp_dir))  # no ~/.ray/auth_token to fall back on
    proc = subprocess.run([RAYEMBED, "submit", "smoke", "--address", token_cluster.dashboard_url],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "401" in proc.stderr or "uthenticat" in proc.stderr, proc.stderr[-2000:]


def test_train_then_index_jobs_through_ray_job_submit(token_cluster, s3_store, train_rows, tiny_corpus, tmp_path):
    from rayembed.cluster.storage import resolve_storage

    run_dir = tmp_path / "run"
    bucket = "s3://rayembed-test/jobs"
    proc = _submit(
        token_cluster, "train", "--config", "jobs/configs/local/train.yaml",
        f"run_dir={run_dir}", f"train.output_dir={bucket}/train", "model.name_or_path=tiny-llama",
        "model.max_length=64", "train.num_workers=1", "train.batch_size=4", "train.max_steps=2",
        "train.checkpoint_every=1", "train.warmup_steps=1", "train.log_every=1", "train.query_max_length=32",
        "train.doc_max_length=48", f"--job-arg=--train-path={train_rows}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    assert "follow logs: ray job logs" in proc.stdout
    train = resolve_storage(f"{bucket}/train")
    assert train.exists("model/embedder_config.json") and train.exists("model/_COMPLETE.json")
    summary = train.read_json("summary.json")
    assert summary["metrics"]["step"] == 2
    # Ray Train's checkpoints went to the configured storage (default <output_dir>/ray) in the bucket.
    assert "rayembed-test/jobs/train/ray" in summary["checkpoint"]
    assert train.exists("config.resolved.yaml")
    assert not run_dir.exists() or not any(run_dir.rglob("*.safetensors"))

    corpus = tiny_corpus
    proc = _submit(
        token_cluster, "index", f"run_dir={run_dir}", f"index.corpus={corpus}", "index.format=jsonl",
        f"index.embedder={bucket}/train/model", f"index.output_dir={bucket}/index", "index.index_type=flat",
        "index.shard_size=50", "index.encode.max_actors=2", "index.encode.batch_size=32",
        "index.encode.rows_per_block=40",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = resolve_storage(f"{bucket}/index").read_json("manifest.json")
    assert manifest["ntotal"] == 120
    assert [(s["id_start"], s["id_end"]) for s in manifest["shards"]] == [(0, 50), (50, 100), (100, 120)]

    # `rayembed search`, a fresh process, queries the index in the bucket: a document finds itself.
    doc = json.loads(corpus.read_text().splitlines()[7])
    proc = subprocess.run([RAYEMBED, "search", "--index", f"{bucket}/index", "-k", "3", "--json",
                           "--query", doc["text"]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hits = json.loads(proc.stdout.strip().splitlines()[-1])["hits"]
    assert hits[0]["doc_id"] == str(doc["_id"]), hits
