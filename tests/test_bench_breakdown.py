"""The per-component time breakdown (``activepath.bench.breakdown``) on real transformers
models of every family, as transformers runs them and after ``optimize``."""

from __future__ import annotations

import pytest
import torch

import activepath
from activepath.bench.breakdown import COMPONENTS, ComponentClock, measure_breakdown
from activepath.bench.build import moe_blocks
from activepath.bench.timing import Clock
from activepath.api import moe_layers

from families import FAMILIES, tiny_model

SHARED = {"qwen2_moe", "deepseek_v3", "deepseek_v2"}  # families with shared experts
DENSE_LAYER = {"qwen2_moe": "model.layers.1.mlp", "deepseek_v3": "model.layers.0.mlp",
               "deepseek_v2": "model.layers.0.mlp"}  # fmt: skip


def _prepared(family: str, impl: str) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    model = tiny_model(family)
    if impl == "hf":
        return model, [b for _, b in moe_blocks(model)]
    activepath.optimize(model, collect_stats=True)
    return model, [layer for _, layer in moe_layers(model)]


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("impl", ["hf", "activepath"])
@pytest.mark.parametrize("family", FAMILIES)
def test_components_cover_the_forward(family: str, impl: str) -> None:
    model, blocks = _prepared(family, impl)
    hooks_before = _hook_count(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    result = measure_breakdown(model, blocks, prompt, 3, Clock())
    assert _hook_count(model) == hooks_before  # every hook is removed again
    assert result.decode_steps == 2
    for phase in (result.prefill, result.decode):
        assert list(phase.ms) == list(COMPONENTS)
        assert sum(phase.ms.values()) == pytest.approx(phase.total_ms)
        # timed components are nested inside the forward, so nothing is counted twice
        assert phase.ms["rest"] >= -1e-6 and all(v >= 0 for v in phase.ms.values())
        for component in ("attention", "router", "experts", "lm_head"):
            assert phase.ms[component] > 0, component
        if impl == "activepath":
            assert phase.ms["dispatch"] > 0 and phase.ms["combine"] > 0
        else:  # transformers' experts module dispatches and combines inside one call
            assert phase.ms["dispatch"] == phase.ms["combine"] == 0
        assert (phase.ms["shared_experts"] > 0) == (family in SHARED)
        assert (phase.ms["dense_mlp"] > 0) == (family in DENSE_LAYER)
        assert 0 <= phase.share("experts") <= 1


@pytest.mark.parametrize("impl", ["hf", "activepath"])
def test_shared_expert_modules_are_timed_once(impl: str) -> None:
    # the activepath layer wraps the source model's shared `mlp`: it must count as the MoE
    # layer's shared experts, not as a dense MLP as well
    model, blocks = _prepared("deepseek_v2", impl)
    with ComponentClock(model, blocks, Clock()) as clock:
        assert clock.timed["dense_mlp"] == [DENSE_LAYER["deepseek_v2"]]
        assert clock.timed["attention"] == [f"model.layers.{i}.self_attn" for i in range(3)]
        assert clock.timed["lm_head"] == ["lm_head"]
        moe_names = ["model.layers.1.mlp", "model.layers.2.mlp"]
        assert clock.timed["moe_glue"] == moe_names
        if impl == "hf":
            assert clock.timed["shared_experts"] == [f"{n}.shared_experts" for n in moe_names]


def test_needs_the_activepath_stage_clocks() -> None:
    model = tiny_model("qwen3_moe")
    activepath.optimize(model)  # collect_stats off: the layers keep no stage times
    blocks = [layer for _, layer in moe_layers(model)]
    hooks_before = _hook_count(model)  # optimize's own input-id check
    with pytest.raises(RuntimeError, match="collect_stats=True"):
        measure_breakdown(model, blocks, torch.zeros(1, 3, dtype=torch.long), 2, Clock())
    assert _hook_count(model) == hooks_before == 1


def test_rejects_a_generation_without_decode_steps() -> None:
    model, blocks = _prepared("qwen3_moe", "hf")
    with pytest.raises(ValueError, match="new must be >= 2"):
        measure_breakdown(model, blocks, torch.zeros(1, 3, dtype=torch.long), 1, Clock())


def test_mean_breakdown_averages_per_forward() -> None:
    from activepath.bench.breakdown import PhaseBreakdown, TimeBreakdown, mean_breakdown

    def run(scale: float, steps: int) -> TimeBreakdown:
        ms = {c: scale * (i + 1) for i, c in enumerate(COMPONENTS)}
        phase = PhaseBreakdown(total_ms=sum(ms.values()), ms=ms)
        return TimeBreakdown(prefill=phase, decode=phase, decode_steps=steps)

    mean = mean_breakdown([run(1.0, 3), run(3.0, 3)])
    assert mean.decode_steps == 6
    assert mean.prefill.ms["attention"] == 2.0 and mean.decode.ms["rest"] == 2.0 * len(COMPONENTS)
    assert sum(mean.prefill.ms.values()) == pytest.approx(mean.prefill.total_ms)
    with pytest.raises(ValueError, match="at least one"):
        mean_breakdown([])
