"""The server against a careless or hostile client (issue 14, items 4-9), on a real socket:
oversized and slow bodies, input that used to become a 500, fields that used to be
ignored, a wrong Content-Type or Host, slow-loris connections, clients that leave, and
SIGTERM with work in flight (a real ``activepath serve`` subprocess)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_serving_fixtures import LiveServer, standin_checkpoint

from activepath.serving.http_guard import HttpLimits

JSON = {"Content-Type": "application/json"}
BODY_LIMIT = 2**20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return standin_checkpoint(tmp_path_factory.mktemp("standin") / "standin")


@pytest.fixture(scope="module")
def live(checkpoint: Path):
    limits = HttpLimits(max_body_bytes=BODY_LIMIT, header_timeout_s=1.0, body_timeout_s=1.0)
    server = LiveServer(checkpoint, limits=limits, max_len=256, step_delay_s=0.01)
    yield server
    server.close()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_logs():
    """Every record of the server's loggers (uvicorn's do not reach the root logger)."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("activepath", "uvicorn", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


def completions(url: str, body: object, *, client: httpx.Client | None = None, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    kw.setdefault("headers", JSON)
    return (client or httpx).post(f"{url}/v1/completions", content=content, timeout=30, **kw)


def raw_exchange(port: int, data: bytes, *, wait_s: float = 5.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh socket and read until the server closes it (or ``wait_s``)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        sock.settimeout(wait_s)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return reply, time.monotonic() - start


# --- item 4: body size, tokenization off the event loop --------------------------------


def test_declared_oversized_body_is_refused_before_it_is_sent(live: LiveServer) -> None:
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10 * BODY_LIMIT}\r\n\r\n").encode()
    reply, elapsed = raw_exchange(live.port, head)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"connection: close" in reply.lower() and b"--max-body-bytes" in reply
    assert elapsed < 2.0  # answered and closed at once, not after waiting for the body


def test_chunked_body_is_cut_at_the_limit(live: LiveServer) -> None:
    sent = []

    def body():
        for _ in range(64):  # 4 MiB in 64 KiB chunks, no Content-Length
            sent.append(1)
            yield b" " * 2**16

    resp = httpx.post(f"{live.url}/v1/completions", content=body(), headers=JSON, timeout=30)
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "request_too_large"


def test_large_prompt_does_not_block_the_event_loop(live: LiveServer) -> None:
    prompt = "def add(a, b):\n    return a + b\n" * 30000  # ~0.96 MB: tokenizing takes ~0.5 s
    result: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: result.append(completions(live.url, {"prompt": prompt})))
    gaps = []
    with httpx.Client(base_url=live.url, timeout=30) as client:
        sender.start()
        while sender.is_alive():
            start = time.monotonic()
            assert client.get("/health").status_code == 200
            gaps.append(time.monotonic() - start)
    sender.join()
    assert result[0].status_code == 400 and result[0].json()["error"]["code"] == "context_length_exceeded"
    assert len(gaps) >= 3 and max(gaps) < 0.25, gaps


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_a_large_prompt_gives_its_memory_back(checkpoint: Path) -> None:
    """A real ``serve`` process (with its tuned allocator, which keeps up to 256 MiB of freed
    heap): ~1.6 MB prompts cost ~300 MiB while tokenized; it must not stay resident."""
    from test_serving_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "activepath.cli", "serve", "--model", str(checkpoint),
                             "--port", str(port), "--threads", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def rss_mib() -> float:
        return int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024

    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        completions(url, {"prompt": "abc", "max_tokens": 2})
        before = rss_mib()
        content = json.dumps({"prompt": "def add(a, b):\n    return a + b\n" * 48000})
        for _ in range(3):
            resp = completions(url, content)
            assert resp.json()["error"]["code"] == "context_length_exceeded"
        assert rss_mib() - before < 100
    finally:
        proc.terminate()
        proc.wait(30)


# --- item 5: a non-streaming client that leaves -----------------------------------------


def test_non_streaming_client_that_leaves_is_aborted_within_half_a_second(live: LiveServer) -> None:
    aborted = live.outcome("aborted")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/completions", json={"prompt": "import os", "max_tokens": 240}, timeout=0.3)
    left = time.monotonic()
    generated = live.metrics.generated._value.get()
    while live.engine.scheduler.num_running or live.engine.scheduler.num_waiting:
        assert time.monotonic() - left < 2.0, "the request kept its slot"  # it would run ~2.4 s to the end
        time.sleep(0.01)
    assert time.monotonic() - left < 0.6
    assert live.outcome("aborted") == aborted + 1
    assert live.metrics.generated._value.get() - generated < 60  # steps take >= 10 ms


# --- item 6: input that used to be a 500 --------------------------------------------------


