# route → [dispatch] → experts → combine
"""Dispatch: group token-slots by expert, without a Python loop over tokens.

A *slot* is one (token, k) pair, numbered ``t * K + k``. Shape legend: T tokens,
K experts per token, S = T*K slots, E experts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property

import torch

from activepath.kernels import cpu as native


@dataclass(frozen=True)
class DispatchPlan:
    """Slots sorted by expert (only the slots kept, when a capacity stage dropped some).

    ``order_S[j]`` is the slot at sorted position j, ``expert_ids_S[j]`` its expert and
    ``token_idx_S[j]`` its token; expert e owns sorted positions
    ``offsets[e]:offsets[e+1]``, and ``counts_E[e]`` slots.
    """

    order_S: torch.Tensor
    token_idx_S: torch.Tensor
    expert_ids_S: torch.Tensor
    counts_E: torch.Tensor
    num_tokens: int
    top_k: int
    # the inverse of order_S, when the planner made it anyway (see ``position_S``)
    given_position_S: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @cached_property
    def position_S(self) -> torch.Tensor:
        """int64 [T*K]: the sorted position of slot ``t*K + k``, -1 for a slot a capacity
        stage dropped (the inverse of ``order_S``). On the device of ``order_S``."""
        if self.given_position_S is not None:
            return self.given_position_S
        device = self.order_S.device
        position_S = torch.full((self.num_tokens * self.top_k,), -1, dtype=torch.int64, device=device)
        return position_S.index_put_((self.order_S,), torch.arange(self.order_S.shape[0], device=device))

    @cached_property
    def counts(self) -> tuple[int, ...]:
        """``counts_E`` as host ints, read on first use. Off the CPU that read is the plan's
        one device → host sync; backends that plan on the device (``triton``) never make
        it, so a whole layer can run without waiting for the GPU (and be graph-captured)."""
        return tuple(self.counts_E.tolist())

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Host ints: expert e owns sorted positions ``offsets[e]:offsets[e+1]``."""
        return (0, *itertools.accumulate(self.counts))

    @property
    def active_experts(self) -> tuple[int, ...]:
        """Experts that received at least one slot, ascending."""
        return tuple(e for e, n in enumerate(self.counts) if n)

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        """``(expert, lo, hi)`` for each active expert: it owns sorted positions ``lo:hi``."""
        return [(e, self.offsets[e], self.offsets[e + 1]) for e in self.active_experts]


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
    if kept_TK is None and _native_plan_applies(topk_ids_TK):
        return _native_plan(topk_ids_TK, num_experts)
    if kept_TK is None and topk_ids_TK.device.type != "cpu":
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
        from activepath.kernels.triton import moe as triton_moe  # one Triton launch instead of ~10 small torch ops (host time at decode)

        plan = triton_moe.plan_on_device(topk_ids_TK, num_experts)
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


def _native_plan_applies(topk_ids_TK: torch.Tensor) -> bool:
    return (
        topk_ids_TK.dtype == torch.int64
        and topk_ids_TK.device.type == "cpu"
        and topk_ids_TK.is_contiguous()
        and native.available()
    )


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
