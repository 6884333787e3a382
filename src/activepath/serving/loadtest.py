"""``activepath loadtest``: drive a running server with Poisson arrivals (``--rate``) or a
fixed number of concurrent streams (``--concurrency``) for a bounded time; report TTFT,
inter-token and end-to-end latency percentiles, throughput, and check that every request
got exactly one complete response (none lost, none duplicated). JSON + Markdown out."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROMPTS = (
    "The json module provides functions to",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
    "Debian packages are built from source packages that contain",
    "import os\nimport sys\n\n\ndef main():\n",
    "The configuration file is read at startup and",
    "for (int i = 0; i < n; i++) {",
    "This manual page documents briefly the",
    "class Cache:\n    def __init__(self, size):\n",
)


@dataclass(frozen=True, kw_only=True)
class LoadTestConfig:
    """Exactly one of ``rate`` (requests/s, Poisson) and ``concurrency`` (closed loop)."""

    url: str = "http://127.0.0.1:8000"
    model: str | None = None
    rate: float | None = None
    concurrency: int | None = None
    duration_s: float = 60.0
    max_tokens: int = 64
    timeout_s: float = 300.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate and concurrency")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.duration_s > 0 or self.max_tokens < 1:
            raise ValueError("duration_s must be > 0 and max_tokens >= 1")


@dataclass
class RequestRecord:
    """What one request saw. Times are seconds since the test started."""

    index: int
    sent_s: float
    status: int | None = None
    token_s: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    done_markers: int = 0
    response_ids: set[str] = field(default_factory=set)
    error: str | None = None
    end_s: float | None = None

    @property
    def complete(self) -> bool:
        return (self.status == 200 and self.error is None and len(self.finish_reasons) == 1
                and self.done_markers == 1 and len(self.response_ids) == 1)


async def _one_request(client: Any, cfg: LoadTestConfig, model: str, rec: RequestRecord, t0: float) -> None:
    body = {"model": model, "prompt": PROMPTS[rec.index % len(PROMPTS)], "max_tokens": cfg.max_tokens, "stream": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=cfg.timeout_s) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.error = (await resp.aread()).decode(errors="replace")[:200]
                return
            async for line in resp.aiter_lines():
                _on_line(rec, line, time.perf_counter() - t0)
    except Exception as exc:  # a lost request is data, not a crash of the tester
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.end_s = time.perf_counter() - t0


def _on_line(rec: RequestRecord, line: str, now: float) -> None:
    if not line.startswith("data: "):
        return
    data = line[len("data: "):]
    if data == "[DONE]":
        rec.done_markers += 1
        return
    chunk = json.loads(data)
    if "error" in chunk:
        rec.error = str(chunk["error"].get("message"))
        return
    rec.response_ids.add(chunk["id"])
    rec.token_s.append(now)
    reason = chunk["choices"][0]["finish_reason"]
    if reason is not None:
        rec.finish_reasons.append(reason)


async def run_loadtest(cfg: LoadTestConfig) -> dict[str, Any]:
    """Run the test; returns the report document."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=cfg.url, limits=limits, timeout=cfg.timeout_s) as client:
        model = cfg.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        records: list[RequestRecord] = []
        t0 = time.perf_counter()
        if cfg.rate is not None:
            await _open_loop(client, cfg, model, records, t0)
        else:
            await _closed_loop(client, cfg, model, records, t0)
        wall_s = time.perf_counter() - t0
    return summarize(cfg, records, wall_s)


async def _open_loop(client: Any, cfg: LoadTestConfig, model: str, records: list[RequestRecord], t0: float) -> None:
    rng = random.Random(cfg.seed)
    assert cfg.rate is not None
    tasks = []
    next_s = rng.expovariate(cfg.rate)
    while next_s < cfg.duration_s:
        await asyncio.sleep(max(0.0, next_s - (time.perf_counter() - t0)))
        rec = RequestRecord(len(records), time.perf_counter() - t0)
        records.append(rec)
        tasks.append(asyncio.create_task(_one_request(client, cfg, model, rec, t0)))
        next_s += rng.expovariate(cfg.rate)
    await asyncio.gather(*tasks)


