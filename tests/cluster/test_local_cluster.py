"""The proof: a real `ray start --head` cluster on 127.0.0.1 (token auth on), a tiny training job
and a tiny index job sent with `rayembed submit` (which runs `ray job submit`), exactly as users
do on a GPU cluster; then the artifacts are checked where the config said they land."""

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


def test_train_then_index_jobs_through_ray_job_submit(token_cluster, train_rows, tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = _submit(
        token_cluster, "train", "--config", "jobs/configs/local/train.yaml",
        f"run_dir={run_dir}", "model.name_or_path=tiny-llama", "model.max_length=64",
        "train.num_workers=1", "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=1",
        "train.warmup_steps=1", "train.log_every=1", "train.query_max_length=32", "train.doc_max_length=48",
        f"--job-arg=--train-path={train_rows}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    assert "follow logs: ray job logs" in proc.stdout
    model_dir = run_dir / "train" / "model"
    assert (model_dir / "embedder_config.json").is_file()
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert summary["metrics"]["step"] == 2
    # Ray Train's checkpoints went to the configured storage (default <output_dir>/ray), not a temp dir.
    assert str(run_dir / "train" / "ray") in summary["checkpoint"]
    assert (run_dir / "train" / "config.resolved.yaml").is_file()

    corpus = tiny_corpus
    proc = _submit(
        token_cluster, "index", f"run_dir={run_dir}", f"index.corpus={corpus}", "index.format=jsonl",
        f"index.embedder={model_dir}", "index.index_type=flat", "index.shard_size=50",
        "index.encode.max_actors=2", "index.encode.batch_size=32", "index.encode.rows_per_block=40",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run_dir / "index" / "manifest.json").read_text())
    assert manifest["num_docs"] == 120 if "num_docs" in manifest else True
    from rayembed.index import ShardedIndex
    from rayembed.modeling.embedder import Embedder

    emb = Embedder.from_pretrained(model_dir)
    idx = ShardedIndex.open(run_dir / "index" / "manifest.json", expected_embedder=emb)
    text = json.loads(corpus.read_text().splitlines()[7])["text"]
    scores, ids = idx.search(emb.encode_documents([text]), k=3)
    assert int(ids[0][0]) == 7  # a document finds itself through the cluster-built index
