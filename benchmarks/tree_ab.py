"""Prefill and decode with an earlier revision's whole package vs this tree's, alternating in
one process: the check that a refactor changed nothing measurable.

    python benchmarks/tree_ab.py --base REV [--rounds 6] [--new 32] [--prompt 128]
                                 [--out benchmarks/results/tree_ab_qwen3-30b-a3b_fp32]

The host's memory bandwidth drifts between processes (and within minutes), so both trees run
in the same process. ``git archive REV src`` is unpacked into a temporary directory and
imported as ``activepath`` first; its modules are then dropped from ``sys.modules`` and this
tree's package is imported. Each package optimizes its own structural copy of ONE
transformers model (the Qwen3-30B-A3B shape, 4 layers, vocab 32000, fp32, random weights):
the copies share every weight tensor, so the same bytes are read and memory holds one model.
Each round runs, per tree, a prefill of the round's prompt and a greedy generation; the
order alternates between rounds. Reports medians and p95 per tree, per-round ratios, and
whether the tokens agreed.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_tree(src: Path) -> ModuleType:
    """Import the ``activepath`` package found under ``src``, replacing any loaded one."""
    for name in [m for m in sys.modules if m == "activepath" or m.startswith("activepath.")]:
        del sys.modules[name]
    sys.path.insert(0, str(src))
    try:
        module = importlib.import_module("activepath")
    finally:
        sys.path.remove(str(src))
    assert Path(module.__file__).resolve().is_relative_to(src.resolve()), module.__file__
    return module


def export_revision(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def structural_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers ARE the original's tensors."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def timed_generation(model: torch.nn.Module, prompt_1P: torch.Tensor, new: int) -> tuple[float, list[float], list[int]]:
    """(prefill seconds, decode step seconds, tokens) of a greedy generation."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    logits = model(input_ids=prompt_1P, cache=cache, use_cache=True, logits_to_keep=1).logits
    prefill_s = time.perf_counter() - start
    next_11 = logits[:, -1].argmax(-1, keepdim=True)
    tokens, steps = [int(next_11)], []
    for _ in range(new - 1):
        start = time.perf_counter()
        logits = model(input_ids=next_11, cache=cache, use_cache=True).logits
        next_11 = logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - start)
        tokens.append(int(next_11))
    return prefill_s, steps, tokens


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/tree_ab.py")
    p.add_argument("--base", required=True, help="git revision whose package is the baseline")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--new", type=int, default=32, help="tokens per generation (1 from prefill + decode steps)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (the prefill measured)")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.new < 2 or args.prompt < 1:
        raise SystemExit("--rounds and --prompt must be >= 1 and --new >= 2")
    return args


def load_trees(base: str, tmp: Path) -> tuple[dict[str, torch.nn.Module], ModuleType]:
    """{"base": model, "this": model}, each optimized by its own tree; and this tree's package.

    The base tree optimizes while it is the imported ``activepath`` (a lazy relative import
    inside it resolves through ``sys.modules``), then this tree is imported for its copy."""
    torch.set_num_threads(2)
    base_pkg = import_tree(export_revision(base, tmp))
    build = importlib.import_module("activepath.bench.build")
    shapes = importlib.import_module("activepath.bench.shapes")
    base_pkg.tune_allocator()
    hf_model = build.build_model(shapes.hf_config(shapes.get_shape("qwen3-30b-a3b"), layers=4, vocab=32000))
    twin = structural_copy(hf_model)
    models = {"base": base_pkg.optimize(hf_model)}
    this_pkg = import_tree(ROOT / "src")
    models["this"] = this_pkg.optimize(twin)
    this_pkg.freeze_loaded_objects()
    return models, this_pkg


def run_rounds(models: dict[str, torch.nn.Module], args: argparse.Namespace) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    prefill: dict[str, list[float]] = {"base": [], "this": []}
    steps: dict[str, list[float]] = {"base": [], "this": []}
    decode_by_round: dict[str, list[float]] = {"base": [], "this": []}
    agree = []
    with torch.inference_mode():
        for name in models:  # warm-up: build the native libraries, fault the workspaces in
            timed_generation(models[name], torch.randint(0, 32000, (1, args.prompt), generator=gen), 4)
        for r in range(args.rounds):
            prompt_1P = torch.randint(0, 32000, (1, args.prompt), generator=gen)
            tokens = {}
            for name in ("base", "this") if r % 2 == 0 else ("this", "base"):
                p_s, s, tokens[name] = timed_generation(models[name], prompt_1P, args.new)
                prefill[name].append(p_s)
                steps[name] += s
                decode_by_round[name].append(statistics.median(s))
            agree.append(tokens["base"] == tokens["this"])
            print(f"round {r + 1}: decode base {decode_by_round['base'][-1] * 1e3:.2f} ms, this "
                  f"{decode_by_round['this'][-1] * 1e3:.2f} ms; prefill base {prefill['base'][-1] * 1e3:.1f} ms, "
                  f"this {prefill['this'][-1] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return {"prefill_s": prefill, "steps_s": steps, "decode_round_medians_s": decode_by_round, "same_tokens": agree}


def report(args: argparse.Namespace, result: dict, command: str, pkg: ModuleType) -> str:
    from activepath.bench.machine import cpu_model, versions
    from activepath.bench.timing import summarize

    lines = [f"# Whole package: {args.base} vs this tree (one process, alternating)", "", f"`{command}`", "",
             f"{cpu_model()}, torch threads 2; Qwen3-30B-A3B shape x 4 layers, vocab 32000, fp32, batch 1, "
             f"prompt {args.prompt}; versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), "",
             "| tree | prefill median ms | prefill p95 ms | decode steps | decode median ms | decode p95 ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ("base", "this"):
        pre, dec = summarize(result["prefill_s"][name]), summarize(result["steps_s"][name])
        lines.append(f"| {name} | {pre.median_s * 1e3:.1f} | {pre.p95_s * 1e3:.1f} | {dec.n} | "
                     f"**{dec.median_s * 1e3:.2f}** | {dec.p95_s * 1e3:.2f} |")
    pre = {n: statistics.median(result["prefill_s"][n]) for n in ("base", "this")}
    dec = {n: statistics.median(result["steps_s"][n]) for n in ("base", "this")}
    rounds = result["decode_round_medians_s"]
    wins = sum(t < b for t, b in zip(rounds["this"], rounds["base"], strict=True))
    lines += ["", f"Median ratio this/base: decode **{dec['this'] / dec['base']:.3f}**, prefill "
              f"**{pre['this'] / pre['base']:.3f}**. This tree's decode was faster in {wins} of {args.rounds} rounds. "
              f"Same tokens in every round: **{all(result['same_tokens'])}**."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/tree_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        models, pkg = load_trees(args.base, Path(tmp))
        result = run_rounds(models, args)
        text = report(args, result, command.strip(), pkg)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps({"command": command.strip(), "base": args.base, **result},
                                                       indent=1) + "\n")
        Path(f"{args.out}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
