# route → dispatch → experts → combine: the records each stage hands the next
"""The frozen records between the MoE stages: routing → dispatch → experts → combine → stats.

Shape legend: T tokens, K experts per token, S slots (sorted by expert), E experts, H hidden.
A *slot* is one (token, k) pair, numbered ``t * K + k``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True)
class RoutingResult:
    """Expert choices per token. ``topk_weights_TK`` is fp32 (float64 for float64 input);
    ``logits_TE`` as computed."""

    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    logits_TE: torch.Tensor


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

    @property
    def slot_segments(self) -> list[tuple[int, int, int]]:
        """``(expert, j, j + 1)`` for every sorted position j: one segment per slot (the
        batch-invariant row-wise order, each slot alone)."""
        return [(e, j, j + 1) for e, lo, hi in self.segments for j in range(lo, hi)]


@dataclass(frozen=True, kw_only=True)
class ExpertsOutput:
    """What the experts stage returns to the layer: the combined output ``y_TH`` [T, H] (the
    stage runs the combine itself when the backend does not fuse it) and the kernel path it
    took (a ``kernels.policy.Choice.path``; the backend's name when it declares no policy)."""

    y_TH: torch.Tensor
    path: str
    experts_s: float = 0.0  # seconds of the experts (a fused combine included) and of the combine,
    combine_s: float = 0.0  # when the caller passed a stage clock


@dataclass(frozen=True)
class MoEStats:
    """What one call did. Times are wall seconds per stage (``shared_s`` is the dense
    shared-expert path); ``tokens_per_expert_E`` counts slots routed to each expert;
    ``experts_path`` is the kernel path the experts took (``kernels.policy.Choice.path``)."""

    tokens_per_expert_E: torch.Tensor
    routing_s: float
    dispatch_s: float
    experts_s: float
    combine_s: float
    shared_s: float
    experts_path: str = ""

    @property
    def total_s(self) -> float:
        return self.routing_s + self.dispatch_s + self.experts_s + self.combine_s + self.shared_s

    @property
    def routing_overhead_ratio(self) -> float:
        """(routing + dispatch + combine) / layer time: the cost of being sparse."""
        total = self.total_s
        return (self.routing_s + self.dispatch_s + self.combine_s) / total if total > 0 else 0.0
