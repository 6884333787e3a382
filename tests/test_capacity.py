"""Capacity stage against a slow, obviously correct reference; the layer hook; dropless
stays bit-identical."""

from __future__ import annotations

import math

import pytest
import torch

from activepath import ExpertWeights, ActivationConfig, Router, RouterConfig, SparseMoE
from activepath.moe.capacity import CapacityConfig, apply_capacity, expert_capacity
from activepath.moe.routing import RoutingResult, route

H, E = 16, 6


def reference_capacity(config: CapacityConfig, routing: RoutingResult, num_experts: int):
    """Plain loops: first-come by (k, t); overflow dropped or moved to the best unused expert with room."""
    ids = routing.topk_ids_TK.tolist()
    weights = routing.topk_weights_TK.tolist()
    logits = routing.logits_TE.tolist()
    T, K = len(ids), len(ids[0]) if ids else 0
    cap = max(config.min_capacity, math.ceil(config.capacity_factor * T * K / num_experts))
    load = [0] * num_experts
    kept = [[False] * K for _ in range(T)]
    for k in range(K):
        for t in range(T):
            if load[ids[t][k]] < cap:
                load[ids[t][k]] += 1
                kept[t][k] = True
    rerouted = 0
    if config.policy == "reroute":
        for k in range(K):
            for t in range(T):
                if kept[t][k]:
                    continue
                order = sorted(range(num_experts), key=lambda e: (-logits[t][e], e))
                for e in order:
                    if e not in ids[t] and load[e] < cap:
                        ids[t][k], kept[t][k] = e, True
                        load[e] += 1
                        rerouted += 1
                        break
    dropped = sum(not kept[t][k] for t in range(T) for k in range(K))
    new_w = []
    for t in range(T):
        total = sum(weights[t])
        kept_sum = sum(w for w, ok in zip(weights[t], kept[t]) if ok)
        if all(kept[t]):
            new_w.append(weights[t])
        else:
            new_w.append([w * total / kept_sum if ok and kept_sum > 0 else 0.0 for w, ok in zip(weights[t], kept[t])])
    return ids, new_w, kept, dropped, rerouted


def make_routing(T: int, K: int, seed: int, skew: float = 0.0) -> RoutingResult:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(E, H, generator=gen)
    w[0] += skew  # a hot expert when skew > 0
    x = torch.randn(T, H, generator=gen).abs() if skew else torch.randn(T, H, generator=gen)
    return route(RouterConfig(num_experts=E, top_k=K, normalize_topk=True), x, w)


@pytest.mark.parametrize("policy", ["drop", "reroute"])
@pytest.mark.parametrize("T,K,factor,skew", [(1, 1, 1.0, 0.0), (7, 2, 0.5, 0.0), (13, 2, 1.0, 2.0),
                                             (31, 3, 0.75, 3.0), (29, 2, 1.25, 0.0), (0, 2, 1.0, 0.0)])
def test_capacity_matches_reference(policy: str, T: int, K: int, factor: float, skew: float) -> None:
    cfg = CapacityConfig(capacity_factor=factor, policy=policy)
    routing = make_routing(T, K, seed=T * 10 + K, skew=skew)
    result = apply_capacity(cfg, routing, E)
    ids, weights, kept, dropped, rerouted = reference_capacity(cfg, routing, E)
    assert result.routing.topk_ids_TK.tolist() == ids
    assert result.kept_TK.tolist() == kept
    assert (result.dropped, result.rerouted) == (dropped, rerouted)
    torch.testing.assert_close(result.routing.topk_weights_TK, torch.tensor(weights).view(T, K), rtol=1e-6, atol=1e-7)
    load = torch.bincount(result.routing.topk_ids_TK[result.kept_TK], minlength=E)
    assert all(n <= expert_capacity(cfg, T, K, E) for n in load.tolist())


def test_skewed_load_overflows_and_reroute_recovers() -> None:
    routing = make_routing(40, 2, seed=3, skew=4.0)
    drop = apply_capacity(CapacityConfig(capacity_factor=1.0, policy="drop"), routing, E)
    reroute = apply_capacity(CapacityConfig(capacity_factor=1.0, policy="reroute"), routing, E)
    assert drop.dropped > 0 and drop.rerouted == 0
    assert reroute.rerouted > 0 and reroute.dropped < drop.dropped
    # capacity_factor 1 has room for every slot in total, so reroute drops nothing
    assert reroute.dropped == 0


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="capacity_factor"):
        CapacityConfig(capacity_factor=0.0)
    with pytest.raises(ValueError, match="policy"):
        CapacityConfig(capacity_factor=1.0, policy="spill")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CapacityConfig(capacity_factor="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_capacity"):
        CapacityConfig(capacity_factor=1.0, min_capacity=-1)


