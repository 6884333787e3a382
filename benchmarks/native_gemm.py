"""The native GEMM kernels (dot-product tiles, and the panel kernel for many rows) vs torch
(BLAS) on MoE expert shapes, against the memory and compute rooflines measured in the same run.

    python benchmarks/native_gemm.py [--experts 64] [--rows 1,2,4,8,16,32,64,128,256,512] [--repeats 7]
                                     [--out benchmarks/results/native_gemm_qwen3-30b-a3b_fp32]

Shapes: Qwen3-30B-A3B experts, gate/up [1536, 2048] and down [2048, 768], fp32, ``--experts``
distinct matrices per call (64 × 18 MiB = 1.1 GiB ≫ the 32 MiB L3, so every call streams
weights from DRAM). M rows per expert. torch runs one ``F.linear`` per expert (what a loop over
active experts does); native (dot) and panel run all experts in one grouped call each (the
panel kernel takes a segment's full 16-row panels, its other rows go to the dot kernel). Rooflines: a 1 GiB
``copy_`` (read + write counted) and a 1 GiB read-only ``sum``, and a 4096³ fp32 matmul.
Median and p95 over ``--repeats`` calls, the order of implementations alternating.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from activepath.kernels import cpu as native

SHAPES = {"gate_up": (1536, 2048), "down": (2048, 768)}


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def rooflines(repeats: int) -> dict[str, float]:
    src, dst = torch.ones(1 << 28), torch.empty(1 << 28)
    copy = min(timed(lambda: dst.copy_(src), repeats))
    read = min(timed(lambda: src.sum(), repeats))
    a = torch.randn(4096, 4096)
    gemm = min(timed(lambda: a @ a, 3))
    return {"copy_GBps": 2 * src.numel() * 4 / copy / 1e9, "read_GBps": src.numel() * 4 / read / 1e9,
            "gemm_GFLOPs": 2 * 4096**3 / gemm / 1e9}  # fmt: skip


def measure(experts: int, rows: list[int], repeats: int) -> list[dict]:
    out = []
    for name, (n, k) in SHAPES.items():
        w_ENK = torch.randn(experts, n, k)
        for m in rows:
            x_MK = torch.randn(experts * m, k)
            y_MN = torch.empty(experts * m, n)
            segments = [(e, e * m, (e + 1) * m) for e in range(experts)]

            def ours() -> None:
                native.grouped_nk_gemm(x_MK, w_ENK, segments, y_MN)

            def panel() -> None:
                native.grouped_nk_gemm_panel(x_MK, w_ENK, segments, y_MN)

            def blas() -> None:
                for e in range(experts):
                    torch.mm(x_MK[e * m : (e + 1) * m], w_ENK[e].t(), out=y_MN[e * m : (e + 1) * m])

            samples: dict[str, list[float]] = {"native": [], "panel": [], "torch": []}
            for _ in range(repeats):  # alternate, so drift in the machine hits all alike
                samples["native"] += timed(ours, 1)
                samples["panel"] += timed(panel, 1)
                samples["torch"] += timed(blas, 1)
            for impl, times in samples.items():
                median = statistics.median(times)
                p95 = sorted(times)[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
                out.append({"matrix": name, "rows_per_expert": m, "impl": impl, "median_s": median, "p95_s": p95,
                            "GBps": w_ENK.numel() * 4 / median / 1e9,
                            "GFLOPs": 2 * m * w_ENK.numel() / median / 1e9})  # fmt: skip
            print(f"{name} M={m}: " + ", ".join(f"{r['impl']} {r['GBps']:.1f} GB/s {r['GFLOPs']:.0f} GFLOP/s"
                                                 for r in out[-3:]), flush=True)  # fmt: skip
    return out


def markdown(command: str, roof: dict, rows: list[dict], experts: int) -> str:
    lines = ["# Native small-batch GEMM vs torch (BLAS), Qwen3-30B-A3B expert shapes, fp32", "",
             "Produced by:", "", "```", command, "```", "",
             f"- {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; {experts} experts per call",
             f"- roofline measured in this run: copy {roof['copy_GBps']:.1f} GB/s (read + write), "
             f"read-only {roof['read_GBps']:.1f} GB/s, fp32 GEMM {roof['gemm_GFLOPs']:.1f} GFLOP/s", "",
             "| matrix | rows/expert | native (dot) ms (p95) | panel ms (p95) | torch ms (p95) | dot GB/s "
             "| panel GB/s | torch GB/s | dot GFLOP/s | panel GFLOP/s | torch GFLOP/s | dot / torch speed "
             "| panel / torch speed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    by_key = {(r["matrix"], r["rows_per_expert"], r["impl"]): r for r in rows}
    for matrix, m in dict.fromkeys((r["matrix"], r["rows_per_expert"]) for r in rows):
        a, p, b = (by_key[(matrix, m, impl)] for impl in ("native", "panel", "torch"))
        lines.append(f"| {matrix} | {m} | " + " | ".join(f"{r['median_s'] * 1e3:.2f} ({r['p95_s'] * 1e3:.2f})"
                                                         for r in (a, p, b))
                     + " | " + " | ".join(f"{r['GBps']:.1f}" for r in (a, p, b))
                     + " | " + " | ".join(f"{r['GFLOPs']:.0f}" for r in (a, p, b))
                     + f" | {b['median_s'] / a['median_s']:.2f}x | {b['median_s'] / p['median_s']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,512")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/native_gemm_qwen3-30b-a3b_fp32")
    args = parser.parse_args()
    if not native.available():
        print(f"native kernels unavailable: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    torch.set_grad_enabled(False)
    roof_before = rooflines(3)
    rows = measure(args.experts, [int(r) for r in args.rows.split(",")], args.repeats)
    roof_after = rooflines(3)
    roof = {key: max(roof_before[key], roof_after[key]) for key in roof_before}
    command = "python " + " ".join(sys.argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"command": command, "roofline_before": roof_before,
                                                    "roofline_after": roof_after, "rows": rows}, indent=1))  # fmt: skip
    Path(f"{args.out}.md").write_text(markdown(command, roof, rows, args.experts))
    print(f"wrote {args.out}.json, {args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
