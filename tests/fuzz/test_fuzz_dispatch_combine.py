"""Property-based fuzzing of dispatch (the plan is a stable permutation grouping slots by
expert) and combine (the float64 weighted sum, added in expert order, the same bits every
run and on every path), over idle experts, one hot expert, T=1, primes and capacity drops."""

from __future__ import annotations

import importlib

import pytest
import torch
from fuzz_support import SEEDS, TOKEN_COUNTS, fuzz, native_kernels
from hypothesis import given
from hypothesis import strategies as st
from oracle import combine_oracle

from activepath import combine, plan_dispatch
from activepath.moe import dispatch as dispatch_mod
from activepath.tolerances import tolerance

combine_mod = importlib.import_module("activepath.moe.combine")  # the module (the package exports the function)


@st.composite
def routings(draw: st.DrawFn):
    """(ids [T, K] int64, kept [T, K] bool or None, E): the router's kind of ids (distinct
    per token), ids from a few experts only (the rest idle), or every slot on one expert."""
    num_experts = draw(st.integers(1, 140))
    num_tokens = draw(st.one_of(st.just(0), TOKEN_COUNTS))
    mode = draw(st.sampled_from(["distinct", "subset", "one_expert"]))
    top_k = 1 if mode == "one_expert" else draw(st.integers(1, min(8, num_experts)))
    gen = torch.Generator().manual_seed(draw(SEEDS))
    if mode == "distinct":
        ids_TK = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=1).indices
    elif mode == "subset":
        live_L = torch.randperm(num_experts, generator=gen)[: draw(st.integers(1, num_experts))]
        ids_TK = live_L[torch.randint(0, live_L.numel(), (num_tokens, top_k), generator=gen)]
    else:
        ids_TK = torch.full((num_tokens, 1), draw(st.integers(0, num_experts - 1)), dtype=torch.int64)
    drop = draw(st.sampled_from([None, None, 0.0, 0.3, 1.0]))
    kept_TK = None if drop is None else torch.rand(num_tokens, top_k, generator=gen) >= drop
    return ids_TK.contiguous(), kept_TK, num_experts