async def _closed_loop(client: Any, cfg: LoadTestConfig, model: str, records: list[RequestRecord], t0: float) -> None:
    async def worker() -> None:
        while time.perf_counter() - t0 < cfg.duration_s:
            rec = RequestRecord(len(records), time.perf_counter() - t0)
            records.append(rec)
            await _one_request(client, cfg, model, rec, t0)

    assert cfg.concurrency is not None
    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))


def summarize(cfg: LoadTestConfig, records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    from activepath.bench.timing import percentile

    done = [r for r in records if r.complete]
    rejected = [r for r in records if r.status == 503]
    all_ids = [i for r in records for i in r.response_ids]
    duplicated = len(all_ids) - len(set(all_ids)) + sum(
        len(r.finish_reasons) > 1 or r.done_markers > 1 or len(r.response_ids) > 1 for r in records)
    ttft = [r.token_s[0] - r.sent_s for r in done]
    itl = [b - a for r in done for a, b in zip(r.token_s, r.token_s[1:])]
    e2e = [r.token_s[-1] - r.sent_s for r in done]
    tokens = sum(len(r.token_s) for r in done)

    def pct(xs: list[float]) -> dict[str, float | None]:
        return {f"p{q}": (percentile(xs, q) if xs else None) for q in (50, 95, 99)}

    return {
        "config": asdict(cfg), "wall_s": wall_s,
        "requests": {"sent": len(records), "complete": len(done), "rejected_503": len(rejected),
                     "lost": len(records) - len(done) - len(rejected), "duplicated": duplicated,
                     "errors": sorted({r.error for r in records if r.error})[:5]},
        "ttft_s": pct(ttft), "itl_s": pct(itl), "e2e_s": pct(e2e),
        "throughput": {"output_tokens": tokens, "tokens_per_s": tokens / wall_s, "requests_per_s": len(done) / wall_s},
        "ok": len(done) == len(records) - len(rejected) and duplicated == 0,
    }


def render_markdown(doc: dict[str, Any]) -> str:
    c, r, t = doc["config"], doc["requests"], doc["throughput"]
    load = f"Poisson {c['rate']} req/s" if c["rate"] is not None else f"{c['concurrency']} concurrent streams"
    lines = [f"# Load test: {load}, {c['duration_s']:g} s, max_tokens {c['max_tokens']}", ""]
    if "command" in doc:
        lines += [f"Command: `{doc['command']}`", ""]
    lines += ["| requests sent | complete | rejected (503) | lost | duplicated |", "| --- | --- | --- | --- | --- |",
              f"| {r['sent']} | {r['complete']} | {r['rejected_503']} | {r['lost']} | {r['duplicated']} |", "",
              "| latency (ms) | p50 | p95 | p99 |", "| --- | --- | --- | --- |"]
    for key, name in (("ttft_s", "time to first token"), ("itl_s", "inter-token"), ("e2e_s", "end to end")):
        row = doc[key]
        lines.append(f"| {name} | " + " | ".join("—" if row[p] is None else f"{1e3 * row[p]:.1f}"
                                                 for p in ("p50", "p95", "p99")) + " |")
    lines += ["", f"Throughput: {t['tokens_per_s']:.1f} output tokens/s, {t['requests_per_s']:.2f} requests/s "
                  f"over {doc['wall_s']:.1f} s.", "", f"Every request exactly one complete response: **{doc['ok']}**"]
    if r["errors"]:
        lines += ["", "Errors seen: " + "; ".join(f"`{e}`" for e in r["errors"])]
    return "\n".join(lines) + "\n"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("loadtest", help="load-test a running activepath server")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name to send (default: the server's)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="Poisson arrival rate, requests/s")
    mode.add_argument("--concurrency", type=int, help="fixed number of concurrent streams")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (default 60)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write OUT.json and OUT.md")
    p.set_defaults(handler=run_loadtest_cmd)


def run_loadtest_cmd(args: argparse.Namespace) -> int:
    cfg = LoadTestConfig(url=args.url, model=args.model, rate=args.rate, concurrency=args.concurrency,
                         duration_s=args.duration, max_tokens=args.max_tokens, seed=args.seed)
    doc = asyncio.run(run_loadtest(cfg))
    doc["command"] = "activepath " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    markdown = render_markdown(doc)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps(doc, indent=2) + "\n")
        Path(f"{out}.md").write_text(markdown)
    return 0 if doc["ok"] else 1
