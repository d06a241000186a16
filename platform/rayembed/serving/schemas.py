"""Request and response bodies of the HTTP API, and the JSON error format.

Types are strict: a JSON string where an integer belongs (``"k": "5"``) is an error, not a
guess. Limits that come from the config (largest k, most queries, longest input) are checked
by :func:`check_texts` and friends in the replica, so a deployment can change them without
new code. Every error is OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``,
so the ``openai`` client raises its usual exceptions with a readable message.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class InvalidRequest(Exception):
    """A request the client must fix. ``param`` names the offending field."""

    def __init__(self, param: str | None, message: str, status: int = 400, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.status = status
        self.code = code

    def __reduce__(self):
        # Raised in one replica, re-raised in another: pickle every field, not just the message.
        return (type(self), (self.param, self.message, self.status, self.code))


def error_body(message: str, param: str | None, code: str, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class SearchRequest(BaseModel):
    """``POST /search``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: StrictStr | list[StrictStr] = Field(
        description="One query, or a list of queries answered in order.",
        examples=["what is the boiling point of water"],
    )
    k: StrictInt | None = Field(None, description="Results per query (1..serve.max_k). Default serve.default_k.")
    instruction: StrictStr | None = Field(
        None,
        description="Task instruction for these queries, replacing serve.default_instruction. "
        "An empty string encodes the queries as written.",
    )
    nprobe: StrictInt | None = Field(None, description="IVF lists to visit (IVF indexes only; more: slower, better).")
    ef_search: StrictInt | None = Field(None, description="HNSW search breadth (HNSW indexes only).")
    methods: dict[StrictStr, float] | None = Field(
        None,
        description="Hybrid search: retrieval methods and their weights, e.g. {\"dense\": 1.0, \"bm25\": 0.5}, "
        "from the parts the index holds (dense, bm25, sparse). Omit for plain dense search.",
        examples=[{"dense": 1.0, "bm25": 0.5}],
    )
    fusion: Literal["rrf", "weighted", "weighted_sum"] | None = Field(
        None,
        description="How several methods' lists merge: rrf (weighted reciprocal rank fusion, the default) or "
        "weighted (min-max normalised scores, weighted and summed).",
    )
    rerank: Literal["multivector"] | None = Field(
        None, description="Re-score the fused top rerank_top with MaxSim over the index's stored token vectors."
    )
    rerank_top: StrictInt | None = Field(
        None, description="How many fused hits the reranker re-scores (1..serve.max_rerank_top, default 100)."
    )
    filter: dict[StrictStr, Any] | None = Field(
        None,
        description="Metadata filter applied inside the search: equality, {\"in\": [...]} and numeric ranges "
        "(gt, gte, lt, lte) per field, all of which must hold.",
        examples=[{"lang": "en", "year": {"gte": 2015}}],
    )

    @property
    def is_hybrid(self) -> bool:
        """Whether any hybrid option is set; without them /search is the plain dense search."""
        return any(v is not None for v in (self.methods, self.fusion, self.rerank, self.rerank_top))


class QueryResult(BaseModel):
    query: str
    ids: list[str] = Field(description="Document ids, best first.")
    scores: list[float] = Field(
        description="Similarity scores (inner product of normalised vectors); with hybrid options, the fused "
        "score, or the MaxSim score of reranked hits."
    )
    texts: list[str]
    titles: list[str]
    method_scores: list[dict[str, float]] | None = Field(
        None, description="Hybrid search only: each hit's raw score per method that found it (and multivector)."
    )


class SearchResponse(BaseModel):
    results: list[QueryResult]
    k: int
    model: str
    index_version: str
    methods: dict[str, float] | None = Field(None, description="Hybrid search only: the methods and weights used.")
    fusion: str | None = Field(None, description="Hybrid search only: the fusion used.")
    rerank: str | None = Field(None, description="Hybrid search only: the reranker used, if any.")


class RerankRequest(BaseModel):
    """``POST /rerank`` (TEI-like): score given texts against one query."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: StrictStr = Field(description="The query.", examples=["what do bees make"])
    texts: list[StrictStr] = Field(
        description="Texts to score (1..serve.reranker.max_texts).", examples=[["Bees make honey.", "Paris is in France."]]
    )
    model: Literal["multivector", "llm"] | None = Field(
        None,
        description="llm: the LLM reranker of serve.reranker.path (logit yes - logit no). multivector: MaxSim "
        "with the served embedder's multi-vector head. Default: llm when configured, else multivector.",
    )
    top_n: StrictInt | None = Field(None, description="Return only the best top_n texts (default: all).")
    instruction: StrictStr | None = Field(
        None, description="Task instruction: a line of the LLM prompt, or the query instruction for multivector."
    )


class RerankResult(BaseModel):
    index: int = Field(description="Position of the text in the request's texts.")
    score: float = Field(description="Relevance score; higher is more relevant.")


class RerankResponse(BaseModel):
    results: list[RerankResult] = Field(description="Sorted by score, highest first.")
    model: str = Field(description="The reranker used: llm or multivector.")


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings``, as in the OpenAI API (unknown extra fields are ignored, as there)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="A text or a list of texts to embed. Token-id arrays (accepted by the OpenAI API) are refused "
        "with a 400: this endpoint embeds text."
    )
    model: StrictStr = Field(description="The served model's name (see GET /v1/models).")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: little-endian float32 bytes."
    )
    dimensions: StrictInt | None = Field(
        None,
        description="Shorter vectors: the first `dimensions` coordinates of each, L2-normalised again (as "
        "OpenAI's text-embedding-3). Only sizes the model was trained for (its Matryoshka sizes, "
        "train.matryoshka_dims, listed on GET /v1/models) and its full size, unless force_dimensions is true.",
    )
    force_dimensions: StrictBool = Field(
        False,
        description="Extension: truncate to a `dimensions` the model was not trained for anyway. Such "
        "prefixes of a model trained without Matryoshka usually retrieve much worse.",
    )
    user: StrictStr | None = None
    instruction: StrictStr | None = Field(
        None, description="Extension: embed the inputs as queries with this task instruction."
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rayembed"
    dim: int | None = None
    matryoshka_dims: list[int] | None = Field(
        None, description="Shorter sizes the model was trained for: valid `dimensions` besides dim."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    index_version: str | None = None
    model: str | None = None


def check_texts(value: str | list[str], param: str, *, max_items: int, max_chars: int) -> list[str]:
    """Normalise one text or a list into a non-empty list of non-blank texts within limits."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise InvalidRequest(param, f"{param} is an empty list; send at least one text.", code="empty")
    if len(texts) > max_items:
        raise InvalidRequest(
            param,
            f"{param} holds {len(texts)} texts; at most {max_items} are accepted per request. "
            "Split it into several requests.",
            code="too_many",
        )
    single = isinstance(value, str)
    for i, t in enumerate(texts):
        where = param if single else f"{param}[{i}]"
        check_unicode(t, where)
        if not t.strip():
            raise InvalidRequest(where, f"{where} is empty; send non-blank text.", code="empty")
        if len(t) > max_chars:
            raise InvalidRequest(
                where,
                f"{where} is {len(t)} characters long; the limit is {max_chars}. Shorten it.",
                code="too_long",
            )
    return texts


