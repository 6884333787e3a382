"""The MoE glue around the expert GEMMs (``moe_glue.cpp``): softmax top-k routing (with the
router's GEMM fused in), the dispatch plan's counting sort, and the weighted combine.

Shape legend: T tokens, H hidden, E experts, K experts per token, S = T * K slots.
"""

from __future__ import annotations

import torch

from activepath.kernels.cpu.build import call, threads_for
from activepath.kernels.cpu.gemm import M_BLOCK, N_BLOCK


def softmax_topk(logits_TE: torch.Tensor, k: int, *, normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing of fp32 logits: (ids [T, K] by descending probability, ties to the
    lower id; weights [T, K] fp32: the chosen probabilities, renormalised over the K when
    ``normalize``, times ``scale``)."""
    if logits_TE.dtype != torch.float32 or logits_TE.dim() != 2 or logits_TE.device.type != "cpu":
        raise TypeError(f"logits must be a 2-D float32 CPU tensor, got {logits_TE.dtype} {tuple(logits_TE.shape)}")
    num_tokens, num_experts = logits_TE.shape
    if not 0 < k <= num_experts:
        raise ValueError(f"k must be in [1, {num_experts}], got {k}")
    logits_TE = logits_TE.contiguous()
    ids_TK = torch.empty(num_tokens, k, dtype=torch.int64)
    weights_TK = torch.empty(num_tokens, k, dtype=torch.float32)
    call("ap_softmax_topk", logits_TE.data_ptr(), num_tokens, num_experts, k, int(normalize), scale,
         ids_TK.data_ptr(), weights_TK.data_ptr())  # fmt: skip
    return ids_TK, weights_TK


def route_softmax_topk(
    x_TH: torch.Tensor, weight_EH: torch.Tensor, bias_E: torch.Tensor | None, k: int, *, normalize: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The softmax router in one call: logits = x @ weight.T (+ bias) by the native GEMM,
    then ``softmax_topk``. All fp32 CPU, ``x`` and ``weight`` with contiguous rows.
    Returns (ids [T, K], weights [T, K], logits [T, E])."""
    if not router_inputs_fit(x_TH, weight_EH, bias_E):
        raise TypeError(f"x, weight and bias must be contiguous float32 CPU tensors, got x {x_TH.dtype} on "
                        f"{x_TH.device}, weight {weight_EH.dtype} on {weight_EH.device}")  # fmt: skip
    return route_softmax_topk_prechecked(x_TH, weight_EH, bias_E, k, normalize=normalize, scale=scale)


def router_inputs_fit(x_TH: torch.Tensor, weight_EH: torch.Tensor, bias_E: torch.Tensor | None) -> bool:
    """The dtype/device/layout conditions of ``route_softmax_topk``; callers that checked
    them (``routing.route``) call ``route_softmax_topk_prechecked`` and skip a second check."""
    # One flat expression, not a loop: this runs once per layer per decode step, on cold caches.
    return (
        x_TH.dtype == weight_EH.dtype == torch.float32
        and x_TH.device.type == weight_EH.device.type == "cpu"
        and x_TH.is_contiguous() and weight_EH.is_contiguous()
        and (bias_E is None or (bias_E.dtype == torch.float32 and bias_E.device.type == "cpu" and bias_E.is_contiguous()))
    )  # fmt: skip


def route_softmax_topk_prechecked(
    x_TH: torch.Tensor, weight_EH: torch.Tensor, bias_E: torch.Tensor | None, k: int, *, normalize: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``route_softmax_topk`` for inputs the caller checked with ``router_inputs_fit`` (shapes
    and ``k`` are still checked here: the kernel trusts them)."""
    num_tokens, hidden = x_TH.shape
    num_experts = weight_EH.shape[0]
    if weight_EH.shape != (num_experts, hidden) or (bias_E is not None and bias_E.shape != (num_experts,)):
        raise ValueError(f"router shapes do not chain: x {tuple(x_TH.shape)}, weight {tuple(weight_EH.shape)}")
    if not 0 < k <= num_experts:
        raise ValueError(f"k must be in [1, {num_experts}], got {k}")
    logits_TE = torch.empty(num_tokens, num_experts, dtype=torch.float32)
    weights_TK = torch.empty(num_tokens, k, dtype=torch.float32)
    ids_TK = torch.empty(num_tokens, k, dtype=torch.int64)
    threads = threads_for(4 * weight_EH.numel())
    call("ap_route_softmax_topk", x_TH.data_ptr(), num_tokens, hidden, weight_EH.data_ptr(),
         None if bias_E is None else bias_E.data_ptr(), num_experts, k, int(normalize), scale,
         logits_TE.data_ptr(), ids_TK.data_ptr(), weights_TK.data_ptr(), N_BLOCK, M_BLOCK, threads)  # fmt: skip
    return ids_TK, weights_TK, logits_TE


def plan_dispatch(ids: torch.Tensor, top_k: int, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Stable counting sort of slot ids (int64, contiguous, any shape — [T, K] or [S] — each
    in [0, E)) by expert: (order_S, token_idx_S, sorted_ids_S, counts_E, offsets_E1).
    Out-of-range ids raise ValueError."""
    if ids.dtype != torch.int64 or ids.device.type != "cpu" or not ids.is_contiguous():
        raise TypeError(f"ids must be a contiguous int64 CPU tensor, got {ids.dtype} on {ids.device}")
    num_slots = ids.numel()
    # Five plain allocations, not views of one: at decode this runs right after the experts
    # streamed their weights through the caches, where the first view op (split, slice)
    # measured 15-20 us and a further torch.empty 1-2 us.
    order_S = torch.empty(num_slots, dtype=torch.int64)
    token_idx_S = torch.empty(num_slots, dtype=torch.int64)
    sorted_ids_S = torch.empty(num_slots, dtype=torch.int64)
    counts_E = torch.empty(num_experts, dtype=torch.int64)
    offsets_E1 = torch.empty(num_experts + 1, dtype=torch.int64)
    try:
        call("ap_plan_dispatch", ids.data_ptr(), num_slots, top_k, num_experts, order_S.data_ptr(),
             token_idx_S.data_ptr(), sorted_ids_S.data_ptr(), counts_E.data_ptr(), offsets_E1.data_ptr())  # fmt: skip
    except ValueError:
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got {ids.min().item()}..{ids.max().item()}") from None
    return order_S, token_idx_S, sorted_ids_S, counts_E, offsets_E1


def combine(
    out_SH: torch.Tensor, weights_TK: torch.Tensor, order_S: torch.Tensor, token_idx_S: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """``y[t] = sum over sorted slots j of token t, in order, of out[j] * w[order[j]]``, fp32,
    each product rounded before its add (no FMA)."""
    if not combine_inputs_fit(out_SH, weights_TK, order_S, token_idx_S):
        raise TypeError("combine needs contiguous CPU tensors: out/weights float32 or bfloat16, order/token_idx int64")
    return combine_prechecked(out_SH, weights_TK, order_S, token_idx_S, num_tokens)


def combine_inputs_fit(
    out_SH: torch.Tensor, weights_TK: torch.Tensor, order_S: torch.Tensor, token_idx_S: torch.Tensor
) -> bool:
    """The dtype/device/layout conditions of ``combine``; callers that checked them
    (``combine.combine``) call ``combine_prechecked`` and skip a second check."""
    # One flat expression, not a loop over the four: this runs once per layer per decode step.
    return (
        out_SH.dtype in _COMBINE_DTYPES and weights_TK.dtype in _COMBINE_DTYPES
        and order_S.dtype == token_idx_S.dtype == torch.int64
        and out_SH.device.type == weights_TK.device.type == order_S.device.type == token_idx_S.device.type == "cpu"
        and out_SH.is_contiguous() and weights_TK.is_contiguous()
        and order_S.is_contiguous() and token_idx_S.is_contiguous()
    )  # fmt: skip


_COMBINE_DTYPES = (torch.float32, torch.bfloat16)  # widened exactly to fp32 in the kernel


def combine_prechecked(
    out_SH: torch.Tensor, weights_TK: torch.Tensor, order_S: torch.Tensor, token_idx_S: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """``combine`` for inputs the caller checked with ``combine_inputs_fit``: y_TH in fp32
    (the caller casts it to the activations' dtype)."""
    num_slots, hidden = out_SH.shape
    if order_S.shape != (num_slots,) or token_idx_S.shape != (num_slots,):
        raise ValueError(f"order and token_idx must be [{num_slots}], got {tuple(order_S.shape)}, {tuple(token_idx_S.shape)}")
    y_TH = torch.empty(num_tokens, hidden, dtype=torch.float32)
    threads = threads_for(4 * out_SH.numel())
    call("ap_combine", out_SH.data_ptr(), int(out_SH.dtype == torch.bfloat16), num_slots, hidden,
         weights_TK.data_ptr(), int(weights_TK.dtype == torch.bfloat16), order_S.data_ptr(), weights_TK.numel(),
         token_idx_S.data_ptr(), num_tokens, y_TH.data_ptr(), threads)  # fmt: skip
    return y_TH
