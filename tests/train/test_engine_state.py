"""DDP training state on disk: safetensors plus JSON, restored exactly, and never unpickled."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from rayembed.config import load_config
from rayembed.train.engine import DDPEngine

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _engine(device: str, seed: int = 0) -> DDPEngine:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)  # a frozen part stays out of the checkpoint
    train = load_config(None, ["train.lr=0.01", "train.warmup_steps=2", "train.max_steps=10"]).train
    return DDPEngine(model, train, torch.device(device))


def _steps(engine: DDPEngine, n: int) -> None:
    for _ in range(n):
        x = torch.randn(5, 8, device=engine.device)
        engine.backward(engine.module(x).pow(2).mean())
        engine.step()


@pytest.mark.parametrize("device", DEVICES)
def test_ddp_state_round_trips_exactly_without_pickles(device, tmp_path):
    a = _engine(device)
    _steps(a, 3)
    random.seed(7)
    np.random.seed(7)
    a.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ddp_state.json", "ddp_state.safetensors", "rng_state-rank0.json", "rng_state-rank0.safetensors"]
    expect = (random.random(), np.random.rand(), torch.rand(3), [p.detach().clone() for p in a.unwrapped.parameters()])

    b = _engine(device)  # the same frozen weights (not in the checkpoint), an untouched optimizer
    with torch.no_grad():
        for p in b.unwrapped.parameters():
            if p.requires_grad:
                p.add_(1.0)
    b.load(tmp_path)
    assert (random.random(), np.random.rand()) == expect[:2]
    assert torch.equal(torch.rand(3), expect[2])
    for p, q in zip(b.unwrapped.parameters(), a.unwrapped.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q)
    assert b.scheduler.state_dict()["last_epoch"] == 3 and b.lr == a.lr
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name, t in sa["state"][k].items():
            assert torch.equal(t.cpu(), sb["state"][k][name].cpu()), (k, name)
    # Training on from the restored state matches training on from the original.
    torch.manual_seed(3)
    _steps(a, 2)
    torch.manual_seed(3)
    _steps(b, 2)
    for p, q in zip(b.unwrapped.parameters(), a.unwrapped.parameters()):
        assert torch.equal(p, q)


class _Payload:
    """What an attacker could plant: unpickling it runs code (here, writes a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_planted_pickle_checkpoint_is_refused_not_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    ran = tmp_path / "code-ran"
    with open(ckpt / "ddp_state.pt", "wb") as f:
        pickle.dump({"trainable": _Payload(ran), "optimizer": {}, "scheduler": {}}, f)
    with pytest.raises(ValueError, match=r"ddp_state\.pt, a pickle, which is never loaded.*new train\.run_name"):
        _engine("cpu").load(ckpt)
    assert not ran.exists()


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_engine_autocast_follows_precision(precision, dtype):
    """Every task runs forward and backward inside engine.autocast(): bf16 autocasts, fp32 does not."""
    model = torch.nn.Linear(8, 4)
    train = load_config(None, [f"train.precision={precision}"]).train
    engine = DDPEngine(model, train, torch.device("cpu"))
    with engine.autocast():
        out = engine.module(torch.randn(2, 8))
    assert out.dtype == dtype
