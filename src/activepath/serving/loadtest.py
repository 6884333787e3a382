"""``activepath loadtest``: drive a running server with Poisson arrivals (``--rate``) or a
fixed number of concurrent streams (``--concurrency``) for a bounded time; report TTFT,
inter-token and end-to-end latency percentiles, throughput, and check that every request
got exactly one complete response (none lost, none duplicated, no 5xx). JSON + Markdown out.

For a soak: ``--prompt-words MIN:MAX`` varies the prompt lengths, ``--abort-fraction`` of
the streams are closed by the client after a random number of tokens, ``--timeout-fraction``
of the requests are non-streaming with a client timeout of 0.05-1 s (they leave
mid-request); those count as aborted, not lost. ``--serve ARGS`` starts ``activepath serve
ARGS`` itself (or ``--pid`` names a running server) and records its RSS over time, with the
growth after ``--warmup`` seconds (and a PNG of it next to ``--out``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from activepath.serving.soak import RssSampler, ServerProcess, plot_rss, rss_report

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
WORDS = tuple(sorted({w for p in PROMPTS for w in p.split()}))
TIMEOUT_RANGE_S = (0.05, 1.0)  # client timeouts of the timeout fraction


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
    prompt_words: tuple[int, int] | None = None
    abort_fraction: float = 0.0
    timeout_fraction: float = 0.0
    warmup_s: float = 0.0
    rss_interval_s: float = 1.0
    max_rss_growth_pct: float | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate and concurrency")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.duration_s > 0 or self.max_tokens < 1:
            raise ValueError("duration_s must be > 0 and max_tokens >= 1")
        if self.prompt_words is not None and not 1 <= self.prompt_words[0] <= self.prompt_words[1]:
            raise ValueError(f"prompt_words must be MIN:MAX with 1 <= MIN <= MAX, got {self.prompt_words}")
        for name in ("abort_fraction", "timeout_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.abort_fraction + self.timeout_fraction > 1.0:
            raise ValueError(f"abort_fraction + timeout_fraction must be <= 1, got "
                             f"{self.abort_fraction} + {self.timeout_fraction}")
        if not 0.0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"warmup_s must be in [0, duration_s={self.duration_s}), got {self.warmup_s}")
        if not self.rss_interval_s > 0:
            raise ValueError(f"rss_interval_s must be > 0, got {self.rss_interval_s}")


@dataclass
class RequestRecord:
    """What one request saw. Times are seconds since the test started."""

    index: int
    sent_s: float
    kind: str = "stream"  # stream | abort (client closes the stream) | timeout (non-streaming, leaves)
    status: int | None = None
    token_s: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    done_markers: int = 0
    response_ids: set[str] = field(default_factory=set)
    error: str | None = None
    server_error: bool = False  # a 5xx other than 503, or an error event in the stream
    aborted: bool = False  # the client left on purpose (abort / timeout kinds)
    end_s: float | None = None

    @property
    def complete(self) -> bool:
        markers = 0 if self.kind == "timeout" else 1
        return (self.status == 200 and self.error is None and not self.aborted and len(self.finish_reasons) == 1
                and self.done_markers == markers and len(self.response_ids) == 1)


def _request_plan(cfg: LoadTestConfig, index: int) -> tuple[str, str, float]:
    """(kind, prompt, abort point): the abort point is a token count for ``abort``, a
    client timeout in seconds for ``timeout``. Deterministic in (seed, index)."""
    rng = random.Random(cfg.seed * 1_000_003 + index)
    if cfg.prompt_words is None:
        prompt = PROMPTS[index % len(PROMPTS)]
    else:
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(*cfg.prompt_words)))
    u = rng.random()
    if u < cfg.abort_fraction:
        return "abort", prompt, rng.randint(0, cfg.max_tokens - 1)
    if u < cfg.abort_fraction + cfg.timeout_fraction:
        return "timeout", prompt, rng.uniform(*TIMEOUT_RANGE_S)
    return "stream", prompt, 0.0


async def _one_request(client: Any, cfg: LoadTestConfig, model: str, rec: RequestRecord, t0: float) -> None:
    rec.kind, prompt, leave_at = _request_plan(cfg, rec.index)
    body = {"model": model, "prompt": prompt, "max_tokens": cfg.max_tokens, "stream": rec.kind != "timeout"}
    try:
        if rec.kind == "timeout":
            await _unary(client, body, rec, leave_at)
        else:
            await _streamed(client, cfg, body, rec, t0, leave_at if rec.kind == "abort" else None)
    except Exception as exc:  # a lost request is data, not a crash of the tester
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.end_s = time.perf_counter() - t0


async def _streamed(client: Any, cfg: LoadTestConfig, body: dict, rec: RequestRecord, t0: float,
                    abort_after: float | None) -> None:
    async with client.stream("POST", "/v1/completions", json=body, timeout=cfg.timeout_s) as resp:
        _on_status(rec, resp.status_code)
        if resp.status_code != 200:
            rec.error = (await resp.aread()).decode(errors="replace")[:200]
            return
        async for line in resp.aiter_lines():
            if abort_after is not None and len(rec.token_s) >= abort_after and not rec.finish_reasons:
                rec.aborted = True  # leaving the block closes the connection mid-stream
                return
            _on_line(rec, line, time.perf_counter() - t0)


async def _unary(client: Any, body: dict, rec: RequestRecord, timeout_s: float) -> None:
    import httpx

    try:
        resp = await client.post("/v1/completions", json=body, timeout=timeout_s)
    except httpx.TimeoutException:
        rec.aborted = True
        return
    _on_status(rec, resp.status_code)
    if resp.status_code != 200:
        rec.error = resp.text[:200]
        return
    doc = resp.json()
    rec.response_ids.add(doc["id"])
    rec.finish_reasons.extend(c["finish_reason"] for c in doc["choices"] if c["finish_reason"] is not None)


def _on_status(rec: RequestRecord, status: int) -> None:
    rec.status = status
    rec.server_error = rec.server_error or (status >= 500 and status != 503)


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
        rec.server_error = True
        return
    rec.response_ids.add(chunk["id"])
    rec.token_s.append(now)
    reason = chunk["choices"][0]["finish_reason"]
    if reason is not None:
        rec.finish_reasons.append(reason)


async def run_loadtest(cfg: LoadTestConfig, rss_pid: int | None = None) -> dict[str, Any]:
    """Run the test; returns the report document. With ``rss_pid``, the report's ``rss``
    holds that process's resident memory over the run."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=cfg.url, limits=limits, timeout=cfg.timeout_s) as client:
        model = cfg.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        records: list[RequestRecord] = []
        sampler = None if rss_pid is None else RssSampler(rss_pid, cfg.rss_interval_s)
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.start(t0)
        if cfg.rate is not None:
            await _open_loop(client, cfg, model, records, t0)
        else:
            await _closed_loop(client, cfg, model, records, t0)
        wall_s = time.perf_counter() - t0
        if sampler is not None:
            await sampler.stop(t0)
    doc = summarize(cfg, records, wall_s)
    if sampler is not None:
        doc["rss"] = rss_report(sampler.samples, cfg.warmup_s, sampler.pid)
        growth = doc["rss"]["growth_after_warmup_pct"]
        if cfg.max_rss_growth_pct is not None and (growth is None or growth > cfg.max_rss_growth_pct):
            doc["ok"] = False
    return doc


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
    aborted = [r for r in records if r.aborted and r.error is None and r.status in (None, 200)]
    server_errors = sum(r.server_error for r in records)
    all_ids = [i for r in records for i in r.response_ids]
    duplicated = len(all_ids) - len(set(all_ids)) + sum(
        len(r.finish_reasons) > 1 or r.done_markers > 1 or len(r.response_ids) > 1 for r in records)
    streamed = [r for r in done if r.token_s]
    ttft = [r.token_s[0] - r.sent_s for r in streamed]
    itl = [b - a for r in streamed for a, b in zip(r.token_s, r.token_s[1:])]
    e2e = [r.token_s[-1] - r.sent_s for r in streamed]
    tokens = sum(len(r.token_s) for r in done)

    def pct(xs: list[float]) -> dict[str, float | None]:
        return {f"p{q}": (percentile(xs, q) if xs else None) for q in (50, 95, 99)}

    return {
        "config": asdict(cfg), "wall_s": wall_s,
        "requests": {"sent": len(records), "complete": len(done), "rejected_503": len(rejected),
                     "aborted_by_client": len(aborted), "server_errors_5xx": server_errors,
                     "lost": len(records) - len(done) - len(rejected) - len(aborted), "duplicated": duplicated,
                     "by_kind": {k: sum(r.kind == k for r in records) for k in ("stream", "abort", "timeout")},
                     "errors": sorted({r.error for r in records if r.error})[:5]},
        "ttft_s": pct(ttft), "itl_s": pct(itl), "e2e_s": pct(e2e),
        "throughput": {"output_tokens": tokens, "tokens_per_s": tokens / wall_s, "requests_per_s": len(done) / wall_s},
        "ok": len(done) == len(records) - len(rejected) - len(aborted) and duplicated == 0 and server_errors == 0,
    }


