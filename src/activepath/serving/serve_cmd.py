"""``activepath serve --model DIR|tiny --port P``: check every option, load, build the
engine, run the HTTP server. Heavy imports happen in the handler, so building the CLI
parser stays cheap, and a bad option costs no model load: argparse checks each value
(``activepath serve: error: ...``, exit 2) and ``run_serve`` checks the combinations
before loading."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def _number(kind: type, low: float, high: float | None = None, *, open_low: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: ``kind`` (int or float) in [low, high] ((low, high] if ``open_low``)."""
    shown = f"{'(' if open_low else '['}{low:g}, {'∞)' if high is None else f'{high:g}]'}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} in "
                                             f"{shown}, got {text!r}") from None
        above_low = value > low if open_low else value >= low
        if not (math.isfinite(value) and above_low and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"expected a value in {shown}, got {text}")
        return value

    return parse


def _hosts(text: str) -> tuple[str, ...]:
    hosts = tuple(h.strip() for h in text.split(",") if h.strip())
    if not hosts:
        raise argparse.ArgumentTypeError(f"expected comma-separated host names (or '*'), got {text!r}")
    return hosts


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", default="tiny", help="checkpoint directory or embedded model name (default tiny)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_number(int, 1, 65535), default=8000)
    p.add_argument("--served-model-name", help="the name clients send as 'model' (default: the --model name)")
    p.add_argument("--backend", default="grouped", help="experts backend (default grouped)")
    p.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's (bf16 for tiny)")
    p.add_argument("--threads", type=_number(int, 1, 1024), help="torch intra-op threads")
    p.add_argument("--max-batch-size", type=_number(int, 1, 4096), default=16, help="sequences decoded together (= KV slots)")
    p.add_argument("--max-tokens-per-step", type=_number(int, 1), default=1024, help="token budget of one step")
    p.add_argument("--max-queue", type=_number(int, 1), default=64, help="waiting requests before answering 503")
    p.add_argument("--max-len", type=_number(int, 2), help="context per sequence (default: the model's, at most 512)")
    p.add_argument("--target-itl-ms", type=_number(float, 0, open_low=True),
                   help="admit prefills only while a step stays under this")
    p.add_argument("--max-wait-ms", type=_number(float, 0), default=500.0, help="…unless a request waited this long")
    p.add_argument("--exact", action="store_true", help="batch-invariant decoding (row-wise kernels)")
    p.add_argument("--capacity-factor", type=_number(float, 0, open_low=True), help="per-expert capacity (default: dropless)")
    p.add_argument("--overflow-policy", choices=("drop", "reroute"), default="drop")
    _register_http(p)
    p.set_defaults(handler=run_serve)


def _register_http(p: argparse.ArgumentParser) -> None:
    from activepath.serving.http_guard import LOOPBACK_HOSTS, HttpLimits

    d = HttpLimits()
    p.add_argument("--max-body-bytes", type=_number(int, 1), default=d.max_body_bytes,
                   help=f"larger request bodies get 413 (default {d.max_body_bytes})")
    p.add_argument("--header-timeout-s", type=_number(float, 0, 86400, open_low=True), default=d.header_timeout_s,
                   help=f"close a connection whose request headers take longer (default {d.header_timeout_s:g})")
    p.add_argument("--body-timeout-s", type=_number(float, 0, 86400, open_low=True), default=d.body_timeout_s,
                   help=f"408 for a request body that takes longer (default {d.body_timeout_s:g})")
    p.add_argument("--keep-alive-s", type=_number(float, 0, 86400, open_low=True), default=d.keep_alive_s,
                   help=f"close idle keep-alive connections after this (default {d.keep_alive_s:g})")
    p.add_argument("--max-connections", type=_number(int, 1), default=d.max_connections,
                   help=f"503 beyond this many connections (default {d.max_connections})")
    p.add_argument("--allowed-hosts", type=_hosts, default=(),
                   help=f"extra Host header names to accept, comma-separated, '*' for any (always: "
                        f"{', '.join(LOOPBACK_HOSTS)} and --host)")
    p.add_argument("--shutdown-grace-s", type=_number(float, 0, 86400), default=d.shutdown_grace_s,
                   help=f"on SIGTERM, let running work finish this long (default {d.shutdown_grace_s:g}), then end "
                        "open streams with an error event and answer the rest 503")


