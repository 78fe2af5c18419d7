"""The HTTP API (FastAPI): /v1/completions, /v1/chat/completions (JSON or server-sent events),
/v1/models, /health, /metrics. Bodies are validated by openai_api.parse_body, the validation
batch records and run.py's flags share, rather than by pydantic models: one set of rules and
messages for all three. Every error is OpenAI's error object with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from typing import Callable, Optional

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from runtime import openai_api as api
from runtime.distributed import multi_process
from runtime.errors import RequestError
from runtime.request import Request
from runtime.server.streams import Exchange
from runtime.server.worker import Job, Worker

MAX_BODY_BYTES = 16 << 20  # a 100k-token prompt as JSON ids is ~1 MB
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclasses.dataclass
class ServedModel:
    name: str
    tokenizer: object
    chat_template: Optional[Callable]  # () -> ChatTemplate (raises RequestError without one)
    defaults: Request  # sampling defaults (flags, generation_config.json)
    vocab_size: int
    context: int  # tokens per slot (the engine's cache length)


class _UnknownModel(RequestError):
    """A request naming another model than the one served: 404, as OpenAI answers."""


def _error(status: int, message: str, kind: str = "invalid_request_error",
           code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(api.error_body(message, kind, code=code), status_code=status)


def create_app(worker: Worker, model: ServedModel, metrics) -> FastAPI:
    app = FastAPI(title="llm-runtime", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # 404, 405: OpenAI's error shape
        return _error(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                      code=str(error.status_code))

    @app.get("/health")
    async def health():
        if worker.failed:
            return _error(503, worker.failed, "server_error")
        return {"status": "draining" if worker.stop_requested else "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": 0,
                                            "owned_by": "llm-runtime",
                                            "max_model_len": model.context}]}

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await _answer(request, False, worker, model, metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await _answer(request, True, worker, model, metrics)

    return app


async def _answer(http: HttpRequest, chat: bool, worker: Worker, model: ServedModel, metrics):
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    response = await _respond(http, chat, worker, model)
    metrics.requests.labels(endpoint, str(response.status_code)).inc()
    return response


async def _respond(http: HttpRequest, chat: bool, worker: Worker, model: ServedModel):
    raw = await _body(http)
    if isinstance(raw, Response):
        return raw
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return _error(400, f"invalid JSON body: {getattr(e, 'msg', type(e).__name__)}")
    try:
        parsed = _parsed(body, chat, model)
    except RequestError as e:
        if isinstance(e, _UnknownModel):
            return _error(404, str(e), code="model_not_found")
        return _error(400, str(e))
    request = parsed.request
    echo_logprobs = None
    if parsed.sampling.echo and (request.logprobs or request.top_logprobs):
        try:  # scoring: the prompt's own log-probabilities, beside the decode loop
            echo_logprobs = await asyncio.to_thread(worker.engine.prompt_logprobs,
                                                    request.prompt_ids, request.top_logprobs)
        except RequestError as e:
            return _error(400, str(e))
    prefix = "chatcmpl" if chat else "cmpl"
    exchange = Exchange(chat, f"{prefix}-{secrets.token_hex(12)}", model.name, int(time.time()),
                        model.tokenizer, parsed, _echo_text(parsed, model), echo_logprobs)
    jobs = [Job(f"{exchange.id}/{c}", dataclasses.replace(request, choice=c),
                parsed.sampling.stop, exchange.sink(c)) for c in range(parsed.sampling.n)]
    if not worker.submit(jobs):
        if worker.failed or worker.stop_requested:
            return _error(503, worker.failed or "the server is shutting down", "server_error")
        return _error(429, f"the queue is full ({worker.max_queue} requests waiting); retry "
                           f"later", "rate_limit_error", "queue_full")
    keys = [job.key for job in jobs]
    if parsed.stream:
        return StreamingResponse(_cancelling(exchange.events_as_sse(), worker, keys),
                                 media_type="text/event-stream")
    try:
        return JSONResponse(await exchange.collect(http))
    except ConnectionError:  # nobody to answer; the jobs free their slots at the next step
        worker.cancel(keys)
        return Response(status_code=499)
    except RuntimeError as e:
        return _error(500, str(e), "server_error")
    except asyncio.CancelledError:
        worker.cancel(keys)
        raise


async def _cancelling(events, worker: Worker, keys: list[str]):
    """The stream's events; if it ends early (the client left: Starlette cancels it), the
    request's jobs are cancelled."""
    finished = False
    try:
        async for event in events:
            yield event
        finished = True
    finally:
        if not finished:
            worker.cancel(keys)


async def _body(http: HttpRequest):
    """The raw body, or a 413 response past MAX_BODY_BYTES (read no further)."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return _error(413, f"request body of {declared} bytes exceeds {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return _error(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parsed(body, chat: bool, model: ServedModel) -> api.ParsedBody:
    defaults = dataclasses.replace(
        model.defaults, max_new_tokens=model.context if chat else COMPLETIONS_MAX_TOKENS,
        seed=secrets.randbelow(2**31))  # no seed given: a fresh one, as OpenAI's API does
    parsed = api.parse_body(body, chat, defaults, model.tokenizer, model.chat_template)
    if isinstance(body, dict) and body.get("model") not in (None, model.name):
        raise _UnknownModel(f"the model {body['model']!r} does not exist; this server has "
                           f"{model.name!r}")
    parsed.request.validate(model.vocab_size, model.context, label="request")
    if parsed.sampling.echo and (parsed.request.logprobs or parsed.request.top_logprobs) \
            and multi_process():
        raise RequestError("'echo' with 'logprobs' (prompt log-probabilities) needs a "
                           "single-process server")
    return parsed


def _echo_text(parsed: api.ParsedBody, model: ServedModel) -> str:
    if not parsed.sampling.echo or model.tokenizer is None:
        return ""
    return model.tokenizer.decode(list(parsed.request.prompt_ids))
