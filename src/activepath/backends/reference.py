# route → dispatch → [experts: the reference] → combine
"""The ``reference`` backend: slow and obviously correct, always registered, what the tests trust.

Shape legend: T tokens, S slots (sorted by expert), H hidden.
"""

from __future__ import annotations

import torch

from activepath.backends.registry import register_backend
from activepath.moe.activation import gated_activation
from activepath.moe.types import DispatchPlan
from activepath.moe.weights import ExpertStore


def reference_experts(store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Every expert, one slot at a time, in fp32 (or wider), then cast."""
    acc = torch.promote_types(x_TH.dtype, torch.float32)
    out_SH = torch.zeros(len(plan.order_S), store.hidden_size, dtype=acc, device=x_TH.device)
    token_idx = plan.token_idx_S.tolist()
    for e in range(store.num_experts):
        for j in range(plan.offsets[e], plan.offsets[e + 1]):
            out_SH[j] = _wide_mlp(store, x_TH[token_idx[j]].unsqueeze(0).to(acc), e)[0]
    return out_SH.to(x_TH.dtype)


def _wide_mlp(store: ExpertStore, x_1H: torch.Tensor, e: int) -> torch.Tensor:
    acc = x_1H.dtype
    w_gu, w_dn = (w.to(acc) for w in store.matrices(e))
    b_gu, b_dn = store.biases(e)
    gate_up = x_1H @ w_gu.t()
    if b_gu is not None:
        gate_up = gate_up + b_gu.to(acc)
    y = gated_activation(store.activation, gate_up) @ w_dn.t()
    return y if b_dn is None else y + b_dn.to(acc)


# With autograd on it takes torch ops only: the same values, with a backward.
REFERENCE = register_backend("reference", reference_experts, batch_invariant=True, differentiable=True)
