"""``activepath serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) around one
``Engine``. ``POST /v1/completions`` (streaming SSE or not), ``GET /health``,
``GET /metrics`` (Prometheus). The engine runs on its own thread; each request gets an
asyncio queue that the engine thread feeds with ``call_soon_threadsafe``."""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from activepath.serving.engine import Engine, EngineClosed, EngineError
from activepath.serving.http_guard import HttpLimits
from activepath.serving.metrics import CONTENT_TYPE, ServingMetrics
from activepath.serving.protocol import (
    CompletionRequest,
    RequestError,
    completion_chunk,
    completion_schema,
    context_error,
    decode_json,
    parse_completion,
    short,
)
from activepath.serving.scheduler import QueueFull, TokenEvent

log = logging.getLogger(__name__)
_DISCONNECTED = object()  # put on a request's queue when its client goes away
# Tokenizing a long text allocates ~200 bytes per character (the Rust encoding's ids,
# offsets, token strings); glibc keeps that freed heap in the tokenizer thread's arena
# (and the tuned allocator's trim threshold is 256 MiB). Past this size, give it back.
_TRIM_AFTER_CHARS = 128 * 1024


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
        self.queue: asyncio.Queue[TokenEvent | EngineError | object] = asyncio.Queue()

    def put(self, event: TokenEvent | EngineError) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: server shutting down
            pass


def build_app(engine: Engine, tokenizer: Any, *, served_model: str, metrics: ServingMetrics,
              limits: HttpLimits | None = None) -> FastAPI:
    """The FastAPI app. Starts the engine on startup and stops it on shutdown."""
    limits = limits or HttpLimits()
    # One worker: a big prompt's tokenization runs off the event loop, and a fast tokenizer
    # must not be entered by two threads at once (transformers mutates its padding state).
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="activepath-tokenize")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not engine.is_alive:
            engine.start()
        yield
        engine.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="activepath", lifespan=lifespan)
    max_len = engine.config.scheduler.max_len
    model_vocab = getattr(engine.runner.model.config.get_text_config(), "vocab_size", None) or len(tokenizer)
    vocab_size = min(len(tokenizer), model_vocab)  # ids the tokenizer knows and the model can embed
    handler = _Completions(engine, tokenizer, metrics, pool, limits, served_model=served_model, max_len=max_len,
                           vocab_size=vocab_size)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405: OpenAI-style too
        return JSONResponse(RequestError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code,
                            headers=exc.headers)

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

    body_schema = completion_schema(served_model, max_len)
    openapi = {"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}}

    @app.post("/v1/completions", openapi_extra=openapi, responses=_ERROR_RESPONSES)
    async def completions(request: Request) -> Response:
        return await handler(request)

    return app


_ERROR_BODY = {"content": {"application/json": {"schema": {"type": "object", "required": ["error"]}}}}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": why, **_ERROR_BODY} for code, why in (
        (400, "invalid request (the message names the field)"), (404, "unknown model"), (408, "body too slow"),
        (413, "body too large"), (415, "not application/json"), (421, "Host not served here"),
        (503, "queue full (Retry-After) or shutting down"))}


