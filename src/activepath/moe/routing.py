# [route] → dispatch → experts → combine
"""Routing: score every expert for every token, keep the top-k, weight them.

Shape legend: T tokens, H hidden, E experts, K experts per token, G expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from activepath.kernels import cpu as native
from activepath.kernels.policy import needs_autograd, select_router, select_router_topk
from activepath.moe.types import RoutingResult
from activepath.validation import as_parameter
from activepath.validation import check_choice
from activepath.validation import check_positive_int

Scoring = Literal["softmax", "sigmoid"]
Order = Literal["score_then_topk", "topk_then_softmax"]
GroupScore = Literal["top2_sum", "max"]
LogitsPrecision = Literal["input", "fp32"]


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """How a family turns router logits into expert choices and weights.

    ``order="topk_then_softmax"`` is GPT-OSS: top-k over raw logits, then a softmax over
    the k kept logits. Grouped top-k (DeepSeek) first keeps the ``topk_group`` best of
    ``n_group`` expert groups, ranked by ``group_score``. ``logits_precision`` says whether
    the router matmul runs in the input dtype (Mixtral, Qwen, OLMoE, GPT-OSS) or in fp32
    (DeepSeek); the scores after it are always fp32, as in the reference models.
    """

    num_experts: int
    top_k: int
    scoring: Scoring = "softmax"
    order: Order = "score_then_topk"
    normalize_topk: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "top2_sum"
    routed_scaling_factor: float = 1.0
    logits_precision: LogitsPrecision = "input"

    def __post_init__(self) -> None:
        check_positive_int("num_experts", self.num_experts)
        check_positive_int("top_k", self.top_k)
        check_positive_int("n_group", self.n_group)
        check_positive_int("topk_group", self.topk_group)
        check_choice("scoring", self.scoring, ("softmax", "sigmoid"))
        check_choice("order", self.order, ("score_then_topk", "topk_then_softmax"))
        check_choice("group_score", self.group_score, ("top2_sum", "max"))
        check_choice("logits_precision", self.logits_precision, ("input", "fp32"))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts={self.num_experts} must be divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
        if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
            raise ValueError(
                f"topk_group={self.topk_group} groups of {self.num_experts // self.n_group} experts "
                f"cannot supply top_k={self.top_k} experts"
            )
        if self.order == "topk_then_softmax" and (self.scoring != "softmax" or self.n_group != 1):
            raise ValueError("order='topk_then_softmax' needs scoring='softmax' and n_group=1")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")


class Router(nn.Module):
    """Holds the gate weights (shared with the source model, never copied) and routes."""

    def __init__(
        self,
        config: RouterConfig,
        weight_EH: torch.Tensor,
        bias_E: torch.Tensor | None = None,
        correction_bias_E: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if weight_EH.dim() != 2 or weight_EH.shape[0] != config.num_experts:
            raise ValueError(
                f"router weight must be [num_experts={config.num_experts}, hidden], got {tuple(weight_EH.shape)}"
            )
        for name, vec in (("bias", bias_E), ("correction_bias", correction_bias_E)):
            if vec is not None and tuple(vec.shape) != (config.num_experts,):
                raise ValueError(f"router {name} must be [{config.num_experts}], got {tuple(vec.shape)}")
        self.config = config
        self.weight = as_parameter(weight_EH)
        self.bias = None if bias_E is None else as_parameter(bias_E)
        # Selection-only bias (DeepSeek-V3): shifts which experts win, never their weights.
        self.register_buffer("correction_bias", correction_bias_E, persistent=False)

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, x_TH: torch.Tensor) -> RoutingResult:
        return route(self.config, x_TH, self.weight, self.bias, self.correction_bias)


def route(
    config: RouterConfig,
    x_TH: torch.Tensor,
    weight_EH: torch.Tensor,
    bias_E: torch.Tensor | None = None,
    correction_bias_E: torch.Tensor | None = None,
) -> RoutingResult:
    """Route tokens ``x_TH`` to ``config.top_k`` experts each.

    The top-k runs on the same fp32 scores the reference models use, with equal scores
    going to the lower expert id on every path (native or not, any dtype, grad mode or
    not), so choices are a pure function of each token's own row (deterministic,
    batch-invariant).
    """
    if fused_native_router_applies(config, x_TH, weight_EH, bias_E, correction_bias_E):
        # Inputs checked by the line above: the unchecked entry point.
        topk_ids_TK, weights_TK, logits_TE = native.route_softmax_topk_prechecked(
            x_TH, weight_EH, bias_E, config.top_k, normalize=config.normalize_topk, scale=config.routed_scaling_factor
        )
        return RoutingResult(topk_ids_TK, weights_TK, logits_TE)
    logits_TE = _router_logits(config, x_TH, weight_EH, bias_E)
    if config.order == "topk_then_softmax":
        top_logits_TK, topk_ids_TK = _topk(logits_TE.to(_score_dtype(logits_TE)), config.top_k)
        weights_TK = torch.softmax(top_logits_TK, dim=-1)
        return RoutingResult(topk_ids_TK, weights_TK, logits_TE)

    if _native_softmax_topk_applies(config, logits_TE, correction_bias_E):
        topk_ids_TK, weights_TK = native.softmax_topk(
            logits_TE, config.top_k, normalize=config.normalize_topk, scale=config.routed_scaling_factor
        )
        return RoutingResult(topk_ids_TK, weights_TK, logits_TE)
    topk_ids_TK, weights_TK = _select(config, logits_TE, correction_bias_E)
    if config.normalize_topk:
        # The 1e-20 matches DeepSeek; for softmax scores the sum is never near zero anyway.
        denominator_T1 = weights_TK.sum(dim=-1, keepdim=True)
        denominator_T1 += 1e-20  # in place: no scalar tensor materialised (same bits)
        weights_TK = weights_TK / denominator_T1
    if config.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * config.routed_scaling_factor
    return RoutingResult(topk_ids_TK, weights_TK, logits_TE)


def _select(
    config: RouterConfig, logits_TE: torch.Tensor, correction_bias_E: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, scores) of each token's top-k experts, before normalisation and scaling."""
    scores_TE = _scores(config, logits_TE)
    if _plain_softmax_topk(config, correction_bias_E):
        # Ranked on the logits, as the native router ranks them: the softmax keeps their
        # order, but its fp32 rounding and underflow make ties the logits do not have.
        topk_ids_TK = _topk(logits_TE.to(scores_TE.dtype), config.top_k)[1]
        return topk_ids_TK, scores_TE.gather(1, topk_ids_TK)
    choice_TE = scores_TE if correction_bias_E is None else scores_TE + correction_bias_E.to(scores_TE.dtype)
    if config.n_group > 1:
        choice_TE = _mask_losing_groups(config, choice_TE)
    top_values_TK, topk_ids_TK = _topk(choice_TE, config.top_k)
    # Without a selection bias the chosen values are the scores themselves (group masking
    # only touches the losers): no gather, one op fewer per layer (a launch on a GPU).
    return topk_ids_TK, top_values_TK if correction_bias_E is None else scores_TE.gather(1, topk_ids_TK)


