"""In-process checks of the training steps (no Ray): GradCache equals the unchunked gradient,
SimCSE and MNTP run and learn, the MNTP export loads as an embedder, the LR schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from step_batches import DOCS, contrastive_batch

from rayembed.config import load_config
from rayembed.train.engine import DDPEngine, lr_factor
from rayembed.train.tasks import ContrastiveTask, MNTPTask, SimCSETask, mntp_mask


def _cfg(*over: str):
    base = [
        "model.name_or_path=tiny-llama", "model.max_length=64", "model.lora.enabled=true",
        "model.lora.dropout=0.1", "train.query_max_length=32", "train.doc_max_length=32",
        "train.batch_size=8", "train.max_steps=20", "train.warmup_steps=0", "train.lr=0.002",
        "train.temperature=0.05",
    ]
    return load_config(None, base + list(over))


def _grads(task, engine, batch):
    torch.manual_seed(123)
    task.step(engine, batch)
    out = {n: p.grad.detach().clone() for n, p in task.model.named_parameters() if p.grad is not None}
    engine.optimizer.zero_grad(set_to_none=True)
    return out


def test_gradcache_gradients_equal_unchunked():
    # Dropout off: chunked and unchunked passes cannot draw the same dropout masks.
    cfg_full = _cfg("model.lora.dropout=0.0")
    cfg_chunk = _cfg("model.lora.dropout=0.0", "train.chunk_size=2")
    cls = ContrastiveTask
    dev = torch.device("cpu")
    task_full = cls(cfg_full, dev)
    task_chunk = cls(cfg_chunk, dev)
    task_chunk.model.load_state_dict(task_full.model.state_dict())
    batch = contrastive_batch(task_full.embedder)
    g_full = _grads(task_full, DDPEngine(task_full.model, cfg_full.train, dev), batch)
    g_chunk = _grads(task_chunk, DDPEngine(task_chunk.model, cfg_chunk.train, dev), batch)
    assert g_full and g_full.keys() == g_chunk.keys()
    assert any("lora" in n for n in g_full), "LoRA weights must receive gradients"
    for name in g_full:
        # Chunked and whole-batch matmuls add in another order: elements that nearly cancel differ by
        # float32 rounding of the tensor's scale, not of their own size; compare at that scale.
        scale = float(g_full[name].abs().max())
        torch.testing.assert_close(g_chunk[name], g_full[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_gradcache_replay_reproduces_dropout_masks():
    """The replayed chunk must see the no-grad pass's dropout masks, or its gradient is wrong."""
    from rayembed.train.gradcache import RandContext

    cfg = _cfg("train.mode=simcse", "train.simcse_dropout=0.3")
    task = SimCSETask(cfg, torch.device("cpu"))
    batch = contrastive_batch(task.embedder)
    ids, mask = batch["d_input_ids"][:4], batch["d_attention_mask"][:4]
    rnd = RandContext(ids, mask)
    first = task.embedder(ids, mask)
    again = task.embedder(ids, mask)
    with rnd:
        replay = task.embedder(ids, mask)
    assert not torch.allclose(first, again)
    torch.testing.assert_close(replay, first)


def _run_steps(task, cfg, batch, steps):
    engine = DDPEngine(task.model, cfg.train, torch.device("cpu"))
    losses = []
    for _ in range(steps):
        out = task.step(engine, batch)
        engine.step()
        losses.append(out["loss"])
    return losses