class _Completions:
    """``POST /v1/completions``: read and check the body, tokenize off the event loop,
    submit, answer. A refused request is one log line and keeps its connection usable."""

    def __init__(self, engine: Engine, tokenizer: Any, metrics: ServingMetrics, pool: ThreadPoolExecutor,
                 limits: HttpLimits, *, served_model: str, max_len: int, vocab_size: int) -> None:
        self.engine, self.tokenizer, self.metrics, self.pool, self.limits = engine, tokenizer, metrics, pool, limits
        self.served_model, self.max_len, self.vocab_size = served_model, max_len, vocab_size

    async def __call__(self, request: Request) -> Response:
        reader = _BodyReader(request, self.limits)
        try:
            raw = await reader.read()
            req, prompt_ids = await asyncio.get_running_loop().run_in_executor(self.pool, self._prepare, raw)
            return await self._submit(request, req, prompt_ids)
        except RequestError as exc:
            log.info("%d %s: %s", exc.status, request.url.path, exc.message)
            # an unread body would be the next "request" on this connection: close it instead
            headers = None if reader.complete else {"Connection": "close"}
            return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:  # a bug: one traceback, a 500, and the connection stays usable
            log.exception("unhandled error in %s", request.url.path)
            return JSONResponse(RequestError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)

    def _prepare(self, raw: bytes) -> tuple[CompletionRequest, list[int]]:
        """On the tokenizer thread: decode, validate and tokenize (big prompts take seconds)."""
        req = parse_completion(decode_json(raw), served_model=self.served_model, max_len=self.max_len,
                               vocab_size=self.vocab_size)
        try:
            prompt_ids = _encode(self.tokenizer, req)
        finally:
            if isinstance(req.prompt, str) and len(req.prompt) > _TRIM_AFTER_CHARS:
                _release_free_heap()
        if len(prompt_ids) + req.max_tokens > self.max_len:
            raise context_error(len(prompt_ids), req.max_tokens, self.max_len)
        return req, prompt_ids

    async def _submit(self, request: Request, req: CompletionRequest, prompt_ids: list[int]) -> Response:
        bridge = _Bridge()
        try:
            request_id = self.engine.submit(prompt_ids, req.max_tokens, bridge.put)
        except QueueFull as exc:
            self.metrics.requests.labels("rejected").inc()
            retry = str(max(1, math.ceil(exc.retry_after_s)))
            return JSONResponse(RequestError(503, f"server busy: {exc}; retry later").body(), status_code=503,
                                headers={"Retry-After": retry})
        except EngineClosed as exc:
            return JSONResponse(RequestError(503, str(exc)).body(), status_code=503)
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
        call = _Call(self.engine, self.tokenizer, req, request_id, bridge, len(prompt_ids))
        if req.stream:
            return StreamingResponse(call.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await call.complete(request)


class _BodyReader:
    """The body, refused early: 415 unless JSON, 413 past ``max_body_bytes`` (from
    Content-Length before reading, or while a chunked body arrives), 408 if it takes longer
    than ``body_timeout_s``."""

    def __init__(self, request: Request, limits: HttpLimits) -> None:
        self.request, self.limits = request, limits
        self.complete = False

    async def read(self) -> bytes:
        headers, limit = self.request.headers, self.limits.max_body_bytes
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise RequestError(415, f"the body must be application/json, got Content-Type {short(media_type)}",
                               code="unsupported_media_type")
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise RequestError(413, f"the body is {short(declared)} bytes; at most {limit} are accepted "
                                    "(activepath serve --max-body-bytes)", code="request_too_large")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                async for chunk in self.request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise RequestError(413, f"the body exceeds {limit} bytes (activepath serve "
                                                "--max-body-bytes)", code="request_too_large")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(408, f"the body did not arrive within {self.limits.body_timeout_s:g} s",
                               code="request_timeout") from None
        self.complete = True
        return b"".join(chunks)


def _release_free_heap() -> None:
    """glibc ``malloc_trim(0)``: return freed heap of every arena to the OS (no-op elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _encode(tokenizer: Any, req: CompletionRequest) -> list[int]:
    if isinstance(req.prompt, tuple):
        return list(req.prompt)
    ids = tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RequestError(400, "'prompt' encodes to no tokens", param="prompt")
    return list(ids)


async def _watch_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]], queue: asyncio.Queue) -> None:
    """Wait (the body is read: only ``http.disconnect`` can come) and tell the request's queue."""
    while (await receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(_DISCONNECTED)


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
        # Starlette cancels this generator when the client disconnects (the finally aborts)
        try:
            while not self.done:
                text, finish, error = self._consume(await self.bridge.queue.get())
                if error is not None:
                    yield _sse(error.body())
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
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, self.bridge.queue))
        try:
            while not self.done:
                event = await self.bridge.queue.get()
                if event is _DISCONNECTED:
                    return Response(status_code=499)  # nobody reads it; the finally frees the slot
                text, finish, error = self._consume(event)
                if error is not None:
                    return JSONResponse(error.body(), status_code=error.status)
                pieces.append(text)
        finally:
            watcher.cancel()
            if not self.done:
                self.engine.abort(self.request_id)
        body = completion_chunk(self.response_id, self.req.model, "".join(pieces), finish, self.created)
        body["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                         "total_tokens": self.prompt_tokens + self.completion_tokens}
        return JSONResponse(body)

    def _consume(self, event: TokenEvent | EngineError) -> tuple[str, str | None, RequestError | None]:
        """(new text, finish reason, error) for one engine event."""
        if isinstance(event, EngineError):
            self.done = True
            return "", None, RequestError(event.status, event.message)
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