def _plain_softmax_topk(config: RouterConfig, correction_bias_E: torch.Tensor | None) -> bool:
    """Softmax scores, top-k over them, no expert groups, no selection bias: the routing the
    native ``softmax_topk`` implements."""
    return (
        config.scoring == "softmax"
        and config.order == "score_then_topk"
        and config.n_group == 1
        and correction_bias_E is None
    )


def fused_native_router_applies(
    config: RouterConfig,
    x_TH: torch.Tensor,
    weight_EH: torch.Tensor,
    bias_E: torch.Tensor | None,
    correction_bias_E: torch.Tensor | None,
) -> bool:
    """fp32 softmax routing on CPU without autograd: logits and top-k in one native call."""
    plain = _plain_softmax_topk(config, correction_bias_E)
    if not plain or x_TH.shape[0] == 0:
        return False  # the cheap exit first: no input checks for routing the kernel cannot do
    choice = select_router(plain_softmax_topk=plain, num_tokens=x_TH.shape[0],
                           inputs_fit=native.router_inputs_fit(x_TH, weight_EH, bias_E),
                           autograd=needs_autograd(x_TH, weight_EH), native_available=native.available())  # fmt: skip
    return choice.path == "native_fused_router"


def _native_softmax_topk_applies(
    config: RouterConfig, logits_TE: torch.Tensor, correction_bias_E: torch.Tensor | None
) -> bool:
    """Plain softmax-then-top-k routing of fp32 CPU logits without autograd: one native
    call instead of five small ops (which cost 2-4x more right after the experts have
    streamed their weights through the caches)."""
    choice = select_router_topk(plain_softmax_topk=_plain_softmax_topk(config, correction_bias_E),
                                logits_dtype=logits_TE.dtype, device_type=logits_TE.device.type,
                                autograd=logits_TE.requires_grad, native_available=native.available())  # fmt: skip
    return choice.path == "native_topk"