def render_markdown(doc: dict[str, Any]) -> str:
    c, r, t = doc["config"], doc["requests"], doc["throughput"]
    load = f"Poisson {c['rate']} req/s" if c["rate"] is not None else f"{c['concurrency']} concurrent streams"
    lines = [f"# Load test: {load}, {c['duration_s']:g} s, max_tokens {c['max_tokens']}", ""]
    if "command" in doc:
        lines += [f"Command: `{doc['command']}`", ""]
    # The soak's columns (aborted, other 5xx) come last: the first five keep their meaning for readers of old reports.
    lines += ["| requests sent | complete | rejected (503) | lost | duplicated | aborted by the client | other 5xx |",
              "| --- | --- | --- | --- | --- | --- | --- |",
              f"| {r['sent']} | {r['complete']} | {r['rejected_503']} | {r['lost']} | {r['duplicated']} "
              f"| {r['aborted_by_client']} | {r['server_errors_5xx']} |", "",
              "| latency (ms) | p50 | p95 | p99 |", "| --- | --- | --- | --- |"]
    for key, name in (("ttft_s", "time to first token"), ("itl_s", "inter-token"), ("e2e_s", "end to end")):
        row = doc[key]
        lines.append(f"| {name} | " + " | ".join("—" if row[p] is None else f"{1e3 * row[p]:.1f}"
                                                 for p in ("p50", "p95", "p99")) + " |")
    lines += ["", f"Throughput: {t['tokens_per_s']:.1f} output tokens/s, {t['requests_per_s']:.2f} requests/s "
                  f"over {doc['wall_s']:.1f} s.", "",
              f"Every request exactly one complete response (or left by its client), no 5xx: **{doc['ok']}**"]
    if "rss" in doc:
        lines += ["", _render_rss(doc["rss"])]
    if r["errors"]:
        lines += ["", "Errors seen: " + "; ".join(f"`{e}`" for e in r["errors"])]
    return "\n".join(lines) + "\n"


