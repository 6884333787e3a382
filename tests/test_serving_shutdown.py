"""SIGTERM on a real ``activepath serve`` (the embedded tiny model, so generation takes
seconds): work that fits the grace period finishes; past it, every open stream ends with an
error event, every other request gets a 503, and the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from test_serving_server import free_port


def start(*extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "activepath.cli", "serve", "--model", "tiny", "--port", str(port), "--threads", "1",
           "--max-batch-size", "2", "--max-queue", "4", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.fixture
def stopped():
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_past_the_grace_answers_every_request_and_exits_0(stopped) -> None:
    proc, url = start("--shutdown-grace-s", "0.5")
    stopped.append(proc)
    long = {"prompt": "def main():", "max_tokens": 400}
    answers: dict[str, httpx.Response] = {}

    def send(name: str) -> None:
        answers[name] = httpx.post(f"{url}/v1/completions", json=long, timeout=60)

    lines: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=60) as resp:
        stream_lines = resp.iter_lines()
        lines.append(next(stream_lines))  # the stream is open and generating
        senders = [threading.Thread(target=send, args=(name,)) for name in ("running", "queued")]
        for sender in senders:
            sender.start()
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        while metric(url, "activepath_queue_depth") < 1:  # one runs beside the stream, one waits
            assert time.monotonic() < deadline, "the second request was not queued"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        lines.extend(stream_lines)
    for sender in senders:
        sender.join(30)
    assert proc.wait(30) == 0, proc.stdout.read() if proc.stdout else ""
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert len(events) < 400 and "choices" in events[0]
    assert events[-1]["error"]["message"] == "the server is shutting down" and events[-1]["error"]["type"] == "server_error"
    for name in ("running", "queued"):
        assert answers[name].status_code == 503, (name, answers[name].text)
        assert "shutting down" in answers[name].json()["error"]["message"]


def test_sigterm_lets_work_within_the_grace_finish(stopped) -> None:
    proc, url = start("--shutdown-grace-s", "60")
    stopped.append(proc)
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "import os", "max_tokens": 40, "stream": True},
                      timeout=60) as resp:
        lines = resp.iter_lines()
        first = next(lines)
        proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    started = time.monotonic()
    assert proc.wait(30) == 0
    assert time.monotonic() - started < 10  # it leaves once the work is done, not after the grace
    events = [json.loads(line[6:]) for line in [first, *rest] if line.startswith("data: {")]
    assert len(events) == 40 and events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert [line for line in rest if line][-1] == "data: [DONE]"
