"""The ``serve`` section: the Ray Serve retrieval endpoint.

Two deployments make up the application (see ``rayembed.serving``): ``QueryEncoder`` runs the
embedder with request batching, ``Retriever`` is the HTTP ingress and holds the FAISS index; a
third, ``LLMRerankerDeployment``, runs the LLM reranker when ``serve.reranker.path`` is set.
Each has its own resources and autoscaling bounds, so a GPU cluster can scale encoders apart
from retrievers. The API key is never a config value: only the name of the environment
variable that holds it, or the path of a file that holds it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from rayembed.config.base import ConfigError, option


@dataclass
class DeploymentConfig:
    """Resources and autoscaling of one Serve deployment."""

    num_cpus: float = option(0.5, "CPUs reserved per replica (fractions share a core).")
    num_gpus: float = option(0.0, "GPUs reserved per replica (fractions share a GPU).")
    min_replicas: int = option(1, "Autoscaling lower bound (replicas).")
    max_replicas: int = option(1, "Autoscaling upper bound (replicas). Equal to min_replicas: fixed size.")
    target_ongoing_requests: float = option(
        8.0, "Autoscaling target of in-flight requests per replica; above it Serve adds replicas."
    )
    max_ongoing_requests: int = option(
        64, "Requests one replica accepts at once; keep it at least max_batch_size so batches can fill."
    )
    max_queued_requests: int = option(
        256,
        "Requests each caller (the HTTP proxy, or the Retriever for the model deployments) queues for this "
        "deployment beyond those the replicas run; past it the caller gets a 503 at once. -1: unbounded.",
    )
    upscale_delay_s: float = option(5.0, "Seconds of sustained load before adding a replica.")
    downscale_delay_s: float = option(60.0, "Seconds of low load before removing a replica.")

    def check(self, name: str) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError(f"serve.{name}.num_cpus/num_gpus must be >= 0.")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ConfigError(
                f"serve.{name} reserves no CPU and no GPU; give it num_cpus (e.g. 0.5) so Ray "
                "does not pack unlimited replicas on one node."
            )
        if self.min_replicas < 0:
            raise ConfigError(f"serve.{name}.min_replicas must be >= 0, got {self.min_replicas}.")
        if self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(
                f"serve.{name}.max_replicas={self.max_replicas} must be >= 1 and >= "
                f"min_replicas={self.min_replicas}."
            )
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"serve.{name}.target_ongoing_requests must be positive.")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"serve.{name}.max_ongoing_requests must be >= 1.")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise ConfigError(
                f"serve.{name}.max_queued_requests must be >= 1, or -1 for an unbounded queue; got "
                f"{self.max_queued_requests}."
            )

    def serve_options(self) -> dict:
        """Keyword arguments for ``Deployment.options``."""
        ray_actor_options: dict = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            ray_actor_options["num_gpus"] = self.num_gpus
        return {
            "ray_actor_options": ray_actor_options,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            },
        }


@dataclass
class EncoderDeploymentConfig(DeploymentConfig):
    """QueryEncoder: runs the model, so it gets a whole CPU (or a GPU) by default."""

    num_cpus: float = option(1.0, "CPUs reserved per replica (also torch's share of the node).")
    max_ongoing_requests: int = option(
        128, "Requests one replica accepts at once; keep it at least max_batch_size so batches can fill."
    )


@dataclass
class RetrieverDeploymentConfig(DeploymentConfig):
    """Retriever: HTTP handling plus FAISS search; light on CPU for small indexes."""

    max_ongoing_requests: int = option(128, "Requests one replica accepts at once.")


@dataclass
class RerankerServeConfig(DeploymentConfig):
    """The LLM reranker behind ``POST /rerank`` (model "llm"): its own deployment, when a path is set."""

    path: str | None = option(
        None,
        "A saved reranker folder (from train.mode=rerank) or a causal LM name (smollm2-135m) to score "
        "with. Empty: no LLM reranker; /rerank then offers only model=multivector.",
    )
    max_length: int | None = option(
        None, "Prompt length limit in tokens (documents are cut first). Empty: the reranker's own setting."
    )
    batch_size: int = option(8, "Prompts scored per forward pass.")
    max_texts: int = option(100, "Most texts one /rerank request may score.")
    num_cpus: float = option(1.0, "CPUs reserved per replica (also torch's share of the node).")

    def check(self, name: str) -> None:
        super().check(name)
        if self.batch_size < 1:
            raise ConfigError(f"serve.{name}.batch_size must be >= 1, got {self.batch_size}.")
        if self.max_texts < 1:
            raise ConfigError(f"serve.{name}.max_texts must be >= 1, got {self.max_texts}.")
        if self.max_length is not None and self.max_length < 16:
            raise ConfigError(f"serve.{name}.max_length must be at least 16 tokens or empty, got {self.max_length}.")
        if self.path is not None and not str(self.path).strip():
            raise ConfigError(f"serve.{name}.path is blank; leave it empty (null) or name a reranker folder.")


@dataclass
class ServeConfig:
    """The retrieval endpoint: what it serves, where it listens, its limits and deployments."""

    output_dir: str | None = option(None, "Where this stage writes. Empty: <run_dir>/serve.")
    index_dir: str | None = option(
        None, "Index folder (with manifest.json) to serve. Empty: <run_dir>/index."
    )
    embedder: str | None = option(
        None,
        "Embedder that encodes queries (a saved folder or a registered name). Empty: the embedder "
        "recorded in the index manifest, so queries and documents always share a model.",
    )
    model_name: str | None = option(
        None, "Model name on /v1/models and /v1/embeddings. Empty: the embedder folder's name."
    )
    default_instruction: str | None = option(
        None,
        "Task instruction put before every /search query (Instruct: ...\\nQuery: ...). Empty: "
        "queries are encoded as written; set it for instruction-tuned embedders.",
    )
    host: str = option(
        "127.0.0.1",
        "Address the HTTP proxy binds. Another address without an API key logs a warning.",
    )
    port: int = option(8000, "HTTP port.")
    app_name: str = option("rayembed", "Serve application name.")
    route_prefix: str = option("/", "URL prefix of the application.")
    api_key_env: str = option(
        "RAYEMBED_API_KEY",
        "Environment variable holding the API key. When it (or api_key_file) is set, every "
        "route except /healthz needs 'Authorization: Bearer <key>'.",
    )
    api_key_file: str | None = option(
        None,
        "File holding the API key (e.g. a mounted secret); read when the env variable is empty. "
        "The key itself never goes in a config.",
    )
    max_batch_size: int = option(32, "Most queries encoded in one forward pass (texts).")
    max_batch_chars: int = option(
        65536,
        "Most characters of query text in one forward pass: a batch closes at this or at max_batch_size, "
        "whichever comes first, so long inputs do not stall many short ones. At least max_input_chars.",
    )
    batch_wait_timeout_s: float = option(
        0.0,
        "Seconds an idle encoder waits for more queries before it starts a batch. Under load no wait is "
        "needed: queries that arrive while a batch runs form the next one.",
    )
    max_queries_per_request: int = option(64, "Most queries (or /v1/embeddings inputs) per request.")
    max_input_chars: int = option(8192, "Longest accepted query or input, in characters.")
    max_k: int = option(100, "Largest k a /search request may ask for.")
    max_rerank_top: int = option(
        1000, "Largest rerank_top a hybrid /search request may ask for (hits re-scored by MaxSim)."
    )
    max_rerank_docs: int = option(
        2000,
        "Most hits one /search request may re-score by MaxSim over all its queries (rerank_top x queries); "
        "each loads a document's token vectors.",
    )
    max_ef_search: int = option(1024, "Largest ef_search a /search request may ask of an HNSW index.")
    max_concurrent_requests: int = option(
        32, "Search, embedding and rerank requests one Retriever replica works on at once."
    )
    max_waiting_requests: int = option(
        96,
        "Requests one Retriever replica lets wait for a free slot; beyond it a request gets 503 with "
        "Retry-After at once. max_concurrent_requests + max_waiting_requests must fit in "
        "serve.retriever.max_ongoing_requests.",
    )
    queue_timeout_s: float = option(5.0, "Seconds a request may wait for a free slot before it gets 503.")
    request_timeout_s: float = option(
        30.0,
        "Seconds a request may run before it is stopped and answered 503. The HTTP proxy's own timeout is "
        "set 10 s above it, as a backstop.",
    )
    health_timeout_s: float = option(
        2.0, "Seconds /healthz waits for the QueryEncoder to answer before it reports the endpoint unavailable."
    )
    default_k: int = option(10, "k when a /search request gives none.")
    max_body_bytes: int = option(1_048_576, "Largest request body, in bytes; larger gets 413.")
    access_log: bool = option(True, "Log one line per request in the replicas (off for benchmarks).")
    verify_index: bool = option(
        True, "Check shard checksums and the embedder identity when the index opens."
    )
    torch_threads: int | None = option(None, "torch threads per encoder replica. Empty: torch's default.")
    faiss_threads: int | None = option(
        1, "OpenMP threads FAISS uses per retriever replica. 1 avoids oversubscribing small nodes."
    )
    encoder: EncoderDeploymentConfig = option(
        help="QueryEncoder deployment: resources and autoscaling.", factory=EncoderDeploymentConfig
    )
    retriever: RetrieverDeploymentConfig = option(
        help="Retriever (HTTP ingress) deployment: resources and autoscaling.", factory=RetrieverDeploymentConfig
    )
    reranker: RerankerServeConfig = option(
        help="LLM reranker for POST /rerank (model llm): what it loads, its limits and deployment.",
        factory=RerankerServeConfig,
    )

    def __post_init__(self) -> None:
        for key in ("max_batch_size", "max_queries_per_request", "max_input_chars", "max_k", "default_k",
                    "max_rerank_top", "max_rerank_docs", "max_ef_search", "max_concurrent_requests"):
            if getattr(self, key) < 1:
                raise ConfigError(f"serve.{key} must be >= 1, got {getattr(self, key)}.")
        if self.default_k > self.max_k:
            raise ConfigError(f"serve.default_k={self.default_k} exceeds serve.max_k={self.max_k}; lower it.")
        if not 0 <= self.batch_wait_timeout_s <= 1.0:
            raise ConfigError(
                f"serve.batch_wait_timeout_s must be within [0, 1] seconds, got {self.batch_wait_timeout_s}; "
                "a few milliseconds is typical."
            )
        if not 0 < self.port < 65536:
            raise ConfigError(f"serve.port must be in 1..65535, got {self.port}.")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"serve.max_body_bytes must be at least 1024, got {self.max_body_bytes}.")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"serve.route_prefix must start with '/', got {self.route_prefix!r}.")
        if not self.api_key_env or not self.api_key_env.replace("_", "").isalnum():
            raise ConfigError(
                f"serve.api_key_env must be an environment variable name such as RAYEMBED_API_KEY, "
                f"got {self.api_key_env!r}. Put the key itself in that variable, never in the config."
            )
        for key in ("torch_threads", "faiss_threads"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"serve.{key} must be >= 1 or empty, got {v}.")
        if self.max_batch_chars < self.max_input_chars:
            raise ConfigError(
                f"serve.max_batch_chars={self.max_batch_chars} is below serve.max_input_chars={self.max_input_chars}; "
                "one accepted input would not fit in a batch. Raise max_batch_chars."
            )
        if self.max_waiting_requests < 0:
            raise ConfigError(f"serve.max_waiting_requests must be >= 0, got {self.max_waiting_requests}.")
        for key in ("queue_timeout_s", "request_timeout_s", "health_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"serve.{key} must be a positive number of seconds, got {getattr(self, key)}.")
        admitted = self.max_concurrent_requests + self.max_waiting_requests
        if admitted > self.retriever.max_ongoing_requests:
            raise ConfigError(
                f"serve.max_concurrent_requests + serve.max_waiting_requests = {admitted} exceeds "
                f"serve.retriever.max_ongoing_requests={self.retriever.max_ongoing_requests}: Serve would queue "
                "the excess before the Retriever can answer 503. Raise max_ongoing_requests or lower the two."
            )
        self.encoder.check("encoder")
        self.retriever.check("retriever")
        self.reranker.check("reranker")
        for name in ("encoder", "retriever"):
            dep = getattr(self, name)
            if name == "encoder" and dep.max_ongoing_requests < self.max_batch_size:
                raise ConfigError(
                    f"serve.encoder.max_ongoing_requests={dep.max_ongoing_requests} is below "
                    f"serve.max_batch_size={self.max_batch_size}; batches could never fill. Raise it."
                )

    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        return host_is_loopback(self.host)


def host_is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