def make_layer(seed: int = 0, K: int = 2) -> SparseMoE:
    gen = torch.Generator().manual_seed(seed)
    experts = ExpertWeights(torch.randn(E, 24, H, generator=gen) / 4, torch.randn(E, H, 12, generator=gen) / 4,
                            ActivationConfig())
    router = Router(RouterConfig(num_experts=E, top_k=K, normalize_topk=True), torch.randn(E, H, generator=gen))
    return SparseMoE(router, experts)


def test_layer_dropless_default_is_bit_identical_and_counts_nothing() -> None:
    layer = make_layer()
    x = torch.randn(37, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = layer(x)
        layer.capacity = CapacityConfig(capacity_factor=100.0)
        roomy = layer(x)
        layer.capacity = None
        after = layer(x)
    assert layer.capacity is None
    assert torch.equal(before, after) and torch.equal(before, roomy)
    assert int(layer.overflow_dropped) == 0 and int(layer.overflow_rerouted) == 0


@pytest.mark.parametrize("policy", ["drop", "reroute"])
def test_layer_output_equals_dropless_layer_on_capacity_routing(policy: str) -> None:
    layer = make_layer(seed=2)
    x = torch.randn(41, H, generator=torch.Generator().manual_seed(5))
    cfg = CapacityConfig(capacity_factor=0.5, policy=policy)
    with torch.no_grad():
        expected = apply_capacity(cfg, layer.router(x), E)
        layer.capacity = cfg
        layer.backend = "reference"
        y, routing = layer.forward_with_routing(x)
    assert torch.equal(routing.topk_ids_TK, expected.routing.topk_ids_TK)
    assert int(layer.overflow_dropped) == expected.dropped
    assert int(layer.overflow_rerouted) == expected.rerouted
    assert expected.dropped + expected.rerouted > 0
    # the layer's output is the plain MoE sum with the capacity-adjusted weights
    manual = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(2):
            e, w = int(routing.topk_ids_TK[t, k]), float(routing.topk_weights_TK[t, k])
            manual[t] += w * layer.experts.mlp(x[t : t + 1], e)[0]
    torch.testing.assert_close(y, manual, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["grouped", "grouped_loop", "rowwise"])
def test_dropped_slots_cost_no_expert_compute(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(seed=3)
    x = torch.randn(37, H, generator=torch.Generator().manual_seed(7))
    cfg = CapacityConfig(capacity_factor=0.5, policy="drop")
    with torch.no_grad():
        dropless = layer(x)  # noqa: F841 - warm path, no capacity
        expected = apply_capacity(cfg, layer.router(x), E)
        rows: list[int] = []
        original = type(layer.experts).gate_up
        monkeypatch.setattr(type(layer.experts), "gate_up", lambda self, xs, e: rows.append(len(xs)) or original(self, xs, e))
        layer.capacity, layer.backend = cfg, backend
        y = layer(x)
        layer.backend = "reference"
        y_reference = layer(x)
    kept = int(expected.kept_TK.sum())
    assert 0 < kept < x.shape[0] * 2
    if backend != "grouped":  # grouped runs torch's grouped GEMM, not gate_up
        assert sum(rows) == kept  # only kept slots reach an expert
    torch.testing.assert_close(y, y_reference, rtol=1e-5, atol=1e-6)


def test_plan_dispatch_leaves_out_dropped_slots() -> None:
    from activepath import plan_dispatch

    ids = torch.tensor([[3, 1], [1, 0], [3, 2]])
    kept = torch.tensor([[True, False], [True, True], [False, True]])
    plan = plan_dispatch(ids, 4, kept)
    assert plan.counts == (1, 1, 1, 1)
    assert plan.order_S.tolist() == [3, 2, 5, 0]
    assert plan.token_idx_S.tolist() == [1, 1, 2, 0]
    with pytest.raises(ValueError, match="expert ids"):
        plan_dispatch(torch.tensor([[4, 0]]), 4, torch.tensor([[True, True]]))
