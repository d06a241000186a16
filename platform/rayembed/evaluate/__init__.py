"""Retrieval and STS evaluation of saved embedders against BM25 and MiniLM baselines.

The public API: :func:`evaluate_models` (many models x many datasets, written as JSON,
Markdown and a plot), :func:`render_table`, :func:`retrieval_metrics` and :func:`spearman`
(pytrec_eval-backed), :func:`load_dataset`, :func:`run_passkey` (long-context test) and
:data:`EVAL_INSTRUCTIONS`. ``rayembed eval --config ...`` is the command-line face of it.
"""

from rayembed.config.eval import DatasetSpec
from rayembed.evaluate.datasets import RetrievalData, STSData, load_dataset
from rayembed.evaluate.instructions import EVAL_INSTRUCTIONS, instruction_for
from rayembed.evaluate.metrics import RETRIEVAL_METRICS, retrieval_metrics, spearman
from rayembed.evaluate.passkey import make_passkey_data, passkey_accuracy, run_passkey
from rayembed.evaluate.retrieval import BM25Retriever, DenseRetriever
from rayembed.evaluate.runner import (
    evaluate_models,
    evaluate_sts,
    load_retriever,
    render_table,
    write_results,
)

__all__ = [
    "DatasetSpec", "RetrievalData", "STSData", "load_dataset", "EVAL_INSTRUCTIONS", "instruction_for",
    "RETRIEVAL_METRICS", "retrieval_metrics", "spearman", "make_passkey_data", "passkey_accuracy",
    "run_passkey", "BM25Retriever", "DenseRetriever", "evaluate_models", "evaluate_sts", "load_retriever",
    "render_table", "write_results",
]
