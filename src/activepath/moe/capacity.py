# route → [capacity] → dispatch → experts → combine
"""Capacity: bound the slots any one expert takes in a call, and say what overflowed.

Dropless (no ``CapacityConfig``) is the default. With a config, each expert takes at most
``expert_capacity(...)`` slots. Slots claim room in priority order: every token's first
choice (in token order), then every second choice, and so on (GShard's order), so a
token's best expert is the last thing it loses. An overflowing slot is then

- ``drop``: given weight 0; the token's remaining weights are rescaled to their old sum;
- ``reroute``: moved to the token's next-best expert (by router logits) that still has
  room and that the token does not already use, keeping the slot's weight; dropped as
  above when no expert has room.

A dropped slot keeps its expert id with weight 0 and is marked in ``kept_TK``; the layer
passes that mask to dispatch, which leaves the slot out, so it costs no expert compute.

Shape legend: T tokens, K experts per token, E experts, S = T*K slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from activepath.validation import check_choice
from activepath.moe.routing import RoutingResult

OverflowPolicy = Literal["drop", "reroute"]


@dataclass(frozen=True, kw_only=True)
class CapacityConfig:
    """``capacity_factor``: room per expert as a multiple of the fair share ``T*K/E``.
    ``min_capacity``: floor, so a one-token decode step never drops."""

    capacity_factor: float
    policy: OverflowPolicy = "drop"
    min_capacity: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float)):
            raise TypeError(f"capacity_factor must be a number, got {self.capacity_factor!r}")
        if not (0 < self.capacity_factor < float("inf")):
            raise ValueError(f"capacity_factor must be a finite number > 0, got {self.capacity_factor}")
        check_choice("policy", self.policy, ("drop", "reroute"))
        if isinstance(self.min_capacity, bool) or not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ValueError(f"min_capacity must be an int >= 0, got {self.min_capacity!r}")


@dataclass(frozen=True)
class CapacityResult:
    """The routing after capacity, ``kept_TK`` (False where a slot was dropped), and the
    number of slots dropped and rerouted in this call."""

    routing: RoutingResult
    kept_TK: torch.Tensor
    capacity: int
    dropped: int
    rerouted: int


def expert_capacity(config: CapacityConfig, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Slots one expert may take in a call of ``num_tokens`` tokens."""
    return max(config.min_capacity, math.ceil(config.capacity_factor * num_tokens * top_k / num_experts))


def apply_capacity(config: CapacityConfig, routing: RoutingResult, num_experts: int) -> CapacityResult:
    """Enforce ``config`` on ``routing`` (ids and weights [T, K]); returns a new result."""
    ids_TK, weights_TK = routing.topk_ids_TK, routing.topk_weights_TK
    num_tokens, top_k = ids_TK.shape
    capacity = expert_capacity(config, num_tokens, top_k, num_experts)
    kept_TK = _first_come_kept(ids_TK, num_experts, capacity)
    overflow = int((~kept_TK).sum())
    if overflow == 0:
        return CapacityResult(routing, kept_TK, capacity, 0, 0)
    rerouted = 0
    if config.policy == "reroute":
        ids_TK, kept_TK, rerouted = _reroute(routing.logits_TE, ids_TK, kept_TK, num_experts, capacity)
    new_weights_TK = _renormalised(weights_TK, kept_TK)
    new_routing = RoutingResult(ids_TK, new_weights_TK, routing.logits_TE)
    return CapacityResult(new_routing, kept_TK, capacity, overflow - rerouted, rerouted)


def _first_come_kept(ids_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """True for slots that fit, in priority order (all k=0 slots in token order, then k=1, ...)."""
    ids_KT = ids_TK.t().reshape(-1)
    one_hot_SE = F.one_hot(ids_KT, num_experts)
    position_S = one_hot_SE.cumsum(0).gather(1, ids_KT.unsqueeze(1)).squeeze(1) - 1
    return (position_S < capacity).view(ids_TK.shape[1], ids_TK.shape[0]).t().contiguous()


def _reroute(
    logits_TE: torch.Tensor, ids_TK: torch.Tensor, kept_TK: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Move each overflowing slot, in priority order, to its token's best unused expert with room."""
    ids_TK, kept_TK = ids_TK.clone(), kept_TK.clone()
    load = torch.bincount(ids_TK[kept_TK], minlength=num_experts).tolist()
    ranked_TE = torch.argsort(logits_TE.float(), dim=-1, descending=True, stable=True).tolist()
    ids = ids_TK.tolist()
    moved = 0
    for k, t in _overflowing_slots(kept_TK):
        used = set(ids[t])
        target = next((e for e in ranked_TE[t] if e not in used and load[e] < capacity), None)
        if target is None:
            continue
        ids[t][k] = target
        load[target] += 1
        kept_TK[t, k] = True
        moved += 1
    return torch.tensor(ids, dtype=ids_TK.dtype, device=ids_TK.device), kept_TK, moved


def _overflowing_slots(kept_TK: torch.Tensor) -> list[tuple[int, int]]:
    """(k, t) of dropped slots, in priority order."""
    return [(int(k), int(t)) for k, t in torch.nonzero(~kept_TK.t()).tolist()]


def _renormalised(weights_TK: torch.Tensor, kept_TK: torch.Tensor) -> torch.Tensor:
    """Zero dropped slots; rescale each token's kept weights to its original sum."""
    kept_w_TK = torch.where(kept_TK, weights_TK, torch.zeros_like(weights_TK))
    total_T1 = weights_TK.sum(dim=-1, keepdim=True)
    kept_T1 = kept_w_TK.sum(dim=-1, keepdim=True)
    scale_T1 = torch.where(kept_T1 > 0, total_T1 / kept_T1.clamp_min(torch.finfo(kept_T1.dtype).tiny), 0.0)
    untouched_T1 = kept_TK.all(dim=-1, keepdim=True)
    return torch.where(untouched_T1, weights_TK, kept_w_TK * scale_T1)
