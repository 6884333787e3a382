"""Where a GPU MoE layer's time goes at decode: torch.profiler over eager calls (host time
per op, kernel time per kernel) and over CUDA-graph replays (kernel time alone), for
activepath's triton backend and transformers' grouped_mm block, one Qwen3-30B-A3B layer
in bf16.

    python benchmarks/gpu_layer_profile.py [--tokens 1] [--out DIR]

Writes DIR/profile_T{tokens}.txt (the tables) and prints the top rows. Exits 0 without CUDA.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def _tables(prof: profile, rows: int) -> str:
    events = prof.key_averages()
    return (events.table(sort_by="self_cpu_time_total", row_limit=rows) + "\n"
            + events.table(sort_by="self_device_time_total", row_limit=rows))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to profile")
        return 0
    from activepath.bench.layer_bench import LayerBenchConfig, _build_layers
    from activepath.bench.shapes import get_shape

    shape, copies = get_shape("qwen3-30b-a3b"), 2
    config = LayerBenchConfig(tokens=(1,), impls=("activepath",), backend="triton", copies=copies)
    model, blocks, layers = _build_layers(shape, torch.bfloat16, copies, config, "cuda")
    for layer in layers:
        layer.collect_stats = False
    model.set_experts_implementation("grouped_mm")
    x = torch.randn(1, args.tokens, shape.hidden_size, device="cuda").to(torch.bfloat16)
    report = []
    with torch.inference_mode():
        for name, mods in (("activepath:triton", layers), ("hf-grouped_mm", blocks)):
            for m in mods * 3:  # warm-up: compiles, allocator
                m(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(args.calls):
                    mods[i % copies](x)
                torch.cuda.synchronize()
            report.append(f"===== eager {name} T={args.tokens}, {args.calls} calls =====\n" + _tables(prof, 30))
            graphs = []
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for m in mods:
                    m(x)
            torch.cuda.current_stream().wait_stream(side)
            for m in mods:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    m(x)
                graphs.append(g)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(args.calls):
                    graphs[i % copies].replay()
                torch.cuda.synchronize()
            events = prof.key_averages()
            report.append(f"===== graph {name} T={args.tokens}, {args.calls} replays =====\n"
                          + events.table(sort_by="self_device_time_total", row_limit=30))  # fmt: skip
    text = "\n\n".join(report)
    out = Path(args.out) / f"profile_T{args.tokens}.txt"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
