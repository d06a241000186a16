"""Optional nDCG@10 on a small validation retrieval set during training (``train.eval_every``).

It reuses the evaluation package (its BEIR reader, instructions, exact dense search and
pytrec_eval metrics). When that package is missing the hook logs a warning once and is skipped;
training never depends on it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class TrainingEvaluator:
    """Loads the validation set once; ``evaluate`` scores the model being trained."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.data = None
        try:
            from rayembed.evaluate import _readers
            from rayembed.evaluate.datasets import RetrievalData, _subsample
            from rayembed.evaluate.instructions import instruction_for
        except ImportError as e:
            logger.warning("train.eval_every is set but the evaluation package is unavailable (%s); skipping.", e)
            return
        path = Path(cfg.train.eval_dataset)
        if not path.is_absolute() and not path.exists():
            from rayembed.runtime import resolve_data_dir

            path = resolve_data_dir(cfg.data_dir) / path
        corpus, queries, qrels = _readers.load_beir(path)
        data = RetrievalData(path.name, corpus, queries, qrels, instruction_for(path.name))
        self.data = _subsample(data, 0, cfg.train.eval_max_docs)

    def evaluate(self, task: Any, engine: Any, rank: int) -> dict[str, float]:
        """Every rank calls this (ZeRO-3 needs all ranks to gather weights); rank 0 reports."""
        if self.data is None or not hasattr(task, "embedder"):
            return {}
        from rayembed.evaluate.metrics import retrieval_metrics
        from rayembed.evaluate.retrieval import DenseRetriever

        partitioned = type(engine).__name__ == "DeepSpeedEngine"
        if rank != 0 and not partitioned:
            return {}
        emb = task.embedder
        was_training = emb.training
        emb.eval()
        try:
            with engine.full_parameters():
                run = DenseRetriever(emb, batch_size=16).search(self.data, k=100)
        finally:
            emb.train(was_training)
        scores = retrieval_metrics(self.data.qrels, run)
        out = {"ndcg@10": float(scores["ndcg@10"]), "recall@100": float(scores["recall@100"])}
        if rank == 0:
            logger.info("validation %s: nDCG@10 %.4f", self.data.name, out["ndcg@10"])
        return out
