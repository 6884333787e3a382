# route → [dispatch] → experts → combine
"""Dispatch: group token-slots by expert, without a Python loop over tokens.

A *slot* is one (token, k) pair, numbered ``t * K + k``. Shape legend: T tokens,
K experts per token, S = T*K slots, E experts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from . import native


@dataclass(frozen=True)
class DispatchPlan:
    """Slots sorted by expert (only the slots kept, when a capacity stage dropped some).

    ``order_S[j]`` is the slot at sorted position j, ``expert_ids_S[j]`` its expert and
    ``token_idx_S[j]`` its token; expert e owns sorted positions
    ``offsets[e]:offsets[e+1]``. ``counts`` and ``offsets`` are plain ints because the
    expert loop needs them on the host anyway; reading them once here is the only sync.
    """

    order_S: torch.Tensor
    token_idx_S: torch.Tensor
    expert_ids_S: torch.Tensor
    counts_E: torch.Tensor
    counts: tuple[int, ...]
    offsets: tuple[int, ...]
    num_tokens: int
    top_k: int

    @property
    def active_experts(self) -> tuple[int, ...]:
        """Experts that received at least one slot, ascending."""
        return tuple(e for e, n in enumerate(self.counts) if n)

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        """``(expert, lo, hi)`` for each active expert: it owns sorted positions ``lo:hi``."""
        return [(e, self.offsets[e], self.offsets[e + 1]) for e in self.active_experts]


def plan_dispatch(topk_ids_TK: torch.Tensor, num_experts: int, kept_TK: torch.Tensor | None = None) -> DispatchPlan:
    """Sort the slots of ``topk_ids_TK`` (int, [T, K]) by expert.

    The sort is stable, so inside an expert's group slots stay in token order: the plan
    is a pure function of the routing, whatever the thread count. ``kept_TK`` (bool, from
    a capacity stage) leaves the False slots out of the plan entirely: no expert computes
    them and combine adds nothing for them.
    """
    if topk_ids_TK.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, k], got shape {tuple(topk_ids_TK.shape)}")
    num_tokens, top_k = topk_ids_TK.shape
    if kept_TK is None and _native_plan_applies(topk_ids_TK):
        return _native_plan(topk_ids_TK, num_experts)
    ids_S = topk_ids_TK.reshape(-1)
    bins = num_experts
    if kept_TK is not None:
        _check_in_range(ids_S, num_experts)
        ids_S = ids_S.masked_fill(~kept_TK.reshape(-1), num_experts)  # sentinel: sorts last
        bins = num_experts + 1
    counts_E = _count(ids_S, bins)[:num_experts]
    expert_ids_S, order_S = torch.sort(ids_S, stable=True)
    counts = tuple(counts_E.tolist())  # the one host sync
    offsets = (0, *itertools.accumulate(counts))
    order_S, expert_ids_S = order_S[: offsets[-1]], expert_ids_S[: offsets[-1]]
    return DispatchPlan(
        order_S=order_S,
        token_idx_S=order_S // top_k,
        expert_ids_S=expert_ids_S,
        counts_E=counts_E,
        counts=counts,
        offsets=offsets,
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
    order_S, token_idx_S, expert_ids_S, counts_E, offsets_E1 = native.plan_dispatch(topk_ids_TK, top_k, num_experts)
    return DispatchPlan(
        order_S=order_S,
        token_idx_S=token_idx_S,
        expert_ids_S=expert_ids_S,
        counts_E=counts_E,
        counts=tuple(counts_E.tolist()),
        offsets=tuple(offsets_E1.tolist()),
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
