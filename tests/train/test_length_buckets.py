"""train.length_buckets: a padded group goes through the model in sub-batches of similar length,
cut to their own longest row. Fewer padded tokens, the same vectors, loss and gradients."""

from __future__ import annotations

import pytest
import torch
from step_batches import contrastive_batch

from rayembed.config import load_config
from rayembed.train.engine import DDPEngine
from rayembed.train.tasks import ContrastiveTask, length_buckets

# Byte-level tiny tokenizer: 3 to 30 query tokens, 4 to 46 document tokens, none truncated.
QUERIES = [f"q{i} " + "cd " * (3 * (i % 4)) for i in range(8)]
DOCS = [f"p{i} " + "ab " * (2 * (i % 8)) for i in range(16)]


def test_the_plan_covers_every_row_once_with_the_fewest_padded_tokens():
    lengths = [10, 2, 9, 1, 10, 2]
    left = torch.tensor([[0] * (10 - n) + [1] * n for n in lengths])  # left padded to 10
    right = left.flip(1)
    for mask in (left, right):
        plan = length_buckets(mask, 2)
        assert sorted(sorted(r.tolist()) for r, _ in plan) == [[0, 2, 4], [1, 3, 5]]
        for rows, cols in plan:  # every token of a bucket's rows is inside its columns
            assert int(mask[rows][:, cols].sum()) == int(mask[rows].sum())
        assert sum(len(r) * (c.stop - c.start) for r, c in plan) == 3 * 10 + 3 * 2  # against 60 whole
    whole = length_buckets(left, 1)
    assert len(whole) == 1 and whole[0][0].tolist() == list(range(6)) and whole[0][1] == slice(0, 10)
    assert len(length_buckets(torch.ones(4, 7, dtype=torch.long), 4)) == 1  # nothing to gain
    plan = length_buckets(left, 6)  # more buckets than distinct lengths: no empty or useless bucket
    assert len(plan) == 4 and sum(len(r) for r, _ in plan) == 6


def _task(buckets: int, attention: str) -> ContrastiveTask:
    cfg = load_config(None, [
        "model.name_or_path=tiny-llama", "model.max_length=64", "model.lora.enabled=true", "model.lora.dropout=0.0",
        f"model.attention={attention}", "train.query_max_length=32", "train.doc_max_length=48", "train.batch_size=8",
        "train.max_steps=2", "train.warmup_steps=0", "train.lr=0.002", "train.temperature=0.05",
        f"train.length_buckets={buckets}",
    ])
    torch.manual_seed(0)
    return ContrastiveTask(cfg, torch.device("cpu"))


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_buckets_give_the_same_loss_and_gradients_for_fewer_tokens(attention):
    whole, bucketed = _task(1, attention), _task(4, attention)
    bucketed.model.load_state_dict(whole.model.state_dict())
    batch = contrastive_batch(whole.embedder, QUERIES, DOCS, query_len=32, doc_len=48)
    q = {k[2:]: batch[k] for k in ("q_input_ids", "q_attention_mask")}
    d = {k[2:]: batch[k] for k in ("d_input_ids", "d_attention_mask")}
    padded = q["input_ids"].numel() + d["input_ids"].numel()
    outs, grads = [], []
    for task in (whole, bucketed):
        engine = DDPEngine(task.model, task.train, torch.device("cpu"))
        outs.append(task.step(engine, batch))
        grads.append({n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None})
    assert outs[0]["tokens_fed"] == padded
    real = int(q["attention_mask"].sum() + d["attention_mask"].sum())
    assert real <= outs[1]["tokens_fed"] < 0.75 * padded  # the padding mostly gone
    assert outs[1]["loss"] == pytest.approx(outs[0]["loss"], rel=1e-5)
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)
    with torch.no_grad():  # and the vectors themselves, in the caller's row order
        v_whole = whole.model(d["input_ids"], d["attention_mask"])[0]
        v_bucketed = bucketed.model(d["input_ids"], d["attention_mask"])[0]
    torch.testing.assert_close(v_bucketed, v_whole, rtol=1e-4, atol=1e-5)


def test_length_buckets_below_one_is_refused():
    from rayembed.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.length_buckets=0 must be at least 1"):
        load_config(None, ["train.length_buckets=0"])
