"""Evaluate several models on several datasets and write one results table.

Example::

    from rayembed.config.eval import DatasetSpec
    from rayembed.evaluate import evaluate_models, render_table

    results = evaluate_models(
        {"bm25": "bm25", "minilm": "all-minilm-l6-v2", "trained": "runs/demo/model"},
        [DatasetSpec(name="cranfield", path="cranfield")],
        "runs/demo/eval",
        data_dir="../shared/data",
    )
    print(render_table(results))

Hybrid rows (``hybrid=[HybridSpec(name="dense+bm25 (rrf)", methods={"dense": 1, "bm25": 1})]``)
search an embedder's index with several methods fused (see :mod:`rayembed.search`) and appear
in the same table; they reuse the dense model's index and add only their parts.

The output folder gets ``results.json`` (every metric, dataset facts, machine, date),
``per_query.json``, ``results.md`` (the Markdown tables) and ``ndcg.png`` (nDCG@10 per model).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rayembed.config.eval import BM25Config, DatasetSpec, HybridSpec, PasskeyConfig
from rayembed.evaluate.datasets import RetrievalData, STSData, load_dataset
from rayembed.evaluate.metrics import RETRIEVAL_METRICS, pearson, retrieval_metrics, spearman
from rayembed.evaluate.retrieval import BM25Retriever, DenseRetriever, HybridRetriever
from rayembed.io import atomic_path, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

BM25 = "bm25"

_LABELS = {"ndcg@10": "nDCG@10", "recall@10": "R@10", "recall@100": "R@100", "mrr@10": "MRR@10",
           "map": "MAP", "spearman": "Spearman", "pearson": "Pearson"}


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_retriever(
    name: str,
    model: Any,
    *,
    query_instructions: str = "auto",
    batch_size: int = 32,
    max_length: int | None = None,
    bm25: BM25Config | None = None,
    device: str | None = None,
    dtype: str | None = None,
    autocast: str | None = None,
    index_type: str = "flat",
    index_root: str | os.PathLike | None = None,
    indexes: Mapping[str, str] | None = None,
):
    """A retriever for one entry of ``eval.models``: 'bm25', an Embedder, a folder or a name.

    ``indexes``: ``{dataset: index location}`` built with this model already (see
    :class:`~rayembed.evaluate.retrieval.DenseRetriever`)."""
    if isinstance(model, str) and model.strip().lower() == BM25:
        b = bm25 or BM25Config()
        return BM25Retriever(k1=b.k1, b=b.b, stopwords=b.stopwords, stemmer=b.stemmer)
    if isinstance(model, (BM25Retriever, DenseRetriever, HybridRetriever)):
        return model
    from rayembed.modeling.embedder import Embedder

    if isinstance(model, Embedder):
        emb = model
    else:
        try:
            emb = Embedder.from_pretrained(str(model), device=device, dtype=dtype, autocast=autocast)
        except OSError as e:
            raise FileNotFoundError(
                f"eval.models.{name}={model!r} could not be loaded ({e}). Give a saved embedder folder, "
                f"a Hugging Face folder, a registered name (e.g. all-minilm-l6-v2, smollm2-135m) or 'bm25'."
            ) from e
    if query_instructions == "auto":
        instruct = emb.takes_instructions
    else:
        instruct = query_instructions == "always"
    return DenseRetriever(emb, instruct=instruct, batch_size=batch_size, max_length=max_length,
                          index_type=index_type, index_root=index_root, indexes=dict(indexes or {}))


def evaluate_sts(retriever, data: STSData) -> dict[str, float]:
    """Spearman (and Pearson) of cosine similarity against the gold scores.

    STS is symmetric, so both sentences get the instruction when the model takes one.
    """
    if not isinstance(retriever, DenseRetriever):
        raise ValueError(f"STS needs an embedding model; '{data.name}' cannot be scored by BM25.")
    a = retriever.encode(data.sentences1, data.instruction)  # (n, dim)
    b = retriever.encode(data.sentences2, data.instruction)  # (n, dim)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = (a * b).sum(axis=1)  # (n,)
    return {"spearman": spearman(cos, data.scores), "pearson": pearson(cos, data.scores),
            "num_pairs": len(data.scores)}


def evaluate_models(
    models: Mapping[str, Any],
    datasets: Sequence[DatasetSpec | RetrievalData | STSData],
    out_dir: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    instructions: Mapping[str, str] | None = None,
    query_instructions: str = "auto",
    top_k: int = 1000,
    batch_size: int = 32,
    max_length: int | None = None,
    bm25: BM25Config | None = None,
    passkey: PasskeyConfig | None = None,
    device: str | None = None,
    dtype: str | None = None,
    autocast: str | None = None,
    index_type: str = "flat",
    keep_indexes: bool = False,
    plot: bool = True,
    hybrid: Sequence[HybridSpec | Mapping[str, Any]] | None = None,
    indexes: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """Evaluate every model on every dataset; write the results to ``out_dir`` when given.

    ``models`` maps a display name to 'bm25', a registered name, a saved embedder folder, or an
    already loaded :class:`~rayembed.modeling.embedder.Embedder`. ``datasets`` are specs (read
    from ``data_dir``) or already loaded data. BM25 skips STS datasets (it scores no pairs).
    ``passkey``: when given and enabled, also runs the passkey test for each model.
    ``keep_indexes``: keep each FAISS index in ``<out_dir>/indexes/<model>/<dataset>`` and reuse
    it when the corpus and embedder are unchanged (default: temporary indexes).
    ``hybrid``: extra rows, each an embedder's index searched with several methods fused
    (:class:`~rayembed.config.eval.HybridSpec`); their embedder is ``spec.model`` (a name of
    ``models``, a folder or a registered name), else the last embedding model of ``models``.
    ``indexes``: ``{model row: {dataset: index location}}`` of exact indexes already built with
    that row's model (the pipeline's index stage): those datasets are searched through them
    instead of encoding their corpus again; ``results["models"][row]["index_from"]`` says which.
    Returns the dictionary written as ``results.json``.
    """
    hybrids = [h if isinstance(h, HybridSpec) else HybridSpec(**h) for h in (hybrid or [])]
    with contextlib.ExitStack() as stack:
        shared = None
        if hybrids:  # dense rows and the hybrid rows over them share one index per model and dataset
            shared = (Path(out_dir) / "indexes" if (keep_indexes and out_dir is not None)
                      else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rayembed-eval-idx-"))))
        return _evaluate_models(
            models, datasets, out_dir, hybrids, shared, data_dir=data_dir, instructions=instructions,
            query_instructions=query_instructions, top_k=top_k, batch_size=batch_size, max_length=max_length,
            bm25=bm25, passkey=passkey, device=device, dtype=dtype, autocast=autocast, index_type=index_type,
            keep_indexes=keep_indexes, plot=plot, indexes=indexes or {})


def _hybrid_model(spec: HybridSpec, models: Mapping[str, Any]) -> tuple[str | None, Any]:
    """(row name or None, model) of the embedder a hybrid row searches with."""
    if spec.model:
        return (spec.model, models[spec.model]) if spec.model in models else (None, spec.model)
    dense = [n for n, m in models.items()
             if not (isinstance(m, str) and m.strip().lower() == BM25) and not isinstance(m, BM25Retriever)]
    if not dense:
        if spec.needs_model:
            raise ValueError(
                f"eval.hybrid[{spec.name}] uses {sorted(spec.methods)} and needs an embedding model, but "
                "eval.models holds none; set eval.hybrid[].model to a saved folder or registered name."
            )
        return None, None
    return dense[-1], models[dense[-1]]


def _evaluate_models(models, datasets, out_dir, hybrids: list[HybridSpec], shared: Path | None, *,
                     data_dir, instructions, query_instructions, top_k, batch_size, max_length, bm25, passkey,
                     device, dtype, autocast, index_type, keep_indexes, plot, indexes) -> dict[str, Any]:
    hybrid_models = {_hybrid_model(h, models)[0] for h in hybrids}
    loaded = [
        d if isinstance(d, (RetrievalData, STSData)) else load_dataset(d, data_dir, dict(instructions or {}))
        for d in datasets
    ]
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "models": {},
        "datasets": {d.name: d.describe() for d in loaded},
        "metrics": {},
    }
    per_query: dict[str, dict[str, Any]] = {}
    common = dict(query_instructions=query_instructions, batch_size=batch_size, max_length=max_length, bm25=bm25,
                  device=device, dtype=dtype, autocast=autocast, index_type=index_type)
    for name, model in [*models.items(), *((h.name, h) for h in hybrids)]:
        t_load = time.perf_counter()
        index_root = Path(out_dir) / "indexes" / name if (keep_indexes and out_dir is not None) else None
        if shared is not None and name in hybrid_models:
            index_root = shared / name
        if isinstance(model, HybridSpec):
            retriever = _hybrid_retriever(model, models, shared, common, indexes)
            source = "hybrid"
        else:
            retriever = load_retriever(name, model, index_root=index_root, indexes=indexes.get(name), **common)
            source = model if isinstance(model, str) else type(model).__name__
        results["models"][name] = {"source": str(source), **retriever.describe(),
                                   "load_seconds": round(time.perf_counter() - t_load, 2)}
        results["metrics"][name] = {}
        per_query[name] = {}
        for data in loaded:
            t0 = time.perf_counter()
            if isinstance(data, STSData):
                if isinstance(retriever, (BM25Retriever, HybridRetriever)):
                    continue
                row = evaluate_sts(retriever, data)
            else:
                run = retriever.search(data, top_k)
                row = retrieval_metrics(data.qrels, run, per_query=True)
                per_query[name][data.name] = row.pop("per_query")
            row["seconds"] = round(time.perf_counter() - t0, 2)
            results["metrics"][name][data.name] = row
            logger.info("%s on %s: %s", name, data.name, _brief(row))
        if getattr(retriever, "index_used", None):
            results["models"][name]["index_from"] = dict(retriever.index_used)
        if passkey is not None and passkey.enabled and not isinstance(retriever, HybridRetriever):
            results.setdefault("passkey", {})[name] = run_passkey_for(retriever, passkey)
        del retriever
    if out_dir is not None:
        write_results(results, out_dir, per_query=per_query, plot=plot)
    return results


def _hybrid_retriever(spec: HybridSpec, models: Mapping[str, Any], shared: Path, common: dict[str, Any],
                      indexes: Mapping[str, Mapping[str, str]]) -> HybridRetriever:
    """The retriever of one hybrid row; its index folder is its model's (``shared/<model row>``), or
    the model row's prebuilt index (``indexes``) where that holds the parts the row searches."""
    from rayembed.index.lexical import BM25Params

    row, model = _hybrid_model(spec, models)
    dense = None
    if model is not None and spec.needs_model:
        dense = load_retriever(row or spec.name, model, index_root=None, indexes=indexes.get(row or ""), **common)
        if not isinstance(dense, DenseRetriever):
            raise ValueError(f"eval.hybrid[{spec.name}].model must be an embedding model, not {model!r}.")
    root = shared / (row if (row and dense is not None) else f"{spec.name} (index)")
    return HybridRetriever(spec.name, spec.methods, dense=dense, fusion=spec.fusion, rerank=spec.rerank,
                           rerank_top=spec.rerank_top, candidates=spec.candidates,
                           bm25=BM25Params.from_config(common.get("bm25")), index_root=root)


