"""``rayembed serve-llm``: a Hugging Face causal LM behind an OpenAI-compatible API on Ray Serve.

Implements what the synth client needs from the protocol:

- ``GET  <prefix>/v1/models``
- ``POST <prefix>/v1/chat/completions`` with ``messages`` (rendered through the model's chat
  template), ``max_tokens``, ``temperature`` (0 means greedy; below 1e-5 is treated as 0, as
  vLLM does), ``top_p``, ``stop``, ``seed``; replies carry ``usage`` and ``finish_reason``
  ("length" when max_tokens cut the reply).
- ``response_format``: ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
  (OpenAI's and vLLM's shape) or ``{"type": "json_object"}``. Both are enforced by constrained
  decoding with llguidance: at every step a token mask computed from the grammar is applied to
  the logits (a transformers ``LogitsProcessor``), so a reply that ends by itself parses and
  matches the schema. A reply cut by ``max_tokens`` ends with ``finish_reason: "length"``.

Every request body is checked at the edge, before it can join a batch: the body size
(``max_body_bytes``, chunked bodies too: 413), then a pydantic model of the request (types,
ranges, lone surrogates), then the prompt's length against the model and the schema's
compilation. A bad field is a 400 in the OpenAI error shape, ``{"error": {"message", "type",
"param", "code"}}``, naming the field in ``param``. Tokenising and compiling run in a worker
thread, off the replica's event loop.

Requests are batched with ``@serve.batch``: concurrent requests with the same sampling
settings are left-padded into one ``generate`` call, which on CPU costs little more than one.
Each row keeps its own grammar matcher, so requests with different schemas (or none) share a
batch. An item that fails inside a batch fails alone: the rest of its batch is generated again
without it.

With SmolLM2-135M-Instruct this runs offline on a laptop CPU; on a GPU cluster point
``synth.base_url`` at vLLM instead.

Programmatic use::

    handle = start_llm_server(cfg.synth.llm_server)     # Ray must be initialised
    ...  # OpenAI clients talk to handle.base_url
    handle.stop()
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.request
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)
from ray import serve

logger = logging.getLogger(__name__)

# Temperatures below this sample as greedy (vLLM's rule): 1e-300 would overflow the logits.
GREEDY_BELOW = 1e-5
DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4  # as the OpenAI API
# JSON whitespace fixed to ", " and ": ": a small model cannot then spend its tokens on blanks.
JSON_GRAMMAR_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# ------------------------------------------------------------------------------ errors


class RequestError(Exception):
    """A request the client must fix (4xx), or an item that failed in generation (5xx)."""

    def __init__(self, status: int, param: str | None, message: str, code: str = "invalid_value",
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.message, self.code, self.kind = status, param, message, code, kind


def error_response(err: RequestError):
    from starlette.responses import JSONResponse

    body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status)


# ------------------------------------------------------------------------------ the request model


def _utf8(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone UTF-16 surrogate (such as \\ud800), which is not text; "
                         "send valid Unicode") from None
    return s


Text = Annotated[StrictStr, AfterValidator(_utf8)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None
    description: StrictStr | None = None


class FormatText(BaseModel):
    type: Literal["text"]


class FormatJsonObject(BaseModel):
    type: Literal["json_object"]


class FormatJsonSchema(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")]


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``; fields the server does not use are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True, allow_inf_nan=False)
    n: StrictInt | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64)
    response_format: ResponseFormat | None = None
    stream: StrictBool | None = None


# What each field must be, said once, for the 400's message.
_FIELD_HINTS = {
    "model": "'model' must be a string naming the served model (GET /v1/models lists it).",
    "messages": "'messages' must be a non-empty list of {role, content} objects; role is system, "
                "developer, user or assistant, content a string (or a list of {type: text, text} parts).",
    "max_tokens": "'max_tokens' must be an integer >= 1.",
    "max_completion_tokens": "'max_completion_tokens' must be an integer >= 1.",
    "temperature": "'temperature' must be a number in [0, 2].",
    "top_p": "'top_p' must be a number in (0, 1].",
    "n": "'n' must be the integer 1 (one choice per request).",
    "stop": f"'stop' must be a string or a list of at most {MAX_STOP_SEQUENCES} strings.",
    "seed": "'seed' must be an integer in [-2**63, 2**64).",
    "response_format": "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                       "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\", \"strict\"}} with a name "
                       "of letters, digits, _ or - (at most 64) and a JSON-object schema.",
    "stream": "'stream' must be true or false (and this server answers stream=false only).",
}


def _param(loc: tuple) -> str | None:
    """OpenAI-style name of the field at ``loc``: ``messages.[0].content``, ``stop``, ..."""
    if not loc:
        return None
    top = str(loc[0])
    if top == "messages" and len(loc) > 1 and isinstance(loc[1], int):
        out = f"messages.[{loc[1]}]"
        if len(loc) > 2 and loc[2] in ("role", "content"):
            out += f".{loc[2]}"
        return out
    return top


def parse_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raise :class:`RequestError` naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, None, f"The request body must be a JSON object, not a JSON {type(body).__name__}; "
                           "send {\"messages\": [...], ...}.")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(tuple(err["loc"]))
        top = str(err["loc"][0]) if err["loc"] else ""
        detail = err["msg"]
        hint = _FIELD_HINTS.get(top, "")
        raise RequestError(400, param, f"Invalid '{param}': {detail}. {hint}".strip()) from None
    if req.n is not None and req.n != 1:
        raise RequestError(400, "n", f"n={req.n} is not supported: this server returns one choice; send n=1.")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP_SEQUENCES:
        raise RequestError(400, "stop", _FIELD_HINTS["stop"])
    if req.stream:
        raise RequestError(400, "stream", "stream=true is not supported by serve-llm; send stream=false.")
    return req


# ------------------------------------------------------------------------------ grammars


class GrammarCache:
    """Compiled llguidance matchers by grammar text; each request gets a copy of its own.

    Compiling a JSON schema takes milliseconds to tens of milliseconds; a synth run sends the
    same few schemas thousands of times, so each is compiled once and deep-copied after.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], size: int = 256):
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def grammar_for(self, fmt: ResponseFormat | None) -> str | None:
        LLMatcher = self._llg.LLMatcher
        if fmt is None or fmt.type == "text":
            return None
        schema = {"type": "object"} if fmt.type == "json_object" else fmt.json_schema.schema_
        try:
            return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_GRAMMAR_OPTIONS)
        except (ValueError, TypeError) as e:
            raise RequestError(400, "response_format", f"response_format.json_schema.schema cannot be "
                               f"compiled: {e}. Send a JSON Schema object.") from None

    def matcher(self, grammar: str):
        with self._lock:
            proto = self._cache.get(grammar)
            if proto is not None:
                self._cache.move_to_end(grammar)
                return proto.deep_copy()
        proto = self._llg.LLMatcher(self.lltok, grammar, log_level=0)
        if proto.is_error():
            raise RequestError(400, "response_format", "response_format.json_schema.schema cannot be compiled "
                               f"for constrained decoding: {proto.get_error()}. Simplify the schema (llguidance "
                               "supports most of JSON Schema draft 2020-12, but not every keyword).")
        with self._lock:
            self._cache[grammar] = proto
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return proto.deep_copy()


