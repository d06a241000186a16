"""A trained embedder's folder records whether its queries had instructions; evaluation's
``query_instructions: auto`` and training's validation follow it, so a model trained with
``data.stream.instructions=false`` is searched without the prefix it never saw, and serving warns
when its ``serve.default_instruction`` would add one."""

from __future__ import annotations

import json

import pytest
import torch

from rayembed.config import load_config
from rayembed.evaluate.runner import load_retriever
from rayembed.modeling.embedder import Embedder
from rayembed.train.tasks import ContrastiveTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _export(tmp_path, name: str, *over: str):
    cfg = load_config(None, ["model.name_or_path=tiny-llama", "model.max_length=64", *over])
    return ContrastiveTask(cfg, torch.device("cpu")).export(tmp_path / name)


def test_the_folder_records_instructions_and_auto_evaluation_follows_it(tmp_path):
    plain = _export(tmp_path, "plain", "data.stream.instructions=false")
    instructed = _export(tmp_path, "instructed")
    assert json.loads((plain / "embedder_config.json").read_text())["query_instructions"] is False
    assert json.loads((instructed / "embedder_config.json").read_text())["query_instructions"] is True

    # auto: as trained. A decoder trained without instructions is searched without them.
    assert load_retriever("m", str(plain)).instruct is False
    assert load_retriever("m", str(instructed)).instruct is True
    # An explicit policy still wins.
    assert load_retriever("m", str(plain), query_instructions="always").instruct is True
    assert load_retriever("m", str(instructed), query_instructions="never").instruct is False


def test_a_folder_without_the_record_keeps_the_decoder_and_encoder_defaults(tmp_path):
    base = Embedder.from_pretrained("tiny-llama", max_length=64)
    assert base.config.query_instructions is None and base.takes_instructions is True
    folder = base.save_pretrained(tmp_path / "base")
    assert load_retriever("m", str(folder)).instruct is True
    # An older folder (no key at all) loads as "not recorded".
    cfg_file = folder / "embedder_config.json"
    saved = json.loads(cfg_file.read_text())
    del saved["query_instructions"]
    cfg_file.write_text(json.dumps(saved))
    assert Embedder.from_pretrained(folder).takes_instructions is True
    # Encoders (all-MiniLM-L6-v2 and kin) were trained without instructions.
    base.config.is_decoder = False
    assert base.takes_instructions is False


def test_serving_warns_when_its_default_instruction_meets_a_model_trained_without(tmp_path, caplog):
    from rayembed.serving.encoder import QueryEncoder

    plain = _export(tmp_path, "plain", "data.stream.instructions=false")
    instructed = _export(tmp_path, "instructed")
    with caplog.at_level("WARNING", logger="rayembed.serving.encoder"):
        QueryEncoder.func_or_class(str(instructed), {"default_instruction": "Given a query, find passages"})
        assert "trained without query instructions" not in caplog.text
        QueryEncoder.func_or_class(str(plain), {"default_instruction": ""})
        assert "trained without query instructions" not in caplog.text
        QueryEncoder.func_or_class(str(plain), {"default_instruction": "Given a query, find passages"})
    assert "trained without query instructions" in caplog.text
    assert "serve.default_instruction= (empty)" in caplog.text