def router_logits_batch_invariant(config: RouterConfig, x_TH: torch.Tensor, weight_EH: torch.Tensor) -> bool:
    """Whether ``route`` computes these logits with the native kernel (fixed summation
    order per logit, so a token's routing is bitwise independent of its batch)."""
    if config.logits_precision == "fp32":
        return native.available() and x_TH.device.type == "cpu" and weight_EH.device.type == "cpu"
    return native.supports(x_TH.reshape(-1, x_TH.shape[-1]), weight_EH)


def _router_logits(
    config: RouterConfig, x_TH: torch.Tensor, weight_EH: torch.Tensor, bias_E: torch.Tensor | None
) -> torch.Tensor:
    if config.logits_precision == "fp32":
        x_TH, weight_EH = x_TH.float(), weight_EH.float()
        bias_E = None if bias_E is None else bias_E.float()
    if x_TH.shape[0] and native.supports(x_TH, weight_EH) and (bias_E is None or bias_E.dtype == torch.float32):
        # The native kernel sums each logit in a fixed order, so a token's routing does not
        # move with the batch it shares (BLAS picks different kernels for 1 and 64 rows),
        # and it reads the router weights faster at decode.
        return native.linear(x_TH.contiguous(), weight_EH, bias_E)
    return F.linear(x_TH, weight_EH, bias_E)


def _scores(config: RouterConfig, logits_TE: torch.Tensor) -> torch.Tensor:
    if config.scoring == "softmax":  # widened inside the softmax, as transformers does: no cast op
        return torch.softmax(logits_TE, dim=-1, dtype=_score_dtype(logits_TE))
    wide_TE = logits_TE.to(_score_dtype(logits_TE))
    if wide_TE.device.type == "cpu":
        # torch's CPU sigmoid rounds a vector's tail unlike its body (torch 2.13, fp32 and
        # float64): equal logits got unequal scores by their place in the batch, so ties and
        # near-ties — a row's routing — moved with the batch. Its exp is position-independent.
        return torch.reciprocal(torch.exp(-wide_TE) + 1)  # out of place: exp's backward reads its output
    return torch.sigmoid(wide_TE)


def _topk(values_TN: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest per row, descending, equal values by ascending
    index: the native router's order. ``torch.topk`` breaks ties differently (and
    differently by size and device), so an all-equal row — a zero hidden state — would
    route by whether the native kernels, grad mode or a half dtype was in use."""
    values_TN, indices_TN = torch.sort(values_TN, dim=-1, descending=True, stable=True)
    return values_TN[:, :k], indices_TN[:, :k]


def _score_dtype(t: torch.Tensor) -> torch.dtype:
    # fp32 for every half precision, as the reference models do; float64 stays float64.
    return torch.promote_types(t.dtype, torch.float32)


def _mask_losing_groups(config: RouterConfig, choice_TE: torch.Tensor) -> torch.Tensor:
    """Keep the ``topk_group`` best expert groups per token; the rest can never win."""
    per_group = config.num_experts // config.n_group
    choice_TGE = choice_TE.view(-1, config.n_group, per_group)
    if config.group_score == "max":
        group_scores_TG = choice_TGE.max(dim=-1).values
    else:
        group_scores_TG = choice_TGE.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    kept_TG = _topk(group_scores_TG, config.topk_group)[1]
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, kept_TG, True)
    keep_TE = keep_TG.unsqueeze(-1).expand_as(choice_TGE).reshape_as(choice_TE)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))

