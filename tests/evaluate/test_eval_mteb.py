"""The MTEB adapter's encode contract, which holds without mteb installed."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest

from rayembed.config.eval import DatasetSpec
from rayembed.evaluate.mteb_adapter import MTEBEncoder, local_retrieval_task

HAS_MTEB = importlib.util.find_spec("mteb") is not None


def test_encode_takes_strings_or_batches_and_instructs_queries_only(tiny_embedder_dir):
    enc = MTEBEncoder.from_pretrained(str(tiny_embedder_dir), batch_size=4)
    texts = ["a short query", "another one", "third"]
    task = SimpleNamespace(name="SciFact", type="Retrieval")
    q = enc.encode(texts, task_metadata=task, prompt_type="query")
    batches = [{"text": texts[:2]}, {"text": texts[2:]}]  # what an mteb DataLoader yields
    q2 = enc.encode(batches, task_metadata=task, prompt_type=SimpleNamespace(value="query"))
    d = enc.encode(texts, task_metadata=task, prompt_type="document")
    assert q.shape == (3, enc.embedder.dim) and q.dtype == np.float32
    np.testing.assert_allclose(q, q2, atol=1e-5)
    assert not np.allclose(q, d, atol=1e-3)  # queries carry the SciFact instruction, documents none
    expected = enc.embedder.encode(texts, instruction="Given a scientific claim, retrieve documents that support or refute the claim")
    np.testing.assert_allclose(q, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-4)
    sims = enc.similarity(q, d)
    assert sims.shape == (3, 3) and enc.similarity_pairwise(q, d).shape == (3,)


@pytest.mark.skipif(HAS_MTEB, reason="mteb is installed")
def test_without_mteb_the_error_names_the_extra(tiny_beir):
    with pytest.raises(ImportError, match=r"pip install 'rayembed\[eval\]'"):
        local_retrieval_task(DatasetSpec(name="tiny", path=str(tiny_beir)))
