# route → dispatch → experts → [combine]
"""Combine: weight each slot's expert output and sum back into token order.

Shape legend: T tokens, K experts per token, S = T*K slots, H hidden.
"""

from __future__ import annotations

import torch

from .dispatch import DispatchPlan


def combine(out_sorted_SH: torch.Tensor, plan: DispatchPlan, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Return ``y_TH[t] = sum_k w[t, k] * out[slot(t, k)]`` in the dtype of ``out_sorted_SH``.

    The sum runs over k in a fixed order and in fp32 (or wider), so a token's result depends only on
    its own slots: not on thread scheduling, nor on which tokens share the batch.
    """
    hidden = out_sorted_SH.shape[-1]
    out_slot_SH = torch.empty_like(out_sorted_SH)
    out_slot_SH[plan.order_S] = out_sorted_SH
    out_TKH = out_slot_SH.view(plan.num_tokens, plan.top_k, hidden)
    acc = torch.promote_types(out_sorted_SH.dtype, torch.float32)
    weighted_TKH = out_TKH.to(acc) * topk_weights_TK.to(acc).unsqueeze(-1)
    return weighted_TKH.sum(dim=1).to(out_sorted_SH.dtype)
