"""End to end: ``activepath serve`` started as a user would, on a loopback ephemeral port,
then streaming and non-streaming completions, bad inputs, a client that disconnects, a
full queue, /metrics, and ``activepath loadtest`` against it. The server is stopped at
the end of the module."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from test_serving_fixtures import standin_checkpoint

MAX_LEN = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    directory = standin_checkpoint(tmp_path_factory.mktemp("standin") / "standin")
    port = free_port()
    cmd = [sys.executable, "-m", "activepath.cli", "serve", "--model", str(directory), "--port", str(port),
           "--max-batch-size", "2", "--max-queue", "2", "--max-len", str(MAX_LEN), "--threads", "1",
           "--capacity-factor", "2.0", "--overflow-policy", "reroute"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read().decode() if proc.stdout else ''}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not come up")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(url: str, body: object, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(f"{url}/v1/completions", content=content, timeout=60, headers=headers, **kw)


def stream_chunks(url: str, body: dict) -> tuple[list[dict], int]:
    chunks, done = [], 0
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                done += 1
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    return chunks, done


def test_health(server: str) -> None:
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_non_streaming_and_streaming_agree(server: str) -> None:
    body = {"model": "standin", "prompt": "def add(a, b):", "max_tokens": 7}
    resp = post(server, body)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["object"] == "text_completion" and doc["id"].startswith("cmpl-")
    assert doc["usage"]["completion_tokens"] == 7 and doc["choices"][0]["finish_reason"] == "length"
    chunks, done = stream_chunks(server, body)
    assert done == 1 and len(chunks) == 7
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 6 + ["length"]
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == doc["choices"][0]["text"]


def test_token_id_prompt(server: str) -> None:
    resp = post(server, {"model": "standin", "prompt": [5, 6, 7], "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"model": "gpt-9", "prompt": "a"}, 404, "does not exist"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 10**12}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": [3] * (MAX_LEN - 4), "max_tokens": 10}, 400, "context"),
    ({"prompt": [10**9]}, 400, "token ids"),
    ({"prompt": "a", "n": 3}, 400, "n=1"),
    ({"prompt": "a", "bogus": 1}, 400, "unsupported"),
])
def test_bad_requests_get_4xx_with_message(server: str, body: object, status: int, needle: str) -> None:
    resp = post(server, body)
    assert resp.status_code == status, resp.text
    assert needle in resp.json()["error"]["message"]


def test_disconnect_mid_stream_frees_the_slot(server: str) -> None:
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                      json={"prompt": "import os", "max_tokens": 100, "stream": True}) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    # both slots must be usable again: two concurrent requests complete
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda _: post(server, {"prompt": "x", "max_tokens": 3}).status_code, range(2)))
    assert codes == [200, 200]
    deadline = time.monotonic() + 10
    while 'activepath_requests_total{outcome="aborted"} 1.0' not in httpx.get(f"{server}/metrics").text:
        assert time.monotonic() < deadline, "abort not counted"
        time.sleep(0.1)


def test_full_queue_answers_503_with_retry_after(server: str) -> None:
    def one(_: int) -> httpx.Response:
        return post(server, {"prompt": "for (int i = 0;", "max_tokens": 100})

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(one, range(10)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}
    assert codes.count(200) >= 4  # 2 running + 2 queued at least
    busy = next(r for r in responses if r.status_code == 503)
    assert int(busy.headers["Retry-After"]) >= 1 and "busy" in busy.json()["error"]["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_metrics_exposition(server: str) -> None:
    post(server, {"prompt": "abc", "max_tokens": 3})
    text = httpx.get(f"{server}/metrics").text
    for name in ("activepath_time_to_first_token_seconds_bucket", "activepath_inter_token_latency_seconds_bucket",
                 "activepath_e2e_request_latency_seconds_bucket", "activepath_queue_depth",
                 "activepath_running_batch_size", "activepath_generated_tokens_per_second",
                 'activepath_expert_tokens_total{expert="', 'activepath_routing_overhead_ratio{layer="',
                 'activepath_capacity_overflow_total{layer="model.layers.0.mlp",policy="reroute"}',
                 'activepath_requests_total{outcome="rejected"}'):
        assert name in text, name


def test_loadtest_cli_against_server(server: str, tmp_path: Path) -> None:
    out = tmp_path / "lt"
    cmd = [sys.executable, "-m", "activepath.cli", "loadtest", "--url", server, "--concurrency", "2",
           "--duration", "1.5", "--max-tokens", "5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(Path(f"{out}.json").read_text())
    assert doc["ok"] and doc["requests"]["lost"] == 0 and doc["requests"]["duplicated"] == 0
    assert doc["requests"]["complete"] >= 2 and doc["ttft_s"]["p50"] is not None
    assert "exactly one complete response" in Path(f"{out}.md").read_text()