def run_passkey_for(retriever, cfg: PasskeyConfig) -> dict[str, dict]:
    from rayembed.evaluate.passkey import run_passkey

    return run_passkey(retriever, list(cfg.lengths), num_docs=cfg.num_docs, num_queries=cfg.num_queries,
                       seed=cfg.seed)


def _brief(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{_LABELS.get(k, k)} {v:.4f}" for k, v in row.items()
                     if k in _LABELS and isinstance(v, float))


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v))


def render_table(results: Mapping[str, Any]) -> str:
    """The results as Markdown: a summary (models x datasets), then every metric per dataset."""
    metrics = results.get("metrics", {})
    datasets = results.get("datasets", {})
    models = list(metrics)
    lines: list[str] = []
    if models and datasets:
        cols: list[tuple[str, str]] = []
        for ds, info in datasets.items():
            keys = ("spearman",) if info.get("kind") == "sts" else ("ndcg@10", "recall@100")
            cols += [(ds, k) for k in keys]
        lines += ["| model | " + " | ".join(f"{ds} {_LABELS[k]}" for ds, k in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for m in models:
            cells = [_fmt(metrics[m].get(ds, {}).get(k)) for ds, k in cols]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        for ds, info in datasets.items():
            keys = ("spearman", "pearson") if info.get("kind") == "sts" else RETRIEVAL_METRICS
            size = (f"{info.get('num_pairs')} pairs" if info.get("kind") == "sts"
                    else f"{info.get('num_queries')} queries, {info.get('num_docs')} documents")
            lines += ["", f"### {ds} ({size})", "", f"Query instruction: `{info.get('instruction')}`", "",
                      "| model | " + " | ".join(_LABELS[k] for k in keys) + " | seconds |",
                      "|---|" + "---:|" * (len(keys) + 1)]
            for m in models:
                row = metrics[m].get(ds)
                if row is None:
                    continue
                lines.append(f"| {m} | " + " | ".join(_fmt(row.get(k)) for k in keys) + f" | {row.get('seconds')} |")
    prebuilt = {m: info["index_from"] for m, info in results.get("models", {}).items() if info.get("index_from")}
    if prebuilt:
        lines += ["", "Searched through the index stage's exact indexes (their corpora were not encoded again): "
                  + "; ".join(f"{m} on {', '.join(sorted(v))}" for m, v in prebuilt.items()) + "."]
    if results.get("passkey"):
        lengths = sorted({int(n) for rows in results["passkey"].values() for n in rows})
        lines += ["", "### Passkey retrieval (top-1 accuracy per document length in tokens)", "",
                  "| model | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for m, rows in results["passkey"].items():
            cells = []
            for n in lengths:
                r = rows.get(str(n))
                cell = "–" if r is None else f"{r['accuracy']:.2f}"
                if r and r.get("truncated_to"):
                    cell += f" (cut to {r['truncated_to']})"
                cells.append(cell)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ndcg(results: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """A grouped bar plot of nDCG@10: one group per retrieval dataset, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = results.get("metrics", {})
    ds_names = [d for d, i in results.get("datasets", {}).items() if i.get("kind") == "retrieval"]
    models = list(metrics)
    if not ds_names or not models:
        return None
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(ds_names) * max(1, len(models) / 2)), 3.6))
    for i, m in enumerate(models):
        vals = [metrics[m].get(d, {}).get("ndcg@10", 0.0) for d in ds_names]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(ds_names))]
        bars = ax.bar(xs, vals, width, label=m)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(ds_names)), ds_names)
    ax.set_ylabel("nDCG@10")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("nDCG@10 per model")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write_results(results: Mapping[str, Any], out_dir: str | os.PathLike, *,
                  per_query: Mapping[str, Any] | None = None, plot: bool = True) -> Path:
    """Write results.json, per_query.json, results.md and (with ``plot``) ndcg.png atomically."""
    out = Path(out_dir)
    atomic_write_json(out / "results.json", results)
    if per_query:
        atomic_write_json(out / "per_query.json", per_query)
    atomic_write_text(out / "results.md", "# Evaluation results\n\n" + render_table(results))
    if plot:
        plot_ndcg(results, out / "ndcg.png")
    logger.info("wrote %s", out / "results.json")
    return out
