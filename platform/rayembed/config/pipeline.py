"""The ``pipeline`` section: which stages `rayembed pipeline` runs, on which corpora."""

from __future__ import annotations

from dataclasses import dataclass

from rayembed.config.base import ConfigError, option

STAGES = ("synth", "data", "train", "index", "eval", "serve")


@dataclass
class CorpusSpec:
    """A corpus the index stage builds an index of (with the trained model)."""

    name: str = option("msmarco-subset", "Name; the index goes to <run_dir>/index/<name>.")
    path: str = option("msmarco-subset", "Corpus file or folder; relative paths resolve against data_dir.")
    format: str = option("beir", "beir, smart, jsonl or parquet (see index.format).")


def _default_corpora() -> list[CorpusSpec]:
    return [CorpusSpec(), CorpusSpec(name="cranfield", path="cranfield", format="smart")]


@dataclass
class PipelineConfig:
    """`rayembed pipeline`: synth -> data -> train -> index -> eval -> serve, one run directory."""

    stages: list[str] = option(help="Stages to run, in order.", factory=lambda: list(STAGES))
    force: bool = option(False, "Rerun stages that already finished in this run_dir (default: reuse them).")
    corpora: list[CorpusSpec] = option(help="Corpora the index stage indexes.", factory=_default_corpora)
    baselines: dict[str, str] = option(
        help="Baselines evaluated beside the trained model: display name -> bm25 or a model.",
        factory=lambda: {"BM25": "bm25", "all-MiniLM-L6-v2": "all-minilm-l6-v2"},
    )
    include_untuned: bool = option(True, "Also evaluate the backbone before training.")
    demo_queries: list[str] = option(
        help="Queries sent to the endpoint in the serve stage.",
        factory=lambda: [
            "what is the fahrenheit scale",
            "causes of left ventricular hypertrophy",
            "how long does it take to boil an egg",
        ],
    )
    serve_port: int = option(8000, "Port of the endpoint started in the serve stage.")

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"pipeline.stages has unknown stage(s) {unknown}; choose from {list(STAGES)}.")
        if not self.stages:
            raise ConfigError(f"pipeline.stages is empty; name at least one of {list(STAGES)}.")
