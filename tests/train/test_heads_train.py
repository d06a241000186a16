"""In-process training with BGE-M3-style heads (no Ray): the joint loss is the weighted sum of
each head's InfoNCE plus self-distillation, it goes down, the heads learn and export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from step_batches import DOCS, NEGS, QUERIES, contrastive_batch

from rayembed.config import ConfigError, load_config
from rayembed.modeling.embedder import Embedder
from rayembed.modeling.heads import HEADS_FILE, maxsim, sparse_scores
from rayembed.train.engine import DDPEngine
from rayembed.train.tasks import ContrastiveTask, MNTPTask

TAU = 0.05


def _cfg(*over: str):
    base = [
        "model.name_or_path=tiny-llama", "model.max_length=64", "model.lora.enabled=true",
        "model.lora.dropout=0.0", "model.heads.sparse=true", "model.heads.multivector=true",
        "model.heads.multivector_dim=16", "train.self_distill=true",
        "train.query_max_length=32", "train.doc_max_length=32", "train.batch_size=8",
        "train.max_steps=20", "train.warmup_steps=0", "train.lr=0.002", f"train.temperature={TAU}",
    ]
    return load_config(None, base + list(over))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_joint_loss_is_the_weighted_sum_of_the_heads(tmp_path):
    cfg = _cfg("train.heads_loss_weights.sparse=0.3", "train.self_distill_weight=0.5")
    task = ContrastiveTask(cfg, torch.device("cpu"))
    emb = task.embedder
    with torch.no_grad():  # token weights that differ, so the max per token id matters
        w = emb.sparse_head.linear.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        emb.sparse_head.linear.bias.fill_(0.3)
    engine = DDPEngine(task.model, cfg.train, torch.device("cpu"))
    out = task.step(engine, contrastive_batch(emb))
    engine.optimizer.zero_grad(set_to_none=True)

    # The same scores by hand, from the inference API and the numpy scoring functions.
    docs = DOCS + NEGS
    s = {
        "dense": emb.encode(QUERIES, max_length=32) @ emb.encode(docs, max_length=32).T,
        "sparse": sparse_scores(emb.encode_sparse(QUERIES, max_length=32), emb.encode_sparse(docs, max_length=32)),
        "multivector": np.array(
            [[maxsim(a, b) for b in emb.encode_multivector(docs, max_length=32)]
             for a in emb.encode_multivector(QUERIES, max_length=32)]
        ),
    }
    w = {"dense": 1.0, "sparse": 0.3, "multivector": 1.0}
    assert s["sparse"].max() > 0, "the sparse head takes part"
    rows = np.arange(8)
    infonce = {h: -_log_softmax(s[h] / TAU)[rows, rows].mean() for h in s}
    teacher = np.exp(_log_softmax(sum(w[h] * s[h] for h in s) / TAU))
    distill = {h: -(teacher * _log_softmax(s[h] / TAU)).sum(axis=1).mean() for h in s}
    want = sum(w[h] * infonce[h] for h in s) + 0.5 * sum(w[h] * distill[h] for h in s)
    assert out["loss"] == pytest.approx(want, rel=1e-4)
    for h in s:
        assert out[f"loss_{h}"] == pytest.approx(infonce[h], rel=1e-4)
        assert out[f"loss_distill_{h}"] == pytest.approx(distill[h], rel=1e-4)


def test_training_with_heads_learns_and_exports(tmp_path):
    cfg = _cfg()
    task = ContrastiveTask(cfg, torch.device("cpu"))
    emb = task.embedder
    heads_before = {k: v.clone() for k, v in emb._heads_state().items()}
    engine = DDPEngine(task.model, cfg.train, torch.device("cpu"))
    batch = contrastive_batch(emb)
    outs = []
    for _ in range(6):
        outs.append(task.step(engine, batch))
        engine.step()
    losses = [o["loss"] for o in outs]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    for head in ("dense", "sparse", "multivector"):  # every head learns, none collapses
        assert outs[-1][f"loss_{head}"] < outs[0][f"loss_{head}"], head
    heads_after = emb._heads_state()
    for name in ("sparse_head.linear.weight", "multivector_head.linear.weight"):
        assert not torch.allclose(heads_before[name], heads_after[name]), f"{name} did not train"

    folder = task.export(tmp_path / "model")
    assert (folder / HEADS_FILE).exists() and (folder / "adapter_model.safetensors").exists()
    loaded = Embedder.from_pretrained(folder)
    task.embedder.eval()
    np.testing.assert_allclose(
        loaded.encode_sparse(DOCS).toarray(), task.embedder.encode_sparse(DOCS).toarray(), rtol=1e-4, atol=1e-5
    )
    for a, b in zip(loaded.encode_multivector(QUERIES), task.embedder.encode_multivector(QUERIES)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_head_options_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match=r"train.chunk_size \(GradCache\) does not support model.heads"):
        ContrastiveTask(_cfg("train.chunk_size=2"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.self_distill .* needs model.heads"):
        ContrastiveTask(
            _cfg("model.heads.sparse=false", "model.heads.multivector=false", "model.heads.multivector_dim=null"),
            torch.device("cpu"),
        )
    with pytest.raises(ConfigError, match="train.mode=mntp .* exports no heads"):
        MNTPTask(_cfg("train.mode=mntp"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.heads_loss_weights.sparse must be >= 0"):
        _cfg("train.heads_loss_weights.sparse=-1")


def test_gathered_dense_scores_keep_their_offset_and_distil_on_local_columns():
    """Two workers: dense scores span every worker's documents, the token heads only this one's."""
    from rayembed.losses import multi_head_info_nce

    g = torch.Generator().manual_seed(0)
    b, m, offset = 3, 5, 5  # this worker is rank 1 of 2, five documents each
    dense = torch.randn(b, 2 * m, generator=g)
    sparse = torch.randn(b, m, generator=g)
    w = {"dense": 1.0, "sparse": 0.3}
    loss, parts = multi_head_info_nce(
        {"dense": dense, "sparse": sparse}, w, tau=0.5, offsets={"dense": offset}, num_local=m,
        self_distill=True, self_distill_weight=2.0,
    )
    ce = torch.nn.functional.cross_entropy
    want_dense = ce(dense / 0.5, torch.arange(b) + offset)
    want_sparse = ce(sparse / 0.5, torch.arange(b))
    local = {"dense": dense[:, offset:] / 0.5, "sparse": sparse / 0.5}
    teacher = torch.softmax(local["dense"] + 0.3 * local["sparse"], dim=-1)
    distill = {h: -(teacher * torch.log_softmax(x, dim=-1)).sum(-1).mean() for h, x in local.items()}
    want = want_dense + 0.3 * want_sparse + 2.0 * (distill["dense"] + 0.3 * distill["sparse"])
    torch.testing.assert_close(parts["dense"], want_dense)
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="no weight for"):
        multi_head_info_nce({"dense": dense, "colbert": sparse}, w, tau=0.5)
