"""Mixtral: softmax over all experts, top-k, renormalised."""

from __future__ import annotations

from torch import nn

from activepath.moe.layer import SparseMoE
from activepath.moe.routing import Router
from activepath.adapters.base import FamilyAdapter, OptimizeOptions, finish, softmax_router_config, stacked_experts


def convert(block: nn.Module, config: object, options: OptimizeOptions) -> nn.Module:
    rc = softmax_router_config(config, block.experts.num_experts, options, normalize_topk=True)
    moe = SparseMoE(Router(rc, block.gate.weight), stacked_experts(block.experts, config.hidden_act))
    return finish(moe, options)


ADAPTER = FamilyAdapter(model_type="mixtral", block_class="MixtralSparseMoeBlock", convert=convert)
