"""Dataset reading for evaluation: BEIR, Cranfield (SMART) and STS-B, instructions, subsampling."""

from __future__ import annotations

import pytest

from rayembed.config import ConfigError, load_config
from rayembed.config.eval import DatasetSpec
from rayembed.evaluate import EVAL_INSTRUCTIONS, STSData, instruction_for, load_dataset
from rayembed.evaluate.datasets import doc_text


def test_paper_instructions_are_kept_exactly():
    assert EVAL_INSTRUCTIONS["msmarco"] == "Given a web search query, retrieve relevant passages that answer the query"
    assert EVAL_INSTRUCTIONS["scifact"] == "Given a scientific claim, retrieve documents that support or refute the claim"
    assert EVAL_INSTRUCTIONS["sts"] == "Retrieve semantically similar text."
    assert instruction_for("msmarco-subset") == EVAL_INSTRUCTIONS["msmarco"]
    assert instruction_for("FiQA2018") == EVAL_INSTRUCTIONS["fiqa2018"]
    assert instruction_for("cranfield").startswith("Given a question about aeronautics")
    assert instruction_for("stsb", kind="sts") == "Retrieve semantically similar text."
    assert instruction_for("cranfield", {"cranfield": "Find it"}) == "Find it"
    assert instruction_for("msmarco-subset", {"msmarco": "Mine"}) == "Mine"


def test_cranfield_reads_with_sequential_qrels_and_graded_gains(data_dir):
    data = load_dataset(DatasetSpec(name="cranfield", path="cranfield", format="smart"), data_dir)
    assert len(data.corpus) == 1400 and len(data.queries) == 225
    assert len(data.judged_query_ids()) == 225
    assert data.corpus["471"]["text"] == "" and data.corpus["995"]["text"] == ""
    # cranqrel's query 3 is cran.qry's third query, whose .I id is 004.
    assert data.queries["4"].startswith("what problems of heat conduction in composite slabs")
    assert data.qrels["1"]["184"] == 5 - 2
    assert set(g for q in data.qrels.values() for g in q.values()) == {0, 1, 2, 3, 4}
    assert data.instruction == instruction_for("cranfield")
    # Cranfield's body repeats its title; the title is not prepended a second time.
    assert doc_text(data.corpus["1"]).count("experimental investigation of the aerodynamics") == 1


def test_beir_folder_and_subsampling_keeps_judged_documents(tiny_beir, data_dir):
    full = load_dataset(DatasetSpec(name="tiny", path=str(tiny_beir)))
    assert full.judged_query_ids() == ["q1", "q2", "q3"]
    assert doc_text(full.corpus["d4"]) == "Photosynthesis Plants turn sunlight, water and carbon dioxide into sugar."
    assert doc_text(full.corpus["d1"]) == "Paris is the capital and largest city of France."
    ms = load_dataset(DatasetSpec(name="msmarco-subset", path="msmarco-subset", max_queries=3, max_docs=1000), data_dir)
    assert len(ms.judged_query_ids()) == 3 and len(ms.corpus) == 1000
    assert {d for q in ms.qrels.values() for d in q} <= set(ms.corpus)


def test_stsb_test_split(data_dir):
    data = load_dataset(DatasetSpec(name="stsb", path="stsb", format="sts", split="test"), data_dir)
    assert isinstance(data, STSData) and len(data.scores) == 1379
    assert data.instruction == "Retrieve semantically similar text."


def test_bad_paths_and_formats_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; set the dataset's path"):
        load_dataset(DatasetSpec(name="x", path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Cannot tell the format"):
        load_dataset(DatasetSpec(name="x", path=str(tmp_path / "empty")))


def test_eval_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="eval.models is empty"):
        load_config(None, ["eval.models={}"])
    with pytest.raises(ConfigError, match="duplicate names"):
        load_config(None, ["eval.datasets=[{name: a, path: x}, {name: a, path: y}]"])
    with pytest.raises(ConfigError, match="eval.passkey.lengths"):
        load_config(None, ["eval.passkey.lengths=[8]"])
    with pytest.raises(ConfigError, match="eval.top_k"):
        load_config(None, ["eval.top_k=5"])
    cfg = load_config("jobs/configs/local/eval.yaml", [])
    assert [d.name for d in cfg.eval.datasets] == ["msmarco-subset", "cranfield", "stsb"]


def test_relative_paths_fall_back_to_the_default_data_dir():
    data = load_dataset(DatasetSpec(name="cranfield", path="cranfield", max_queries=2))
    assert len(data.judged_query_ids()) == 2
