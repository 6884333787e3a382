"""Roofline arithmetic and timing statistics on hand-checked tiny cases."""

from __future__ import annotations

import pytest
import torch

from activepath.bench.arith import MoEGeometry, distinct_experts, expert_load, moe_flops, percent_of, weight_bytes
from activepath.bench.timing import TimingPlan, percentile, summarize, time_calls, Clock


def test_expert_bytes_hand_checked():
    # H=4, I=3, fp32: gate+up 2I·H = 24, down H·I = 12 → 36 params → 144 bytes
    g = MoEGeometry(hidden=4, inter=3, num_experts=5, top_k=2, elem_bytes=4)
    assert g.expert_bytes == 144
    assert g.router_bytes == 5 * 4 * 4
    assert g.all_experts_bytes == 5 * 144
    assert g.flops_per_slot == 6 * 4 * 3


def test_expert_bytes_with_biases_bf16():
    # GPT-OSS style biases: 2I + H = 10 more params; bf16 = 2 bytes
    g = MoEGeometry(hidden=4, inter=3, num_experts=5, top_k=2, elem_bytes=2, expert_bias=True)
    assert g.expert_bytes == (36 + 10) * 2


def test_weight_bytes_counts_distinct_experts_once():
    g = MoEGeometry(hidden=4, inter=3, num_experts=5, top_k=2, elem_bytes=4)
    # 3 tokens × top-2 = 6 slots on experts {0, 0, 1, 1, 4, 4}: 3 distinct experts
    counts = torch.tensor([2, 2, 0, 0, 2])
    assert distinct_experts(counts) == 3
    assert weight_bytes(g, 3) == 3 * 144 + 80
    with pytest.raises(ValueError):
        weight_bytes(g, 6)


def test_shared_experts_add_bytes_and_flops():
    g = MoEGeometry(hidden=4, inter=3, num_experts=5, top_k=2, elem_bytes=4, shared_bytes=100,
                    shared_flops_per_token=7)
    assert weight_bytes(g, 0) == 80 + 100
    assert moe_flops(g, tokens=2, slots=4) == 2 * (2 * 4 * 5 + 7) + 4 * 72


def test_flops_sparse_vs_dense():
    g = MoEGeometry(hidden=4, inter=3, num_experts=5, top_k=2, elem_bytes=4)
    router = 2 * 3 * 4 * 5  # 2·T·H·E with T=3
    assert moe_flops(g, tokens=3, slots=3 * 2) == router + 6 * 72
    assert moe_flops(g, tokens=3, slots=3 * 5) == router + 15 * 72


def test_expert_load():
    load = expert_load(torch.tensor([4, 0, 2, 2]))
    assert load.max_over_mean == pytest.approx(2.0)
    assert (load.idle_experts, load.active_experts, load.max_tokens) == (1, 3, 4)
    assert expert_load(torch.zeros(3, dtype=torch.long)).max_over_mean == 0.0


def test_percent_of_unmeasured_peak_is_none():
    assert percent_of(5.0, 20.0) == pytest.approx(25.0)
    assert percent_of(5.0, None) is None


def test_percentiles_interpolate():
    samples = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(samples, 50) == 3.0
    assert percentile(samples, 95) == pytest.approx(4.8)
    s = summarize(samples)
    assert (s.n, s.min_s, s.max_s, s.mean_s) == (5, 1.0, 5.0, 3.0)


def test_time_calls_excludes_warmup_and_rotates():
    seen: list[int] = []
    samples = time_calls(seen.append, TimingPlan(warmup=2, iters=4, min_iters=1, budget_s=100), Clock())
    assert len(samples) == 4
    assert seen == [0, 1, 2, 3, 4, 5]


def test_timing_plan_validates():
    with pytest.raises(ValueError):
        TimingPlan(iters=2, min_iters=3)
    with pytest.raises(ValueError):
        MoEGeometry(hidden=4, inter=3, num_experts=2, top_k=3, elem_bytes=4)
