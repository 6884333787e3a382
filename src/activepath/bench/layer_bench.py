# shapes → build → [layer bench] → report
"""``activepath bench layer``: one MoE layer, several implementations side by side.

Method (stated in every report): the layer is built ``copies`` times (same router, so
routing depends only on the input; different expert weights), and call i uses copy
i mod copies and input i mod inputs. Enough copies are built that the weights touched
between two uses of one copy exceed twice the last-level cache, so every timed call
reads its experts from memory, as decoding a real model does. Warm-up calls excluded.

Shape legend: T tokens, H hidden, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from activepath.validation import check_choice, check_positive_int
from activepath.adapters import OptimizeOptions, adapter_for
from activepath.backends.registry import get_backend
from activepath.bench.dense_baseline import dense_forward
from activepath.moe.dispatch import plan_dispatch
from activepath.moe.layer import SparseMoE
from activepath.bench.arith import ExpertLoad, MoEGeometry, distinct_experts, expert_load, moe_flops, percent_of, weight_bytes
from activepath.bench.build import build_model, moe_blocks
from activepath.bench.roofline import Roofline
from activepath.bench.shapes import ModelShape, hf_config
from activepath.bench.timing import Clock, Summary, TimingPlan, progress_bar, summarize, time_calls

log = logging.getLogger(__name__)

LAYER_IMPLS = ("activepath", "hf-eager", "hf-grouped_mm", "hf-batched_mm", "dense")
_MAX_COPIES = 64


@dataclass(frozen=True, kw_only=True)
class LayerBenchConfig:
    """``copies=None`` picks enough copies to exceed twice ``llc_bytes`` (1 when unknown),
    bounded by ``max_weights_bytes`` of expert weights in all."""

    tokens: tuple[int, ...] = (1, 8, 64, 512)
    impls: tuple[str, ...] = LAYER_IMPLS
    timing: TimingPlan = field(default_factory=TimingPlan)
    inputs: int = 16
    copies: int | None = None
    max_weights_bytes: int = 8 << 30
    backend: str = "grouped"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.tokens or not self.impls:
            raise ValueError("tokens and impls must not be empty")
        for t in self.tokens:
            check_positive_int("tokens", t)
        for impl in self.impls:
            if impl.startswith("activepath:"):
                get_backend(impl.partition(":")[2])  # raises, naming the registered backends
            else:
                check_choice("impl", impl, LAYER_IMPLS)
        check_positive_int("inputs", self.inputs)
        check_positive_int("max_weights_bytes", self.max_weights_bytes)
        if self.copies is not None:
            check_positive_int("copies", self.copies)


@dataclass(frozen=True, kw_only=True)
class LayerRow:
    """One (impl, tokens) measurement. Rates use the mean weight bytes / FLOPs of the
    timed calls over the median time; ``None`` marks a figure this impl cannot report."""

    impl: str
    tokens: int
    timing: Summary
    distinct_experts_mean: float
    weight_bytes_mean: float
    achieved_GBps: float
    smbu_pct: float | None
    flops: int
    achieved_GFLOPs: float
    smfu_pct: float | None
    routing_overhead_ratio: float | None
    stage_median_s: dict[str, float] | None
    experts_path: str | None  # the kernel path the experts took (kernels.policy), None for hf-*
    max_abs_diff_vs_first_impl: float | None
    samples_s: list[float]


@dataclass(frozen=True, kw_only=True)
class LayerBenchResult:
    shape: str
    dtype: str
    geometry: MoEGeometry
    copies: int
    weights_bytes_all_copies: int
    cold_weights: bool | None
    method: str
    load_by_tokens: dict[int, ExpertLoad]
    tokens_per_expert_by_tokens: dict[int, list[int]]
    rows: list[LayerRow]


def choose_copies(shape: ModelShape, elem_bytes: int, llc: int | None, config: LayerBenchConfig) -> int:
    """Fewest copies whose experts touched by one token each (K per copy) exceed 2×LLC."""
    if config.copies is not None:
        return config.copies
    expert = shape.expert_params() * elem_bytes
    by_memory = max(1, config.max_weights_bytes // (expert * shape.num_experts))
    wanted = 1 if llc is None else math.ceil(2 * llc / (expert * shape.top_k))
    return int(max(1, min(wanted, by_memory, _MAX_COPIES)))


def run_layer_bench(
    shape: ModelShape, dtype: torch.dtype, config: LayerBenchConfig, roofline: Roofline | None,
    *, llc: int | None, device: str = "cpu", progress: bool = True,
) -> LayerBenchResult:
    """Build the layer copies, time every (tokens, impl) pair, return the rows."""
    elem = torch.empty((), dtype=dtype).element_size()
    copies = choose_copies(shape, elem, llc, config)
    model, blocks, layers = _build_layers(shape, dtype, copies, config, device)
    geom = geometry(layers[0], shape.top_k)
    cold = None if llc is None else copies * shape.top_k * geom.expert_bytes >= 2 * llc
    runners = {impl: _runner(impl, model, blocks, layers, config.backend) for impl in config.impls}
    rows: list[LayerRow] = []
    loads: dict[int, ExpertLoad] = {}
    counts_by_tokens: dict[int, list[int]] = {}
    bar = progress_bar(len(config.tokens) * len(config.impls), "bench layer", progress)
    with torch.inference_mode():
        for tokens in config.tokens:
            inputs = _inputs(tokens, geom.hidden, dtype, config, device)
            counts = [_route_counts(layers[0], x) for x in inputs]
            loads[tokens] = _mean_load(counts)
            counts_by_tokens[tokens] = torch.stack(counts).sum(0).tolist()
            reference = None
            for impl in config.impls:
                bar.set_postfix_str(f"T={tokens} {impl}")
                row, y = _measure(impl, runners[impl], tokens, inputs, counts, copies, geom, roofline, config, device)
                reference = y if reference is None else reference
                diff = float((y.float() - reference.float()).abs().max())
                rows.append(_with_diff(row, None if y is reference else diff))
                bar.update()
    bar.close()
    del model, blocks, layers
    return LayerBenchResult(
        shape=shape.name, dtype=str(dtype).removeprefix("torch."), geometry=geom, copies=copies,
        weights_bytes_all_copies=copies * geom.all_experts_bytes, cold_weights=cold,
        method=_method_text(copies, config, device), load_by_tokens=loads, tokens_per_expert_by_tokens=counts_by_tokens,
        rows=rows,
    )


def geometry(layer: SparseMoE, top_k: int) -> MoEGeometry:
    """The bytes/FLOPs geometry of one built layer, read off its actual tensors."""
    experts = layer.experts
    shared_params = [p for p in layer.shared.parameters()] if layer.shared is not None else []
    return MoEGeometry(
        hidden=experts.hidden_size, inter=experts.intermediate_size, num_experts=experts.num_experts, top_k=top_k,
        elem_bytes=experts.w_gate_up.element_size(), expert_bias=experts.b_gate_up is not None,
        shared_bytes=sum(p.numel() * p.element_size() for p in shared_params),
        shared_flops_per_token=sum(2 * p.numel() for p in shared_params if p.dim() == 2),
    )


def _build_layers(
    shape: ModelShape, dtype: torch.dtype, copies: int, config: LayerBenchConfig, device: str
) -> tuple[nn.Module, list[nn.Module], list[SparseMoE]]:
    hf = hf_config(shape, layers=shape.first_k_dense + copies, vocab=32)
    model = build_model(hf, dtype=dtype, seed=config.seed, device=device)
    blocks = [b for _, b in moe_blocks(model)]
    adapter = adapter_for(model.config.get_text_config().model_type)
    options = OptimizeOptions(backend=config.backend, collect_stats=True)
    layers = [adapter.convert(b, model.config.get_text_config(), options) for b in blocks]
    with torch.no_grad():  # one router for all copies: routing depends on the input alone
        for layer in layers[1:]:
            layer.router.weight.copy_(layers[0].router.weight)
            if layer.router.bias is not None:
                layer.router.bias.copy_(layers[0].router.bias)
    return model, blocks, layers


def _inputs(tokens: int, hidden: int, dtype: torch.dtype, config: LayerBenchConfig, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(config.seed + tokens)
    return [torch.randn(1, tokens, hidden, generator=gen).to(device=device, dtype=dtype) for _ in range(config.inputs)]


def _route_counts(layer: SparseMoE, x_1TH: torch.Tensor) -> torch.Tensor:
    routing = layer.router(x_1TH.reshape(-1, x_1TH.shape[-1]))
    return plan_dispatch(routing.topk_ids_TK, layer.experts.num_experts).counts_E.cpu()


def _mean_load(counts: list[torch.Tensor]) -> ExpertLoad:
    loads = [expert_load(c) for c in counts]
    n = len(loads)
    return ExpertLoad(
        max_over_mean=sum(x.max_over_mean for x in loads) / n,
        idle_experts=round(sum(x.idle_experts for x in loads) / n),
        active_experts=round(sum(x.active_experts for x in loads) / n),
        max_tokens=max(x.max_tokens for x in loads),
        mean_tokens=sum(x.mean_tokens for x in loads) / n,
    )


Runner = Callable[[int, torch.Tensor, bool], tuple[torch.Tensor, dict[str, float] | None, str | None]]


def _runner(impl: str, model: nn.Module, blocks: list[nn.Module], layers: list[SparseMoE], backend: str) -> Runner:
    """``run(copy, x_1TH, stats) → (y, stage seconds or None, experts path or None)`` for one
    implementation. ``activepath`` runs ``backend``, ``activepath:NAME`` the experts backend NAME;
    ``stats`` turns the layer's stage clocks on (``dense`` always clocks its stages)."""
    if impl == "activepath" or impl.startswith("activepath:"):
        name = impl.partition(":")[2] or backend

        def run(c: int, x: torch.Tensor, stats: bool) -> tuple[torch.Tensor, dict[str, float] | None, str | None]:
            layers[c].backend = name  # the layers are shared by every activepath impl
            layers[c].collect_stats = stats
            layers[c].last_stats = None
            y, s = _output(layers[c](x)), layers[c].last_stats
            return y, _stage_times(layers[c]), None if s is None else s.experts_path
        return run
    if impl == "dense":
        def run_dense(c: int, x: torch.Tensor, stats: bool) -> tuple[torch.Tensor, dict[str, float], str]:
            layers[c].backend = backend
            return dense_forward(layers[c], x)
        return run_dense
    hf_impl = impl.removeprefix("hf-")

    def run_hf(c: int, x: torch.Tensor, stats: bool) -> tuple[torch.Tensor, None, None]:
        if model.config._experts_implementation != hf_impl:
            model.set_experts_implementation(hf_impl)
        return _output(blocks[c](x)), None, None
    return run_hf


