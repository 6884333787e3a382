"""The throughput check of the serving issue: the same N requests (greedy, exactly
``max_tokens`` new tokens each) run one at a time through transformers ``generate``, then
all at once through the engine (in process, no HTTP), and through transformers' own
continuous batching (``generate_batch``) for comparison. Writes JSON + Markdown.

    python -m activepath.serving.throughput --model tiny --streams 16 --max-tokens 64 \
        --out benchmarks/results/serving_throughput
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from activepath.runtime.process import MALLOC_CHOICES, apply_malloc_option
from activepath.serving.loadtest import PROMPTS

log = logging.getLogger(__name__)


def _prompts(tokenizer: Any, streams: int) -> list[list[int]]:
    return [tokenizer(PROMPTS[i % len(PROMPTS)], add_special_tokens=False)["input_ids"] for i in range(streams)]


def sequential_generate(model: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds to run every prompt alone through ``model.generate``, and the new tokens."""
    outputs = []
    start = time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False)
            outputs.append(out[0, len(ids):].tolist())
    return time.perf_counter() - start, outputs


def engine_concurrent(model: Any, prompts: list[list[int]], max_tokens: int, *, exact: bool,
                      max_len: int) -> tuple[float, list[list[int]]]:
    """Seconds for the engine to finish all prompts submitted at once (one slot each)."""
    from activepath.serving.engine import Engine, EngineConfig
    from activepath.serving.scheduler import SchedulerConfig

    config = EngineConfig(scheduler=SchedulerConfig(max_batch_size=len(prompts), max_len=max_len), exact=exact)
    engine = Engine(model, config).start()
    try:
        engine.generate(prompts[0], 4)  # warm-up
        results: list[list[int]] = [[] for _ in prompts]
        start = time.perf_counter()
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.generate(prompts[i], max_tokens)))
                   for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start, results
    finally:
        engine.stop()


def transformers_continuous(model: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, str | None]:
    """transformers' ``generate_batch`` on the plain model; (seconds, error or None)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    # sized like our engine's cache (the default sizes it from free accelerator memory)
    cb = ContinuousBatchingConfig(num_blocks=2 * len(prompts), max_batch_tokens=1024,
                                  max_requests_per_batch=len(prompts))
    try:
        model.generate_batch(inputs=prompts[:2], generation_config=gen, continuous_batching_config=cb)  # warm-up
        start = time.perf_counter()
        model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=cb)
        return time.perf_counter() - start, None
    except Exception as exc:  # report, do not fail the whole benchmark
        return float("nan"), f"{type(exc).__name__}: {exc}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from activepath.bench.machine import cpu_model, versions
    from activepath.api import load
    from activepath.models import embedded_path

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    directory = embedded_path(args.model) or Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = _prompts(tokenizer, args.streams)
    max_len = max(len(p) for p in prompts) + args.max_tokens + 1
    plain = AutoModelForCausalLM.from_pretrained(directory, experts_implementation="eager").eval()
    plain.generation_config.eos_token_id = None
    ours = load(directory, backend=args.backend)
    ours.generation_config.eos_token_id = None
    sequential_generate(plain, prompts[:1], 4)  # warm-up
    rows: dict[str, Any] = {}
    seconds, hf_tokens = sequential_generate(plain, prompts, args.max_tokens)
    rows["transformers generate, one at a time"] = seconds
    seconds, ap_seq_tokens = sequential_generate(ours, prompts, args.max_tokens)
    rows["activepath model, generate one at a time"] = seconds
    seconds, engine_tokens = engine_concurrent(ours, prompts, args.max_tokens, exact=args.exact, max_len=max_len)
    rows[f"activepath engine, {args.streams} concurrent"] = seconds
    cb_seconds, cb_error = transformers_continuous(plain, prompts, args.max_tokens)
    rows[f"transformers generate_batch (continuous batching), {args.streams} at once"] = cb_seconds
    total = args.streams * args.max_tokens
    baseline = rows["transformers generate, one at a time"]
    return {
        "command": "python -m activepath.serving.throughput " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "environment": {**versions(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
                        "allocator": _allocator(args)},
        "model": str(args.model), "streams": args.streams, "max_tokens": args.max_tokens, "exact": args.exact,
        "tokens": total,
        "rows": [{"what": k, "seconds": v, "tokens_per_s": total / v, "speedup_vs_generate": baseline / v}
                 for k, v in rows.items()],
        "engine_tokens_equal_generate": engine_tokens == hf_tokens,
        "engine_requests_equal_generate": sum(a == b for a, b in zip(engine_tokens, hf_tokens)),
        "engine_first_divergence": [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                    for a, b in zip(engine_tokens, hf_tokens)],
        "activepath_generate_equal_generate": ap_seq_tokens == hf_tokens,
        "transformers_continuous_error": cb_error,
    }


def render_markdown(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    lines = [f"# Serving throughput: {doc['streams']} streams × {doc['max_tokens']} tokens, model {doc['model']}", "",
             f"Command: `{doc['command']}`", "",
             f"CPU: {env['cpu']}, torch threads {env['threads']}; torch {env['torch']}, "
             f"transformers {env['transformers']}, activepath {env.get('activepath_git', env['activepath'])}", "",
             "| run | seconds | tokens/s | × generate one at a time |", "| --- | --- | --- | --- |"]
    for row in doc["rows"]:
        lines.append(f"| {row['what']} | {row['seconds']:.2f} | {row['tokens_per_s']:.1f} | "
                     f"{row['speedup_vs_generate']:.2f} |")
    lines += ["", f"Engine tokens identical to transformers generate: **{doc['engine_tokens_equal_generate']}** "
                  f"({doc['engine_requests_equal_generate']}/{doc['streams']} requests identical; first differing "
                  f"token index per request: {doc['engine_first_divergence']})"]
    if doc["transformers_continuous_error"]:
        lines += ["", f"transformers generate_batch failed: `{doc['transformers_continuous_error']}`"]
    return "\n".join(lines) + "\n"


def _allocator(args: argparse.Namespace) -> str:
    state = getattr(args, "allocator", None)  # set by main(); absent when run() is called directly
    return "unknown (run() called directly)" if state is None else state.describe()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m activepath.serving.throughput")
    p.add_argument("--model", default="tiny")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--backend", default="grouped")
    p.add_argument("--exact", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="write OUT.json and OUT.md")
    p.add_argument("--malloc", choices=MALLOC_CHOICES, default="tuned",
                   help="as the activepath command's --malloc (both implementations run under it)")
    args = p.parse_args(argv)
    args.allocator = apply_malloc_option(args.malloc)
    logging.basicConfig(level=logging.WARNING)
    doc = run(args)
    markdown = render_markdown(doc)
    print(markdown)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(doc, indent=2) + "\n")
        Path(f"{args.out}.md").write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
