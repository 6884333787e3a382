"""What a family adapter is, and the options every adapter honours.

An adapter maps one transformers MoE block onto a ``SparseMoE`` by *reusing* the block's
parameters (no copies). Adding a family means adding one adapter file and listing it in
``adapters/__init__.py``; the core never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from activepath.validation import check_choice, check_positive_int
from activepath.backends import get_backend
from activepath.moe.activation import ActivationConfig
from activepath.moe.weights import ExpertWeights
from activepath.moe.layer import SparseMoE
from activepath.moe.weights_int8 import quantize_experts
from activepath.moe.routing import RouterConfig


@dataclass(frozen=True, kw_only=True)
class OptimizeOptions:
    """Options of ``activepath.optimize``.

    backend: experts backend name (see ``activepath.backends.backend_names()``).
    collect_stats: record per-call ``MoEStats`` on every layer (costs a few timer calls).
    top_k: override the model's experts per token (fewer = faster, less exact); None keeps it.
    expert_dtype: "native" keeps the model's expert weights; "int8" packs them per output
    channel (see ``activepath.moe.weights_int8``).
    """

    backend: str = "grouped"
    collect_stats: bool = False
    top_k: int | None = None
    expert_dtype: str = "native"

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a str, got {type(self.backend).__name__}")
        get_backend(self.backend)
        if not isinstance(self.collect_stats, bool):
            raise TypeError(f"collect_stats must be a bool, got {self.collect_stats!r}")
        if self.top_k is not None:
            check_positive_int("top_k", self.top_k)
        check_choice("expert_dtype", self.expert_dtype, ("native", "int8"))

    def top_k_for(self, model_top_k: int) -> int:
        return model_top_k if self.top_k is None else self.top_k


ConvertFn = Callable[[nn.Module, object, OptimizeOptions], nn.Module]


@dataclass(frozen=True, kw_only=True)
class FamilyAdapter:
    """``model_type``: the transformers config's model_type. ``block_class``: the class name
    of the family's MoE block. ``convert(block, config, options)`` returns its replacement."""

    model_type: str
    block_class: str
    convert: ConvertFn


def finish(moe: SparseMoE, options: OptimizeOptions) -> SparseMoE:
    """Apply the options every adapter shares: per-call settings, then the weight transform."""
    moe.backend = options.backend
    moe.collect_stats = options.collect_stats
    moe.experts = quantize_experts(moe.experts, options.expert_dtype)
    return moe


def softmax_router_config(config: object, num_experts: int, options: OptimizeOptions, **kw: object) -> RouterConfig:
    """The common softmax → top-k router (Mixtral, Qwen, OLMoE)."""
    return RouterConfig(
        num_experts=num_experts,
        top_k=options.top_k_for(config.num_experts_per_tok),  # type: ignore[attr-defined]
        **kw,  # type: ignore[arg-type]
    )


def stacked_experts(experts: nn.Module, hidden_act: str) -> ExpertWeights:
    """transformers 5's standard stacked layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    return ExpertWeights(experts.gate_up_proj, experts.down_proj, ActivationConfig.from_hf(hidden_act))