def _grammar_mask_processor(matchers: list, width: int, vocab_size: int, eos_id: int):
    """A transformers ``LogitsProcessor`` that masks each row's logits to its grammar.

    ``matchers[i]`` is row ``i``'s llguidance matcher, or None for an unconstrained row.
    ``width`` is the padded prompt width: a longer ``input_ids`` means a token was sampled.
    """
    import torch
    from transformers import LogitsProcessor

    class GrammarMask(LogitsProcessor):
        def __init__(self):
            self.rows = [i for i, m in enumerate(matchers) if m is not None]
            self.words = (vocab_size + 31) // 32
            self.bitmask = torch.zeros((len(matchers), self.words), dtype=torch.int32)
            self.shifts = torch.arange(32, dtype=torch.int32)
            self.done = [False] * len(matchers)
            self.errors: dict[int, str] = {}
            self.mask_s = 0.0
            self.steps = 0

        def __call__(self, input_ids, scores):
            t0 = time.perf_counter()
            if input_ids.shape[1] > width:
                last = input_ids[:, -1].tolist()
                for i in self.rows:
                    m = matchers[i]
                    if self.done[i] or i in self.errors:
                        continue
                    if not m.consume_token(last[i]):
                        self.errors[i] = m.get_error() or "token rejected by the grammar"
                    elif m.is_stopped():
                        self.done[i] = True
            nbytes = self.words * 4
            for i in self.rows:
                m = matchers[i]
                if self.done[i] or i in self.errors:
                    # Finished (or broken) rows may only end: generate pads them from here on.
                    self.bitmask[i].zero_()
                    self.bitmask[i, eos_id // 32] = 1 << (eos_id % 32) if eos_id % 32 < 31 else -(2**31)
                else:
                    m.unsafe_compute_mask_ptr(self.bitmask[i].data_ptr(), nbytes)
            rows = torch.tensor(self.rows)
            bits = ((self.bitmask[rows].unsqueeze(-1) >> self.shifts) & 1).bool()  # (R, words, 32)
            allowed = bits.view(len(self.rows), -1)[:, : scores.shape[-1]]  # (R, V)
            if allowed.shape[1] < scores.shape[-1]:
                pad = torch.zeros((len(self.rows), scores.shape[-1] - allowed.shape[1]), dtype=torch.bool)
                allowed = torch.cat([allowed, pad], dim=1)
            scores[rows] = scores[rows].masked_fill(~allowed, float("-inf"))
            self.mask_s += time.perf_counter() - t0
            self.steps += 1
            return scores

    return GrammarMask()


# ------------------------------------------------------------------------------ the engine


class LLMEngine:
    """Tokenizer, model and grammars: prepares requests and generates batches of them.

    Used by the Serve deployment (:class:`ChatLLM`) and directly by ``bench/structured.py``.
    """

    def __init__(self, checkpoint: str, model_name: str, *, max_new_tokens_cap: int = 1024,
                 max_input_tokens: int = 2048, dtype: str = "float32", torch_threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rayembed.modeling.backbones import resolve_checkpoint

        if torch_threads:
            torch.set_num_threads(torch_threads)
        path = resolve_checkpoint(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.chat_template is None:
            raise ValueError(
                f"Checkpoint '{checkpoint}' has no chat template; serve an instruction-tuned model "
                "(e.g. smollm2-135m) or add a chat_template to its tokenizer_config.json."
            )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.model_name = model_name
        self.cap = max_new_tokens_cap
        ctx = getattr(self.model.config, "max_position_embeddings", None) or 10**9
        self.context = int(ctx)
        self.max_input_tokens = min(max_input_tokens, self.context - 1)
        eos = [self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id]
        self.eos_ids = sorted({e for i in eos if i is not None for e in (i if isinstance(i, list) else [i])})
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.grammars = GrammarCache(self.tokenizer, self.vocab_size, self.eos_ids)

    def prepare(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """Everything a batch needs from one validated request; CPU work, run it off the event loop."""
        if req.model not in (None, self.model_name):
            raise RequestError(404, "model", f"The model '{req.model}' does not exist here; GET /v1/models lists "
                               f"'{self.model_name}'.", code="model_not_found")
        max_tokens = req.max_tokens or req.max_completion_tokens or DEFAULT_MAX_TOKENS
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature < GREEDY_BELOW:
            temperature = 0.0
        # Reject prompts far too long to be worth tokenising (a token holds at most a few dozen bytes).
        chars = sum(len(m.text()) for m in req.messages)
        if chars > 64 * self.max_input_tokens:
            raise RequestError(400, "messages", f"The messages hold {chars} characters, far more than this "
                               f"server's limit of {self.max_input_tokens} tokens; shorten them.",
                               code="context_length_exceeded")
        try:
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages],
                add_generation_prompt=True, tokenize=False,
            )
        except Exception as e:  # noqa: BLE001 - jinja's raise_exception: roles out of order and the like
            raise RequestError(400, "messages", f"The model's chat template refused these messages: {e}") from None
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_input_tokens:
            raise RequestError(400, "messages", f"The prompt has {len(ids)} tokens; this server accepts at most "
                               f"{self.max_input_tokens} (synth.llm_server.max_input_tokens and the model's "
                               f"context of {self.context}).", code="context_length_exceeded")
        grammar = self.grammars.grammar_for(req.response_format)
        matcher = self.grammars.matcher(grammar) if grammar is not None else None
        stop = req.stop or []
        return {
            "ids": ids,
            "max_tokens": max(1, min(max_tokens, self.cap, self.context - len(ids))),
            "temperature": temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "stop": [stop] if isinstance(stop, str) else list(stop),
            "seed": req.seed,
            "matcher": matcher,
        }

    def generate_all(self, items: list[dict[str, Any]]) -> list[dict[str, Any] | RequestError]:
        """Results in order; an item that fails gets a :class:`RequestError` and fails alone."""
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((it["temperature"], it["top_p"], it["seed"]), []).append(i)
        out: list[dict[str, Any] | RequestError | None] = [None] * len(items)
        for (temperature, top_p, seed), idx in groups.items():
            for i, res in zip(idx, self._generate_isolated([items[i] for i in idx], temperature, top_p, seed)):
                out[i] = res
        return out  # type: ignore[return-value]

    def _generate_isolated(self, items, temperature, top_p, seed) -> list[dict[str, Any] | RequestError]:
        try:
            return self.generate(items, temperature, top_p, seed)
        except Exception as e:  # noqa: BLE001 - one item's failure must not fail its batch
            if len(items) == 1:
                logger.exception("serve-llm: generation failed")
                return [RequestError(500, None, f"Generation failed: {type(e).__name__}.", code="generation_failed",
                                     kind="server_error")]
        # Which item broke the batch is unknown: generate each alone (matchers are fresh copies).
        return [self._generate_isolated([it], temperature, top_p, seed)[0] for it in items]

    def generate(self, items, temperature: float, top_p: float, seed) -> list[dict[str, Any] | RequestError]:
        import torch

        if seed is not None:
            torch.manual_seed(seed % (2**64))
        # Matchers are consumed by generation: keep the pristine ones for a retry.
        matchers = [it["matcher"].deep_copy() if it["matcher"] is not None else None for it in items]
        batch = self.tokenizer.pad({"input_ids": [it["ids"] for it in items]}, return_tensors="pt").to(self.device)
        width = batch["input_ids"].shape[1]
        max_new = max(it["max_tokens"] for it in items)
        sample = temperature > 0
        kwargs: dict[str, Any] = dict(do_sample=sample, max_new_tokens=max_new, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.eos_ids)
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        mask = None
        if any(m is not None for m in matchers):
            mask = _grammar_mask_processor(matchers, width, self.vocab_size, self.eos_ids[0])
            kwargs["logits_processor"] = [mask]
        with torch.inference_mode():
            gen = self.model.generate(**batch, **kwargs)  # (B, width + new)
        results: list[dict[str, Any] | RequestError] = []
        eos = set(self.eos_ids)
        for r, (row, it) in enumerate(zip(gen[:, width:].tolist(), items)):
            if mask is not None and r in mask.errors:
                results.append(RequestError(500, None, f"Constrained decoding failed: {mask.errors[r]}",
                                            code="generation_failed", kind="server_error"))
                continue
            toks, finish = [], "length"
            for t in row[: it["max_tokens"]]:
                if t in eos:
                    finish = "stop"
                    break
                toks.append(t)
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            for s in it["stop"]:
                if s and s in text:
                    text, finish = text.split(s, 1)[0], "stop"
            results.append({
                "text": text,
                "finish_reason": finish,
                "prompt_tokens": len(it["ids"]),
                "completion_tokens": len(toks) + (1 if finish == "stop" and len(toks) < it["max_tokens"] else 0),
                "mask_s": (mask.mask_s / max(1, len(mask.rows))) if mask is not None and matchers[r] is not None else 0.0,
            })
        return results


# ------------------------------------------------------------------------------ the deployment


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes whether or not Content-Length is sent."""
    too_big = RequestError(413, None, f"The request body is larger than {limit} bytes "
                           "(synth.llm_server.max_body_bytes); send a smaller one.", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise too_big
    return bytes(buf)


@serve.deployment(name="ChatLLM")
class ChatLLM:
    """One replica: the HTTP edge (auth, size limit, validation) over an :class:`LLMEngine`."""

    def __init__(self, checkpoint: str, model_name: str, max_new_tokens_cap: int, max_input_tokens: int,
                 dtype: str, torch_threads: int | None, max_batch_size: int, batch_wait_timeout_s: float,
                 api_key_env: str = "", api_key_file: str | None = None, max_body_bytes: int = 1 << 20):
        from rayembed.serving.auth import resolve_api_key

        # Resolved here, in the replica, so the key never travels in the deployment's arguments.
        self.api_key = resolve_api_key(api_key_env, api_key_file)
        self.engine = LLMEngine(checkpoint, model_name, max_new_tokens_cap=max_new_tokens_cap,
                                max_input_tokens=max_input_tokens, dtype=dtype, torch_threads=torch_threads)
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("serve-llm: %s ready on %s", model_name, self.engine.device)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        from rayembed.serving.auth import check_bearer

        if not check_bearer(request.headers.get("authorization"), self.api_key):
            return error_response(RequestError(401, None, "Missing or wrong API key: send Authorization: Bearer <key>.",
                                               code="invalid_api_key", kind="authentication_error"))
        path = request.url.path.rstrip("/")
        if path.endswith("/v1/models") and request.method == "GET":
            return JSONResponse({"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": 0, "owned_by": "rayembed"}]})
        if not (path.endswith("/v1/chat/completions") and request.method == "POST"):
            return error_response(RequestError(404, None, f"No route {request.method} {path}; this server has "
                                               "GET /v1/models and POST /v1/chat/completions.", code="not_found",
                                               kind="not_found_error"))
        try:
            raw = await read_body(request, self.max_body_bytes)
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                raise RequestError(400, None, "The request body is not valid JSON (UTF-8).", code="invalid_json") from None
            req = parse_request(body)
            item = await asyncio.to_thread(self.engine.prepare, req)
            result = await self.generate_batch(item)
            if isinstance(result, RequestError):
                raise result
        except RequestError as e:
            return error_response(e)
        pt, ct = result["prompt_tokens"], result["completion_tokens"]
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "finish_reason": result["finish_reason"],
                         "message": {"role": "assistant", "content": result["text"]}}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
        })

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any] | RequestError]:
        return await asyncio.to_thread(self.engine.generate_all, items)


def build_app(cfg, model_name: str | None = None):
    """The Serve application for an :class:`~rayembed.config.synth.LLMServerConfig`."""
    name = model_name or cfg.model_name or cfg.checkpoint
    return ChatLLM.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=max(64, 4 * cfg.max_batch_size),
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(
        cfg.checkpoint, name, cfg.max_new_tokens_cap, cfg.max_input_tokens, cfg.dtype, cfg.torch_threads,
        cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.api_key_env, cfg.api_key_file, cfg.max_body_bytes,
    )


@dataclass
class LLMServerHandle:
    """A running serve-llm app: its OpenAI base URL, and :meth:`stop`."""

    base_url: str
    app_name: str
    model_name: str
    api_key: str | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Delete the app; shut Serve down too when no other application is left on it."""
        try:
            serve.delete(self.app_name)
            if not serve.status().applications:
                serve.shutdown()
        except Exception as e:  # noqa: BLE001 - stopping must not mask the caller's own error
            logger.warning("serve-llm: stopping %s failed: %s", self.app_name, e)


def start_llm_server(cfg, model_name: str | None = None, *, timeout_s: float = 600.0) -> LLMServerHandle:
    """Deploy serve-llm on the current Ray (call ``init_ray`` first); return when it answers.

    Binds ``cfg.host`` (127.0.0.1 by default). If Serve already runs on this cluster its HTTP
    options are kept (the handle's ``base_url`` names the port actually used) and the app is
    added beside the others under ``cfg.route_prefix``.
    """
    from rayembed.serving.auth import resolve_api_key, warn_if_exposed
    from rayembed.serving.server import start_serve_http

    name = model_name or cfg.model_name or cfg.checkpoint
    key = resolve_api_key(cfg.api_key_env, cfg.api_key_file)
    warn_if_exposed(cfg.host, key, cfg.api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    base_url = start_serve_http(cfg.host, cfg.port) + cfg.route_prefix.rstrip("/") + "/v1"
    serve.run(build_app(cfg, name), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"{base_url}/models", headers=headers)
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    logger.info("serve-llm: %s answering at %s", name, base_url)
                    return LLMServerHandle(base_url, cfg.app_name, name, key)
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(1.0)
    LLMServerHandle(base_url, cfg.app_name, name).stop()
    raise TimeoutError(f"serve-llm did not answer at {base_url} within {timeout_s:.0f} s (last error: {last}).")
