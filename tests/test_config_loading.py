"""Config: recipes load, overrides apply, bad input names the key and the fix."""

from pathlib import Path

import pytest
import yaml

from rayembed.config import ConfigError, RayembedConfig, load_config, parse_overrides, save_resolved, to_dict

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "jobs" / "configs").rglob("*.yaml"))


def test_defaults_build():
    cfg = load_config()
    assert isinstance(cfg, RayembedConfig)
    assert cfg.model.name_or_path == "smollm2-135m"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, RayembedConfig)


def test_overrides_are_typed_and_nested():
    cfg = load_config(overrides=["model.max_length=256", "model.lora.r=8", "model.lora.target_modules=[q_proj, v_proj]", "seed=3"])
    assert cfg.model.max_length == 256
    assert cfg.model.lora.r == 8
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.seed == 3


def test_exponent_floats_without_a_dot(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; a float field takes it as the number users meant.
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 1e-4\n")
    assert load_config(p, ["train.weight_decay=1e-2"]).train.lr == 1e-4
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_config(overrides=["train.lr=fast"])


def test_yaml_then_override(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  max_length: 128\n  pooling: mean\n")
    cfg = load_config(p, ["model.max_length=64"])
    assert (cfg.model.max_length, cfg.model.pooling) == (64, "mean")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.nmae_or_path=x"], r"Unknown config key 'model.nmae_or_path'.*Did you mean 'name_or_path'"),
        (["modle.max_length=3"], r"Unknown config key 'modle'.*Did you mean 'model'"),
        (["model.max_length=abc"], r"model.max_length: expected an integer"),
        (["model.max_length=4"], r"max_length must be at least 8"),
        (["model.pooling=median"], r"model.pooling: 'median' is not one of"),
        (["model.normalize=maybe"], r"model.normalize: expected true or false"),
        (["model.query_template=Query: {text}"], r"must contain both \{instruction\} and \{text\}"),
        (["model.lora.r=0"], r"model.lora.r must be a positive rank"),
        (["model.max_length"], r"has no '='"),
    ],
)
def test_bad_config_messages(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_bad_yaml_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_resolved_config_roundtrips(tmp_path):
    cfg = load_config(overrides=["model.max_length=99"])
    path = save_resolved(cfg, tmp_path)
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load(path.read_text())["model"]["max_length"] == 99


def test_parse_overrides_values_are_yaml():
    tree = parse_overrides(["a.b=1", "a.c=true", "d=[1, 2]", "e=hello world", "f="])
    assert tree == {"a": {"b": 1, "c": True}, "d": [1, 2], "e": "hello world", "f": ""}
