"""GPT-OSS: top-k over biased logits, softmax over the k kept; experts stored transposed
with interleaved gate/up, biases, and the clamped swiglu. The block returns
``(hidden, router_scores)``, so the replacement does too."""

from __future__ import annotations

import torch
from torch import nn

from activepath.moe.activation import ActivationConfig
from activepath.moe.weights import ExpertWeights
from activepath.moe.layer import SparseMoE
from activepath.moe.routing import Router, RouterConfig
from activepath.adapters.base import FamilyAdapter, OptimizeOptions, finish


class GptOssSparseMoE(SparseMoE):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        y, routing = self.forward_with_routing(x)
        return y, routing.topk_weights_TK.to(x.dtype)


def convert(block: nn.Module, config: object, options: OptimizeOptions) -> nn.Module:
    ex = block.experts
    rc = RouterConfig(
        num_experts=ex.num_experts,
        top_k=options.top_k_for(config.num_experts_per_tok),
        order="topk_then_softmax",
    )
    act = ActivationConfig(kind="clamped_swiglu", alpha=ex.alpha, limit=ex.limit, interleaved=True)
    experts = ExpertWeights(
        ex.gate_up_proj, ex.down_proj, act, transposed=True, b_gate_up_E2I=ex.gate_up_proj_bias, b_down_EH=ex.down_proj_bias
    )
    router = Router(rc, block.router.weight, bias_E=block.router.bias)
    return finish(GptOssSparseMoE(router, experts), options)


ADAPTER = FamilyAdapter(model_type="gpt_oss", block_class="GptOssMLP", convert=convert)
