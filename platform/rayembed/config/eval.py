"""The ``eval`` section: which models, which datasets, which metrics settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rayembed.config.base import ConfigError, option
from rayembed.config.index import BM25Config

DATASET_FORMATS = ("auto", "beir", "smart", "sts")


@dataclass
class DatasetSpec:
    """One evaluation dataset: a BEIR folder, a SMART/TREC collection or an STS TSV file."""

    name: str = option("msmarco-subset", "Name shown in tables; also picks the default instruction.")
    path: str = option(
        "msmarco-subset",
        "Folder (BEIR, SMART) or .csv/.tsv file (STS). Relative paths are under data_dir.",
    )
    format: Literal["auto", "beir", "smart", "sts"] = option(
        "auto", "auto: corpus.jsonl -> beir, cran.all.* / *.all.* -> smart, a .csv/.tsv file -> sts."
    )
    split: str = option("test", "BEIR qrels split (qrels/<split>.tsv) or STS split (sts-<split>.csv).")
    instruction: str | None = option(
        None, "Query instruction. Empty: the paper's for this task (eval.instructions can override)."
    )
    symmetric: bool = option(
        False, "Put the instruction on documents too (symmetric tasks such as Quora). STS always does."
    )
    max_queries: int = option(0, "Evaluate only the first N judged queries (0: all). For quick runs.")
    max_docs: int = option(
        0, "Keep at most N documents, judged ones of the kept queries first (0: all). For quick runs."
    )
    ignore_identical_ids: bool = option(
        False, "Drop hits whose document id equals the query id (BEIR does this for ArguAna, Quora)."
    )

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("eval.datasets[].name is empty; give each dataset a name.")
        if not self.path:
            raise ConfigError(f"eval.datasets[{self.name}].path is empty; name a folder or file.")
        if self.max_queries < 0 or self.max_docs < 0:
            raise ConfigError(
                f"eval.datasets[{self.name}]: max_queries and max_docs must be >= 0 (0 means all)."
            )


@dataclass
class PasskeyConfig:
    """The personalised passkey retrieval test (long context), generated synthetically."""

    enabled: bool = option(False, "Run the passkey test as part of `rayembed eval`.")
    lengths: list[int] = option(
        help="Document lengths to test, in tokens of each model's tokenizer.",
        factory=lambda: [128, 256, 512],
    )
    num_docs: int = option(100, "Candidate documents per length; each query's answer is one of them.")
    num_queries: int = option(20, "Queries per length (accuracy = top-1 hits / queries).")
    seed: int = option(0, "Seed for names, passkeys and insertion positions.")

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 32 for n in self.lengths):
            raise ConfigError(
                f"eval.passkey.lengths must list token lengths of at least 32, got {self.lengths}."
            )
        if self.num_docs < 2:
            raise ConfigError(f"eval.passkey.num_docs must be at least 2, got {self.num_docs}.")
        if not 1 <= self.num_queries <= self.num_docs:
            raise ConfigError(
                f"eval.passkey.num_queries must be in [1, num_docs={self.num_docs}], got {self.num_queries}."
            )


HYBRID_METHODS = ("dense", "bm25", "sparse")


@dataclass
class HybridSpec:
    """One hybrid row of the results table: an embedder's index searched with several methods, fused.

    Example: ``{name: "dense+bm25 (rrf)", methods: {dense: 1, bm25: 1}, fusion: rrf}``, or with
    ``rerank: multivector`` (the embedder needs its multi-vector head).
    """

    name: str = option("dense+bm25 (rrf)", "Row name in the results table; unique among models and hybrids.")
    model: str | None = option(
        None,
        "The embedder: an eval.models name, a saved folder or a registered name. Empty: the last "
        "embedding model of eval.models (in `rayembed pipeline`, the trained model).",
    )
    methods: dict[str, float] = option(
        help="First-stage methods and their weights: dense, bm25, sparse (sparse needs model.heads.sparse).",
        factory=lambda: {"dense": 1.0, "bm25": 1.0},
    )
    fusion: Literal["rrf", "weighted_sum"] = option(
        "rrf", "rrf: reciprocal rank fusion (k=60); weighted_sum: min-max normalised scores, weighted."
    )
    rerank: Literal["multivector"] | None = option(
        None, "multivector: rerank the fused top rerank_top with MaxSim (needs model.heads.multivector)."
    )
    rerank_top: int = option(100, "How many fused hits the reranker re-scores.")
    candidates: int = option(100, "Hits each method retrieves per query before fusion.")

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("eval.hybrid[].name is empty; name each hybrid row.")
        bad = [m for m in self.methods if m not in HYBRID_METHODS]
        if bad or not self.methods:
            raise ConfigError(
                f"eval.hybrid[{self.name}].methods={self.methods}: use one or more of {list(HYBRID_METHODS)} "
                "with a weight each, e.g. {dense: 1, bm25: 1}."
            )
        if any(w < 0 for w in self.methods.values()):
            raise ConfigError(f"eval.hybrid[{self.name}].methods: weights must be >= 0, got {self.methods}.")
        if self.rerank_top < 1 or self.candidates < 1:
            raise ConfigError(f"eval.hybrid[{self.name}]: rerank_top and candidates must be at least 1.")

    @property
    def needs_model(self) -> bool:
        return any(m != "bm25" for m in self.methods) or self.rerank is not None


def _default_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec(name="msmarco-subset", path="msmarco-subset", format="beir"),
        DatasetSpec(name="cranfield", path="cranfield", format="smart"),
        DatasetSpec(name="stsb", path="stsb", format="sts", split="test"),
    ]


@dataclass
class EvalConfig:
    """Settings for the eval stage."""

    output_dir: str | None = option(None, "Where this stage writes. Empty: <run_dir>/eval.")
    models: dict[str, str] = option(
        help="Models to compare, name -> saved embedder folder, registered name, or 'bm25'.",
        factory=lambda: {"bm25": "bm25", "all-minilm-l6-v2": "all-minilm-l6-v2"},
    )
    datasets: list[DatasetSpec] = option(
        help="Datasets to evaluate on (BEIR folders, SMART collections, STS files).",
        factory=_default_datasets,
    )
    instructions: dict[str, str] = option(
        help="Query instruction overrides, dataset name -> instruction.", factory=dict
    )
    query_instructions: Literal["auto", "always", "never"] = option(
        "auto",
        "Instruct queries? auto: as the embedder was trained when its folder records it "
        "(data.stream.instructions); else decoder embedders (the E5-mistral recipe) yes, encoders "
        "such as all-MiniLM-L6-v2 (trained without instructions) no.",
    )
    top_k: int = option(1000, "Search depth per query (hits fed to the metrics; MAP uses all of them).")
    batch_size: int = option(32, "Encoding batch size (texts).")
    max_length: int | None = option(None, "Encoding max length in tokens. Empty: each model's own.")
    index_type: str = option("flat", "FAISS index type for dense search (flat is exact; see index.index_type).")
    keep_indexes: bool = option(
        False, "Keep each model's FAISS index under <output_dir>/indexes/<model>/<dataset> and reuse it."
    )
    plot: bool = option(True, "Write ndcg.png, a bar plot of nDCG@10 per model and dataset.")
    bm25: BM25Config = option(help="BM25 baseline settings (also the bm25 method of eval.hybrid).",
                              factory=BM25Config)
    hybrid: list[HybridSpec] = option(
        help="Hybrid rows: an embedder's index searched with dense, bm25 and sparse fused, optionally "
        "reranked with multi-vector MaxSim. Empty: none.",
        factory=list,
    )
    passkey: PasskeyConfig = option(help="Long-context passkey retrieval test.", factory=PasskeyConfig)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError(
                "eval.models is empty; name at least one, e.g. eval.models={bm25: bm25, mine: runs/x/model}."
            )
        for name, path in self.models.items():
            if not path:
                raise ConfigError(f"eval.models.{name} is empty; give a folder, registered name or 'bm25'.")
        rows = list(self.models) + [h.name for h in self.hybrid]
        dup_rows = sorted({n for n in rows if rows.count(n) > 1})
        if dup_rows:
            raise ConfigError(f"eval.models and eval.hybrid share the row names {dup_rows}; give each row its own name.")
        names = [d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"eval.datasets has duplicate names {dup}; give each dataset a unique name.")
        if self.top_k < 10:
            raise ConfigError(f"eval.top_k must be at least 10 (nDCG@10 needs 10 hits), got {self.top_k}.")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be positive, got {self.batch_size}.")
