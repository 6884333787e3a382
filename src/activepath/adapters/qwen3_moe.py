"""Qwen3-MoE: softmax, top-k, renormalised when ``norm_topk_prob``."""

from __future__ import annotations

from torch import nn

from activepath.moe.layer import SparseMoE
from activepath.moe.routing import Router
from activepath.adapters.base import FamilyAdapter, OptimizeOptions, finish, softmax_router_config, stacked_experts


def convert(block: nn.Module, config: object, options: OptimizeOptions) -> nn.Module:
    rc = softmax_router_config(config, block.experts.num_experts, options, normalize_topk=config.norm_topk_prob)
    moe = SparseMoE(Router(rc, block.gate.weight), stacked_experts(block.experts, config.hidden_act))
    return finish(moe, options)


ADAPTER = FamilyAdapter(model_type="qwen3_moe", block_class="Qwen3MoeSparseMoeBlock", convert=convert)
