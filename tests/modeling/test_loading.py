"""One ModelConfig -> from_pretrained keywords function, with the rule each caller needs."""

from __future__ import annotations

import pytest

from rayembed.config import load_config
from rayembed.modeling.loading import base_model_id, pretrained_kwargs, split_base_model


def _model(*overrides: str):
    return load_config(None, list(overrides)).model


def test_changed_passes_only_keys_set_away_from_their_defaults():
    kw = pretrained_kwargs(_model("model.padding_side=right", "model.pooling=auto"), settings="changed")
    assert kw["padding_side"] == "right"
    # Defaults stay out, so a saved embedder or an encoder keeps its own settings.
    assert not {"pooling", "normalize", "max_length", "query_template", "attention"} & set(kw)
    assert kw["sparse"] is None and kw["multivector"] is None  # a model keeps the heads it has


def test_all_passes_every_setting_and_auto_pooling_as_none():
    kw = pretrained_kwargs(_model(), settings="all", dtype="float32", device="cpu")
    assert kw["pooling"] is None and kw["padding_side"] == "left" and kw["attention"] == "causal"
    assert kw["normalize"] is True and kw["max_length"] == 512
    assert (kw["dtype"], kw["device"]) == ("float32", "cpu")  # overrides win
    assert "lora" not in kw


def test_none_leaves_the_model_its_own_settings():
    kw = pretrained_kwargs(_model("model.padding_side=right", "model.gguf_file=m.gguf"), settings="none",
                           heads=False)
    assert set(kw) == {"dtype", "device", "trust_remote_code", "cache", "autocast"}


def test_lora_only_when_enabled():
    assert pretrained_kwargs(_model(), lora=True)["lora"] is None
    assert pretrained_kwargs(_model("model.lora.enabled=true"), lora=True)["lora"].enabled


def test_a_wrong_rule_is_named():
    with pytest.raises(ValueError, match="settings must be changed, all or none"):
        pretrained_kwargs(_model(), settings="some")


def test_gguf_base_model_id_round_trips():
    assert split_base_model(base_model_id("org/m", "q4.gguf")) == ("org/m", "q4.gguf")
    assert split_base_model(base_model_id("org/m", None)) == ("org/m", None)
