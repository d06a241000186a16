"""The train section, the recipes and the generated DeepSpeed JSON (fast, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayembed.config import ConfigError, load_config
from rayembed.train.engine import deepspeed_config
from rayembed.train.trainer import check_config

REPO = Path(__file__).resolve().parents[2]


def test_cluster_template_matches_the_generator():
    cfg = load_config(REPO / "jobs/configs/gpu/train.yaml")
    template = json.loads((REPO / "cluster/deepspeed_zero3.json").read_text())
    assert deepspeed_config(cfg.train, cfg.train.num_workers) == template


def test_gpu_recipe_has_the_paper_defaults():
    t = load_config(REPO / "jobs/configs/gpu/train.yaml").train
    assert (t.lr, t.warmup_steps, t.weight_decay, t.temperature, t.num_negatives) == (1e-4, 100, 0.1, 0.02, 1)
    assert t.batch_size == 2048 and t.gradient_checkpointing and t.resolved_precision() == "bf16"
    assert t.resolved_engine() == "deepspeed" and t.deepspeed.zero_stage == 3 and t.deepspeed.torch_adam
    local = load_config(REPO / "jobs/configs/local/train.yaml")
    assert local.train.resolved_engine() == "ddp" and local.train.cpus_per_worker < 1


def test_deepspeed_json_follows_config():
    cfg = load_config(None, [
        "train.batch_size=64", "train.num_workers=4", "train.use_gpu=true", "train.precision=fp16",
        "train.deepspeed.zero_stage=2", "train.deepspeed.offload_optimizer=cpu",
    ])
    ds = deepspeed_config(cfg.train, 4)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.batch_size=7", "train.num_workers=2"], r"train.batch_size=7 must be a positive multiple of train.num_workers"),
        (["train.batch_size=8", "train.chunk_size=3"], r"train.chunk_size=3 must be 0 \(off\) or divide"),
        (["train.deepspeed.zero_stage=2", "train.deepspeed.offload_params=cpu"], r"offload_params needs ZeRO stage 3"),
        (["train.eval_every=10"], r"train.eval_dataset is empty"),
        (["train.mode=mntp", "train.chunk_size=2", "train.batch_size=8"], r"chunk_size \(GradCache\) applies to contrastive"),
        (["train.temperature=0"], r"train.temperature must be positive"),
        (["train.matryoshka_dims=[0,64]"], r"train.matryoshka_dims must hold positive sizes"),
        (["train.matryoshka_dims=[128,64]"], r"strictly increasing without repeats, got \[128, 64\]; write them as \[64, 128\]"),
        (["train.matryoshka_dims=[64,64]"], r"strictly increasing without repeats"),
        (["train.matryoshka_dims=64"], r"train.matryoshka_dims: expected a list"),
        (["train.matryoshka_weights=[1,1]"], r"train.matryoshka_weights is set but train.matryoshka_dims is empty"),
        (["train.matryoshka_dims=[64]", "train.matryoshka_weights=[1]"], r"needs 2 numbers, one per size .* full dimension last"),
        (["train.matryoshka_dims=[64]", "train.matryoshka_weights=[1,-1]"], r"matryoshka_weights must be >= 0"),
        (["train.matryoshka_dims=[64]", "train.mode=mntp"], r"train.mode=mntp makes no embeddings to nest"),
    ],
)
def test_bad_train_config_is_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.fail_at_step=2", "train.checkpoint_every=5"], r"fail_at_step=2 must come after the first checkpoint"),
        (["train.use_gpu=true", "train.engine=deepspeed", "train.precision=fp16", "train.chunk_size=2",
          "train.batch_size=8"], r"GradCache\) cannot combine with DeepSpeed fp16"),
        (["train.precision=fp16"], r"fp16 needs a GPU"),
    ],
)
def test_impossible_combinations_fail_before_launch(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_config(load_config(None, overrides))


def test_cli_prints_generated_deepspeed_json(capsys):
    from rayembed.cli import main

    assert main(["train", "--config", str(REPO / "jobs/configs/gpu/train.yaml"), "--print-deepspeed"]) == 0
    assert json.loads(capsys.readouterr().out)["zero_optimization"]["stage"] == 3
