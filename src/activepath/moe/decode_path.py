# [route → dispatch → experts → combine] for one token, in two native calls
"""The one-token path of ``SparseMoE``: decode at batch 1.

At one token a layer's experts stream ~150 MB of weights, which flushes every cache, and
the Python between the native calls then costs ~300 us per layer (segments built from
the counts, the token gathered K times, checks, wrappers; measured piece by piece in
benchmarks/results/issue6_performance.md). Here the router, the plan and the gate/up GEMM
are one native call, the down GEMM and the combine another, with the activation between
them in torch. The native steps and their arguments are those of the general path
(``grouped`` and ``native`` both run a token's experts in the dot kernel, fp32 or int8),
and the activation is the same function, so the results are the same bits: the general
path at one token is what the tests compare it with.

Shape legend: H hidden, E experts, K experts per token, I expert intermediate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from activepath.kernels import cpu as native
from activepath.kernels.cpu import token as native_token
from activepath.kernels.policy import select_decode_path
from activepath.moe.activation import activate_into, gated_activation
from activepath.moe.routing import Router, fused_native_router_applies
from activepath.moe.types import RoutingResult
from activepath.moe.weights import ExpertStore

if TYPE_CHECKING:
    from activepath.moe.layer import SparseMoE

PATH = "native_decode"  # the Choice.path of this path, recorded in MoEStats


@dataclass(frozen=True)
class TokenResult:
    """One token through the layer: y [1, H] fp32, its routing, its per-expert slot
    counts [E] and the seconds of each stage (Python around a native call is counted in
    the stage that makes the call)."""

    y_1H: torch.Tensor
    routing: RoutingResult
    counts_E: torch.Tensor
    routing_s: float
    dispatch_s: float
    experts_s: float
    combine_s: float
    path: str = PATH


def applies(layer: SparseMoE, x_TH: torch.Tensor) -> bool:
    """Whether ``run`` computes what the general path would, the same way: one fp32 CPU
    token, no capacity stage, a backend whose spec declares ``one_token_path``, activepath's
    own router where the fused native one applies, and experts the native kernels take in
    place: plain fp32 ``"nk"`` weights without biases (not GPT-OSS's ``"kn"`` ones), or int8."""
    if x_TH.shape[0] != 1:
        return False  # the cheap exit first: this runs once per layer per call
    router = layer.router
    plain_router = type(router) is Router  # not a wrapper (the serving runner's row-wise router)
    choice = select_decode_path(
        num_tokens=x_TH.shape[0], capacity=layer.capacity is not None,
        one_token_backend=layer.backend_spec.one_token_path, plain_router=plain_router,
        store_fits=_experts_fit(layer.experts),
        fused_router=plain_router and fused_native_router_applies(router.config, x_TH, router.weight, router.bias,
                                                                  router.correction_bias),
    )  # fmt: skip
    return choice.path == PATH


def _experts_fit(experts: ExpertStore) -> bool:
    if experts.format == "int8":
        return experts.device.type == "cpu"
    return (
        experts.format == "float"
        and experts.layout == "nk"
        and experts.b_gate_up is None and experts.b_down is None
        and experts.w_gate_up.dtype == experts.w_down.dtype == torch.float32
        and native.supports_weight(experts.w_gate_up) and native.supports_weight(experts.w_down)
    )  # fmt: skip


def run(layer: SparseMoE, x_1H: torch.Tensor) -> TokenResult:
    """The token's layer output, where ``applies`` holds (not checked again here)."""
    experts, router = layer.experts, layer.router
    config = router.config
    route = (x_1H, router.weight, router.bias, config.top_k)
    options = {"normalize": config.normalize_topk, "scale": config.routed_scaling_factor}
    start = time.perf_counter()
    if experts.format == "int8":
        # The activation as Int8ExpertWeights.run_segments computes it.
        gate_up = native_token.token_route_gate_up_i8(*route, **options, q_E2IH=experts.q_gate_up,
                                                     scale_E2I=experts.scale_gate_up, bias_E2I=experts.bias_gate_up)
        routed = time.perf_counter()
        h_KI = gated_activation(experts.activation, gate_up.gate_up_K2I).contiguous()
        activated = time.perf_counter()
        y_1H, (down_s, combine_s) = native_token.token_down_combine_i8(h_KI, experts.q_down, experts.scale_down,
                                                                       experts.bias_down, gate_up)
    else:
        gate_up = native_token.token_route_gate_up(*route, **options, w_gate_up_E2IH=experts.w_gate_up)
        routed = time.perf_counter()
        h_KI = torch.empty(config.top_k, experts.intermediate_size, dtype=torch.float32)
        activate_into(experts.activation, gate_up.gate_up_K2I, h_KI)
        activated = time.perf_counter()
        y_1H, (down_s, combine_s) = native_token.token_down_combine(h_KI, experts.w_down, gate_up)
    done = time.perf_counter()
    _router_s, plan_s, gate_up_s = gate_up.seconds
    return TokenResult(
        y_1H=y_1H,
        routing=RoutingResult(gate_up.ids_1K, gate_up.weights_1K, gate_up.logits_1E),
        counts_E=gate_up.counts_E,
        routing_s=(routed - start) - plan_s - gate_up_s,
        dispatch_s=plan_s,
        experts_s=gate_up_s + (activated - routed) + down_s,
        combine_s=(done - activated) - down_s,
    )
