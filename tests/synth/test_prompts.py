"""Prompt templates, placeholders and seeded sampling."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from rayembed.config import ConfigError, load_config
from rayembed.synth import prompts as P
from rayembed.synth.languages import XLMR_LANGUAGES, LanguageSampler, language_weights

COUNTS = {"short-long": 6, "long-short": 4, "short-short": 2, "long-long": 2, "sts": 5, "bitext": 5}


def _tasks():
    return {t: [f"Given an input for {t}, find item {i}." for i in range(10)]
            for t in ("short-long", "long-short", "short-short", "long-long")}


def _specs(seed=0, **kw):
    langs = LanguageSampler(language_weights(**kw))
    return P.generation_specs(COUNTS, seed, _tasks(), langs, 1, 512, 300)


def test_every_type_has_a_prompt_with_its_output_keys():
    specs = _specs()
    assert Counter(s.task_type for s in specs) == Counter(COUNTS)
    for s in specs:
        for key in P.OUTPUT_KEYS[s.task_type]:
            assert f'"{key}"' in s.prompt, (s.task_type, key)
        assert "JSON" in s.prompt
        if s.task_type in ("sts", "bitext"):
            assert s.instruction == P.SYMMETRIC_INSTRUCTIONS[s.task_type]
        else:
            assert s.instruction in s.prompt


def test_placeholders_come_from_the_value_sets():
    for s in _specs():
        ph = s.placeholders
        assert ph["difficulty"] in P.DIFFICULTY
        if s.task_type == "short-long":
            assert ph["query_type"] in P.QUERY_TYPES and ph["query_length"] in P.QUERY_LENGTHS
            assert ph["clarity"] in P.CLARITY and 50 <= ph["num_words"] <= 500
        if s.task_type == "sts":
            assert ph["high_score"] in (4, 4.5, 5) and ph["low_score"] in (2.5, 3, 3.5)
        if s.task_type == "bitext":
            assert ph["low_score"] in (1.5, 2, 2.5) and ph["src_lang"] != ph["tgt_lang"]
        if s.task_type == "long-long":
            assert "at least 300 words" in s.prompt


def test_same_seed_same_prompts_other_seed_other_prompts():
    a, b, c = _specs(0), _specs(0), _specs(1)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.id for s in a] != [s.id for s in c]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    bs = P.brainstorm_specs(COUNTS, 0, 20, 1, 512)
    assert len(bs) == 4 and all('Think up 20' in s.prompt for s in bs)
    assert [s.prompt for s in bs] == [s.prompt for s in P.brainstorm_specs(COUNTS, 0, 20, 1, 512)]


def test_language_weights_favour_english_and_high_resource():
    assert len(XLMR_LANGUAGES) >= 90
    w = language_weights()
    assert w["en"] == pytest.approx(0.43) and sum(w.values()) == pytest.approx(1.0)
    assert w["de"] > w["cs"] > w["sw"]
    rng = random.Random(0)
    draws = Counter(LanguageSampler(w).sample(rng) for _ in range(4000))
    assert 0.39 < draws["en"] / 4000 < 0.47
    only = language_weights(english_share=0.5, overrides={"fr": 0}, restrict=["en", "de", "fr"])
    assert only == {"en": 0.5, "de": 0.5}
    with pytest.raises(ValueError, match="Unknown language code"):
        language_weights(restrict=["xx"])


def test_config_validation_names_key_and_fix():
    with pytest.raises(ConfigError, match="synth.num_examples has unknown task type 'retrieval'"):
        load_config(None, ["synth.num_examples={retrieval: 3}"])
    with pytest.raises(ConfigError, match="synth.top_p=0.0 must lie in"):
        load_config(None, ["synth.top_p=0"])
    with pytest.raises(ConfigError, match="actor_num_cpus=0.0 must be > 0"):
        load_config(None, ["synth.actor_num_cpus=0"])
    with pytest.raises(ConfigError, match="price_table has no entry for model 'm'"):
        load_config(None, ["synth.model=m", "synth.max_cost_usd=1"])
    with pytest.raises(ConfigError, match="llm_server.host"):
        load_config(None, ["synth.llm_server.host=localhost"])


def test_reply_schemas_accept_only_what_the_validator_accepts():
    """A reply built to each schema's limits passes validation; the schema forbids what it rejects."""
    import json

    import jsonschema

    from rayembed.synth.validate import parse_task_list, reply_to_row

    langs = LanguageSampler(language_weights(restrict=["en"]))
    specs = P.generation_specs(COUNTS, 0, _tasks(), langs, 1, 512, 30, "json_schema", min_document_words=5)
    for s in specs:
        sch = s.schema
        assert sch["additionalProperties"] is False and set(sch["required"]) == set(sch["properties"])
        assert set(P.OUTPUT_KEYS[s.task_type]) <= set(sch["required"])
        reply = {}
        for i, (k, p) in enumerate(sch["properties"].items()):
            if p["type"] == "string" and "pattern" not in p:  # a language without spaces: lengths
                reply[k] = (chr(19968 + i) * p["minLength"])[: p["maxLength"]]
            elif p["type"] == "string":  # as many words as the pattern's minimum, of two characters
                words = int(re.search(r"\{(\d+),(\d+)\}\$$", p["pattern"]).group(1)) + 1
                reply[k] = " ".join(f"{chr(97 + i)}{chr(97 + j % 26)}" for j in range(words))
                assert re.fullmatch(p["pattern"].strip("^$"), reply[k])
                with pytest.raises(jsonschema.ValidationError):  # one word short
                    jsonschema.validate({**reply, k: reply[k].rsplit(" ", 1)[0]} if words > 1 else
                                        {**reply, k: ""}, sch)
            else:
                reply[k] = p["enum"][0]
        jsonschema.validate(reply, sch)
        reply_to_row(s.to_dict(), json.dumps(reply), finish_reason="stop", source="t", long_long_min_words=30,
                     min_document_words=5, max_text_chars=20000)
        with pytest.raises(jsonschema.ValidationError):  # nested objects (SmolLM2's STS habit) never match
            jsonschema.validate({**reply, P.OUTPUT_KEYS[s.task_type][0]: {"text": "x"}}, sch)
        if s.task_type == "sts":
            assert sch["properties"]["S2_score"]["enum"] == list(P.STS_HIGH)
            assert min(P.STS_HIGH) > max(sch["properties"]["S3_score"]["enum"])  # score_order always holds
    bs = P.brainstorm_specs(COUNTS, 0, 5, 1, 400, "json_schema")
    for s in bs:
        tasks = s.schema["properties"]["tasks"]
        assert tasks["minItems"] == tasks["maxItems"] == 5 and '{"tasks": [...]}' in s.prompt
        good = {"tasks": [f"Given query {'abcde'[i]}, find its well-known user's documents." for i in range(5)]}
        jsonschema.validate(good, s.schema)
        assert len(parse_task_list(json.dumps(good))) == 5
        for bad in ({"tasks": good["tasks"][:4]}, {"tasks": ["FindHomeCareersProjectList"] * 5},
                    {"tasks": ["find tips (1) (2) (3)"] * 5},
                    {"tasks": ["find_troubleshop guide_toc_list_d by_category_d_t help_d_d_t"] * 5}):
            # too few; one word (the parser drops it); numbering; symbol runs (a token a character)
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, s.schema)
    zh = P.response_schema("generate", "sts", {"language": "zh"}, 320)
    assert zh["properties"]["S1"]["minLength"] >= 3  # no spaces to count words by: lengths instead
    assert "JSON list of strings" in P.brainstorm_specs(COUNTS, 0, 5, 1, 400, "off")[0].prompt


def test_structured_output_config_and_the_json_mode_alias():
    assert load_config(None, []).synth.structured_output == "json_schema"
    with pytest.warns(FutureWarning, match="synth.json_mode is deprecated.*structured_output=json_object"):
        sc = load_config(None, ["synth.json_mode=true"]).synth
    assert (sc.structured_output, sc.json_mode) == ("json_object", None)
    with pytest.warns(FutureWarning):
        assert load_config(None, ["synth.json_mode=false"]).synth.structured_output == "off"
    assert load_config(None, ["synth.structured_output=off"]).synth.structured_output == "off"  # YAML: false
    with pytest.raises(ConfigError, match="synth.structured_output='xml'; use one of json_schema, json_object, off"):
        load_config(None, ["synth.structured_output=xml"])
    with pytest.raises(ConfigError, match="max_body_bytes"):
        load_config(None, ["synth.llm_server.max_body_bytes=10"])