def check_plan(plan, ids_TK: torch.Tensor, kept_TK: torch.Tensor | None, num_experts: int) -> None:
    top_k = ids_TK.shape[1]
    ids_S = ids_TK.reshape(-1)
    kept_S = torch.ones_like(ids_S, dtype=torch.bool) if kept_TK is None else kept_TK.reshape(-1)
    order = plan.order_S.tolist()
    # a permutation of exactly the kept slots, grouped by expert, token order inside each
    assert sorted(order) == torch.nonzero(kept_S).flatten().tolist()
    assert torch.equal(plan.expert_ids_S, ids_S[plan.order_S])
    keys = [(ids_S[s].item(), s) for s in order]
    assert keys == sorted(keys), "not grouped by expert, or not stable"
    assert torch.equal(plan.token_idx_S, plan.order_S // top_k)
    assert torch.equal(plan.counts_E, torch.bincount(ids_S[kept_S], minlength=num_experts))
    assert sum(plan.counts) == int(kept_S.sum()) and len(plan.counts) == num_experts
    assert plan.offsets[0] == 0 and plan.offsets[-1] == len(order)
    assert plan.active_experts == tuple(e for e in range(num_experts) if plan.counts[e])
    for e, lo, hi in plan.segments:
        assert (plan.expert_ids_S[lo:hi] == e).all() and hi > lo
    position_S = plan.position_S
    assert torch.equal(position_S[plan.order_S], torch.arange(len(order)))
    assert (position_S[~kept_S] == -1).all()


@fuzz(80)
@given(case=routings(), use_native=st.booleans())
def test_dispatch_plan_is_a_stable_grouping(case, use_native: bool) -> None:
    ids_TK, kept_TK, num_experts = case
    with native_kernels(use_native):
        plan = plan_dispatch(ids_TK, num_experts, kept_TK)
    check_plan(plan, ids_TK, kept_TK, num_experts)
    with native_kernels(not use_native):
        other = plan_dispatch(ids_TK, num_experts, kept_TK)
    strided = plan_dispatch(ids_TK.t().contiguous().t(), num_experts, kept_TK)  # not contiguous: the torch path
    for name in ("order_S", "token_idx_S", "expert_ids_S", "counts_E"):
        assert torch.equal(getattr(plan, name), getattr(other, name)), name
        assert torch.equal(getattr(plan, name), getattr(strided, name)), name
    if kept_TK is None:  # the accelerator plan (run here on CPU tensors): the same plan
        device = dispatch_mod._device_plan(ids_TK, num_experts, validate=True)
        for name in ("order_S", "token_idx_S", "expert_ids_S", "counts_E"):
            assert torch.equal(getattr(plan, name), getattr(device, name)), name


def sequential_combine(out_sorted_SH: torch.Tensor, plan, w_TK: torch.Tensor) -> torch.Tensor:
    """Each token's weighted rows added one at a time in sorted (= ascending expert) order,
    each product rounded in the accumulation dtype before its add: what combine promises."""
    acc = torch.promote_types(out_sorted_SH.dtype, torch.float32)
    num_tokens, top_k = plan.num_tokens, plan.top_k
    pos_TK = plan.position_S.view(num_tokens, top_k)
    pos_TK = torch.where(pos_TK < 0, torch.iinfo(torch.int64).max, pos_TK).sort(dim=1).values
    w_S = w_TK.reshape(-1).to(acc)
    y_TH = torch.zeros(num_tokens, out_sorted_SH.shape[1], dtype=acc)
    for k in range(top_k):
        valid_T = pos_TK[:, k] != torch.iinfo(torch.int64).max
        j_T = torch.where(valid_T, pos_TK[:, k], 0)
        rows_TH = out_sorted_SH[j_T].to(acc) if out_sorted_SH.shape[0] else torch.zeros_like(y_TH)
        term_TH = rows_TH * w_S[plan.order_S[j_T]].unsqueeze(1) if out_sorted_SH.shape[0] else rows_TH
        y_TH = torch.where(valid_T.unsqueeze(1), y_TH + term_TH, y_TH)
    return y_TH.to(out_sorted_SH.dtype)


COMBINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@fuzz(60)
@given(case=routings(), hidden=st.integers(1, 70), dtype=st.sampled_from(COMBINE_DTYPES), seed=SEEDS,
       use_native=st.booleans(), grad_mode=st.booleans())  # fmt: skip
def test_combine_is_the_expert_order_sum(case, hidden, dtype, seed, use_native, grad_mode) -> None:
    ids_TK, kept_TK, num_experts = case
    plan = plan_dispatch(ids_TK, num_experts, kept_TK)
    gen = torch.Generator().manual_seed(seed)
    out_SH = torch.randn(plan.order_S.shape[0], hidden, generator=gen).to(dtype)
    w_TK = torch.rand(ids_TK.shape, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    w_TK[torch.rand(ids_TK.shape, generator=gen) < 0.1] = 0.0  # zero weights (a drop) on kept slots too
    with native_kernels(use_native), torch.set_grad_enabled(grad_mode):
        y_TH = combine(out_SH.clone(), plan, w_TK)
        again = combine(out_SH.clone(), plan, w_TK)
    with native_kernels(not use_native), torch.no_grad():
        other = combine(out_SH.clone(), plan, w_TK)
    assert y_TH.dtype == dtype and y_TH.shape == (ids_TK.shape[0], hidden)
    want = combine_oracle(out_SH, plan.order_S, w_TK, ids_TK.shape[0])
    err = (y_TH.double() - want).abs().max().item() if y_TH.numel() else 0.0
    assert err <= tolerance(dtype).bound(want) if want.numel() else True, f"combine off by {err}"
    assert torch.equal(y_TH, again) and torch.equal(y_TH, other), "combine not deterministic across runs/paths"
    assert torch.equal(y_TH, sequential_combine(out_SH, plan, w_TK)), "combine not added in expert order"
    # the accelerator path (a gather and a sum over K): the same sums, up to rounding
    acc = torch.promote_types(dtype, torch.float32)
    weighted_SH = out_SH.to(acc) * w_TK.reshape(-1).to(acc)[plan.order_S].unsqueeze(1)
    gathered = combine_mod._gather_sum(weighted_SH, plan).to(dtype)
    torch.testing.assert_close(gathered.double(), y_TH.double(), rtol=tolerance(dtype).rtol, atol=tolerance(dtype).atol)


@pytest.mark.parametrize("num_tokens", [1, 2, 13, 128, 257])
def test_all_slots_on_one_expert_sum_in_token_order(num_tokens: int) -> None:
    # One hot expert, K columns each their own expert: the plan is the slots in order.
    ids_TK = torch.arange(3).repeat(num_tokens, 1)
    plan = plan_dispatch(ids_TK, 5)
    check_plan(plan, ids_TK, None, 5)
    assert plan.counts == (num_tokens, num_tokens, num_tokens, 0, 0)
