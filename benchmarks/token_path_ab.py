"""Decode at batch 1 with SparseMoE's one-token path on and off, alternating in one process.

    python benchmarks/token_path_ab.py [--rounds 6] [--new 32]
                                       [--out benchmarks/results/token_path_ab_qwen3-30b-a3b_fp32]

The host's memory bandwidth changes between processes (decode medians of 31 vs 40 ms with
the same code, benchmarks/results/issue6_performance.md), so both settings run in the same
process: each round runs one greedy generation per setting on the round's prompt, and the
order alternates between rounds. Model: the Qwen3-30B-A3B shape with 4 layers (vocab 32000,
fp32, random weights), ``activepath.optimize`` (``--expert-dtype``/``--dense-dtype`` as its
``expert_dtype``/``dense_dtype``); the C allocator tuned and the loaded
objects frozen out of the GC, as the ``activepath`` command does. Reports the median and
p95 decode step per setting, the per-round medians, and whether the tokens agreed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import activepath
from activepath.bench.build import build_model
from activepath.bench.machine import cpu_model, versions
from activepath.bench.shapes import get_shape, hf_config
from activepath.bench.timing import summarize


def generate(model: torch.nn.Module, prompt_1P: torch.Tensor, new: int) -> tuple[list[int], list[float]]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = model(input_ids=prompt_1P, cache=cache, use_cache=True, logits_to_keep=1).logits
    next_11 = logits[:, -1].argmax(-1, keepdim=True)
    tokens, steps = [int(next_11)], []
    for _ in range(new - 1):
        start = time.perf_counter()
        logits = model(input_ids=next_11, cache=cache, use_cache=True).logits
        next_11 = logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - start)
        tokens.append(int(next_11))
    return tokens, steps


def parse_ab_args(p: argparse.ArgumentParser, argv: list[str] | None, *, rounds: int) -> argparse.Namespace:
    """The options every in-process decode A/B here takes, added to ``p``, then parsed and checked."""
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--new", type=int, default=32, help="tokens per generation (1 from prefill + decode steps)")
    p.add_argument("--expert-dtype", choices=("native", "int8"), default="native")
    p.add_argument("--dense-dtype", choices=("native", "int8"), default="native")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.new < 2:
        raise SystemExit("--rounds must be >= 1 and --new >= 2")
    return args


def ab_process(args: argparse.Namespace) -> tuple[activepath.AllocatorState, torch.nn.Module]:
    """2 threads, the C allocator tuned, and the Qwen3-30B-A3B x 4 layers model (random
    weights) optimized with ``args``' dtypes: (the allocator's state, the model)."""
    torch.set_num_threads(2)
    allocator = activepath.tune_allocator()
    model = activepath.optimize(build_model(hf_config(get_shape("qwen3-30b-a3b"), layers=4, vocab=32000)),
                                expert_dtype=args.expert_dtype, dense_dtype=args.dense_dtype)
    return allocator, model


def main(argv: list[str] | None = None) -> int:
    args = parse_ab_args(argparse.ArgumentParser(prog="python benchmarks/token_path_ab.py"), argv, rounds=6)
    allocator, model = ab_process(args)
    layers = [layer for _, layer in activepath.moe_layers(model)]
    activepath.freeze_loaded_objects()
    gen = torch.Generator().manual_seed(0)
    steps: dict[str, list[float]] = {"on": [], "off": []}
    by_round: dict[str, list[float]] = {"on": [], "off": []}
    agree = []
    with torch.inference_mode():
        generate(model, torch.randint(0, 32000, (1, 128), generator=gen), 4)  # warm-up
        for r in range(args.rounds):
            prompt_1P = torch.randint(0, 32000, (1, 128), generator=gen)
            tokens = {}
            for setting in ("on", "off") if r % 2 == 0 else ("off", "on"):
                for layer in layers:
                    layer.token_fast_path = setting == "on"
                tokens[setting], s = generate(model, prompt_1P, args.new)
                steps[setting] += s
                by_round[setting].append(statistics.median(s))
            agree.append(tokens["on"] == tokens["off"])
            print(f"round {r + 1}: on {by_round['on'][-1] * 1e3:.2f} ms, off {by_round['off'][-1] * 1e3:.2f} ms",
                  file=sys.stderr, flush=True)
    command = "python benchmarks/token_path_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {k: summarize(v) for k, v in steps.items()}
    lines = ["# SparseMoE's one-token path on vs off (decode, batch 1, one process)", "", f"`{command.strip()}`", "",
             f"experts {args.expert_dtype}, dense projections {args.dense_dtype}", "",
             f"{cpu_model()}, torch threads 2, {allocator.describe()}; versions: "
             + ", ".join(f"{k} {v}" for k, v in versions().items()), "",
             "| token_fast_path | decode steps | median ms | p95 ms | per-round medians ms |", "|---|---:|---:|---:|---|"]
    for k in ("on", "off"):
        rounds = " / ".join(f"{v * 1e3:.2f}" for v in by_round[k])
        median_ms, p95_ms = summary[k].median_s * 1e3, summary[k].p95_s * 1e3
        lines.append(f"| {k} | {summary[k].n} | **{median_ms:.2f}** | {p95_ms:.2f} | {rounds} |")
    wins = sum(a < b for a, b in zip(by_round["on"], by_round["off"]))
    lines += ["", f"Per round, on was faster in {wins} of {args.rounds}. "
              f"Median ratio off/on: {summary['off'].median_s / summary['on'].median_s:.3f}. "
              f"Same tokens in every round: **{all(agree)}**."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        doc = {"command": command.strip(), "cpu": cpu_model(), "versions": versions(),
               "allocator": allocator.describe(), "steps_s": steps, "round_medians_s": by_round, "same_tokens": agree}
        Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
