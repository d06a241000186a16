"""`rayembed pipeline` runs every stage end to end with a tiny model and writes a report.

The main run happens as on a real cluster: a multi-node Ray on 127.0.0.1 whose nodes share
nothing but an S3 server, with ``run_dir`` in the bucket. The LLM is the scripted
OpenAI-compatible server of the synth tests (a real HTTP server on 127.0.0.1, driven through the
openai client); the data is the real local data, sliced small.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "synth"))

from scripted_server import ScriptedLLM  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAYEMBED = str(Path(sys.executable).with_name("rayembed"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llm():
    server = ScriptedLLM()
    base_url = server.start()
    yield base_url
    server.stop()


def _quick_cfg(run_dir, data_dir, base_url, *extra):
    from rayembed.config import load_config

    return load_config(REPO / "jobs/configs/local/demo-quick.yaml", [
        f"run_dir={run_dir}",
        f"data_dir={data_dir}",
        "model.name_or_path=tiny-llama",
        "model.max_length=64",
        "synth.launch_local_llm=false",
        f"synth.base_url={base_url}",
        "synth.model=scripted",
        "synth.num_examples={short-long: 2, sts: 2}",
        "synth.tasks_per_brainstorm=2",
        "data.sources=[{name: stsb, format: stsb, path: stsb/sts-train.csv, max_rows: 200}, "
        "{name: weak-cranfield, format: weak, path: cranfield, weak_mode: both, max_rows: 200}]",
        "train.num_workers=1",
        "train.batch_size=8",
        "train.max_steps=3",
        "train.checkpoint_every=3",
        "index.limit=300",
        "eval.datasets=[{name: cranfield, path: cranfield, format: smart, max_queries: 10, max_docs: 150}]",
        "pipeline.baselines={BM25: bm25}",
        f"pipeline.serve_port={_free_port()}",
        "pipeline.demo_queries=[what is lift on a wing]",
        "compute.log_to_driver=false",
        *extra,
    ])


def _bucket_files(uri: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    from rayembed.cluster.storage import resolve_storage

    st = resolve_storage(uri)
    infos = st.filesystem.get_file_info(pafs.FileSelector(st.path, recursive=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with st.filesystem.open_input_stream(i.path) as f:
                out[i.path[len(st.path) + 1:]] = f.read()
    return out


def test_quick_pipeline_runs_every_stage_into_a_bucket(tmp_path, data_dir, multinode, data_node, llm, monkeypatch):
    """Every output under s3://bucket/run: the local scratch can be deleted afterwards, a rerun
    still finds every stage finished, and a fresh process searches the index in the bucket."""
    import ray

    from rayembed.cluster.storage import local_cache_root, resolve_storage
    from rayembed.pipeline import Pipeline, run_pipeline

    monkeypatch.setenv("OPENAI_API_KEY", "sk-pipeline-test-key-0123456789")
    serve_key = "serve-planted-key-0123456789"
    (tmp_path / "serve.key").write_text(serve_key)
    run_uri = f"s3://{multinode.bucket}/run-{uuid.uuid4().hex[:8]}"
    cfg = _quick_cfg(run_uri, data_dir, llm, f"serve.api_key_file={tmp_path / 'serve.key'}")
    report = run_pipeline(cfg)
    assert report == f"{run_uri}/report.md"

    files = _bucket_files(run_uri)
    for stage in ("synth", "data", "train", "index", "eval", "serve"):
        assert f"{stage}/_stage.json" in files, stage
    for published in ("synth", "data", "eval"):  # written locally, published with a completion marker
        assert f"{published}/_COMPLETE.json" in files, published
    assert "train/model/_COMPLETE.json" in files and "index/cranfield/manifest.json" in files
    text = files["report.md"].decode()
    synth = json.loads(files["synth/_stage.json"])
    assert synth["accepted"] > 0
    data = json.loads(files["data/_stage.json"])
    # Synthetic rows keep their own source name (synth:<model>) in the mix.
    assert any(src.startswith("synth") for src in data["rows"]["train_by_source"]), data["rows"]
    assert json.loads(files["train/_stage.json"])["embedder"] == f"{run_uri}/train/model"
    assert "tiny-llama (trained)" in text and "tiny-llama (untuned)" in text and "BM25" in text
    answers = json.loads(files["serve/answers.json"])
    assert answers and answers[0]["hits"]
    # Neither the synth client's key nor the endpoint's key is in anything the run wrote, in the
    # bucket or on this machine, nor in Ray's logs of this session.
    scratch = Pipeline(cfg).scratch
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    blobs = list(files.items()) + [(str(f), f.read_bytes()) for root in (scratch, logs) for f in root.rglob("*")
                                   if f.is_file() and f.stat().st_size < 50_000_000]
    for name, blob in blobs:
        assert b"sk-pipeline-test-key" not in blob, name
        assert serve_key.encode() not in blob, name

    # Nothing on this machine is needed any more: drop the scratch folder and the download cache.
    shutil.rmtree(scratch)
    shutil.rmtree(local_cache_root(), ignore_errors=True)
    # A rerun finds every stage finished in the bucket and rewrites only the report.
    stamp = resolve_storage(run_uri).read_json("train/_stage.json")["seconds"]
    assert run_pipeline(cfg) == report
    assert resolve_storage(run_uri).read_json("train/_stage.json")["seconds"] == stamp
    # A fresh process searches the index in the bucket with the trained model in the bucket.
    proc = subprocess.run([RAYEMBED, "search", "--index", f"{run_uri}/index/cranfield", "-k", "3", "--json",
                           "--query", "what is lift on a wing"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])["hits"]) == 3


def test_changed_config_reruns_the_stage_and_those_after_it(tmp_path, data_dir, multinode, data_node, llm):
    """Stage markers carry a fingerprint of the config they were made with: an unchanged stage is
    reused, a changed one reruns, a stale input is refused by name, and report.md never shows
    results made under another config."""
    from rayembed.config import ConfigError
    from rayembed.pipeline import run_pipeline

    run = tmp_path / "run"
    base = ("pipeline.stages=[synth, data]",)
    cfg = _quick_cfg(run, data_dir, llm, *base)
    run_pipeline(cfg)
    first = {s: json.loads((run / s / "_stage.json").read_text()) for s in ("synth", "data")}

    # data changed: synth is reused as it is, data reruns.
    cfg = _quick_cfg(run, data_dir, llm, *base, "data.val_fraction=0.1")
    run_pipeline(cfg)
    second = {s: json.loads((run / s / "_stage.json").read_text()) for s in ("synth", "data")}
    assert second["synth"] == first["synth"]
    assert second["data"]["fingerprint"]["data"] != first["data"]["fingerprint"]["data"]
    assert second["data"]["fingerprint"]["stage synth"] == first["data"]["fingerprint"]["stage synth"]

    # synth changed but only data is asked for: data would read a stale synth output, so it refuses.
    cfg = _quick_cfg(run, data_dir, llm, *base, "data.val_fraction=0.1", "synth.temperature=0.3")
    with pytest.raises(ConfigError, match=r"Stage 'synth'.*synth changed"):
        run_pipeline(cfg, ["data"])
    report = (run / "report.md").read_text()
    assert "Stale stages" in report and "- synth: synth changed" in report
    assert "## Synthetic data" not in report

    # The whole list again: synth reruns, and data after it because its input changed.
    run_pipeline(cfg)
    third = {s: json.loads((run / s / "_stage.json").read_text()) for s in ("synth", "data")}
    assert third["synth"]["fingerprint"]["synth"] != second["synth"]["fingerprint"]["synth"]
    assert third["data"]["fingerprint"]["stage synth"] != second["data"]["fingerprint"]["stage synth"]
    assert "Stale stages" not in (run / "report.md").read_text()


def test_rerank_mode_is_refused_where_later_stages_need_an_embedder(tmp_path):
    from rayembed.config import ConfigError, load_config
    from rayembed.pipeline import Pipeline

    cfg = load_config(None, [f"run_dir={tmp_path}", "train.mode=rerank"])
    with pytest.raises(ConfigError, match="serve.reranker.path"):
        Pipeline(cfg)
    cfg = load_config(None, [f"run_dir={tmp_path}", "train.mode=rerank", "pipeline.stages=[data,train]"])
    Pipeline(cfg)
