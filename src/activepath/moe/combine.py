# route → dispatch → experts → [combine]
"""Combine: weight each slot's expert output and sum back into token order.

Shape legend: T tokens, K experts per token, S = T*K slots, H hidden.
"""

from __future__ import annotations

import torch

from activepath.kernels import cpu as native
from activepath.kernels.policy import Choice, grad_mode, select_combine
from activepath.moe.dispatch import DispatchPlan


def combine(out_sorted_SH: torch.Tensor, plan: DispatchPlan, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Return ``y_TH[t] = sum_k w[t, k] * out[slot(t, k)]`` in the dtype of ``out_sorted_SH``.

    Consumes ``out_sorted_SH`` (scaled in place when it is fp32 and autograd is off): at
    prefill sizes a fresh [S, H] temporary costs more in page faults than the arithmetic.
    Each token's k terms are added in fp32 (or wider), in dispatch order (ascending expert
    id) — an order that depends only on the token's own routing, so the result does not
    depend on thread scheduling nor on which tokens share the batch.
    """
    path = _select(out_sorted_SH, topk_weights_TK, plan).path
    if path == "native_combine":
        # Same products, same order, same bits as below, in one call (inputs checked above).
        y_TH = native.combine_prechecked(
            out_sorted_SH, topk_weights_TK, plan.order_S, plan.token_idx_S, plan.num_tokens
        )
        return y_TH if out_sorted_SH.dtype == torch.float32 else y_TH.to(out_sorted_SH.dtype)
    acc = torch.promote_types(out_sorted_SH.dtype, torch.float32)
    w_sorted_S1 = topk_weights_TK.reshape(-1).index_select(0, plan.order_S).to(acc).unsqueeze(1)
    if out_sorted_SH.dtype == acc and not grad_mode():
        weighted_SH = out_sorted_SH.mul_(w_sorted_S1)
    else:
        weighted_SH = out_sorted_SH.to(acc) * w_sorted_S1
    if path == "torch_gather_sum":
        return _gather_sum(weighted_SH, plan).to(out_sorted_SH.dtype)
    y_TH = torch.zeros(plan.num_tokens, out_sorted_SH.shape[1], dtype=acc, device=out_sorted_SH.device)
    return y_TH.index_add_(0, plan.token_idx_S, weighted_SH).to(out_sorted_SH.dtype)


def _gather_sum(weighted_SH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """y_TH[t] = sum of token t's weighted rows, as a gather then a sum over K: on an
    accelerator ``index_add_`` adds with atomics, in an order that changes from run to run.
    This is deterministic there. Slots a capacity stage dropped read a zero row."""
    num_slots, hidden = weighted_SH.shape
    pos_TK = token_slot_positions(plan, missing=num_slots, dtype=torch.long)
    padded_SH = torch.cat([weighted_SH, weighted_SH.new_zeros(1, hidden)])  # row num_slots: dropped slots
    return padded_SH[pos_TK].sum(dim=1)


def token_slot_positions(plan: DispatchPlan, *, missing: int, dtype: torch.dtype) -> torch.Tensor:
    """pos_TK: where each token's K slots sit in sorted order, ascending along K (= ascending
    expert, the order the CPU combine adds them in); ``missing`` for slots a capacity stage
    dropped. On the device of ``plan.order_S``."""
    pos_S = plan.position_S
    if missing != -1:
        pos_S = pos_S.masked_fill(pos_S < 0, missing)
    return pos_S.to(dtype).view(plan.num_tokens, plan.top_k).sort(dim=1).values


def _select(out_sorted_SH: torch.Tensor, topk_weights_TK: torch.Tensor, plan: DispatchPlan) -> Choice:
    # grad_mode() first (inside select_combine): the native fit checks cost more.
    fits = out_sorted_SH.dim() == 2 and not grad_mode() and native.combine_inputs_fit(
        out_sorted_SH, topk_weights_TK, plan.order_S, plan.token_idx_S)  # fmt: skip
    return select_combine(fits_native=fits, native_available=native.available(),
                          device_type=out_sorted_SH.device.type)  # fmt: skip
