"""Property-based fuzzing of the capacity stage: its invariants under either overflow
policy, against the plain-Python oracle (tests/oracle.py), on routings with ties, hot
experts and idle experts."""

from __future__ import annotations

import torch
from fuzz_support import SEEDS, fuzz, grid_logits
from hypothesis import given
from hypothesis import strategies as st
from oracle import capacity_oracle

from activepath import RouterConfig, route
from activepath.moe.capacity import CapacityConfig, apply_capacity, expert_capacity


@st.composite
def capacity_cases(draw: st.DrawFn):
    num_experts = draw(st.integers(1, 12))
    top_k = draw(st.integers(1, min(4, num_experts)))
    cfg = RouterConfig(num_experts=num_experts, top_k=top_k, normalize_topk=draw(st.booleans()))
    num_tokens = draw(st.integers(0, 60))
    levels = draw(st.sampled_from([0, 1, 3, 40]))
    logits_TE = grid_logits(num_tokens, num_experts, seed=draw(SEEDS), levels=levels,
                            equal_rows=draw(st.sampled_from([0.0, 0.5])))  # fmt: skip
    hot = draw(st.none() | st.integers(0, num_experts - 1))
    if hot is not None:
        logits_TE[:, hot] += 20.0  # every token's first choice: overflow
    capacity = CapacityConfig(
        capacity_factor=draw(st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0, 1000.0])),
        policy=draw(st.sampled_from(["drop", "reroute"])),
        min_capacity=draw(st.integers(0, 3)),
    )
    return cfg, logits_TE, capacity


@fuzz(80)
@given(case=capacity_cases())
def test_capacity_invariants_and_oracle(case) -> None:
    cfg, logits_TE, capacity = case
    num_tokens, num_experts, top_k = logits_TE.shape[0], cfg.num_experts, cfg.top_k
    routing = route(cfg, logits_TE.float().contiguous(), torch.eye(num_experts))
    result = apply_capacity(capacity, routing, num_experts)
    cap = expert_capacity(capacity, num_tokens, top_k, num_experts)
    ids_TK, w_TK, kept_TK = result.routing.topk_ids_TK, result.routing.topk_weights_TK, result.kept_TK
    assert result.capacity == cap and kept_TK.shape == ids_TK.shape == (num_tokens, top_k)
    # no expert over capacity; no token uses an expert twice; drops accounted
    assert all(n <= cap for n in torch.bincount(ids_TK[kept_TK], minlength=num_experts).tolist())
    assert all(len(set(row)) == top_k for row in ids_TK.tolist())
    assert result.dropped == int((~kept_TK).sum())
    overflow = int((~apply_capacity(CapacityConfig(capacity_factor=capacity.capacity_factor,
                   min_capacity=capacity.min_capacity), routing, num_experts).kept_TK).sum())  # fmt: skip
    assert result.dropped + result.rerouted == overflow
    assert (w_TK[~kept_TK] == 0).all() and (w_TK >= 0).all()
    if capacity.policy == "drop":
        assert torch.equal(ids_TK, routing.topk_ids_TK) and result.rerouted == 0
    if cap >= num_tokens:  # room for everything: the routing itself, untouched
        assert result.dropped == result.rerouted == 0 and result.routing is routing
    # each token keeps its weight sum unless all its slots were dropped
    sums_T = w_TK.double().sum(-1)
    alive_T = kept_TK.any(-1) & (torch.where(kept_TK, routing.topk_weights_TK, 0).sum(-1) > 0)
    torch.testing.assert_close(sums_T[alive_T], routing.topk_weights_TK.double().sum(-1)[alive_T], rtol=1e-5, atol=1e-7)
    untouched_T = kept_TK.all(-1)
    assert torch.equal(w_TK[untouched_T], routing.topk_weights_TK[untouched_T])
    ids, weights, kept, dropped, rerouted = capacity_oracle(
        cap, capacity.policy, routing.topk_ids_TK.tolist(), routing.topk_weights_TK.double().tolist(),
        routing.logits_TE.double().tolist())  # fmt: skip
    assert ids_TK.tolist() == ids and kept_TK.tolist() == kept
    assert (result.dropped, result.rerouted) == (dropped, rerouted)
    want = torch.tensor(weights, dtype=torch.float64).view(num_tokens, top_k)
    torch.testing.assert_close(w_TK.double(), want, rtol=1e-5, atol=1e-7)
