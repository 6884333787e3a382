"""``activepath serve --model DIR|tiny --port P``: load, build the engine, run the HTTP server.
Heavy imports happen in the handler, so building the CLI parser stays cheap."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", default="tiny", help="checkpoint directory or embedded model name (default tiny)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the name clients send as 'model' (default: the --model name)")
    p.add_argument("--backend", default="grouped", help="experts backend (default grouped)")
    p.add_argument("--dtype", help="float32 / bfloat16 / float16 (default: the checkpoint's; bf16 for tiny)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together (= KV slots)")
    p.add_argument("--max-tokens-per-step", type=int, default=1024, help="token budget of one step")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    p.add_argument("--max-len", type=int, help="context per sequence (default: the model's, at most 512)")
    p.add_argument("--target-itl-ms", type=float, help="admit prefills only while a step stays under this")
    p.add_argument("--max-wait-ms", type=float, default=500.0, help="…unless a request waited this long")
    p.add_argument("--exact", action="store_true", help="batch-invariant decoding (row-wise kernels)")
    p.add_argument("--capacity-factor", type=float, help="per-expert capacity (default: dropless)")
    p.add_argument("--overflow-policy", choices=("drop", "reroute"), default="drop")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn
    from transformers import AutoTokenizer

    from activepath.moe.capacity import CapacityConfig
    from activepath.api import load
    from activepath.models import embedded_path
    from activepath.runtime.process import freeze_loaded_objects
    from activepath.serving.engine import Engine, EngineConfig
    from activepath.serving.metrics import ServingMetrics
    from activepath.serving.scheduler import SchedulerConfig
    from activepath.serving.server import build_app, served_name

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    directory = embedded_path(args.model) or Path(args.model)
    model = load(directory, dtype=args.dtype, backend=args.backend)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text_config = model.config.get_text_config()
    max_len = args.max_len or min(512, int(getattr(text_config, "max_position_embeddings", 512)))
    scheduler = SchedulerConfig(
        max_batch_size=args.max_batch_size, max_tokens_per_step=args.max_tokens_per_step, max_queue=args.max_queue,
        max_len=max_len, target_itl_s=None if args.target_itl_ms is None else args.target_itl_ms / 1e3,
        max_wait_s=args.max_wait_ms / 1e3)
    capacity = None if args.capacity_factor is None else CapacityConfig(capacity_factor=args.capacity_factor,
                                                                          policy=args.overflow_policy)
    metrics = ServingMetrics()
    stop_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    engine = Engine(model, EngineConfig(scheduler=scheduler, exact=args.exact, capacity=capacity),
                    stop_ids=stop_ids, metrics=metrics)
    name = served_name(args.model, args.served_model_name)
    app = build_app(engine, tokenizer, served_model=name, metrics=metrics)
    # Loaded once, alive for the server's lifetime: out of every later full GC pass, which would
    # otherwise walk the whole model (100+ ms) in the middle of a decode step.
    frozen = freeze_loaded_objects()
    log.info("froze %d loaded objects out of the cyclic garbage collector", frozen)
    log.info("serving %s on http://%s:%d (KV cache %.1f MiB)", name, args.host, args.port,
             engine.runner.cache.nbytes / 2**20)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