def _render_rss(rss: dict[str, Any]) -> str:
    if rss["growth_after_warmup_pct"] is None:
        return f"Server RSS (pid {rss['pid']}): no sample after the {rss['warmup_s']:g} s warm-up."
    return (f"Server RSS (pid {rss['pid']}, {len(rss['samples'])} samples): {rss['start_mib']:.0f} MiB at the start, "
            f"{rss['warm_mib']:.0f} MiB after the {rss['warmup_s']:g} s warm-up, at most "
            f"{rss['max_after_warmup_mib']:.0f} MiB after it (**{rss['growth_after_warmup_pct']:+.1f} %**), "
            f"{rss['end_mib']:.0f} MiB at the end.")


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
    p.add_argument("--prompt-words", type=_word_range, metavar="MIN:MAX",
                   help="random prompts of MIN..MAX words (default: eight fixed prompts)")
    p.add_argument("--abort-fraction", type=float, default=0.0, help="streams the client closes mid-way")
    p.add_argument("--timeout-fraction", type=float, default=0.0,
                   help="non-streaming requests whose client times out after 0.05-1 s")
    server = p.add_mutually_exclusive_group()
    server.add_argument("--serve", metavar="ARGS", help="start `activepath serve ARGS` itself and record its RSS")
    server.add_argument("--pid", type=int, help="record the RSS of this (server) process")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds before RSS growth is counted")
    p.add_argument("--rss-interval", type=float, default=1.0, help="seconds between RSS samples")
    p.add_argument("--max-rss-growth", type=float, metavar="PCT", help="fail when RSS grows more after warm-up")
    p.add_argument("--out", help="write OUT.json and OUT.md (and OUT.png with an RSS record)")
    p.set_defaults(handler=run_loadtest_cmd)


def _word_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX (two ints), got {text!r}") from None


def run_loadtest_cmd(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    log_path = None if out is None or args.serve is None else Path(f"{out}.server.log")
    try:  # option values are the user's: a one-line error (exit 2), not a traceback
        cfg = LoadTestConfig(url=args.url, model=args.model, rate=args.rate, concurrency=args.concurrency,
                             duration_s=args.duration, max_tokens=args.max_tokens, seed=args.seed,
                             prompt_words=args.prompt_words, abort_fraction=args.abort_fraction,
                             timeout_fraction=args.timeout_fraction, warmup_s=args.warmup,
                             rss_interval_s=args.rss_interval, max_rss_growth_pct=args.max_rss_growth)
        server = None if args.serve is None else ServerProcess(args.serve, log_path=log_path)
    except (ValueError, TypeError) as exc:
        print(f"activepath loadtest: error: {exc}", file=sys.stderr)
        return 2
    if server is not None:
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        with server:
            doc = asyncio.run(run_loadtest(replace(cfg, url=server.url), rss_pid=server.pid))
            doc["server"] = {"command": shlex.join(server.command), "exit_status": server.stop()}
    else:
        doc = asyncio.run(run_loadtest(cfg, rss_pid=args.pid))
    doc["command"] = "activepath " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    _write(doc, out)
    return 0 if doc["ok"] else 1


def _write(doc: dict[str, Any], out: Path | None) -> None:
    markdown = render_markdown(doc)
    print(markdown)
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(doc, indent=2) + "\n")
    Path(f"{out}.md").write_text(markdown)
    if "rss" in doc:
        plot_rss(doc["rss"], doc["command"], Path(f"{out}.png"))
