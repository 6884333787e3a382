"""DeepSeek-V2: fp32 softmax scores, greedy or group-limited-greedy (groups ranked by their
best expert) top-k, weights scaled by ``routed_scaling_factor``, never renormalised;
shared experts."""

from __future__ import annotations

from torch import nn

from activepath.moe.layer import SharedExperts, SparseMoE
from activepath.moe.routing import Router, RouterConfig
from activepath.adapters.base import FamilyAdapter, OptimizeOptions, finish, stacked_experts

_TOPK_METHODS = ("greedy", "group_limited_greedy")


def convert(block: nn.Module, config: object, options: OptimizeOptions) -> nn.Module:
    if config.topk_method not in _TOPK_METHODS:
        raise ValueError(f"DeepSeek-V2 topk_method={config.topk_method!r} is not supported; expected {_TOPK_METHODS}")
    grouped = config.topk_method == "group_limited_greedy"
    rc = RouterConfig(
        num_experts=block.experts.num_experts,
        top_k=options.top_k_for(config.num_experts_per_tok),
        scoring="softmax",
        n_group=config.n_group if grouped else 1,
        topk_group=config.topk_group if grouped else 1,
        group_score="max",
        routed_scaling_factor=config.routed_scaling_factor,
        logits_precision="fp32",
    )
    moe = SparseMoE(
        Router(rc, block.gate.weight), stacked_experts(block.experts, config.hidden_act), SharedExperts(block.shared_experts)
    )
    return finish(moe, options)


ADAPTER = FamilyAdapter(model_type="deepseek_v2", block_class="DeepseekV2Moe", convert=convert)
