"""First speed check: one MoE layer at Qwen3-30B-A3B shapes (H 2048, I 768, 128 experts,
top-8), fp32, 2 threads, 1/8/64/512 tokens — activepath ``grouped`` vs transformers
``grouped_mm`` and ``eager``, side by side in one run of ``activepath bench layer``.

    python benchmarks/moe_layer_speed.py [--out PREFIX]

Prints the median times and activepath's ratio to the better transformers implementation
per token count, and exits non-zero if activepath is slower at any of them. Where both
run the same GEMM kernel (torch's grouped GEMM) the honest answer is a tie, so "slower"
means slower by more than ``NOISE`` (3 %), the run-to-run spread of these medians on this
machine class.
"""

from __future__ import annotations

import argparse
import json
import sys

from activepath.cli import main as activepath_main

IMPLS = ("activepath", "hf-grouped_mm", "hf-eager")
DEFAULT_OUT = "benchmarks/results/moe_layer_speed_qwen3-30b-a3b_fp32"
NOISE = 0.03


def run(out: str) -> dict:
    argv = ["bench", "layer", "--shape", "qwen3-30b-a3b", "--dtype", "float32", "--threads", "2",
            "--tokens", "1,8,64,512", "--impl", ",".join(IMPLS), "--backend", "grouped", "--out", out]
    if activepath_main(argv) != 0:
        raise SystemExit("activepath bench layer failed")
    with open(f"{out}.json") as f:
        return json.load(f)


def verdict(result: dict) -> tuple[list[str], bool]:
    """Markdown table rows and whether activepath was never slower than transformers' best."""
    median = {(r["impl"], r["tokens"]): r["timing"]["median_s"] for r in result["layer"]["rows"]}
    p95 = {(r["impl"], r["tokens"]): r["timing"]["p95_s"] for r in result["layer"]["rows"]}
    lines = ["| tokens | activepath ms (p95) | hf grouped_mm ms (p95) | hf eager ms (p95) | best hf / activepath |",
             "|---:|---:|---:|---:|---:|"]
    ok = True
    for tokens in sorted({t for _, t in median}):
        cells = [f"{median[(i, tokens)] * 1e3:.2f} ({p95[(i, tokens)] * 1e3:.2f})" for i in IMPLS]
        speedup = min(median[(i, tokens)] for i in IMPLS[1:]) / median[("activepath", tokens)]
        ok &= speedup >= 1.0 - NOISE
        lines.append(f"| {tokens} | " + " | ".join(cells) + f" | {speedup:.2f}x |")
    return lines, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output prefix for the bench JSON/Markdown")
    lines, ok = verdict(run(parser.parse_args().out))
    print("\n".join(lines))
    verdict_line = f"activepath is never slower than transformers' best (beyond {NOISE:.0%} noise)"
    print(verdict_line if ok else "activepath is SLOWER somewhere")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
