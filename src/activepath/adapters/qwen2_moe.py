"""Qwen2-MoE: softmax top-k routed experts plus one sigmoid-gated shared expert."""

from __future__ import annotations

from torch import nn

from activepath.moe.layer import SharedExperts, SparseMoE
from activepath.moe.routing import Router
from activepath.adapters.base import FamilyAdapter, OptimizeOptions, finish, softmax_router_config, stacked_experts


def convert(block: nn.Module, config: object, options: OptimizeOptions) -> nn.Module:
    rc = softmax_router_config(config, block.experts.num_experts, options, normalize_topk=config.norm_topk_prob)
    shared = SharedExperts(block.shared_expert, gate=block.shared_expert_gate)
    moe = SparseMoE(Router(rc, block.gate.weight), stacked_experts(block.experts, config.hidden_act), shared)
    return finish(moe, options)


ADAPTER = FamilyAdapter(model_type="qwen2_moe", block_class="Qwen2MoeSparseMoeBlock", convert=convert)
