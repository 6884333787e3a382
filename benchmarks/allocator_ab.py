"""Prefill and decode with glibc malloc as it is vs tuned (``activepath.tune_allocator``),
for activepath and transformers, each configuration in its own process.

    python benchmarks/allocator_ab.py [--pairs 3] [--prefills 8] [--decode-steps 16]
                                      [--out benchmarks/results/allocator_ab_qwen3-30b-a3b_fp32]

The allocator's thresholds are process-wide and cannot be put back to glibc's adaptive
defaults once set, so every measurement is a fresh child process. Children run in rounds
(default, tuned) × (activepath, transformers), alternating, so that drift of the host hits
both settings alike. Each child builds the Qwen3-30B-A3B shape with 4 layers (vocab 32000,
fp32, random weights), runs 2 untimed prefills, then ``--prefills`` 128-token prefills on
distinct prompts (minor page faults counted around each), then ``--decode-steps`` decode
steps after the last one.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

IMPLS = ("activepath", "hf")
MODES = ("default", "tuned")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(impl: str, mode: str, prefills: int, decode_steps: int) -> dict:
    import activepath
    from activepath.bench.build import build_model
    from activepath.bench.shapes import get_shape, hf_config

    torch.set_num_threads(2)
    state = activepath.tune_allocator() if mode == "tuned" else None
    model = build_model(hf_config(get_shape("qwen3-30b-a3b"), layers=4, vocab=32000))
    if impl == "activepath":
        activepath.optimize(model)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 32000, (1, 128), generator=gen) for _ in range(prefills + 2)]
    prefill_s, prefill_faults = [], []
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            f0, t0 = _faults(), time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            if i >= 2:  # the first two fill the heap and the caches
                prefill_s.append(time.perf_counter() - t0)
                prefill_faults.append(_faults() - f0)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s, f0 = [], _faults()
        for step in range(decode_steps):
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True, cache_position=torch.tensor([128 + step]))
            token = out.logits[:, -1:].argmax(-1)
            decode_s.append(time.perf_counter() - t0)
    return {"impl": impl, "mode": mode, "allocator": None if state is None else state.describe(),
            "prefill_s": prefill_s, "prefill_faults": prefill_faults, "decode_s": decode_s,
            "decode_faults": _faults() - f0}


def _run_child(impl: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, mode, "--prefills", str(args.prefills),
           "--decode-steps", str(args.decode_steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> list[dict]:
    rows = []
    for impl in IMPLS:
        for mode in MODES:
            mine = [r for r in runs if r["impl"] == impl and r["mode"] == mode]
            if not mine:
                continue
            prefill = [s for r in mine for s in r["prefill_s"]]
            decode = [s for r in mine for s in r["decode_s"]]
            rows.append({
                "impl": impl, "mode": mode, "processes": len(mine),
                "prefill_median_ms_by_process": [statistics.median(r["prefill_s"]) * 1e3 for r in mine],
                "prefill_median_ms": statistics.median(prefill) * 1e3,
                "prefill_faults_median_by_process": [statistics.median(r["prefill_faults"]) for r in mine],
                "prefill_faults_max": max(f for r in mine for f in r["prefill_faults"]),
                "decode_median_ms": statistics.median(decode) * 1e3,
                "decode_faults_per_process": [r["decode_faults"] for r in mine],
            })  # fmt: skip
    return rows


def markdown(command: str, rows: list[dict]) -> str:
    lines = ["# glibc malloc as it is vs tuned (`activepath.tune_allocator`)", "", f"`{command}`", "",
             "| impl | malloc | processes | prefill 128 median ms (per process) | faults per prefill, median per "
             "process (max) | decode median ms | faults in the decode steps, per process |",
             "|---|---|---:|---|---|---:|---|"]
    for r in rows:
        per = " / ".join(f"{v:.1f}" for v in r["prefill_median_ms_by_process"])
        faults = " / ".join(f"{v:.0f}" for v in r["prefill_faults_median_by_process"])
        lines.append(f"| {r['impl']} | {r['mode']} | {r['processes']} | **{r['prefill_median_ms']:.1f}** ({per}) | "
                     f"{faults} ({r['prefill_faults_max']}) | {r['decode_median_ms']:.2f} | "
                     f"{' / '.join(str(v) for v in r['decode_faults_per_process'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/allocator_ab.py")
    p.add_argument("--pairs", type=int, default=3, help="rounds of (default, tuned) per impl")
    p.add_argument("--prefills", type=int, default=8, help="timed prefills per process")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--out", help="write OUT.json and OUT.md")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.pairs, args.prefills, args.decode_steps) < 1:
        raise SystemExit("--pairs, --prefills and --decode-steps must be at least 1")
    if args.child:
        impl, mode = args.child
        print(json.dumps(child(impl, mode, args.prefills, args.decode_steps)))
        return 0
    runs = []
    for round_ in range(args.pairs):
        for impl in IMPLS:
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                runs.append(_run_child(impl, mode, args))
                print(f"round {round_ + 1}: {impl} {mode} prefill median "
                      f"{statistics.median(runs[-1]['prefill_s']) * 1e3:.1f} ms", file=sys.stderr, flush=True)
    command = "python benchmarks/allocator_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = summary(runs)
    text = markdown(command.strip(), rows)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        from activepath.bench.machine import cpu_model, versions

        doc = {"command": command, "cpu": cpu_model(), "versions": versions(), "rows": rows, "runs": runs}
        Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