def test_simcse_runs_and_views_differ():
    cfg = _cfg("train.mode=simcse", "train.simcse_dropout=0.3")
    task = SimCSETask(cfg, torch.device("cpu"))
    batch = contrastive_batch(task.embedder)
    ids, mask = batch["d_input_ids"][:8], batch["d_attention_mask"][:8]
    a, b = task.model(ids, mask, ids, mask)  # dropout on: two different views
    assert not torch.allclose(a, b)
    losses = _run_steps(task, cfg, batch, 6)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_mntp_masks_learns_and_exports(tmp_path):
    from rayembed.modeling.embedder import Embedder

    cfg = _cfg("train.mode=mntp", "train.mntp_mask_rate=0.3", "model.lora.dropout=0.0")
    task = MNTPTask(cfg, torch.device("cpu"))
    batch = contrastive_batch(Embedder.from_pretrained("tiny-llama", max_length=64))
    ids, mask = batch["d_input_ids"][:8], batch["d_attention_mask"][:8]
    masked, labels = mntp_mask(ids, mask, task.mask_id, 0.3, task.special_ids, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert chosen.any(dim=1).all(), "every row masks at least one token"
    assert (masked[chosen] == task.mask_id).all() and (labels[chosen] == ids[chosen]).all()
    assert not (chosen & ~mask.bool()).any(), "padding is never masked"
    first_real = mask.argmax(dim=1)
    assert not chosen[torch.arange(8), first_real].any(), "a token with no predecessor is never masked"
    losses = _run_steps(task, cfg, batch, 8)
    assert losses[-1] < losses[0]
    out = task.export(tmp_path / "mntp")
    emb = Embedder.from_pretrained(out)
    assert emb.config.attention == "bidirectional" and emb.config.pooling == "mean"
    assert emb.config.weights == "full"
    v = emb.encode(["hello world", "another text"])
    assert v.shape == (2, emb.dim)


def test_supervised_lora_on_merged_mntp_names_that_base(tmp_path):
    """E5-style training can start from a merged MNTP model; the adapter points at it."""
    from rayembed.modeling.embedder import Embedder

    cfg = _cfg("train.mode=mntp")
    mntp_dir = MNTPTask(cfg, torch.device("cpu")).export(tmp_path / "mntp")
    cfg2 = _cfg(f"model.name_or_path={mntp_dir}")
    task = ContrastiveTask(cfg2, torch.device("cpu"))
    _run_steps(task, cfg2, contrastive_batch(task.embedder), 2)
    out = task.export(tmp_path / "e5")
    emb = Embedder.from_pretrained(out)
    assert emb.config.attention == "bidirectional"
    task.embedder.eval()
    torch.testing.assert_close(
        torch.from_numpy(emb.encode(DOCS[:2])), torch.from_numpy(task.embedder.encode(DOCS[:2])), rtol=1e-4, atol=1e-5
    )


def test_lr_schedule_warmup_then_linear_decay():
    assert [round(lr_factor(s, 4, 12), 3) for s in range(12)] == [
        0.25, 0.5, 0.75, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125
    ]
    assert lr_factor(0, 0, 10) == 1.0


def test_eval_hook_scores_the_model_in_training(data_dir):
    """train.eval_every's hook: nDCG@10 on a small validation set, from the live model."""
    from rayembed.train.evaluation import TrainingEvaluator

    cfg = _cfg("train.eval_every=5", "train.eval_dataset=msmarco-subset", "train.eval_max_docs=120",
               f"data_dir={data_dir}")
    task = ContrastiveTask(cfg, torch.device("cpu"))
    engine = DDPEngine(task.model, cfg.train, torch.device("cpu"))
    evaluator = TrainingEvaluator(cfg)
    scores = evaluator.evaluate(task, engine, rank=0)
    # The hook's nDCG@10 is the live model's: recomputed by hand from its vectors (linear gains).
    data = evaluator.data
    with torch.no_grad():
        task.embedder.eval()
        dvecs = task.embedder.encode(data.doc_texts())  # (docs, dim)
        judged = [q for q, rel in data.qrels.items() if any(g > 0 for g in rel.values())]
        qvecs = task.embedder.encode([data.queries[q] for q in judged], instruction=data.instruction)
        task.embedder.train()
    doc_ids, per_query = data.doc_ids(), []
    for q, sims in zip(judged, qvecs @ dvecs.T):
        top = np.argsort(-sims, kind="stable")[:10]
        dcg = sum(data.qrels[q].get(doc_ids[j], 0) / np.log2(r + 2) for r, j in enumerate(top))
        ideal = sorted(data.qrels[q].values(), reverse=True)[:10]
        per_query.append(dcg / sum(g / np.log2(r + 2) for r, g in enumerate(ideal)))
    assert scores["ndcg@10"] == pytest.approx(float(np.mean(per_query)), abs=1e-4)
    assert "recall@100" in scores
    assert task.embedder.training, "the hook puts the model back in training mode"
    assert TrainingEvaluator(cfg).evaluate(task, engine, rank=1) == {}  # DDP: rank 0 only
