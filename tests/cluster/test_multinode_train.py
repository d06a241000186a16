"""Training as a real cluster runs it: data, checkpoints and outputs in object storage (a moto S3
server), two DDP workers on two different Ray nodes, and one of those nodes lost mid-run.

The fast tests check that URI locations are resolved and checked before any work starts and
never become local folders. The slow test runs a real 2-worker fit on the ``multinode`` cluster,
kills the node of one worker once Ray Train has committed a checkpoint to the bucket, adds a
fresh node (as an autoscaler would), and checks that the run resumed from that checkpoint in the
bucket, kept its data position, and published a model that loads from its URI.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from rayembed.config import load_config

MAX_STEPS = 8
CHECKPOINT_EVERY = 2
RUN_NAME = "train"


def _cfg(run_dir: str, *over: str):
    """The tiny-llama + LoRA DDP fit of tests/train/test_fit.py, one worker per worker node."""
    return load_config(None, [
        f"run_dir={run_dir}",
        "model.name_or_path=tiny-llama", "model.max_length=64", "model.lora.enabled=true",
        "model.lora.dropout=0.0",
        "train.engine=ddp", "train.num_workers=2", "train.batch_size=8", "train.query_max_length=32",
        "train.doc_max_length=48", "train.lr=0.005", "train.warmup_steps=1", "train.temperature=0.05",
        "train.log_every=2", f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.max_failures=1", f"train.run_name={RUN_NAME}",
        # Half of a worker node's CPU plus its one `worker` resource: one Train worker per worker
        # node, never on the head or the data node.
        "train.cpus_per_worker=0.5", "train.resources_per_worker.worker=1",
        "data.stream.tokenize_num_cpus=0.25",
        *over,
    ])


# ----------------------------------------------------------------------------- fast: locations


def test_uri_outputs_map_to_uris_never_to_local_folders():
    from rayembed.train.trainer import output_dir, storage_path

    cfg = load_config(None, ["run_dir=s3://bkt/runs/r1"])
    assert output_dir(cfg) == "s3://bkt/runs/r1/train"
    assert storage_path(cfg) == "s3://bkt/runs/r1/train/ray"
    cfg = load_config(None, ["train.output_dir=s3://bkt/out?endpoint_override=minio:9000&scheme=http"])
    assert output_dir(cfg) == "s3://bkt/out?endpoint_override=minio:9000&scheme=http"
    assert storage_path(cfg) == "s3://bkt/out/ray?endpoint_override=minio:9000&scheme=http"
    cfg = load_config(None, ["run_dir=s3://bkt/r", "train.storage_path=gs://other/ckpt"])
    assert storage_path(cfg) == "gs://other/ckpt"  # a storage_path URI given is kept
    cfg = load_config(None, ["run_dir=runs/x"])
    assert output_dir(cfg) == Path("runs/x/train")
    assert storage_path(cfg) == str(Path("runs/x/train/ray").resolve())


@pytest.mark.parametrize("over, exc, match", [
    (["run_dir=s3://no-such-bucket-here/run"], ValueError,
     r"run_dir=s3://no-such-bucket-here/run/train: the bucket 'no-such-bucket-here' does not exist"),
    (["train.output_dir=ftp://host/out"], ValueError, r"train.output_dir: .*scheme 'ftp'"),
    (["train.storage_path=s3://no-such-bucket-here/ckpt"], ValueError,
     r"train.storage_path=s3://no-such-bucket-here/ckpt: the bucket 'no-such-bucket-here' does not exist"),
])
def test_bad_output_locations_fail_before_any_work(s3_store, tmp_path, monkeypatch, over, exc, match):
    from rayembed.train import run_training

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run_dir=s3://rayembed-test/early/run", *over])
    with pytest.raises(exc, match=match):
        run_training(cfg, ["s3://rayembed-test/early/data"])
    assert list(tmp_path.iterdir()) == []  # no 's3:' or 'ftp:' folder appeared here


def test_missing_training_data_uri_is_named(s3_store, tmp_path, monkeypatch):
    import ray

    from rayembed.cluster.storage import resolve_storage
    from rayembed.train import run_training

    monkeypatch.chdir(tmp_path)
    started = ray.is_initialized()
    cfg = load_config(None, ["run_dir=s3://rayembed-test/early/run"])
    missing = r"--train-path=s3://rayembed-test/early/nothing does not exist"
    with pytest.raises(FileNotFoundError, match=missing):
        run_training(cfg, ["s3://rayembed-test/early/nothing"])
    assert ray.is_initialized() == started  # refused before Ray was started
    assert not resolve_storage("s3://rayembed-test/early/run").exists()
    assert list(tmp_path.iterdir()) == []


def test_resources_per_worker_takes_custom_resources_only():
    from rayembed.config import ConfigError

    assert load_config(None, ["train.resources_per_worker.worker=1"]).train.resources_per_worker == {"worker": 1}
    with pytest.raises(ConfigError, match=r"train.resources_per_worker.CPU: use train.cpus_per_worker"):
        load_config(None, ["train.resources_per_worker={CPU: 2}"])
    with pytest.raises(ConfigError, match=r"train.resources_per_worker.worker must be positive"):
        load_config(None, ["train.resources_per_worker.worker=0"])


# ----------------------------------------------------------------------------- slow: a lost node


def _committed_step(snapshot) -> int | None:
    """The step of the latest checkpoint Ray Train has committed, from its snapshot in the bucket."""
    if not snapshot.exists():
        return None
    latest = json.loads(snapshot.read_bytes(""))["latest_checkpoint_result"]
    return None if latest is None else int(latest["metrics"]["checkpoint_step"])


def _train_workers() -> dict[str, str]:
    """ALIVE Ray Train worker actors -> their node id (from the GCS; no dashboard needed)."""
    from ray._private.state import actors

    return {aid: a["Address"]["NodeID"] for aid, a in actors(actor_state_name="ALIVE").items()
            if a["ActorClassName"] == "RayTrainWorker"}


class _Fit(threading.Thread):
    """``run_training`` in the background: nodes can only be added from the main thread (Ray's
    node start-up installs a SIGTERM handler), so the test thread is the one that kills and adds."""

    def __init__(self, cfg, paths):
        super().__init__(daemon=True)
        self.cfg, self.paths = cfg, paths
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from rayembed.train import run_training

        try:
            self.result = run_training(self.cfg, self.paths)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_node_fit_resumes_from_the_bucket_after_losing_a_node(multinode, data_node, rows_writer, tmp_path,
                                                                  monkeypatch):
    import ray

    from rayembed.cluster.storage import resolve_storage
    from rayembed.modeling.embedder import Embedder

    monkeypatch.chdir(tmp_path)  # so a URI turned into a relative folder would show up here
    base = f"s3://{multinode.bucket}/{uuid.uuid4().hex[:12]}"
    resolve_storage(f"{base}/data").upload(rows_writer(tmp_path / "rows", 128, 2))
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("head"))
    snapshot = resolve_storage(f"{base}/run/train/ray").join(RUN_NAME, "checkpoint_manager_snapshot.json")
    fit = _Fit(_cfg(f"{base}/run"), [f"{base}/data"])
    fit.start()

    # Once a checkpoint is committed to the bucket: lose the node of one Train worker, then add a
    # fresh worker node in its place, as an autoscaler would.
    deadline = time.monotonic() + 420
    while (first_seen := _committed_step(snapshot)) is None:
        assert fit.is_alive() and time.monotonic() < deadline, f"no checkpoint was committed ({fit.error!r})"
        time.sleep(0.1)
    before = _train_workers()
    nodes_before = sorted(before.values())
    # Matched by Ray's node id (``node_id``; a node handle's ``unique_id`` is its address).
    victim = next((n for n in multinode.workers if n.node_id in nodes_before), None)
    assert victim is not None, (first_seen, nodes_before, fit.error)
    killed = victim.node_id
    multinode.kill(victim)
    time.sleep(3.0)  # a report in flight may still commit; after that none can until the restart
    committed_at_kill = _committed_step(snapshot)
    added = multinode.add_worker().node_id
    nodes_after: list[str] = []
    while fit.is_alive() and time.monotonic() < deadline:
        after = {a: n for a, n in _train_workers().items() if a not in before}
        if len(after) == 2:
            nodes_after = sorted(after.values())
            break
        time.sleep(0.2)
    fit.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not fit.is_alive(), "the fit did not finish after the node was replaced"
    assert fit.error is None, repr(fit.error)
    model_uri = fit.result
    assert model_uri == f"{base}/run/train/model"

    # Before the loss: two workers on two different worker nodes; after it, on the survivor and
    # the node added in its place.
    workers = {n.node_id for n in multinode.workers} | {killed}
    assert len(set(nodes_before)) == 2 and set(nodes_before) <= workers, nodes_before
    assert head not in nodes_before and data_node.node_id not in nodes_before
    survivor = next(n for n in nodes_before if n != killed)
    assert nodes_after == sorted([survivor, added]), (nodes_after, survivor, added)

    out = resolve_storage(f"{base}/run/train")
    summary = out.read_json("summary.json")
    m = summary["metrics"]
    assert m["step"] == MAX_STEPS and m["final"] is True and m["world_size"] == 2
    # Resumed from the checkpoint committed to the bucket before the node was lost.
    assert committed_at_kill is not None and committed_at_kill >= first_seen
    assert m["attempts"] == 2 and m["resumed_from_step"] == committed_at_kill
    assert CHECKPOINT_EVERY <= committed_at_kill < MAX_STEPS
    assert summary["model"] == model_uri
    assert summary["checkpoint"].startswith(f"{base}/run/train/ray/{RUN_NAME}/checkpoint_")
    # The data position continued exactly: step k once, batch k-1 of the epoch, no batch twice.
    hist = [json.loads(line) for line in out.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [h["step"] for h in hist] == list(range(1, MAX_STEPS + 1))
    assert [h["batch_in_epoch"] for h in hist] == list(range(MAX_STEPS))
    assert len({h["first_id"] for h in hist}) == MAX_STEPS
    for name in ("config.resolved.yaml", "loss_curve.png", "probe.json", "model/_COMPLETE.json"):
        assert out.exists(name), name

    # The published model loads from its URI and reproduces the trained model's vectors.
    probe = out.read_json("probe.json")
    emb = Embedder.from_pretrained(model_uri)
    assert emb.config.weights == "lora"
    np.testing.assert_allclose(emb.encode(probe["texts"]), np.array(probe["vectors"]), rtol=1e-4, atol=1e-5)
    assert list(tmp_path.iterdir()) == [tmp_path / "rows"]  # nothing written as a local 's3:' folder
