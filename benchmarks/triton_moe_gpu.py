"""The device check of the ``triton`` experts backend: one short script for a lent GPU.

    python benchmarks/triton_moe_gpu.py [--out benchmarks/results/qwen3-30b-a3b_layer_h200_bf16]
                                        [--tokens 1,8,64,512,4096] [--iters 20] [--no-sweep]

1. Correctness of the *compiled* kernels (CI only runs them in Triton's CPU interpreter):
   the backend on CUDA tensors against the float64 oracle of tests/oracle.py, fp32 and bf16,
   at 1, 13 and 300 tokens, every gated activation, with and without biases, one expert
   taking every token; the one-launch dispatch plan against torch's stable sort (1-4096
   tokens); two tiny transformers models against their eager experts.
2. Speed: ``activepath bench layer`` on one Qwen3-30B-A3B MoE layer (H 2048, I 768, 128
   experts, top-8) in bf16. It runs ``activepath:triton`` against ``activepath:grouped``
   (torch's grouped GEMM on CUDA) and transformers' ``grouped_mm``, in one run. The HBM
   bandwidth and the bf16 GEMM rate are measured in the same run, so the report gives % of
   the HBM roofline at decode and % of the measured GEMM rate at prefill.
3. A tile sweep of the backend alone (block sizes, warps) at 1-4096 tokens, to pick the
   defaults from measurements: PREFIX_tiles.json. Each configuration is timed per call and
   replayed from CUDA graphs (the kernels without the host's launch costs).
4. Whole layers (router, dispatch, experts, combine) of the three implementations, per call
   back to back and replayed from CUDA graphs: PREFIX_graphs.json.

Each part runs even when an earlier one failed (the traceback is printed), so one run of
the lease returns everything that works. Results of the H200 runs: benchmarks/results/
qwen3-30b-a3b_layer_h200_bf16*.

Without a CUDA device it says so and exits 0. TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "benchmarks/results/qwen3-30b-a3b_layer_gpu_bf16"  # one file set per card


def check_correctness() -> list[str]:
    """Failures as readable lines (empty: every case within its dtype's tolerance)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from families import tiny_model
    from oracle import moe_oracle

    import activepath
    from activepath import ActivationConfig, ExpertWeights, plan_dispatch
    from activepath.backends import triton as triton_moe
    from activepath.tolerances import MODEL_LOGITS_ATOL_FP32, tolerance

    failures: list[str] = []
    gen = torch.Generator().manual_seed(0)
    num_experts, hidden, inter = 8, 256, 192
    for dtype in (torch.float32, torch.bfloat16):
        for act in ("silu", "gelu", "gelu_tanh", "clamped_swiglu"):  # the last in GPT-OSS's layout
            gpt_oss = act == "clamped_swiglu"
            for tokens, top_k, biases, one_expert in ((1, 2, False, False), (13, 3, True, False),
                                                      (300, 4, False, False), (300, 1, False, True)):  # fmt: skip
                w_gu = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
                w_dn = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
                if gpt_oss:  # transposed [E, H, 2I] / [E, I, H]; interleaved rows; gates past the clamp
                    w_gu, w_dn = 3 * w_gu.transpose(1, 2).contiguous(), w_dn.transpose(1, 2).contiguous()
                b_gu = 0.1 * torch.randn(num_experts, 2 * inter, generator=gen) if biases or gpt_oss else None
                b_dn = 0.1 * torch.randn(num_experts, hidden, generator=gen) if biases or gpt_oss else None
                activation = ActivationConfig(kind=act, interleaved=gpt_oss, limit=1.5 if gpt_oss else 7.0)
                weights = ExpertWeights(w_gu, w_dn, activation, transposed=gpt_oss, b_gate_up_E2I=b_gu,
                                        b_down_EH=b_dn).to(dtype)  # fmt: skip
                x = torch.randn(tokens, hidden, generator=gen).to(dtype)
                scores = torch.rand(tokens, num_experts, generator=gen)
                ids = torch.full((tokens, 1), 5) if one_expert else scores.topk(top_k, dim=1).indices
                w = torch.rand(tokens, ids.shape[1], generator=gen)
                expected = moe_oracle(weights, x, ids, w)  # first: .cuda() below moves the weights
                plan = plan_dispatch(ids.cuda(), num_experts)
                y = triton_moe.triton_experts(weights.cuda(), x.cuda(), plan, topk_weights_TK=w.cuda())
                err = (y.cpu().double() - expected).abs().max().item()
                if not err <= tolerance(dtype).bound(expected):
                    failures.append(f"{dtype} {act} T={tokens} k={ids.shape[1]}: max abs err {err:.3g}")
    for tokens, top_k, experts in ((1, 8, 128), (7, 2, 6), (509, 8, 128), (1024, 8, 128), (4096, 2, 64)):
        ids = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices.cuda()
        fused = triton_moe.plan_on_device(ids, experts)
        ids_S = ids.reshape(-1)  # the reference: torch's stable sort
        expert_ids, order = torch.sort(ids_S, stable=True)
        inverse = torch.empty_like(order).index_put_((order,), torch.arange(order.shape[0], device=order.device))
        same = (fused is not None and torch.equal(fused.order_S, order) and torch.equal(fused.expert_ids_S, expert_ids)
                and torch.equal(fused.token_idx_S, order // top_k) and torch.equal(fused.position_S, inverse)
                and torch.equal(fused.counts_E, torch.bincount(ids_S, minlength=experts)))  # fmt: skip
        if not same:
            failures.append(f"plan_on_device T={tokens} K={top_k} E={experts}: differs from torch's stable sort")
    for family in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        reference, model = tiny_model(family).cuda(), tiny_model(family).cuda()
        activepath.optimize(model, backend="triton")
        ids = torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
        with torch.no_grad():
            err = (model(ids).logits - reference(ids).logits).abs().max().item()
        if not err <= MODEL_LOGITS_ATOL_FP32 * 10:  # cuBLAS vs Triton fp32 sums on the GPU
            failures.append(f"{family} logits vs transformers eager: max abs diff {err:.3g}")
    return failures


def sweep_tiles(tokens_list: list[int], iters: int = 20, *, device: str = "cuda",
                shape: tuple[int, int, int, int] = (128, 2048, 768, 8)) -> list[dict]:
    """The backend alone on one MoE layer (default: Qwen3-30B-A3B, bf16; cold weights: 4
    copies rotate), for a few tile configurations, to choose the defaults from. Rates count
    the distinct experts' weights read and 6·H·I FLOPs per slot. (``device``/``shape`` let
    the script itself be checked on CPU under the interpreter, on a tiny layer.)"""
    from activepath import ActivationConfig, ExpertWeights, plan_dispatch
    from activepath.backends import triton as triton_moe
    from activepath.bench.timing import Clock

    num_experts, hidden, inter, top_k = shape
    copies, clock = 4, Clock(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, generator=gen).to(torch.bfloat16)

    layers = [ExpertWeights(randn(num_experts, 2 * inter, hidden) * hidden**-0.5,
                            randn(num_experts, hidden, inter) * inter**-0.5, ActivationConfig(kind="silu"))
              for _ in range(copies)]  # fmt: skip
    configs = [triton_moe.TritonConfig(block_m=m, block_n=n, block_k=k, num_warps=w)
               for m, n, k, w in ((16, 64, 64, 4), (16, 32, 128, 4), (16, 32, 64, 2), (16, 16, 256, 4),
                                  (16, 128, 64, 4), (32, 64, 64, 4), (64, 64, 64, 4), (64, 128, 64, 8),
                                  (128, 128, 64, 8))]  # fmt: skip
    expert_bytes = 3 * hidden * inter * 2
    rows = []
    for tokens in tokens_list:
        x = randn(tokens, hidden)
        ids = torch.rand(tokens, num_experts, device=device, generator=gen).topk(top_k, dim=1).indices
        w = torch.rand(tokens, top_k, device=device, generator=gen)
        plan = plan_dispatch(ids, num_experts)
        touched = len(plan.active_experts)
        for config in configs:
            if config.block_m > 16 and tokens * top_k < config.block_m * num_experts // 8:
                continue  # big blocks only where experts get many slots
            times = []
            for i in range(iters + 3):
                start = clock.now()
                triton_moe.triton_experts(layers[i % copies], x, plan, topk_weights_TK=w, config=config)
                if i >= 3:
                    times.append(clock.now() - start)
            median = sorted(times)[len(times) // 2]
            kernels = _kernels_only_ms(layers, x, plan, w, config, iters) if device == "cuda" else None
            rows.append({"tokens": tokens, "config": config.__dict__, "median_ms": median * 1e3,
                         "GBps": touched * expert_bytes / median / 1e9,
                         "TFLOPs": 6 * hidden * inter * tokens * top_k / median / 1e12,
                         "kernels_median_ms": kernels,
                         "kernels_GBps": None if kernels is None else touched * expert_bytes / kernels / 1e6})  # fmt: skip
            graph = "" if kernels is None else f"; kernels alone (graph) {kernels:.3f} ms, {rows[-1]['kernels_GBps']:.0f} GB/s"
            print(f"T={tokens} {config}: {median * 1e3:.3f} ms, {rows[-1]['GBps']:.0f} GB/s, "
                  f"{rows[-1]['TFLOPs']:.1f} TFLOP/s{graph}", flush=True)
    return rows


def _kernels_only_ms(layers: list, x: torch.Tensor, plan: object, w: torch.Tensor, config: object,
                     iters: int) -> float | None:  # fmt: skip
    """Median ms of ``triton_experts`` replayed from CUDA graphs (one per weight copy, in
    rotation between two events): the kernels without the host's launch costs. None, with
    the reason printed, if capture fails."""
    from activepath.backends import triton as triton_moe

    return _graph_ms([lambda layer=layer: triton_moe.triton_experts(layer, x, plan, topk_weights_TK=w, config=config)
                      for layer in layers], iters, str(config))  # fmt: skip


def _graph_ms(calls: list, iters: int, label: str) -> float | None:
    """Median ms per call of ``calls`` (no arguments) captured as one CUDA graph each and
    replayed in rotation; None (reason printed) when a call cannot be captured (a host
    read of device data, for one)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles, allocator) outside the capture
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for call in calls:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            graphs.append(graph)
    except Exception as err:  # a capture failure is a finding, not the end of the run
        print(f"graph capture failed ({label}): {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
        torch.cuda.synchronize()
        return None
    return _event_ms([g.replay for g in graphs], iters)


def _event_ms(calls: list, iters: int) -> float:
    """Median over ``iters`` rounds of (one pass over ``calls``, back to back, between two
    CUDA events) / len(calls): per-call time with the host free to run ahead."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(iters + 3):
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / len(calls))
    return sorted(times)[len(times) // 2]


def layer_graphs(tokens_list: list[int], iters: int = 30, copies: int = 4) -> list[dict]:
    """Whole MoE layers (router, dispatch, experts, combine) of Qwen3-30B-A3B in bf16, per
    call: eager back to back (no sync between calls) and replayed from CUDA graphs, for
    activepath's triton and grouped backends and transformers' grouped_mm block. ``copies``
    weight copies (4 x 1.2 GB) rotate so the weights come from HBM, not the 60 MB L2."""
    from activepath.bench.layer_bench import LayerBenchConfig, _build_layers
    from activepath.bench.shapes import get_shape

    shape = get_shape("qwen3-30b-a3b")
    config = LayerBenchConfig(tokens=(1,), impls=("activepath",), backend="triton", copies=copies)
    model, blocks, layers = _build_layers(shape, torch.bfloat16, copies, config, "cuda")
    for layer in layers:
        layer.collect_stats = False
    model.set_experts_implementation("grouped_mm")
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = {t: [torch.randn(1, t, shape.hidden_size, device="cuda", generator=gen).to(torch.bfloat16)
                  for _ in range(copies)] for t in tokens_list}  # fmt: skip
    # A failed capture can leave the stream unusable for what follows: after the first
    # failure an impl is timed eager only.
    impls = (("activepath:triton", "triton", True), ("hf-grouped_mm", None, True),
             ("activepath:grouped", "grouped", True))  # fmt: skip
    rows = []
    with torch.inference_mode():
        for impl, backend, try_graph in impls:
            for layer in layers:
                layer.backend = backend or "grouped"
            mods = layers if backend is not None else blocks
            for tokens in tokens_list:
                calls = [lambda m=m, x=x: m(x) for m, x in zip(mods, inputs[tokens])]
                eager = _event_ms(calls, iters)
                graph = _graph_ms(calls, iters, f"{impl} T={tokens}") if try_graph else None
                try_graph = try_graph and graph is not None
                rows.append({"impl": impl, "tokens": tokens, "eager_ms": eager, "graph_ms": graph})
                print(f"layer T={tokens} {impl}: eager {eager:.3f} ms/call, graph "
                      f"{'n/a' if graph is None else f'{graph:.3f}'} ms/call", flush=True)
    del model, blocks, layers
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output prefix of the bench JSON / Markdown")
    parser.add_argument("--tokens", default="1,8,64,512,4096")
    parser.add_argument("--iters", default="20")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (CI checks the kernels in Triton's interpreter)")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this script checks the compiled kernels")
    import transformers
    import triton

    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}", flush=True)
    failed = []
    try:
        failures = check_correctness()
        print("correctness:", "all cases within tolerance" if not failures else "\n  " + "\n  ".join(failures), flush=True)
        if failures:
            failed.append("correctness")
    except Exception:
        traceback.print_exc()
        failed.append("correctness (crashed)")
    from activepath.cli import main as activepath_main

    # H200: 60 MB of L2 (H100: 50); the layer's weights (1.2 GB in bf16) are far larger anyway.
    argv = ["bench", "layer", "--shape", "qwen3-30b-a3b", "--dtype", "bfloat16", "--device", "cuda",
            "--tokens", args.tokens, "--iters", args.iters, "--impl", "activepath:triton,activepath:grouped,hf-grouped_mm",
            "--llc-mib", "60", "--copy-mib", "4096", "--gemm-n", "8192", "--roofline-repeats", "5",
            "--no-progress", "--out", args.out]  # fmt: skip
    try:
        if activepath_main(argv):
            failed.append("bench layer")
    except Exception:
        traceback.print_exc()
        failed.append("bench layer (crashed)")
    if not args.no_sweep:
        try:
            sweep = sweep_tiles([1, 8, 64, 512, 4096])
            Path(f"{args.out}_tiles.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": sweep}, indent=1))
        except Exception:
            traceback.print_exc()
            failed.append("tile sweep (crashed)")
    try:
        graphs = layer_graphs([1, 8, 64, 512])
        Path(f"{args.out}_graphs.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": graphs}, indent=1))
    except Exception:
        traceback.print_exc()
        failed.append("layer graphs (crashed)")
    print("failed parts:", ", ".join(failed) if failed else "none", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
