"""What stands between the socket and the app: limits on connections, header and body time
and size, the Host check, and a uvicorn server whose SIGTERM drains instead of cutting.

A slow-loris client (headers dribbled a byte at a time) never reaches the ASGI app, so
the header deadline lives in the HTTP protocol (``GuardedH11Protocol``); the body deadline
and size limit are the app's (``server.read_body``), which can answer 408/413 in JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """``max_body_bytes``: larger bodies get 413. ``header_timeout_s``: a connection must
    deliver a request's headers this long after it opens (or after its last response),
    else it is closed. ``body_timeout_s``: the whole body must arrive within this (408).
    ``keep_alive_s``: idle keep-alive connections close after this. ``max_connections``:
    beyond it uvicorn answers 503. ``allowed_hosts``: Host header names accepted ("*": any).
    ``shutdown_grace_s``: after SIGTERM, running work may finish for this long; then open
    streams get an error event and the rest a 503."""

    max_body_bytes: int = 2 * 2**20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 256
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    shutdown_grace_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400:
                raise ValueError(f"{name} must be a number of seconds in (0, 86400), got {value!r}")
        grace = self.shutdown_grace_s
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace < 86400:
            raise ValueError(f"shutdown_grace_s must be a number of seconds in [0, 86400), got {grace!r}")
        if not self.allowed_hosts or not all(isinstance(h, str) and h for h in self.allowed_hosts):
            raise ValueError(f"allowed_hosts must be non-empty host names, got {self.allowed_hosts!r}")


def host_name(header: str) -> str:
    """The name part of a Host header: ``[::1]:8000`` → ``::1``, ``Example.com.`` → ``example.com``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


class HostGuard:
    """ASGI middleware: refuse (421) a request whose Host is not one of ours. A page on an
    attacker's domain that rebinds its DNS to 127.0.0.1 still sends its own name as Host."""

    def __init__(self, app: Any, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(host_name(h) for h in allowed_hosts)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or "*" in self.allowed:
            return await self.app(scope, receive, send)
        raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_name(raw) in self.allowed:
            return await self.app(scope, receive, send)
        message = (f"the Host header {raw[:100]!r} is not served here; allowed: {sorted(self.allowed)} "
                   "(activepath serve --allowed-hosts)")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": "Host",
                                     "code": "misdirected_request"}}).encode()
        await send({"type": "http.response.start", "status": 421,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline: from the connection's start, and again
    after each response, the next request's headers must be complete within
    ``header_timeout_s`` (uvicorn's own keep-alive timer restarts at every byte received)."""

    header_timeout_s = HttpLimits().header_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._header_deadline is not None:
            self._header_deadline.cancel()  # a request's headers are in
            self._header_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing %s: no complete request headers within %.1f s", self.client, self.header_timeout_s)
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: stop accepting (uvicorn), call ``on_drain`` after the grace period
    (it fails what is left, so every client gets an answer), and exit 0 rather than
    re-raising the signal once the shutdown is complete."""

    def __init__(self, config: uvicorn.Config, *, grace_s: float, on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self._grace_s, self._on_drain = grace_s, on_drain
        self._drain_timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._drain_timer is None:
            log.warning("signal %d: finishing running work for up to %.1f s", sig, self._grace_s)
            self._drain_timer = threading.Timer(self._grace_s, self._on_drain)
            self._drain_timer.daemon = True
            self._drain_timer.start()

    async def serve(self, sockets: Any = None) -> None:
        with self.capture_signals():
            await self._serve(sockets)
            self._captured_signals.clear()  # handled: a clean exit, not death by the signal
        if self._drain_timer is not None:
            self._drain_timer.cancel()


def build_server(app: Any, *, host: str, port: int, limits: HttpLimits,
                 on_drain: Callable[[], None]) -> DrainingServer:
    """A uvicorn server for ``app`` (wrapped in the Host check) with ``limits`` applied;
    ``.run()`` serves until a signal (or ``should_exit``)."""
    protocol = type("LimitedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": limits.header_timeout_s})
    config = uvicorn.Config(HostGuard(app, limits.allowed_hosts), host=host, port=port, http=protocol,
                            log_level="warning", timeout_keep_alive=limits.keep_alive_s,
                            limit_concurrency=limits.max_connections, h11_max_incomplete_event_size=16 * 1024,
                            # past the grace, on_drain answers everyone; this only bounds a stuck client
                            timeout_graceful_shutdown=limits.shutdown_grace_s + 5)
    return DrainingServer(config, grace_s=limits.shutdown_grace_s, on_drain=on_drain)
