"""The Ray Data pipeline end to end against the scripted server: shards, rejects, summary,
dedup, budget, and a run killed midway then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from conftest import API_KEY, Reply, synth_cfg
from rayembed.data.schema import SCHEMA

REPO = Path(__file__).resolve().parents[2]


def read_rows(out: Path) -> list[dict]:
    shards = sorted(out.glob("part-*.parquet"))
    return pads.dataset([str(p) for p in shards], format="parquet").to_table().to_pylist()


def all_text(out: Path) -> str:
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in out.rglob("*") if p.is_file())


def test_faults_dedup_rejects_and_summary(ray_local, scripted_llm, api_key, tmp_path):
    from scripted_server import default_reply

    from rayembed.synth import run_synth

    def script(prompt, attempt):
        if "semantic similarity" in prompt:  # every STS prompt gets one and the same reply
            return Reply(json.dumps({"S1": "The same first sentence.", "S2": "An identical second one.",
                                     "S3": "Something else entirely."}))
        if "translation retrieval" in prompt:
            if "difficulty" in prompt or "college" in prompt:
                return Reply(f"Sorry, my key is {API_KEY}, no JSON today.")
            return Reply("```json\n" + default_reply(prompt) + "\n```")
        return None

    scripted_llm.script = script
    cfg = synth_cfg(tmp_path, scripted_llm.base_url, "synth.num_examples={sts: 5, bitext: 6}", "synth.chunk_size=4")
    s = run_synth(cfg)
    out = Path(s["output_dir"])
    rows = read_rows(out)
    assert len(rows) == s["accepted"] == s["rows_by_task_type"]["sts"] + s["rows_by_task_type"].get("bitext", 0)
    assert s["rows_by_task_type"]["sts"] == 1 and s["rejected_by_reason"]["duplicate"] == 4
    assert s["rejected_by_reason"].get("no_json", 0) + s["rows_by_task_type"].get("bitext", 0) == 6
    assert s["requests"] == 11 and s["retries"] == 0 and s["prompt_tokens"] > 0
    assert pads.dataset(str(out), format="parquet").schema.equals(SCHEMA)  # _files are ignored
    assert len({r["id"] for r in rows}) == len(rows)
    rejects = [json.loads(line) for p in (out / "_rejects").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert len(rejects) == s["rejected"]
    assert json.loads((out / "_summary.json").read_text())["accepted"] == s["accepted"]
    # The key reached the server but no file under the output folder.
    assert scripted_llm.log[0]["auth"] == f"Bearer {API_KEY}"
    assert API_KEY not in all_text(out)
    if s["rejected_by_reason"].get("no_json"):
        assert "***REDACTED***" in all_text(out / "_rejects")


def test_budget_stops_early_and_resume_does_not_repay(ray_local, scripted_llm, api_key, tmp_path):
    from rayembed.synth import run_synth

    price = "synth.price_table={scripted: {input: 1000, output: 1000}}"
    cfg = synth_cfg(tmp_path, scripted_llm.base_url, "synth.num_examples={sts: 16}", "synth.chunk_size=4",
                    "synth.num_actors=1", "synth.chunks_in_flight_per_actor=1", price, "synth.max_cost_usd=0.5")
    s = run_synth(cfg)
    assert s["stopped_early"] and "budget reached" in s["stopped_early"]
    assert s["cost_usd"] >= 0.5 and s["accepted"] < 16
    done_specs = 4 * s["chunks_new"]
    sent_before = len(scripted_llm.log)
    cfg.synth.max_cost_usd = 100.0
    s2 = run_synth(cfg)
    assert not s2["stopped_early"] and s2["accepted"] == 16
    assert s2["chunks_resumed"] == s["chunks_new"]
    # Only the specs of unfinished chunks were sent again (chunks in flight at the stop, at most).
    assert len(scripted_llm.log) - sent_before <= 16 - done_specs


@pytest.mark.timeout(900)
def test_killed_run_resumes_to_the_same_rows(ray_local, scripted_llm, api_key, tmp_path):
    from rayembed.synth import run_synth

    common = ["synth.num_examples={short-long: 6, sts: 18}", "synth.tasks_per_brainstorm=6", "synth.chunk_size=3",
              "synth.num_actors=1", "synth.chunks_in_flight_per_actor=1", "synth.max_in_flight=3"]
    ref = run_synth(synth_cfg(tmp_path / "ref", scripted_llm.base_url, *common))
    ref_rows = read_rows(Path(ref["output_dir"]))
    # Identical prompts get identical scripted replies: those are exact duplicates, dropped.
    assert ref["accepted"] + ref["rejected_by_reason"].get("duplicate", 0) == 24
    assert ref["accepted"] == len(ref_rows) >= 20

    # The same run in a separate process, killed (SIGKILL, whole process group) mid-generation.
    scripted_llm.reset()
    scripted_llm.latency_s = 0.3
    out = tmp_path / "killed" / "synth"
    raytmp = Path(f"/tmp/rk{os.getpid()}")
    args = [f"run_dir={tmp_path / 'killed'}", f"synth.base_url={scripted_llm.base_url}", "synth.model=scripted",
            "synth.backoff_base_s=0.05", "synth.backoff_max_s=0.2", "synth.request_timeout_s=5", *common,
            "compute.num_cpus=2", "compute.object_store_memory_mb=128", f"compute.temp_dir={raytmp}",
            "compute.log_to_driver=false"]
    proc = subprocess.Popen([sys.executable, "-m", "rayembed.cli", "synth", *args], cwd=REPO,
                            env={**os.environ}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "killed.log", "wb"))
    try:
        deadline = time.monotonic() + 600  # Ray start-up alone can take minutes on a loaded machine
        while not (out / "_progress" / "generate-part-00002.json").exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list((out / "_progress").glob("generate-*.json")))
    assert 3 <= done < 8  # killed midway: 8 generation chunks in all
    first_phase = scripted_llm.prompts()
    scripted_llm.reset()
    scripted_llm.latency_s = 0.0

    resumed = run_synth(synth_cfg(tmp_path / "killed", scripted_llm.base_url, *common))
    assert read_rows(out) == ref_rows
    assert resumed["accepted"] == ref["accepted"] and resumed["chunks_resumed"] == 1 + done
    assert resumed["rejected_by_reason"] == ref["rejected_by_reason"]
    again = scripted_llm.prompts()
    assert not any(p.startswith("Think up") for p in again)  # brainstorms were cached
    assert len(again) == 24 - 3 * done  # finished chunks were not paid for again
    assert len(first_phase) >= 1 + 3 * done
