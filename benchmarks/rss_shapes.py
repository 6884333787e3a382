"""Resident memory of the serving runner under varied step shapes (issue 14, item 10).

Each variant runs in its own process (the oneDNN cache variables are read once per process)
on the embedded tiny model: a serving-like step mix through ``ModelRunner`` — a prefill of
a random length 1..``--max-prompt`` into a slot beside the other slots' decodes, then three
decode steps — and prints the process's RSS (/proc/self/status) every ``--every`` steps.
Variants swap one piece at a time: dtype, fixed vs varied prompt lengths, plain transformers
forwards, the attention bucket, the oneDNN cache capacities, mkldnn off, malloc_trim,
MALLOC_ARENA_MAX.

    PYTHONPATH=src python benchmarks/rss_shapes.py --steps 600 --out benchmarks/results/rss_shapes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

# name → (environment, options for the child); "before" = attention bucket 1, default caches
CAPS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}
VARIANTS = {
    "bf16 before (exact attention lengths, default oneDNN caches)": ({}, ["--bucket", "1"]),
    "fp32 before": ({}, ["--bucket", "1", "--dtype", "float32"]),
    "bf16 before, one prompt length": ({}, ["--bucket", "1", "--fixed"]),
    "bf16 plain transformers forward (no activepath)": ({}, ["--plain"]),
    "bf16 before, mkldnn disabled": ({}, ["--bucket", "1", "--no-mkldnn"]),
    "bf16 before, malloc_trim at each sample": ({}, ["--bucket", "1", "--trim"]),
    "bf16 before, MALLOC_ARENA_MAX=1": ({"MALLOC_ARENA_MAX": "1"}, ["--bucket", "1"]),
    "bf16 attention bucket 64 only": ({}, ["--bucket", "64"]),
    "bf16 oneDNN caches 64 only": (CAPS, ["--bucket", "1"]),
    "bf16 after (bucket 64 + caches 64)": (CAPS, ["--bucket", "64"]),
    "bf16 after, caches 256": ({k: "256" for k in CAPS}, ["--bucket", "64"]),
}


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    import ctypes

    import torch

    from activepath.runtime.process import tune_allocator

    tune_allocator()  # as `activepath serve` runs
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    torch.set_num_threads(2)
    step = _plain_step(args) if args.plain else _runner_step(args)
    trim = ctypes.CDLL(None).malloc_trim if args.trim else None
    rng, start = random.Random(0), time.perf_counter()
    for i in range(args.steps + 1):
        if i % args.every == 0:
            if trim is not None:
                trim(0)
            print(json.dumps({"step": i, "rss_mib": round(rss_mib(), 1),
                              "elapsed_s": round(time.perf_counter() - start, 2)}), flush=True)
        if i < args.steps:
            step(i, 100 if args.fixed else rng.randint(1, args.max_prompt))


def _plain_step(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM

    from activepath.models import embedded_path

    model = AutoModelForCausalLM.from_pretrained(embedded_path("tiny"), dtype=getattr(torch, args.dtype)).eval()

    def step(i: int, length: int) -> None:
        with torch.inference_mode():
            model(input_ids=torch.randint(1, 8000, (1, length)))
    return step


def _runner_step(args: argparse.Namespace):
    import torch

    from activepath import load
    from activepath.models import embedded_path
    from activepath.serving.runner import ModelRunner, RunnerConfig
    from activepath.serving.scheduler import DecodeItem, PrefillItem, StepPlan

    slots = 8
    runner = ModelRunner(load(embedded_path("tiny"), dtype=args.dtype),
                         RunnerConfig(max_slots=slots, max_len=512, attention_bucket=args.bucket))
    positions: dict[int, int] = {}  # slot → next position
    gen = torch.Generator().manual_seed(0)

    def decodes() -> tuple[DecodeItem, ...]:
        return tuple(DecodeItem(str(s), s, 7, p) for s, p in sorted(positions.items()))

    def step(i: int, length: int) -> None:
        slot = i % slots
        positions.pop(slot, None)
        prompt = tuple(torch.randint(1, 8000, (length,), generator=gen).tolist())
        runner.execute(StepPlan((), (PrefillItem("p", slot, prompt),), decodes()))
        positions[slot] = length
        for _ in range(3):
            runner.execute(StepPlan((), (), decodes()))
            positions.update({s: p + 1 for s, p in positions.items()})
    return step


def run_variant(name: str, args: argparse.Namespace) -> dict:
    env_extra, options = VARIANTS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    env.update(env_extra)
    command = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--every", str(args.every),
               "--max-prompt", str(args.max_prompt), *options]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    samples = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    warm = next(s for s in samples if s["step"] >= args.steps // 3)
    last = samples[-1]
    return {"name": name, "env": env_extra, "options": options, "samples": samples,
            "rss_start_mib": samples[0]["rss_mib"], "rss_warm_mib": warm["rss_mib"], "rss_end_mib": last["rss_mib"],
            "growth_after_warmup_pct": round(100 * (last["rss_mib"] / warm["rss_mib"] - 1), 1),
            "ms_per_step": round(1e3 * last["elapsed_s"] / args.steps, 1)}


def render(doc: dict) -> str:
    lines = [f"# RSS under varied step shapes, tiny model ({doc['steps']} prefill steps + 3 decode steps each)", "",
             f"Command: `{doc['command']}`", "", "Warm-up = the first third of the steps.", "",
             "| variant | RSS start | after warm-up | end | growth after warm-up | ms / prefill step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for v in doc["variants"]:
        lines.append(f"| {v['name']} | {v['rss_start_mib']:.0f} | {v['rss_warm_mib']:.0f} | {v['rss_end_mib']:.0f} "
                     f"| {v['growth_after_warmup_pct']:+.1f} % | {v['ms_per_step']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    for v in doc["variants"]:
        ax.plot([s["step"] for s in v["samples"]], [s["rss_mib"] for s in v["samples"]], label=v["name"])
    ax.axvline(doc["steps"] // 3, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("prefill steps (each + 3 decode steps)")
    ax.set_ylabel("RSS (MiB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--max-prompt", type=int, default=384)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--bucket", type=int, default=64)
    p.add_argument("--fixed", action="store_true")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--no-mkldnn", action="store_true")
    p.add_argument("--trim", action="store_true")
    p.add_argument("--variants", nargs="*", help="substrings of variant names to run (default all)")
    p.add_argument("--out", help="write OUT.json, OUT.md and OUT.png")
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    names = [n for n in VARIANTS if not args.variants or any(s in n for s in args.variants)]
    doc = {"command": "python " + " ".join(sys.argv), "steps": args.steps, "variants": []}
    for name in names:
        doc["variants"].append(run_variant(name, args))
        v = doc["variants"][-1]
        print(f"{name}: {v['rss_start_mib']:.0f} → {v['rss_warm_mib']:.0f} → {v['rss_end_mib']:.0f} MiB "
              f"({v['growth_after_warmup_pct']:+.1f} % after warm-up), {v['ms_per_step']} ms/step", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps(doc, indent=1) + "\n")
        Path(f"{out}.md").write_text(render(doc))
        plot(doc, Path(f"{out}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
