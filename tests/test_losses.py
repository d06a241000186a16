"""InfoNCE equals a hand-computed cross-entropy, with and without a cross-worker gather."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from rayembed.losses import info_nce


def _hand_loss(q, docs, labels, tau):
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ docs[j]) / tau for j in range(docs.shape[0])]
        m = max(logits)
        lse = m + math.log(sum(math.exp(x - m) for x in logits))
        total += lse - logits[labels[i]]
    return total / q.shape[0]


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_matches_hand_computed_in_batch_plus_hard_negatives():
    q, d = _unit(3, 5, seed=0), _unit(6, 5, seed=1)  # 3 positives then 3 hard negatives
    got = info_nce(q, d, tau=0.02)
    want = _hand_loss(q, d, [0, 1, 2], 0.02)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_gathered_pool_offsets_labels():
    # Worker 1 of 2: its documents sit after worker 0's 4 documents in the gathered pool.
    q, d_local, d_other = _unit(2, 5, seed=2), _unit(4, 5, seed=3), _unit(4, 5, seed=4)
    gather = lambda d: (torch.cat([d_other, d]), d_other.shape[0])  # noqa: E731
    got = info_nce(q, d_local, tau=0.05, gather=gather)
    pool = torch.cat([d_other, d_local])
    want = _hand_loss(q, pool, [4, 5], 0.05)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="equal D"):
        info_nce(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least one document per query"):
        info_nce(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="tau must be positive"):
        info_nce(torch.zeros(2, 4), torch.zeros(2, 4), tau=0)


def _worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    q = _unit(2, 5, seed=10 + rank)
    d = _unit(4 + rank, 5, seed=20 + rank).requires_grad_(True)  # uneven sizes on purpose
    loss = info_nce(q, d, tau=0.02, gather=True)
    loss.backward()
    out[rank] = (loss.item(), d.grad.abs().sum().item())
    dist.destroy_process_group()


def test_real_gloo_gather_sees_other_workers_documents():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    pool = torch.cat([_unit(4, 5, seed=20), _unit(5, 5, seed=21)])
    for rank, first in ((0, 0), (1, 4)):
        q = _unit(2, 5, seed=10 + rank)
        want = _hand_loss(q, pool, [first, first + 1], 0.02)
        assert out[rank][0] == pytest.approx(want, rel=1e-4)
        assert out[rank][1] > 0  # gradients reach this worker's own documents
