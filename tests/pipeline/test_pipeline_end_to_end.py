"""`rayembed pipeline` runs every stage end to end with a tiny model and writes a report.

The LLM is the scripted OpenAI-compatible server of the synth tests (a real HTTP server on
127.0.0.1, driven through the openai client); the data is the real local data, sliced small.
"""

import json
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "synth"))

from scripted_server import ScriptedLLM  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quick_pipeline_runs_every_stage(tmp_path, data_dir, ray_local, monkeypatch):
    from rayembed.config import load_config
    from rayembed.pipeline import run_pipeline

    monkeypatch.setenv("OPENAI_API_KEY", "sk-pipeline-test-key-0123456789")
    serve_key = "serve-planted-key-0123456789"
    (tmp_path / "serve.key").write_text(serve_key)
    llm = ScriptedLLM()
    base_url = llm.start()
    repo = Path(__file__).resolve().parents[2]
    try:
        cfg = load_config(repo / "jobs/configs/local/demo-quick.yaml", [
            f"run_dir={tmp_path / 'run'}",
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
            f"serve.api_key_file={tmp_path / 'serve.key'}",
            "pipeline.demo_queries=[what is lift on a wing]",
        ])
        report = run_pipeline(cfg)
    finally:
        llm.stop()

    run = tmp_path / "run"
    text = report.read_text()
    for stage in ("synth", "data", "train", "index", "eval", "serve"):
        assert (run / stage / "_stage.json").exists(), stage
    synth = json.loads((run / "synth" / "_stage.json").read_text())
    assert synth["accepted"] > 0
    data = json.loads((run / "data" / "_stage.json").read_text())
    # Synthetic rows keep their own source name (synth:<model>) in the mix.
    assert any(src.startswith("synth") for src in data["rows"]["train_by_source"]), data["rows"]
    trained = json.loads((run / "train" / "_stage.json").read_text())["embedder"]
    assert (Path(trained) / "embedder_config.json").exists()
    assert (run / "index" / "cranfield" / "manifest.json").exists()
    assert "tiny-llama (trained)" in text and "tiny-llama (untuned)" in text and "BM25" in text
    answers = json.loads((run / "serve" / "answers.json").read_text())
    assert answers and answers[0]["hits"]
    # Neither the synth client's key nor the endpoint's key is in anything the run wrote,
    # nor in Ray's logs of this session.
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for root in (run, logs):
        for f in root.rglob("*"):
            if f.is_file() and f.stat().st_size < 50_000_000:
                data = f.read_bytes()
                assert b"sk-pipeline-test-key" not in data, f
                assert serve_key.encode() not in data, f

    # A rerun skips every finished stage and rewrites the report.
    again = run_pipeline(cfg)
    assert again == report


def test_rerank_mode_is_refused_where_later_stages_need_an_embedder(tmp_path):
    from rayembed.config import ConfigError, load_config
    from rayembed.pipeline import Pipeline

    cfg = load_config(None, [f"run_dir={tmp_path}", "train.mode=rerank"])
    with pytest.raises(ConfigError, match="serve.reranker.path"):
        Pipeline(cfg)
    cfg = load_config(None, [f"run_dir={tmp_path}", "train.mode=rerank", "pipeline.stages=[data,train]"])
    Pipeline(cfg)
