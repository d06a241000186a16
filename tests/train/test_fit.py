"""Ray Train fits on CPU with 2 workers: DDP with a worker killed mid-run, and DeepSpeed ZeRO-3
with GradCache. Each fit costs tens of seconds, so each checks many things at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rayembed.config import load_config

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, *over: str):
    return load_config(
        None,
        [
            f"run_dir={tmp_path}",
            "model.name_or_path=tiny-llama", "model.max_length=64", "model.lora.enabled=true",
            "model.lora.dropout=0.0",
            "train.num_workers=2", "train.batch_size=8", "train.query_max_length=32",
            "train.doc_max_length=48", "train.lr=0.005", "train.warmup_steps=1",
            "train.temperature=0.05", "train.log_every=2",
            *over,
        ],
    )


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_saved_model(model_dir: Path) -> None:
    """The saved folder loads with no extra flags and reproduces the trained model's vectors."""
    from rayembed.modeling.embedder import Embedder

    probe = json.loads((model_dir.parent / "probe.json").read_text())
    emb = Embedder.from_pretrained(model_dir)
    assert emb.config.weights == "lora"
    got = emb.encode(probe["texts"])
    np.testing.assert_allclose(got, np.array(probe["vectors"]), rtol=1e-4, atol=1e-5)


def _loss_falls(hist: list[dict]) -> None:
    losses = [h["loss"] for h in hist]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses


def test_ddp_two_workers_recovers_from_killed_worker(tmp_path, train_shards, ray_train_local):
    """Rank 1 dies at step 5; FailureConfig restarts from the latest checkpoint and finishes."""
    from rayembed.train import run_training

    cfg = _cfg(
        tmp_path, "train.engine=ddp", "train.max_steps=8", "train.checkpoint_every=2",
        "train.fail_at_step=5", "train.max_failures=1",
    )
    model_dir = run_training(cfg, [train_shards])
    out = model_dir.parent
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    assert summary["step"] == 8 and summary["final"] is True
    # Resumed from the latest checkpoint: the worker dies only after Ray committed the step-4 report.
    assert summary["attempts"] == 2 and summary["resumed_from_step"] == 4
    # The gather: every worker's loss saw both workers' documents (positives + negatives).
    assert summary["local_docs"] == 8 and summary["pool_docs"] == 16
    assert summary["model_flops_per_s"] > 0 and 0 <= summary["padding_share"] < 1
    hist = _history(out)
    assert [h["step"] for h in hist] == list(range(1, 9))
    # Throughput of each logging window lands in metrics.jsonl on the logged steps.
    assert [h["step"] for h in hist if "model_flops_per_s" in h] == [s for s in range(1, 9) if s % 2 == 0]
    # The data position continues exactly: batch k of the epoch at step k+1, no batch twice.
    assert [h["batch_in_epoch"] for h in hist] == list(range(8))
    assert len({h["first_id"] for h in hist}) == 8
    # The LR schedule continued where it stopped: linear decay from step 2 on.
    lrs = [h["lr"] for h in hist]
    assert lrs == pytest.approx([0.005 * min(1.0, (8 - s) / 7) for s in range(8)])
    _loss_falls(hist)
    _check_saved_model(model_dir)
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "config.resolved.yaml").is_file()


def test_zero3_two_workers_with_gradcache(tmp_path, train_shards, ray_train_local):
    """DeepSpeed ZeRO-3 on 2 CPU workers, GradCache chunks of 2: trains, checkpoints, exports."""
    from rayembed.train import run_training

    cfg = _cfg(
        tmp_path, "train.engine=deepspeed", "train.max_steps=6", "train.checkpoint_every=3",
        "train.chunk_size=2",
    )
    model_dir = run_training(cfg, [train_shards])
    out = model_dir.parent
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    assert summary["step"] == 6 and summary["pool_docs"] == 16
    # FLOPs are counted on the full weights, not on ZeRO-3's empty per-rank placeholders.
    assert summary["model_flops_per_s"] > 0
    ds = json.loads((out / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 8
    assert ds["train_micro_batch_size_per_gpu"] == 4
    hist = _history(out)
    assert all(np.isfinite(h["grad_norm"]) for h in hist)
    _loss_falls(hist)
    _check_saved_model(model_dir)
