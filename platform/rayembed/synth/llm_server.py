"""``rayembed serve-llm``: a Hugging Face causal LM behind an OpenAI-compatible API on Ray Serve.

Implements what the synth client needs from the protocol:

- ``GET  <prefix>/v1/models``
- ``POST <prefix>/v1/chat/completions`` with ``messages`` (rendered through the model's chat
  template), ``max_tokens``, ``temperature`` (0 means greedy), ``top_p``, ``stop``, ``seed``;
  replies carry ``usage`` and ``finish_reason`` ("length" when max_tokens cut the reply).
  ``response_format`` ``json_object`` is honoured the cheap way: the reply is started with
  "{" (prefilled), so a small model opens with the object rather than with prose. Nothing
  forces the rest into valid JSON; the synth validator rejects what does not parse.

Requests are batched with ``@serve.batch``: concurrent requests with the same sampling
settings are left-padded into one ``generate`` call, which on CPU costs little more than one.
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
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from ray import serve

logger = logging.getLogger(__name__)


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@serve.deployment(name="ChatLLM")
class ChatLLM:
    """One replica: tokenizer + causal LM; batches concurrent requests into one generate call."""

    def __init__(self, checkpoint: str, model_name: str, max_new_tokens_cap: int, max_input_tokens: int,
                 dtype: str, torch_threads: int | None, max_batch_size: int, batch_wait_timeout_s: float,
                 api_key_env: str = "", api_key_file: str | None = None):
        import torch

        from rayembed.serving.auth import resolve_api_key

        # Resolved here, in the replica, so the key never travels in the deployment's arguments.
        self.api_key = resolve_api_key(api_key_env, api_key_file)
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
        self.max_input_tokens = max_input_tokens
        self.eos_ids = {i for i in [self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id] if i is not None}
        self.eos_ids = {e for i in self.eos_ids for e in (i if isinstance(i, list) else [i])}
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("serve-llm: %s ready on %s", model_name, self.device)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        from rayembed.serving.auth import check_bearer

        if not check_bearer(request.headers.get("authorization"), self.api_key):
            return _error(401, "Missing or wrong API key: send Authorization: Bearer <key>.", "authentication_error")
        path = request.url.path.rstrip("/")
        if path.endswith("/v1/models") and request.method == "GET":
            return JSONResponse({"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": 0, "owned_by": "rayembed"}]})
        if not (path.endswith("/v1/chat/completions") and request.method == "POST"):
            return _error(404, f"No route {request.method} {path}; this server has GET /v1/models and "
                               "POST /v1/chat/completions.", "not_found_error")
        try:
            body = await request.json()
        except (json.JSONDecodeError, ValueError):
            return _error(400, "The request body is not valid JSON.")
        try:
            item = self._parse(body)
        except _BadRequest as e:
            return _error(e.status, str(e))
        result = await self.generate_batch(item)
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

    def _parse(self, body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model")
        if model not in (None, self.model_name):
            raise _BadRequest(404, f"The model '{model}' does not exist here; GET /v1/models lists '{self.model_name}'.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages
        ):
            raise _BadRequest(400, "'messages' must be a non-empty list of {role, content} objects.")
        if int(body.get("n") or 1) != 1:
            raise _BadRequest(400, "Only n=1 is supported.")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens")) or 256
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        top_p = float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0)
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise _BadRequest(400, f"max_tokens must be a positive integer, got {max_tokens!r}.")
        if not 0.0 <= temperature <= 2.0 or not 0.0 < top_p <= 1.0:
            raise _BadRequest(400, "temperature must lie in [0, 2] and top_p in (0, 1].")
        prompt = self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            add_generation_prompt=True, tokenize=False,
        )
        fmt = body.get("response_format") or {}
        prefix = "{" if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema") else ""
        prompt += prefix
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_input_tokens:
            raise _BadRequest(400, f"The prompt has {len(ids)} tokens; this server accepts at most "
                                   f"{self.max_input_tokens} (synth.llm_server.max_input_tokens).")
        stop = body.get("stop") or []
        return {
            "ids": ids,
            "max_tokens": min(max_tokens, self.cap),
            "temperature": temperature,
            "top_p": top_p,
            "stop": [stop] if isinstance(stop, str) else list(stop),
            "seed": body.get("seed"),
            "prefix": prefix,
        }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._generate_all, items)

    def _generate_all(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((it["temperature"], it["top_p"], it["seed"]), []).append(i)
        out: list[dict[str, Any] | None] = [None] * len(items)
        for (temperature, top_p, seed), idx in groups.items():
            for i, res in zip(idx, self._generate([items[i] for i in idx], temperature, top_p, seed)):
                out[i] = res
        return out  # type: ignore[return-value]

    def _generate(self, items, temperature: float, top_p: float, seed) -> list[dict[str, Any]]:
        import torch

        if seed is not None:
            torch.manual_seed(int(seed))
        batch = self.tokenizer.pad({"input_ids": [it["ids"] for it in items]}, return_tensors="pt").to(self.device)
        width = batch["input_ids"].shape[1]
        max_new = max(it["max_tokens"] for it in items)
        sample = temperature > 0
        kwargs = dict(do_sample=sample, max_new_tokens=max_new, pad_token_id=self.tokenizer.pad_token_id)
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            gen = self.model.generate(**batch, **kwargs)  # (B, width + new)
        results = []
        for row, it in zip(gen[:, width:].tolist(), items):
            toks, finish = [], "length"
            for t in row[: it["max_tokens"]]:
                if t in self.eos_ids:
                    finish = "stop"
                    break
                toks.append(t)
            text = it.get("prefix", "") + self.tokenizer.decode(toks, skip_special_tokens=True)
            for s in it["stop"]:
                if s and s in text:
                    text, finish = text.split(s, 1)[0], "stop"
            results.append({
                "text": text,
                "finish_reason": finish,
                "prompt_tokens": len(it["ids"]),
                "completion_tokens": len(toks) + (1 if finish == "stop" and len(toks) < it["max_tokens"] else 0),
            })
        return results


def build_app(cfg, model_name: str | None = None):
    """The Serve application for an :class:`~rayembed.config.synth.LLMServerConfig`."""
    name = model_name or cfg.model_name or cfg.checkpoint
    return ChatLLM.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=max(64, 4 * cfg.max_batch_size),
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(
        cfg.checkpoint, name, cfg.max_new_tokens_cap, cfg.max_input_tokens, cfg.dtype, cfg.torch_threads,
        cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.api_key_env, cfg.api_key_file,
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
