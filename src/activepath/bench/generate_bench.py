# shapes → build → [generate bench] → report
"""``activepath bench generate``: end-to-end greedy generation, implementations side by side
on one model (activepath patches it in place and is undone afterwards, so every impl runs
the same weights).

Per impl: one warm-up generation (excluded), then ``repeats`` generations, each on its own
seeded random prompt (the same prompts for every impl). Prefill = one forward over the
prompt plus the first argmax (time to first token); each further token is one timed
decode step. Bytes per decode step: every non-expert weight (embedding: only the rows
read), the distinct routed experts the step touched in each layer, and the KV cache.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from activepath.bench.arith import ExpertLoad, expert_load, percent_of
from activepath.bench.breakdown import TimeBreakdown, mean_breakdown, measure_breakdown
from activepath.bench.energy import EnergyMeter
from activepath.bench.generate_run import (
    ModelBytes,
    Trace,
    generate_once,
    model_bytes,
    moe_modules,
    prepared,
    seeded_prompt,
)
from activepath.bench.roofline import Roofline, remeasure_bandwidth
from activepath.bench.timing import Clock, Summary, progress_bar, summarize
from activepath.runtime.process import frozen_gc
from activepath.validation import check_choice, check_positive_int

log = logging.getLogger(__name__)

# Re-exported: part of this module's public interface (GenerateBenchResult.model_bytes).
__all__ = ["GENERATE_IMPLS", "GenerateBenchResult", "GenerateConfig", "GenerateRow", "ModelBytes", "model_bytes",
           "run_generate_bench"]

GENERATE_IMPLS = ("activepath", "activepath-int8", "activepath-int8-all", "hf", "hf-eager", "hf-grouped_mm")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """``hf`` is transformers with its default experts implementation for this model."""

    prompt: int = 128
    new: int = 32
    batch: int = 1
    impls: tuple[str, ...] = ("activepath", "hf")
    repeats: int = 1
    watts_per_core: float = 10.0
    backend: str = "grouped"
    seed: int = 0
    breakdown: bool = True  # also time each component: an instrumented generation after each timed one

    def __post_init__(self) -> None:
        for name in ("prompt", "batch", "repeats"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.new, bool) or not isinstance(self.new, int) or self.new < 2:
            raise ValueError(f"new must be an int >= 2 (one prefill token, then decode steps), got {self.new!r}")
        if not self.impls:
            raise ValueError("impls must not be empty")
        for impl in self.impls:
            check_choice("impl", impl, GENERATE_IMPLS)
        if not self.watts_per_core > 0:
            raise ValueError(f"watts_per_core must be > 0, got {self.watts_per_core}")


@dataclass(frozen=True, kw_only=True)
class GenerateRow:
    impl: str
    experts_implementation: str
    ttft: Summary
    prefill_tok_s: float
    decode: Summary
    decode_tok_s: float
    decode_bytes_per_step_mean: float
    decode_achieved_GBps: float
    decode_roofline_pct: float | None
    kv_bytes_measured: bool
    energy_prefill_J_per_token: float | None
    energy_decode_J_per_token: float | None
    energy_estimated: bool
    energy_method: str
    tokens_per_expert_by_layer: list[list[int]]
    load_by_layer: list[ExpertLoad]
    generated_sha256: str
    same_tokens_as_first_impl: bool | None
    decode_samples_s: list[float]
    # Per prompt (the host's bandwidth drifts between prompts): median step ms, p95/p50, and
    # % of the copy bandwidth measured just before that prompt's round (None: not measured).
    decode_median_ms_by_prompt: list[float] = field(default_factory=list)
    decode_p95_over_p50_by_prompt: list[float] = field(default_factory=list)
    decode_roofline_pct_by_prompt: list[float] | None = None
    # Where the time goes: the mean over the instrumented generations, one per prompt (None: not run).
    breakdown: TimeBreakdown | None = None


@dataclass(frozen=True, kw_only=True)
class GenerateBenchResult:
    model: str
    dtype: str
    num_layers: int
    moe_layers: int
    model_bytes: ModelBytes
    method: str
    rows: list[GenerateRow] = field(default_factory=list)
    prompt_bandwidth_GBps: list[float] | None = None


def run_generate_bench(
    model: nn.Module, label: str, config: GenerateConfig, roofline: Roofline | None,
    *, device: str = "cpu", progress: bool = True,
) -> GenerateBenchResult:
    """Time greedy generation for every impl in ``config.impls`` on ``model``."""
    mbytes = model_bytes(model, config.batch)
    default_impl = model.config._experts_implementation
    vocab = model.get_input_embeddings().weight.shape[0]
    seeds = [config.seed + 1 + r for r in range(config.repeats)]
    prompts = [seeded_prompt(vocab, config.batch, config.prompt, seed, device) for seed in seeds]
    warm_prompt = seeded_prompt(vocab, config.batch, config.prompt, config.seed, device)
    meter = EnergyMeter(device, config.watts_per_core)
    clock = Clock(device)
    bar = progress_bar(len(config.impls) * config.repeats * config.new, "bench generate", progress)
    traces = {impl: Trace() for impl in config.impls}
    breakdowns: dict[str, list[TimeBreakdown]] = {impl: [] for impl in config.impls}
    resolved: dict[str, str] = {}
    step_bytes: dict[str, ModelBytes] = {}
    # Round-robin over impls for every prompt, so slow drift in the machine's state
    # (other load, thermal, memory) lands on every impl alike rather than on whichever ran last.
    # The bandwidth is re-measured before each round: on a shared host it moves by up to
    # 1.7x within minutes, and a step's % of roofline is only meaningful against the
    # bandwidth of its own moment.
    prompt_bw: list[float] | None = [] if roofline is not None else None
    for prompt in prompts:
        if prompt_bw is not None:
            prompt_bw.append(remeasure_bandwidth(roofline, device))
        for impl in config.impls:
            bar.set_postfix_str(impl)
            with prepared(model, impl, default_impl, config.backend, mbytes) as (tap, label_, bytes_):
                resolved[impl], step_bytes[impl] = label_, bytes_
                generate_once(model, warm_prompt, 2, tap, clock, meter, bytes_, Trace())
                with frozen_gc():  # as `activepath serve` after loading: no full GC pass over the model mid-step
                    generate_once(model, prompt, config.new, tap, clock, meter, bytes_, traces[impl], bar)
                if config.breakdown:  # after the timed generation, so that carries no hooks
                    breakdowns[impl].append(measure_breakdown(model, moe_modules(model, impl), prompt, config.new, clock))
    rows: list[GenerateRow] = []
    for impl in config.impls:
        first = rows[0] if rows else None
        row = _row(impl, resolved[impl], traces[impl], config, step_bytes[impl], roofline, first, prompt_bw)
        rows.append(replace(row, breakdown=mean_breakdown(breakdowns[impl]) if breakdowns[impl] else None))
    bar.close()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return GenerateBenchResult(model=label, dtype=dtype, num_layers=model.config.num_hidden_layers,
                               moe_layers=len(mbytes.expert_bytes_by_layer), model_bytes=mbytes,
                               method=_method_text(config), rows=rows, prompt_bandwidth_GBps=prompt_bw)


def _row(
    impl: str, resolved: str, trace: Trace, config: GenerateConfig, mbytes: ModelBytes,
    roofline: Roofline | None, first: GenerateRow | None, prompt_bw: list[float] | None,
) -> GenerateRow:
    ttft, decode = summarize(trace.ttft_s), summarize(trace.step_s)
    bytes_mean = sum(trace.step_bytes) / len(trace.step_bytes)
    gbps = bytes_mean / decode.median_s / 1e9
    ids = torch.cat(trace.ids, dim=0)
    sha = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    counts = trace.counts or []
    prompt_tokens = config.batch * config.prompt
    decode_tokens = config.batch * (config.new - 1)
    return GenerateRow(
        impl=impl, experts_implementation=resolved, ttft=ttft, prefill_tok_s=prompt_tokens / ttft.median_s,
        decode=decode, decode_tok_s=config.batch * len(trace.step_s) / sum(trace.step_s),
        decode_bytes_per_step_mean=bytes_mean, decode_achieved_GBps=gbps,
        decode_roofline_pct=percent_of(gbps, roofline.bandwidth_GBps if roofline else None),
        kv_bytes_measured=trace.kv_measured,
        energy_prefill_J_per_token=_per_token(trace.prefill_j, prompt_tokens),
        energy_decode_J_per_token=_per_token(trace.decode_j, decode_tokens),
        energy_estimated=trace.energy_estimated, energy_method=trace.energy_method,
        tokens_per_expert_by_layer=[c.tolist() for c in counts], load_by_layer=[expert_load(c) for c in counts],
        generated_sha256=sha, same_tokens_as_first_impl=None if first is None else sha == first.generated_sha256,
        decode_samples_s=trace.step_s,
        **_by_prompt(trace, config.new - 1, prompt_bw),
    )


def _by_prompt(trace: Trace, steps: int, prompt_bw: list[float] | None) -> dict[str, list[float] | None]:
    """Per-prompt decode figures: each generation appended ``steps`` samples in prompt order."""
    medians, tails, pcts = [], [], []
    for r in range(len(trace.step_s) // steps):
        chunk = summarize(trace.step_s[r * steps : (r + 1) * steps])
        medians.append(chunk.median_s * 1e3)
        tails.append(chunk.p95_s / chunk.median_s)
        if prompt_bw:
            step_bytes = trace.step_bytes[r * steps : (r + 1) * steps]
            pcts.append(100 * sum(step_bytes) / len(step_bytes) / chunk.median_s / 1e9 / prompt_bw[r])
    return {"decode_median_ms_by_prompt": medians, "decode_p95_over_p50_by_prompt": tails,
            "decode_roofline_pct_by_prompt": pcts if prompt_bw else None}


def _per_token(joules: list[float], tokens: int) -> float | None:
    if not joules or any(math.isnan(j) for j in joules):  # NaN: not measured
        return None
    return sum(joules) / len(joules) / tokens


def _method_text(config: GenerateConfig) -> str:
    return (
        f"greedy decoding, batch {config.batch}, prompt {config.prompt} random tokens, {config.new} new tokens "
        f"(1 from prefill + {config.new - 1} decode steps); {config.repeats} generation(s) on distinct seeded "
        "prompts shared by all impls, run round-robin (prompt 1 on every impl, then prompt 2, ...), each "
        "preceded by a 2-token warm-up generation that is excluded. Python's cyclic GC: the objects alive before "
        "each timed generation are frozen during it (gc.freeze, as activepath serve does after loading), so no "
        "full collection walks the loaded model mid-step. Decode bytes per step: "
        "non-expert weights (embedding rows only) + distinct routed experts touched per layer + KV cache. Expert "
        "utilisation: tokens per expert summed over prefill and decode of the timed generations. activepath runs "
        "with collect_stats on (a few timer calls per layer); hf-* have forward pre-hooks that keep a reference "
        "to the routing."
        + (" Time breakdown: after each timed generation, the same prompt again with forward hooks timing each "
           "component (not part of the figures above); per-step means over the prompts." if config.breakdown else "")
    )
