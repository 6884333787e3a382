# (layer | generate) bench → [arith] → report
"""Roofline arithmetic: the bytes and FLOPs one MoE call must move and compute.

Sparse figures count only what the routing made necessary: the weights of the *distinct*
experts it touched (each read once, however many tokens chose it) plus the router, and
the GEMM FLOPs of the slots it dispatched. Activations are left out of the bytes (they
are < 1 % of the weights at every shape the bench runs) and the gating nonlinearity out
of the FLOPs. Shape legend: T tokens, H hidden, I expert intermediate, E experts,
K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from activepath.validation import check_positive_int


@dataclass(frozen=True, kw_only=True)
class MoEGeometry:
    """Sizes of one MoE layer's routed experts, as stored (``elem_bytes`` per weight)."""

    hidden: int
    inter: int
    num_experts: int
    top_k: int
    elem_bytes: int
    expert_bias: bool = False
    shared_bytes: int = 0
    shared_flops_per_token: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "inter", "num_experts", "top_k", "elem_bytes"):
            check_positive_int(name, getattr(self, name))
        if self.shared_bytes < 0 or self.shared_flops_per_token < 0:
            raise ValueError("shared_bytes and shared_flops_per_token must be >= 0")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")

    @property
    def expert_bytes(self) -> int:
        """One expert: gate+up [2I, H], down [H, I], optional biases [2I] and [H]."""
        params = 3 * self.hidden * self.inter
        if self.expert_bias:
            params += 2 * self.inter + self.hidden
        return params * self.elem_bytes

    @property
    def router_bytes(self) -> int:
        return self.num_experts * self.hidden * self.elem_bytes

    @property
    def all_experts_bytes(self) -> int:
        return self.num_experts * self.expert_bytes

    @property
    def flops_per_slot(self) -> int:
        """One (token, expert) pair: 2·H·2I for gate+up, 2·I·H for down."""
        return 6 * self.hidden * self.inter


def weight_bytes(geom: MoEGeometry, distinct_experts: int) -> int:
    """Weights a call must read at least once: ``distinct_experts`` routed experts, the
    router, and the dense shared experts (DeepSeek) if any."""
    if not 0 <= distinct_experts <= geom.num_experts:
        raise ValueError(f"distinct_experts must lie in [0, {geom.num_experts}], got {distinct_experts}")
    return distinct_experts * geom.expert_bytes + geom.router_bytes + geom.shared_bytes


def moe_flops(geom: MoEGeometry, tokens: int, slots: int) -> int:
    """GEMM FLOPs of a call: the router (2·T·H·E), ``slots`` expert MLPs and the shared
    experts. Sparse: slots = T·K; dense (every expert on every token): slots = T·E."""
    per_token = 2 * geom.hidden * geom.num_experts + geom.shared_flops_per_token
    return tokens * per_token + slots * geom.flops_per_slot


def distinct_experts(counts_E: torch.Tensor) -> int:
    """How many experts received at least one token."""
    return int(torch.count_nonzero(counts_E))


@dataclass(frozen=True, kw_only=True)
class ExpertLoad:
    """Tokens per expert: ``max_over_mean`` (1.0 is perfectly balanced), idle experts."""

    max_over_mean: float
    idle_experts: int
    active_experts: int
    max_tokens: int
    mean_tokens: float


def expert_load(counts_E: torch.Tensor) -> ExpertLoad:
    """Summarise ``counts_E`` (slots routed to each expert, int [E])."""
    counts = counts_E.to(torch.float64)
    mean = float(counts.mean()) if counts.numel() else 0.0
    peak = float(counts.max()) if counts.numel() else 0.0
    return ExpertLoad(
        max_over_mean=peak / mean if mean > 0 else 0.0,
        idle_experts=int((counts_E == 0).sum()),
        active_experts=distinct_experts(counts_E),
        max_tokens=int(peak),
        mean_tokens=mean,
    )


def percent_of(achieved: float, peak: float | None) -> float | None:
    """``achieved`` as a percentage of ``peak``, or None when the peak was not measured."""
    return None if not peak else 100.0 * achieved / peak