def _fail(message: str) -> int:
    print(f"activepath serve: error: {message}", file=sys.stderr)
    return 2


def _check_options(args: argparse.Namespace):  # -> (SchedulerConfig | None, CapacityConfig | None, HttpLimits, Path)
    """Everything that can be checked without the model; raises ValueError/TypeError."""
    from activepath.moe.capacity import CapacityConfig
    from activepath.moe.experts import get_backend
    from activepath.models import embedded_path
    from activepath.serving.http_guard import LOOPBACK_HOSTS, HttpLimits

    directory = embedded_path(args.model) or Path(args.model)
    if not (directory / "config.json").is_file():
        raise ValueError(f"--model {args.model!r} is neither an embedded model name nor a checkpoint directory "
                         "with a config.json")
    get_backend(args.backend)
    _check_bindable(args.host, args.port)
    capacity = None if args.capacity_factor is None else CapacityConfig(capacity_factor=args.capacity_factor,
                                                                          policy=args.overflow_policy)
    hosts = (*LOOPBACK_HOSTS, args.host, *args.allowed_hosts)
    limits = HttpLimits(max_body_bytes=args.max_body_bytes, header_timeout_s=args.header_timeout_s,
                        body_timeout_s=args.body_timeout_s, keep_alive_s=args.keep_alive_s,
                        max_connections=args.max_connections, allowed_hosts=hosts,
                        shutdown_grace_s=args.shutdown_grace_s)
    _scheduler_config(args, args.max_len or 512)  # the real max_len needs the model's config
    return capacity, limits, directory


def _check_bindable(host: str, port: int) -> None:
    """Bind once before the model loads (minutes for a big one) so a taken port or a bad
    --host fails first. uvicorn binds again later, as it does, with SO_REUSEADDR."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        raise ValueError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None


def _scheduler_config(args: argparse.Namespace, max_len: int):
    from activepath.serving.scheduler import SchedulerConfig

    return SchedulerConfig(
        max_batch_size=args.max_batch_size, max_tokens_per_step=args.max_tokens_per_step, max_queue=args.max_queue,
        max_len=max_len, target_itl_s=None if args.target_itl_ms is None else args.target_itl_ms / 1e3,
        max_wait_s=args.max_wait_ms / 1e3)


def run_serve(args: argparse.Namespace) -> int:
    try:
        capacity, limits, directory = _check_options(args)
    except (ValueError, TypeError) as exc:
        return _fail(str(exc))
    import torch
    from transformers import AutoTokenizer

    from activepath.api import load

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load(directory, dtype=args.dtype, backend=args.backend)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    positions = int(getattr(model.config.get_text_config(), "max_position_embeddings", 512))
    if args.max_len is not None and args.max_len > positions:
        return _fail(f"--max-len {args.max_len} exceeds the model's {positions} positions")
    max_len = args.max_len or min(512, positions)
    return _serve(args, model, tokenizer, _scheduler_config(args, max_len), capacity, limits)


def _serve(args, model, tokenizer, scheduler, capacity, limits) -> int:
    from activepath.runtime.process import freeze_loaded_objects
    from activepath.serving.engine import Engine, EngineConfig
    from activepath.serving.http_guard import build_server
    from activepath.serving.metrics import ServingMetrics
    from activepath.serving.server import build_app, served_name

    metrics = ServingMetrics()
    stop_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    engine = Engine(model, EngineConfig(scheduler=scheduler, exact=args.exact, capacity=capacity),
                    stop_ids=stop_ids, metrics=metrics)
    name = served_name(args.model, args.served_model_name)
    app = build_app(engine, tokenizer, served_model=name, metrics=metrics, limits=limits)
    # Loaded once, alive for the server's lifetime: out of every later full GC pass, which would
    # otherwise walk the whole model (100+ ms) in the middle of a decode step.
    frozen = freeze_loaded_objects()
    log.info("froze %d loaded objects out of the cyclic garbage collector", frozen)
    log.info("serving %s on http://%s:%d (KV cache %.1f MiB)", name, args.host, args.port,
             engine.runner.cache.nbytes / 2**20)
    server = build_server(app, host=args.host, port=args.port, limits=limits, on_drain=engine.shutdown)
    server.run()
    if not server.started:  # e.g. the port is taken: uvicorn logged why
        return _fail(f"could not serve on {args.host}:{args.port}")
    return 0
