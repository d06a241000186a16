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
            from rayembed.config.eval import DatasetSpec
            from rayembed.evaluate.datasets import load_dataset
        except ImportError as e:
            logger.warning("train.eval_every is set but the evaluation package is unavailable (%s); skipping.", e)
            return
        from rayembed.runtime import resolve_data_dir

        path = Path(cfg.train.eval_dataset)
        try:
            data_dir = resolve_data_dir(cfg.data_dir)
        except FileNotFoundError:
            data_dir = None
        spec = DatasetSpec(name=path.name, path=str(path), format="beir", max_docs=cfg.train.eval_max_docs)
        self.data = load_dataset(spec, data_dir)

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
                run = DenseRetriever(emb, instruct=emb.takes_instructions, batch_size=16).search(self.data, k=100)
        finally:
            emb.train(was_training)
        scores = retrieval_metrics(self.data.qrels, run)
        out = {"ndcg@10": float(scores["ndcg@10"]), "recall@100": float(scores["recall@100"])}
        if rank == 0:
            logger.info("validation %s: nDCG@10 %.4f", self.data.name, out["ndcg@10"])
        return out