def _output(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    # GPT-OSS blocks (and activepath's replacement) return (hidden, router_scores)
    return out[0] if isinstance(out, tuple) else out


def _stage_times(layer: SparseMoE) -> dict[str, float] | None:
    s = layer.last_stats
    if s is None:
        return None
    return {"routing_s": s.routing_s, "dispatch_s": s.dispatch_s, "experts_s": s.experts_s,
            "combine_s": s.combine_s, "shared_s": s.shared_s}


def _measure(
    impl: str, run: Runner, tokens: int, inputs: list[torch.Tensor], counts: list[torch.Tensor], copies: int,
    geom: MoEGeometry, roofline: Roofline | None, config: LayerBenchConfig, device: str,
) -> tuple[LayerRow, torch.Tensor]:
    # On the CPU a stage-clock lap is a timer read, so the timed calls carry the clocks. On
    # a GPU each lap synchronises (it would time the syncs and stop the host from running
    # ahead), so the timed calls run without them and as many synchronised calls after
    # them give the stage split alone.
    clocked = torch.device(device).type == "cpu"
    y_first, _, path = run(0, inputs[0], True)  # untimed: the output to compare and the experts' path
    stages: list[dict[str, float]] = []
    sample_idx: list[int] = []
    last: dict[str, dict[str, float] | None] = {}

    def call(i: int) -> None:
        last["stages"] = run(i % copies, inputs[i % len(inputs)], clocked)[1]

    def on_sample(i: int, _: float) -> None:
        sample_idx.append(i % len(inputs))
        if last.get("stages") is not None:
            stages.append(last["stages"])  # type: ignore[arg-type]

    samples = time_calls(call, config.timing, Clock(device), on_sample)
    stage_walls = samples
    if not clocked:
        split = [run(i % copies, inputs[i % len(inputs)], True)[1] for i in range(len(samples))]
        stages = [s for s in split if s is not None]
        stage_walls = [sum(s.values()) for s in stages]
    dense = impl == "dense"
    distinct = [geom.num_experts if dense else distinct_experts(counts[j]) for j in sample_idx]
    bytes_mean = sum(weight_bytes(geom, d) for d in distinct) / len(distinct)
    flops = moe_flops(geom, tokens, tokens * (geom.num_experts if dense else geom.top_k))
    summary = summarize(samples)
    gbps = bytes_mean / summary.median_s / 1e9
    gflops = flops / summary.median_s / 1e9
    return LayerRow(
        impl=impl, tokens=tokens, timing=summary, distinct_experts_mean=sum(distinct) / len(distinct),
        weight_bytes_mean=bytes_mean, achieved_GBps=gbps,
        smbu_pct=percent_of(gbps, roofline.bandwidth_GBps if roofline else None), flops=flops,
        achieved_GFLOPs=gflops, smfu_pct=percent_of(gflops, roofline.gemm_GFLOPs if roofline else None),
        routing_overhead_ratio=_overhead(stages, stage_walls), stage_median_s=_stage_medians(stages),
        experts_path=path, max_abs_diff_vs_first_impl=None, samples_s=samples,
    ), y_first


def _overhead(stages: list[dict[str, float]], samples: list[float]) -> float | None:
    """Median over calls of (routing + dispatch + combine) / the call's wall time."""
    if not stages:
        return None
    ratios = [(s["routing_s"] + s["dispatch_s"] + s["combine_s"]) / t for s, t in zip(stages, samples) if t > 0]
    return summarize(ratios).median_s if ratios else None


def _stage_medians(stages: list[dict[str, float]]) -> dict[str, float] | None:
    if not stages:
        return None
    return {k: summarize([s[k] for s in stages]).median_s for k in stages[0]}


def _with_diff(row: LayerRow, diff: float | None) -> LayerRow:
    return dataclasses.replace(row, max_abs_diff_vs_first_impl=diff)


def _method_text(copies: int, config: LayerBenchConfig, device: str = "cpu") -> str:
    t = config.timing
    gpu = (
        "" if torch.device(device).type == "cpu" else
        " On this GPU the timed calls run without stage clocks (each lap synchronises); the routing overhead "
        "comes from as many synchronised calls after them, as a share of their summed stage times."
    )  # fmt: skip
    return (
        f"{copies} copies of the layer (one shared router, distinct expert weights); call i runs copy i mod "
        f"{copies} on input i mod {config.inputs} (seeded N(0,1) hidden states). {t.warmup} warm-up calls "
        f"excluded, then up to {t.iters} timed calls (at least {t.min_iters}, stopping once {t.budget_s:g} s are "
        "spent), with the objects alive before them frozen out of Python's cyclic GC (gc.freeze). Bytes: "
        "distinct touched experts' weights + router (+ shared experts), each read once; dense "
        "touches all experts. FLOPs: 6·H·I per (token, expert) slot + router GEMM. Rates: mean bytes or FLOPs "
        "of the timed calls over the median time. Routing overhead: median over calls of (routing + dispatch + "
        "combine) / call wall time; transformers' blocks have no stage timers, so it is not measured for hf-*."
        + gpu
    )
