"""DeepSeek-V3: sigmoid scores, grouped top-k chosen with a correction bias (selection
only), weights renormalised and scaled by ``routed_scaling_factor``; shared experts."""

from __future__ import annotations

from torch import nn

from activepath.moe.layer import SharedExperts, SparseMoE
from activepath.moe.routing import Router, RouterConfig
from activepath.adapters.base import FamilyAdapter, OptimizeOptions, finish, stacked_experts


def convert(block: nn.Module, config: object, options: OptimizeOptions) -> nn.Module:
    gate = block.gate
    rc = RouterConfig(
        num_experts=block.experts.num_experts,
        top_k=options.top_k_for(config.num_experts_per_tok),
        scoring="sigmoid",
        normalize_topk=config.norm_topk_prob,
        n_group=config.n_group,
        topk_group=config.topk_group,
        group_score="top2_sum",
        routed_scaling_factor=config.routed_scaling_factor,
        logits_precision="fp32",
    )
    router = Router(rc, gate.weight, correction_bias_E=gate.e_score_correction_bias)
    moe = SparseMoE(router, stacked_experts(block.experts, config.hidden_act), SharedExperts(block.shared_experts))
    return finish(moe, options)


ADAPTER = FamilyAdapter(model_type="deepseek_v3", block_class="DeepseekV3MoE", convert=convert)