@pytest.mark.parametrize("raw,needle", [
    (b'{"prompt": "\\ud800"}', "surrogate"),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    (b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", "digits"),
    (b'{"prompt": "a", "max_tokens": NaN}', "NaN"),
    (b'{"prompt": "a", "top_p": 1e999}', "out of range"),
    (b'{"prompt": "a", "seed": ' + b"7" * 4000 + b"}", "seed"),
])
def test_bad_input_is_a_400_with_one_log_line_and_a_usable_connection(live: LiveServer, server_logs, raw: bytes,
                                                                       needle: str) -> None:
    with httpx.Client(timeout=30) as client:
        bad = completions(live.url, raw, client=client)
        bad_port = bad.extensions["network_stream"].get_extra_info("client_addr")[1]
        good = completions(live.url, {"prompt": "abc", "max_tokens": 2}, client=client)
        good_port = good.extensions["network_stream"].get_extra_info("client_addr")[1]
    assert bad.status_code == 400, bad.text
    assert needle in bad.json()["error"]["message"] and len(bad.text) < 1000
    assert "connection" not in bad.headers
    assert good.status_code == 200 and good_port == bad_port  # the same pooled connection
    assert not [r for r in server_logs if r.exc_info], "a traceback was logged"
    assert len(server_logs) <= 1


# --- item 7: fields never ignored -----------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("top_p", 5), ("top_p", 0), ("presence_penalty", 0.5), ("frequency_penalty", -1), ("seed", "x"),
    ("seed", 1.5), ("logprobs", 1), ("logprobs", 0), ("echo", True), ("best_of", 2), ("logit_bias", {"5": 10}),
    ("suffix", "}"), ("stream_options", {"include_usage": True}), ("temperature", 0.7), ("temperature", -1),
    ("n", True), ("user", 5), ("max_tokens", True), ("mystery", 1),
])
def test_a_field_that_would_change_the_output_is_refused(live: LiveServer, field: str, value: object) -> None:
    resp = completions(live.url, {"prompt": "abc", "max_tokens": 2, field: value})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_no_op_values_are_accepted_and_change_nothing(live: LiveServer) -> None:
    plain = completions(live.url, {"prompt": "abc", "max_tokens": 5})
    no_ops = {"temperature": 0, "top_p": 0.5, "seed": 7, "user": "u", "n": 1, "best_of": 1, "echo": False,
              "logprobs": None, "suffix": None, "logit_bias": {}, "stop": [], "stream_options": None,
              "presence_penalty": 0, "frequency_penalty": 0.0}
    same = completions(live.url, {"prompt": "abc", "max_tokens": 5, **no_ops})
    assert plain.status_code == same.status_code == 200, same.text
    assert same.json()["choices"] == plain.json()["choices"]


# --- item 9: Content-Type, Host, slow clients --------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_declared_json_is_415(live: LiveServer, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    resp = completions(live.url, {"prompt": "abc", "max_tokens": 2}, headers=headers)
    assert resp.status_code == 415, resp.text
    assert "application/json" in resp.json()["error"]["message"]
    ok = completions(live.url, {"prompt": "abc", "max_tokens": 2},
                     headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200


@pytest.mark.parametrize("host,status", [("evil.example", 421), ("127.0.0.1.evil.example:80", 421),
                                         ("localhost:9", 200), ("[::1]:8000", 200), ("127.0.0.1", 200)])
def test_the_host_header_must_be_ours(live: LiveServer, host: str, status: int) -> None:
    resp = httpx.get(f"{live.url}/health", headers={"Host": host})
    assert resp.status_code == status, resp.text
    if status == 421:
        assert resp.json()["error"]["param"] == "Host"


def test_slow_loris_headers_are_dropped(live: LiveServer) -> None:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        for _ in range(40):  # one header byte every 0.1 s: 4 s if nobody stops it
            try:
                sock.sendall(b"X")
                sock.settimeout(0.1)
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if closed:
                break
    assert closed and time.monotonic() - start < 2.5  # header_timeout_s is 1


def test_a_silent_connection_is_dropped(live: LiveServer) -> None:
    reply, elapsed = raw_exchange(live.port, b"", wait_s=5.0)
    assert reply == b"" and elapsed < 2.5


def test_a_slow_body_gets_408(live: LiveServer) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"prompt\"")
    reply, elapsed = raw_exchange(live.port, head)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert elapsed < 2.5


def test_http_errors_are_openai_shaped(live: LiveServer) -> None:
    for resp in (httpx.get(f"{live.url}/nope"), httpx.get(f"{live.url}/v1/completions")):
        assert resp.status_code in (404, 405) and resp.json()["error"]["message"]


# --- item 9: the command line -------------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["--max-len", "0"], "--max-len"), (["--port", "99999"], "--port"), (["--threads", "0"], "--threads"),
    (["--max-body-bytes", "-1"], "--max-body-bytes"), (["--capacity-factor", "nan"], "--capacity-factor"),
    (["--model", "/no/such/dir"], "config.json"), (["--backend", "nope"], "backend"),
    (["--header-timeout-s", "0"], "--header-timeout-s"),
])
def test_bad_cli_values_are_one_line_and_exit_2_before_loading(args: list[str], needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "activepath.cli", "serve", *args], check=False, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("activepath serve: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr
