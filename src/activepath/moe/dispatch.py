# route → [dispatch] → experts → combine
"""Dispatch: group token-slots by expert, without a Python loop over tokens.

A *slot* is one (token, k) pair, numbered ``t * K + k``. Shape legend: T tokens,
K experts per token, S = T*K slots, E experts.
"""

from __future__ import annotations

import torch

from activepath.kernels import cpu as native
from activepath.kernels.policy import grad_mode, select_dispatch
from activepath.kernels.triton import plan as triton_plan
from activepath.moe.types import DispatchPlan
from activepath.runtime.workspace import Workspace


def plan_dispatch(
    topk_ids_TK: torch.Tensor, num_experts: int, kept_TK: torch.Tensor | None = None, *, validate: bool = True
) -> DispatchPlan:
    """Sort the slots of ``topk_ids_TK`` (int, [T, K]) by expert.

    The sort is stable, so inside an expert's group slots stay in token order: the plan
    is a pure function of the routing, whatever the thread count. ``kept_TK`` (bool, from
    a capacity stage) leaves the False slots out of the plan entirely: no expert computes
    them and combine adds nothing for them.

    Off the CPU, without ``kept_TK``, the plan is built without reading anything back to
    the host, except the range check of the ids; ``validate=False`` skips that check, for
    callers whose ids are in range by construction (a router's top-k over its E columns).
    """
    if topk_ids_TK.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, k], got shape {tuple(topk_ids_TK.shape)}")
    num_tokens, top_k = topk_ids_TK.shape
    choice = select_dispatch(capacity=kept_TK is not None, ids_dtype=topk_ids_TK.dtype,
                             device_type=topk_ids_TK.device.type, contiguous=topk_ids_TK.is_contiguous(),
                             native_available=native.available())  # fmt: skip
    if choice.path == "native_sort":
        return _native_plan(topk_ids_TK, num_experts)
    if choice.path == "device_sort":
        return _device_plan(topk_ids_TK, num_experts, validate)
    ids_S = topk_ids_TK.reshape(-1)
    bins = num_experts
    if kept_TK is not None:
        _check_in_range(ids_S, num_experts)
        ids_S = ids_S.masked_fill(~kept_TK.reshape(-1), num_experts)  # sentinel: sorts last
        bins = num_experts + 1
    counts_E = _count(ids_S, bins)[:num_experts]
    expert_ids_S, order_S = torch.sort(ids_S, stable=True)
    kept = int(counts_E.sum()) if kept_TK is not None else ids_S.shape[0]  # a host sync with a capacity stage
    order_S, expert_ids_S = order_S[:kept], expert_ids_S[:kept]
    return DispatchPlan(
        order_S=order_S,
        token_idx_S=order_S // top_k,
        expert_ids_S=expert_ids_S,
        counts_E=counts_E,
        num_tokens=num_tokens,
        top_k=top_k,
    )


def _device_plan(topk_ids_TK: torch.Tensor, num_experts: int, validate: bool) -> DispatchPlan:
    # torch.bincount on CUDA reads the ids' min and max back to size its output (a sync), so
    # the counts come from the sorted ids instead: offsets_E1[e] = #ids < e.
    num_tokens, top_k = topk_ids_TK.shape
    ids_S = topk_ids_TK.reshape(-1)
    if validate:
        _check_in_range(ids_S, num_experts)
    if topk_ids_TK.device.type == "cuda":
        plan = plan_on_device(topk_ids_TK, num_experts)  # one Triton launch instead of ~10 small torch ops
        if plan is not None:
            return plan
    expert_ids_S, order_S = torch.sort(ids_S, stable=True)
    bounds_E1 = torch.arange(num_experts + 1, dtype=expert_ids_S.dtype, device=ids_S.device)
    offsets_E1 = torch.searchsorted(expert_ids_S, bounds_E1)
    return DispatchPlan(
        order_S=order_S,
        token_idx_S=order_S // top_k,
        expert_ids_S=expert_ids_S,
        counts_E=offsets_E1.diff(),
        num_tokens=num_tokens,
        top_k=top_k,
    )


def plan_on_device(topk_ids_TK: torch.Tensor, num_experts: int) -> DispatchPlan | None:
    """The plan of ``topk_ids_TK`` (ids in [0, E), unchecked) in one Triton launch: the same
    order, token ids, expert ids and counts as ``plan_dispatch`` (a stable sort), plus each
    slot's sorted position. None where it does not apply (see ``kernels.triton.plan``)."""
    slots = triton_plan.plan_slots(topk_ids_TK, num_experts)
    if slots is None:
        return None
    order_S, token_idx_S, expert_ids_S, position_S, counts_E = slots
    num_tokens, top_k = topk_ids_TK.shape
    return DispatchPlan(order_S=order_S, token_idx_S=token_idx_S, expert_ids_S=expert_ids_S, counts_E=counts_E,
                        num_tokens=num_tokens, top_k=top_k, given_position_S=position_S)  # fmt: skip


def gather_slots(x_TH: torch.Tensor, plan: DispatchPlan, workspace: Workspace | None = None) -> torch.Tensor:
    """Each slot's token row, in dispatch order: [S, H] (into ``workspace`` scratch when given)."""
    # out= has no autograd, and a reused buffer saved for the backward would be overwritten.
    if workspace is None or grad_mode():
        return x_TH.index_select(0, plan.token_idx_S)
    x_SH = workspace.empty("x", (plan.token_idx_S.shape[0], x_TH.shape[1]), x_TH.dtype, x_TH.device)
    return torch.index_select(x_TH, 0, plan.token_idx_S, out=x_SH)


def _native_plan(topk_ids_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    # One counting sort in native code: the same stable order as torch.sort(stable=True).
    num_tokens, top_k = topk_ids_TK.shape
    order_S, token_idx_S, expert_ids_S, counts_E, _ = native.plan_dispatch(topk_ids_TK, top_k, num_experts)
    return DispatchPlan(
        order_S=order_S,
        token_idx_S=token_idx_S,
        expert_ids_S=expert_ids_S,
        counts_E=counts_E,
        num_tokens=num_tokens,
        top_k=top_k,
    )


def _check_in_range(ids_S: torch.Tensor, num_experts: int) -> None:
    if ids_S.numel() and (int(ids_S.min()) < 0 or int(ids_S.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got {int(ids_S.min())}..{int(ids_S.max())}")


def _count(ids_S: torch.Tensor, num_experts: int) -> torch.Tensor:
    # bincount both counts and range-checks: it grows past num_experts for an id too
    # large and rejects negative ids, so no separate min/max reductions are needed.
    try:
        counts_E = torch.bincount(ids_S, minlength=num_experts)
    except RuntimeError as exc:
        raise ValueError(f"expert ids must be non-negative integers: {exc}") from None
    if counts_E.numel() > num_experts:
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got {int(ids_S.max())}")
    return counts_E
