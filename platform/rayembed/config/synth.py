"""The ``synth`` section: synthetic training data from any OpenAI-compatible LLM.

Generation follows the E5-mistral recipe (MISSION.md §1): asymmetric task types are
brainstormed first and then instantiated one JSON example per task; symmetric types (STS,
bitext) are generated directly. Requests go through the official ``openai`` client against
``base_url`` (OpenAI, vLLM, ``rayembed serve-llm``, any compatible service), from a pool of
Ray Data actors. The API key is best left out of the config: it is read from the environment
variable named by ``api_key_env`` (``OPENAI_API_KEY`` by default) and never written anywhere.
"""

from __future__ import annotations

import ipaddress
import warnings
from dataclasses import dataclass

from rayembed.config.base import ConfigError, option

STRUCTURED_OUTPUT_MODES = ("json_schema", "json_object", "off")
TASK_TYPES = ("short-long", "long-short", "short-short", "long-long", "sts", "bitext", "corpus-queries")
ASYMMETRIC_TYPES = ("short-long", "long-short", "short-short", "long-long")
LANGUAGE_TIERS = ("high", "mid", "low")


def _default_counts() -> dict[str, int]:
    # The paper's mix (167k/122k/99k/89k/17k/13k) at laptop scale.
    return {"short-long": 17, "long-short": 12, "sts": 10, "bitext": 9, "long-long": 2, "short-short": 2}


def _default_tiers() -> dict[str, float]:
    return {"high": 1.0, "mid": 0.25, "low": 0.05}