def check_unicode(text: str, param: str) -> None:
    """400 for text that is not valid Unicode (a lone surrogate such as the JSON escape \\ud800).

    Such a string cannot be encoded as UTF-8, so a tokenizer fails on it and JSON cannot echo it.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(
            param,
            f"{param} is not valid Unicode text: it holds a lone surrogate code point at character {e.start} "
            "(a \\ud800-\\udfff escape without its pair). Send text encoded as UTF-8.",
            code="invalid_unicode",
        ) from None


def check_instruction(value: str | None, param: str, max_chars: int) -> None:
    if value is None:
        return
    check_unicode(value, param)
    if len(value) > max_chars:
        raise InvalidRequest(
            param, f"{param} is {len(value)} characters long; the limit is {max_chars}. Shorten it.", code="too_long"
        )


def check_dimensions(
    value: int | None, dim: int, trained: list[int] | None, force: bool, model: str
) -> int | None:
    """The size to cut vectors to for ``dimensions`` (None: the full vectors), or a 400 naming it.

    ``dim`` is the model's full size and ``trained`` its Matryoshka sizes; any other size needs
    ``force_dimensions``.
    """
    if value is None or value == dim:
        return None
    sizes = [*(trained or []), dim]
    if not 1 <= value <= dim:
        raise InvalidRequest(
            "dimensions",
            f"dimensions={value} is out of range; it must be between 1 and {dim}, the size of the vectors "
            f"'{model}' makes (sizes it was trained for: {sizes}). Omit dimensions for the full vectors.",
            code="out_of_range",
        )
    if value in sizes or force:
        return value
    if trained:
        what = f"was trained for the sizes {sizes} (Matryoshka)"
    else:
        what = f"was trained for its full size {dim} only (no train.matryoshka_dims)"
    raise InvalidRequest(
        "dimensions",
        f"dimensions={value} is not a size '{model}' {what}; a prefix of another length was never trained "
        f"to stand alone. Send one of {sizes}, omit dimensions, or set force_dimensions=true to truncate anyway.",
        code="unsupported",
    )


def check_range(value: int | None, param: str, low: int, high: int | None = None) -> None:
    if value is None:
        return
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequest(param, f"{param}={value} is out of range; it must be {bound}.", code="out_of_range")


_TYPE_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}
_BRANCH_LABEL = re.compile(r"^[a-z][a-z_-]*\[.*\]$")


def validation_error_to_body(errors: list[dict]) -> tuple[str, dict]:
    """Turn FastAPI/pydantic validation errors into (param, OpenAI-style body)."""
    if not errors:
        return "body", error_body("Invalid request body.", "body", "invalid_body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        msg = f"The request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}). Send a JSON object."
        return "body", error_body(msg, "body", "invalid_json")
    parts = []
    params = []
    for e in errors[:5]:
        loc = [x for x in e.get("loc", ()) if x != "body"]
        # Drop pydantic's union-branch labels ('str', 'list[str]', 'function-after[...]') from the location.
        loc = [x for x in loc if not isinstance(x, str) or (x not in _TYPE_LABELS and not _BRANCH_LABEL.match(x))]
        param = ""
        for x in loc:  # field names joined by dots, list positions as [i]: query[1], methods.dense
            param += f"[{x}]" if isinstance(x, int) else (f".{x}" if param else str(x))
        param = param or "body"
        if param not in params:
            params.append(param)
        msg = e.get("msg", "invalid")
        if e.get("type") == "missing":
            msg = "field required"
        elif e.get("type") == "extra_forbidden":
            msg = "unknown field; check its spelling"
        elif e.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            msg = "the body must be a JSON object" if param == "body" else "must be a JSON object"
        parts.append(f"{param}: {msg}")
    message = "Invalid request: " + "; ".join(dict.fromkeys(parts)) + "."
    return params[0], error_body(message, params[0], str(first.get("type", "invalid_value")))
