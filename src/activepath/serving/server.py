"""``activepath serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) around one
``Engine``. ``POST /v1/completions`` (streaming SSE or not), ``GET /health``,
``GET /metrics`` (Prometheus). The engine runs on its own thread; each request gets an
asyncio queue that the engine thread feeds with ``call_soon_threadsafe``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from activepath.serving.engine import Engine, EngineError
from activepath.serving.metrics import CONTENT_TYPE, ServingMetrics
from activepath.serving.protocol import CompletionRequest, RequestError, completion_chunk, context_error, parse_completion
from activepath.serving.scheduler import QueueFull, TokenEvent

log = logging.getLogger(__name__)
_DISCONNECT_POLL_S = 0.5


class _Detokenizer:
    """Incremental text: emit only complete characters (a byte-level token may end inside one)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self._emitted = text[self._emitted :], len(text)
        return delta

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        delta, self._emitted = text[self._emitted :], len(text)
        return delta


class _Bridge:
    """Engine thread → this request's asyncio queue."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenEvent | EngineError] = asyncio.Queue()

    def put(self, event: TokenEvent | EngineError) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: server shutting down
            pass


def build_app(engine: Engine, tokenizer: Any, *, served_model: str, metrics: ServingMetrics) -> FastAPI:
    """The FastAPI app. Starts the engine on startup and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not engine.is_alive:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="activepath", lifespan=lifespan)
    max_len = engine.config.scheduler.max_len
    model_vocab = getattr(engine.runner.model.config.get_text_config(), "vocab_size", None) or len(tokenizer)
    vocab_size = min(len(tokenizer), model_vocab)  # ids the tokenizer knows and the model can embed

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(RequestError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.is_alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model, "object": "model", "owned_by": "activepath"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completion(request, engine, tokenizer, metrics, served_model=served_model,
                                 max_len=max_len, vocab_size=vocab_size)

    return app


async def _completion(request: Request, engine: Engine, tokenizer: Any, metrics: ServingMetrics, *,
                      served_model: str, max_len: int, vocab_size: int) -> Response:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
    req = parse_completion(body, served_model=served_model, max_len=max_len, vocab_size=vocab_size)
    prompt_ids = _encode(tokenizer, req)
    if len(prompt_ids) + req.max_tokens > max_len:
        raise context_error(len(prompt_ids), req.max_tokens, max_len)
    bridge = _Bridge()
    try:
        request_id = engine.submit(prompt_ids, req.max_tokens, bridge.put)
    except QueueFull as exc:
        metrics.requests.labels("rejected").inc()
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        return JSONResponse(RequestError(503, f"server busy: {exc}; retry later").body(), status_code=503,
                            headers={"Retry-After": retry})
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None
    call = _Call(engine, tokenizer, req, request_id, bridge, len(prompt_ids))
    if req.stream:
        return StreamingResponse(call.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await call.complete(request)


def _encode(tokenizer: Any, req: CompletionRequest) -> list[int]:
    if isinstance(req.prompt, tuple):
        return list(req.prompt)
    ids = tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RequestError(400, "'prompt' encodes to no tokens", param="prompt")
    return list(ids)


class _Call:
    """One admitted request: turns engine events into SSE chunks or one JSON response,
    and aborts the request if the client goes away first."""

    def __init__(self, engine: Engine, tokenizer: Any, req: CompletionRequest, request_id: str,
                 bridge: _Bridge, prompt_tokens: int) -> None:
        self.engine, self.req, self.request_id, self.bridge = engine, req, request_id, bridge
        self.detok = _Detokenizer(tokenizer)
        self.response_id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.done = False

    async def stream(self) -> AsyncIterator[str]:
        try:
            while not self.done:
                text, finish, error = self._consume(await self.bridge.queue.get())
                if error is not None:
                    yield _sse(RequestError(500, error).body())
                    return
                # one chunk per token (text may be empty while a character is incomplete),
                # so clients can time every token
                yield _sse(completion_chunk(self.response_id, self.req.model, text, finish, self.created))
            yield "data: [DONE]\n\n"
        finally:
            if not self.done:  # client disconnected (or the server is stopping)
                self.engine.abort(self.request_id)

    async def complete(self, request: Request) -> Response:
        pieces: list[str] = []
        finish: str | None = None
        try:
            while not self.done:
                try:
                    event = await asyncio.wait_for(self.bridge.queue.get(), _DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                text, finish, error = self._consume(event)
                if error is not None:
                    return JSONResponse(RequestError(500, error).body(), status_code=500)
                pieces.append(text)
        finally:
            if not self.done:
                self.engine.abort(self.request_id)
        body = completion_chunk(self.response_id, self.req.model, "".join(pieces), finish, self.created)
        body["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                         "total_tokens": self.prompt_tokens + self.completion_tokens}
        return JSONResponse(body)

    def _consume(self, event: TokenEvent | EngineError) -> tuple[str, str | None, str | None]:
        """(new text, finish reason, error message) for one engine event."""
        if isinstance(event, EngineError):
            self.done = True
            return "", None, event.message
        self.completion_tokens += 1
        finish = event.finish_reason
        text = "" if finish == "stop" else self.detok.push(event.token_id)
        if finish is not None:
            self.done = True
            text += self.detok.flush()
        return text, finish, None


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def served_name(model_arg: str, explicit: str | None) -> str:
    return explicit or (model_arg if not Path(model_arg).exists() else Path(model_arg).resolve().name)