@dataclass
class LLMServerConfig:
    """``rayembed serve-llm``: a Hugging Face causal LM behind /v1/chat/completions on Ray Serve."""

    checkpoint: str = option(
        "smollm2-135m",
        "Registered backbone name (resolved with rayembed.modeling.backbones) or a local HF "
        "folder holding a causal LM with a chat template.",
    )
    model_name: str | None = option(
        None, "Model id the endpoint reports in /v1/models and accepts in requests. Empty: the checkpoint name."
    )
    host: str = option("127.0.0.1", "Address the HTTP proxy binds. 0.0.0.0 exposes it to the network.")
    port: int = option(8100, "HTTP port of the Serve proxy.")
    route_prefix: str = option("/", "Route prefix of the app; the API lives under <prefix>/v1.")
    app_name: str = option("rayembed-llm", "Name of the Serve application.")
    num_cpus: float = option(0.5, "CPUs reserved per replica (fractions share a core).")
    num_gpus: float = option(0.0, "GPUs reserved per replica.")
    num_replicas: int = option(1, "Replicas of the deployment.")
    max_batch_size: int = option(8, "Requests generated together in one padded batch.")
    batch_wait_timeout_s: float = option(0.05, "Seconds to wait for a batch to fill.")
    max_new_tokens_cap: int = option(1024, "Upper bound on max_tokens a request may ask for (tokens).")
    max_input_tokens: int = option(
        2048, "Prompts longer than this (or than the model's context) are refused with HTTP 400 (tokens)."
    )
    max_body_bytes: int = option(
        1 << 20, "Request bodies larger than this are refused with HTTP 413 before parsing, chunked ones too (bytes)."
    )
    dtype: str = option("float32", "Weights dtype on the replica: float32, bfloat16 or float16.")
    torch_threads: int | None = option(None, "torch intra-op threads per replica. Empty: torch's default.")
    api_key_env: str = option(
        "RAYEMBED_LLM_API_KEY",
        "Environment variable holding the key this server requires (Authorization: Bearer). Unset: no key.",
    )
    api_key_file: str | None = option(None, "File holding the required key (used when the variable is unset).")

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError as e:
            raise ConfigError(f"synth.llm_server.host={self.host!r} is not an IP address; use 127.0.0.1.") from e
        if not (0 < self.port < 65536):
            raise ConfigError(f"synth.llm_server.port={self.port} is out of range; use 1024-65535.")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"synth.llm_server.route_prefix={self.route_prefix!r} must start with '/'.")
        if self.num_cpus < 0 or self.num_gpus < 0 or (self.num_cpus == 0 and self.num_gpus == 0):
            raise ConfigError("synth.llm_server needs num_cpus > 0 (e.g. 0.5) or num_gpus > 0.")
        if self.num_replicas < 1 or self.max_batch_size < 1:
            raise ConfigError("synth.llm_server.num_replicas and max_batch_size must be >= 1.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"synth.llm_server.dtype={self.dtype!r}; use float32, bfloat16 or float16.")
        if self.max_new_tokens_cap < 1 or self.max_input_tokens < 16:
            raise ConfigError("synth.llm_server.max_new_tokens_cap must be >= 1 and max_input_tokens >= 16.")
        if self.max_body_bytes < 1024:
            raise ConfigError(
                f"synth.llm_server.max_body_bytes={self.max_body_bytes} is too small for any chat request; "
                "use at least 1024 (the default is 1048576)."
            )


@dataclass
class CorpusQueriesConfig:
    """The ``corpus-queries`` task (InPars / Promptagator): a query for each sampled passage of the
    user's own corpus, kept only when the passage ranks in the top ``top_k`` for its query.

    ``synth.num_examples.corpus-queries`` is the number of passages sampled."""

    corpus: str | None = option(
        None, "Corpus file or folder (JSONL, Parquet, BEIR, SMART); relative paths resolve against data_dir."
    )
    format: str = option("auto", "Corpus format: auto (from the suffix or folder), jsonl, parquet, beir or smart.")
    name: str | None = option(None, "Corpus name written in each row's id and source. Empty: the file's name.")
    id_field: str | None = option(None, "Column holding the document id. Empty: '_id', then 'id', else the row number.")
    text_field: str = option("text", "Column holding the passage text.")
    title_field: str | None = option("title", "Column holding the title (optional; empty to ignore).")
    instruction: str = option(
        "Given a web search query, retrieve relevant passages that answer the query",
        "Instruction written on the rows (what the trained model is told the task is).",
    )
    min_passage_words: int = option(20, "Passages with fewer words are not sampled.")
    max_passage_chars: int = option(1500, "A longer passage is cut to this many characters in the prompt.")
    min_query_words: int = option(3, "Fewest words in a generated query.")
    max_query_words: int = option(16, "Most words in a generated query.")
    filter: str = option(
        "bm25",
        "Round-trip filter: bm25, a saved embedder folder or registered name (its exact search), or none.",
    )
    top_k: int = option(3, "Keep a query when its passage ranks in this many top results of the filter.")
    max_corpus_docs: int = option(
        100_000,
        "Passages the driver holds: a larger corpus is read once, streaming, and a seeded sample of this many is "
        "kept; passages are drawn from it and the round-trip filter ranks over it (0: the whole corpus).",
    )

    def __post_init__(self) -> None:
        if self.format not in ("auto", "jsonl", "parquet", "beir", "smart"):
            raise ConfigError(f"synth.corpus_queries.format={self.format!r}; use auto, jsonl, parquet, beir or smart.")
        if self.top_k < 1:
            raise ConfigError(f"synth.corpus_queries.top_k={self.top_k} must be at least 1.")
        if not 1 <= self.min_query_words <= self.max_query_words:
            raise ConfigError("synth.corpus_queries needs 1 <= min_query_words <= max_query_words.")
        if self.max_corpus_docs < 0:
            raise ConfigError("synth.corpus_queries.max_corpus_docs must be >= 0 (0: the whole corpus).")
        if self.max_passage_chars < 100:
            raise ConfigError("synth.corpus_queries.max_passage_chars must be at least 100.")


@dataclass
class SynthConfig:
    """Synthetic data generation: prompts, the LLM client, the actor pool, validation, output."""

    output_dir: str | None = option(None, "Where shards, rejects and the summary go. Empty: <run_dir>/synth.")
    # --- what to generate
    num_examples: dict[str, int] = option(
        help="Target examples per task type (short-long, long-short, short-short, long-long, sts, bitext, "
        "corpus-queries). Asymmetric types may end below target when a brainstorm returns fewer tasks; "
        "corpus-queries is the number of passages of synth.corpus_queries.corpus to write a query for.",
        factory=_default_counts,
    )
    corpus_queries: CorpusQueriesConfig = option(
        help="The corpus-queries task: queries written for passages of your own corpus.", factory=CorpusQueriesConfig
    )
    tasks_per_brainstorm: int = option(20, "Task definitions asked for in one brainstorm request.")
    examples_per_task: int = option(1, "Generated examples per brainstormed task (the paper: about 3).")
    seed: int | None = option(None, "Seed for task and placeholder sampling. Empty: the global seed.")
    english_share: float = option(0.43, "Fraction of examples in English (the paper: 43%).")
    tier_weights: dict[str, float] = option(
        help="Relative sampling weight of each non-English language by resource tier (high, mid, low).",
        factory=_default_tiers,
    )
    language_weights: dict[str, float] = option(
        help="Per-language weight overrides by ISO code, e.g. {de: 2.0, sw: 0}; 0 removes a language.",
        factory=dict,
    )
    languages: list[str] = option(
        help="Restrict sampling to these ISO codes (e.g. [en, de, fr]). Empty: all XLM-R languages.",
        factory=list,
    )
    long_long_min_words: int = option(300, "Minimum words of each long-long text (the paper: 300).")
    min_document_words: int = option(10, "Minimum words of a generated document (short-long, long-short input).")
    max_text_chars: int = option(20000, "Replies with a field longer than this are rejected (characters).")
    # --- the LLM endpoint
    model: str = option("smollm2-135m", "Model name sent with every request.")
    base_url: str | None = option(
        None,
        "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 for vLLM. Empty: $OPENAI_BASE_URL, "
        "then https://api.openai.com/v1.",
    )
    api_key: str | None = option(
        None, "API key. Prefer leaving this empty and setting the variable named by api_key_env."
    )
    api_key_env: str = option("OPENAI_API_KEY", "Environment variable holding the API key.")
    launch_local_llm: bool = option(
        False, "Start `rayembed serve-llm` (synth.llm_server) inside the job and generate against it."
    )
    llm_server: LLMServerConfig = option(help="The local OpenAI-compatible LLM server.", factory=LLMServerConfig)
    temperature: float = option(1.0, "Sampling temperature (the paper: 1.0).")
    top_p: float = option(1.0, "Nucleus sampling top_p (the paper: 1.0).")
    max_tokens: int = option(1024, "max_tokens of a generation request (tokens).")
    brainstorm_max_tokens: int = option(1024, "max_tokens of a brainstorm request (tokens).")
    structured_output: str | bool = option(
        "json_schema",
        "What each request asks of the reply's shape, as response_format: json_schema (each task type's JSON "
        "schema: keys, string lengths, STS score sets, list lengths; serve-llm and vLLM enforce it by "
        "constrained decoding), json_object (any JSON object) or off (the prompt alone asks for JSON).",
    )
    json_mode: bool | None = option(
        None, "Deprecated alias of structured_output: true means json_object, false means off. Empty: unset."
    )
    # --- traffic control
    max_in_flight: int = option(64, "Requests in flight at once, per actor.")
    requests_per_minute: float | None = option(None, "Request rate limit over all actors (requests/minute). Empty: none.")
    tokens_per_minute: float | None = option(
        None, "Token rate limit over all actors (prompt + max completion tokens/minute). Empty: none."
    )
    request_timeout_s: float = option(120.0, "Per-request timeout (seconds).")
    max_attempts: int = option(6, "Attempts per request, counting the first, on 429/5xx/timeouts/connection errors.")
    backoff_base_s: float = option(0.5, "First retry delay before jitter (seconds); doubles per attempt.")
    backoff_max_s: float = option(30.0, "Cap on one retry delay (seconds).")
    max_retry_after_s: float = option(120.0, "Cap on a server's Retry-After (seconds).")
    price_table: dict[str, dict[str, float]] = option(
        help="USD per 1M tokens by model, e.g. {gpt-4o-mini: {input: 0.15, output: 0.6}}. Empty: cost not tracked.",
        factory=dict,
    )
    max_cost_usd: float | None = option(
        None, "Stop starting new chunks once this much is spent (USD; needs price_table). Empty: no budget."
    )
    max_failure_rate: float = option(
        0.5,
        "Fail the run when more than this fraction of its requests failed (HTTP errors after retries, "
        "endpoint down); a run where every request failed always fails. Failed requests are sent again "
        "by the next run.",
    )
    # --- distribution and output
    num_actors: int = option(1, "Client actors in the Ray Data pool.")
    actor_num_cpus: float = option(0.25, "CPUs reserved per client actor (I/O-bound; fractions are fine).")
    chunks_in_flight_per_actor: int = option(4, "Chunks one actor works on at once (they share max_in_flight).")
    chunk_size: int = option(32, "Prompt specs per chunk; one Parquet shard per chunk, the unit of resume.")
    overwrite: bool = option(False, "Delete an output_dir that holds a run with a different generation config.")
    source_name: str | None = option(None, "Value of the 'source' column. Empty: synth:<model>.")

    def __post_init__(self) -> None:
        if self.json_mode is not None:
            mapped = "json_object" if self.json_mode else "off"
            msg = (
                f"synth.json_mode is deprecated; it now means synth.structured_output={mapped}. Write "
                f"structured_output: {mapped} instead (or json_schema, which enforces each task type's schema)."
            )
            # FutureWarning, not DeprecationWarning: it is meant for the person who wrote the config.
            warnings.warn(msg, FutureWarning, stacklevel=2)
            self.structured_output = mapped
            self.json_mode = None  # resolved: the saved config holds structured_output alone
        if self.structured_output is False:  # YAML 1.1 reads a bare `off` as false
            self.structured_output = "off"
        if self.structured_output not in STRUCTURED_OUTPUT_MODES:
            raise ConfigError(
                f"synth.structured_output={self.structured_output!r}; use one of "
                f"{', '.join(STRUCTURED_OUTPUT_MODES)}."
            )
        for t, n in self.num_examples.items():
            if t not in TASK_TYPES:
                raise ConfigError(
                    f"synth.num_examples has unknown task type {t!r}; use any of {', '.join(TASK_TYPES)}."
                )
            if n < 0:
                raise ConfigError(f"synth.num_examples.{t}={n} is negative; use 0 to skip a type.")
        if self.num_examples.get("corpus-queries", 0) > 0 and not self.corpus_queries.corpus:
            raise ConfigError(
                "synth.num_examples.corpus-queries asks for queries but synth.corpus_queries.corpus is empty; "
                "name the corpus to write queries for (e.g. synth.corpus_queries.corpus=msmarco-subset)."
            )
        for t, w in self.tier_weights.items():
            if t not in LANGUAGE_TIERS or w < 0:
                raise ConfigError(f"synth.tier_weights.{t}={w}: keys are high, mid, low with weights >= 0.")
        if any(w < 0 for w in self.language_weights.values()):
            raise ConfigError("synth.language_weights must be >= 0 (0 removes a language).")
        if not 0.0 <= self.english_share <= 1.0:
            raise ConfigError(f"synth.english_share={self.english_share} must lie in [0, 1].")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"synth.temperature={self.temperature} must lie in [0, 2].")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"synth.top_p={self.top_p} must lie in (0, 1].")
        positive = {
            "tasks_per_brainstorm": self.tasks_per_brainstorm,
            "examples_per_task": self.examples_per_task,
            "max_tokens": self.max_tokens,
            "brainstorm_max_tokens": self.brainstorm_max_tokens,
            "max_in_flight": self.max_in_flight,
            "max_attempts": self.max_attempts,
            "num_actors": self.num_actors,
            "chunks_in_flight_per_actor": self.chunks_in_flight_per_actor,
            "chunk_size": self.chunk_size,
            "max_text_chars": self.max_text_chars,
        }
        for key, v in positive.items():
            if v < 1:
                raise ConfigError(f"synth.{key}={v} must be >= 1.")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"synth.request_timeout_s={self.request_timeout_s} must be > 0 seconds.")
        if self.actor_num_cpus <= 0:
            raise ConfigError(
                f"synth.actor_num_cpus={self.actor_num_cpus} must be > 0; client actors are I/O-bound, "
                "so a fraction such as 0.25 is enough."
            )
        for key in ("requests_per_minute", "tokens_per_minute", "max_cost_usd"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ConfigError(f"synth.{key}={v} must be > 0, or left empty for no limit.")
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ConfigError("synth.backoff_base_s must be >= 0 and backoff_max_s >= backoff_base_s.")
        for model, prices in self.price_table.items():
            unknown = set(prices) - {"input", "output"}
            if unknown or any(v < 0 for v in prices.values()):
                raise ConfigError(
                    f"synth.price_table.{model} must be {{input: USD/1M, output: USD/1M}} with "
                    f"non-negative numbers; got {prices}."
                )
        if self.max_cost_usd is not None and self.model not in self.price_table:
            raise ConfigError(
                f"synth.max_cost_usd is set but synth.price_table has no entry for model {self.model!r}; "
                f"add price_table.{self.model}={{input: ..., output: ...}} (USD per 1M tokens)."
            )
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ConfigError(f"synth.max_failure_rate={self.max_failure_rate} must lie in [0, 1] (0.5: half).")
        if self.long_long_min_words < 1 or self.min_document_words < 0:
            raise ConfigError("synth.long_long_min_words must be >= 1 and min_document_words >= 0.")
