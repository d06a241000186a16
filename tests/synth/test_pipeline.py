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
from synth_helpers import API_KEY, Reply, synth_cfg

from rayembed.config import ConfigError
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


# ----------------------------------------------------------------------------- failures, fingerprint, commits


def _fail_first(n: int, status: int = 401):
    """A script failing the first request of the first ``n`` distinct prompts with ``status``."""
    import threading

    failing: set[str] = set()
    lock = threading.Lock()

    def script(prompt, attempt):
        with lock:
            if attempt == 1 and len(failing) < n:
                failing.add(prompt)
            if attempt == 1 and prompt in failing:
                return Reply(status=status, error_message="invalid api key")
        return None

    return script


def test_failed_requests_fail_the_run_and_are_sent_again_on_resume(ray_local, scripted_llm, api_key, tmp_path):
    from rayembed.synth import run_synth
    from rayembed.synth.pipeline import SynthFailed

    scripted_llm.script = _fail_first(3)
    cfg = synth_cfg(tmp_path, scripted_llm.base_url, "synth.num_examples={sts: 8}", "synth.chunk_size=4",
                    "synth.max_failure_rate=0.25")
    with pytest.raises(SynthFailed) as e:
        run_synth(cfg)
    msg = str(e.value)
    assert f"3 of 8 requests failed at {scripted_llm.base_url}" in msg and "request_http_401 x3" in msg
    assert "above synth.max_failure_rate=0.25" in msg and API_KEY not in msg
    out = tmp_path / "synth"
    assert len(read_rows(out)) == 5  # the answered requests are kept
    assert not any("request_" in line for p in (out / "_rejects").glob("*.jsonl") for line in p.read_text().splitlines())

    scripted_llm.reset()
    scripted_llm.script = None  # the endpoint is fixed
    s = run_synth(cfg)
    assert len(scripted_llm.log) == 3  # only the failed requests were sent again
    assert s["accepted"] == 8 and s["failed_requests"] == 0
    rows = read_rows(out)
    assert len(rows) == len({r["id"] for r in rows}) == 8


@pytest.fixture
def restore_root_logging():
    """The CLI configures the root logger for stderr; put it back so later tests do not log to
    this test's closed capture stream."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    if hasattr(root, "_rayembed_configured"):
        del root._rayembed_configured


def test_every_request_failing_exits_nonzero(ray_local, scripted_llm, api_key, tmp_path, capsys, restore_root_logging):
    from rayembed.cli import main

    scripted_llm.script = lambda prompt, attempt: Reply(status=401, error_message="invalid api key")
    rc = main(["synth", f"run_dir={tmp_path}", f"synth.base_url={scripted_llm.base_url}", "synth.model=scripted",
               "synth.num_examples={sts: 2}", "synth.max_failure_rate=1.0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"2 of 2 requests failed at {scripted_llm.base_url}" in err and "every request failed" in err
    assert API_KEY not in err
    assert read_rows(tmp_path / "synth") == []


def test_a_dead_endpoint_stops_the_run_early(ray_local, scripted_llm, api_key, tmp_path):
    """Past two chunks' worth of requests above the failure rate, no further chunk is sent."""
    from rayembed.synth import run_synth
    from rayembed.synth.pipeline import SynthFailed

    scripted_llm.script = lambda prompt, attempt: Reply(status=503)
    cfg = synth_cfg(tmp_path, scripted_llm.base_url, "synth.num_examples={sts: 20}", "synth.chunk_size=2",
                    "synth.num_actors=1", "synth.chunks_in_flight_per_actor=1", "synth.max_in_flight=2",
                    "synth.max_attempts=1")
    with pytest.raises(SynthFailed, match="every request failed"):
        run_synth(cfg)
    # Two chunks committed, plus at most the chunks Ray Data had already handed to the actor.
    assert 4 <= len(scripted_llm.log) <= 10
    assert json.loads((tmp_path / "synth" / "_summary.json").read_text())["stopped_early"].startswith("4 of 4")


def test_fingerprint_covers_every_setting_that_changes_rows(tmp_path):
    from rayembed.synth.resume import check_manifest, fingerprint

    def fp(*overrides):
        return fingerprint(synth_cfg(tmp_path, "http://127.0.0.1:1/v1", *overrides).synth, 0)

    import dataclasses

    from rayembed.config.synth import SynthConfig

    base = fp()
    changes = ["synth.temperature=0.7", "synth.top_p=0.9", "synth.min_document_words=3", "synth.max_text_chars=500",
               "synth.source_name=mine", "synth.long_long_min_words=50", "synth.max_tokens=64"]
    if "structured_output" in SynthConfig.__dataclass_fields__:
        changes.append("synth.structured_output=json_object")
    for changed in changes:
        assert fp(changed)["fingerprint"] != base["fingerprint"], changed
    # A key added to the section later is covered without touching the fingerprint code.

    Extended = dataclasses.make_dataclass("Extended", [("new_knob", int, 1)], bases=(SynthConfig,))
    assert fingerprint(Extended(new_knob=2), 0)["fingerprint"] != fingerprint(Extended(), 0)["fingerprint"]
    for same in ("synth.num_actors=3", "synth.request_timeout_s=9", "synth.base_url=http://127.0.0.1:2/v1",
                 "synth.api_key=sk-other-0123456789abcdef", "synth.max_failure_rate=0.9", "synth.max_in_flight=2"):
        assert fp(same)["fingerprint"] == base["fingerprint"], same
    check_manifest(tmp_path / "o", base, overwrite=False)
    with pytest.raises(ConfigError, match=r"changed: temperature"):
        check_manifest(tmp_path / "o", fp("synth.temperature=0.7"), overwrite=False)


class Killed(Exception):
    pass


@pytest.mark.parametrize("when", ["before_marker", "before_rename"])
def test_a_shard_is_visible_only_once_committed(ray_local, scripted_llm, api_key, tmp_path, monkeypatch, when):
    """A kill between a shard's write and its commit never leaves a shard that readers see
    without its marker; the next run finishes or redoes that chunk, to the same rows."""
    import rayembed.io
    from rayembed.synth import run_synth

    common = ["synth.num_examples={sts: 8}", "synth.chunk_size=4", "synth.num_actors=1",
              "synth.chunks_in_flight_per_actor=1"]
    out = tmp_path / "run" / "synth"
    real_json, real_replace = rayembed.io.atomic_write_json, os.replace

    def write_json(path, obj, **kw):
        if when == "before_marker" and Path(path).name == "generate-part-00001.json":
            raise Killed(path)
        return real_json(path, obj, **kw)

    def replace(src, dst):
        if when == "before_rename" and Path(dst).name == "part-00001.parquet" and Path(dst).parent == out:
            raise Killed(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(rayembed.io, "atomic_write_json", write_json)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        run_synth(synth_cfg(tmp_path / "run", scripted_llm.base_url, *common))
    monkeypatch.undo()
    assert [p.name for p in out.glob("part-*.parquet")] == ["part-00000.parquet"]
    committed = read_rows(out)
    assert len(pads.dataset(str(out), format="parquet").to_table()) == 4  # what a reader of the folder sees
    scripted_llm.reset()
    resumed = run_synth(synth_cfg(tmp_path / "run", scripted_llm.base_url, *common))
    rows = read_rows(out)
    assert len(rows) == len({r["id"] for r in rows}) == resumed["accepted"] == 8
    assert rows[:4] == committed  # chunk 0 untouched
    # Uncommitted: chunk 1 is sent again. Committed but not yet renamed: finished without a request.
    assert len(scripted_llm.log) == (4 if when == "before_marker" else 0)
