# route → [dispatch] → experts → combine on a GPU: the one-launch plan
"""The dispatch plan on the device in one Triton launch (a stable counting sort), as raw
tensors; ``moe.dispatch`` wraps them in its ``DispatchPlan``. Imports no triton until launched.

Shape legend: T tokens, K experts per token, S = T*K slots, E experts.
"""

from __future__ import annotations

import torch

from activepath.kernels.policy import PLAN_MAX_SLOTS
from activepath.kernels.triton.launch import available, interpreting, jit_kernels, pow2

_PLAN_BLOCK_E = 16


def plan_slots(topk_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...] | None:
    """(order_S, token_idx_S, expert_ids_S, position_S, counts_E) of ``topk_ids_TK`` (ids in
    [0, E), unchecked): the same stable order as ``torch.sort(stable=True)``, expert ids in the
    ids' dtype, positions the inverse of the order. None where it does not apply (no triton,
    CPU tensors without the interpreter, no slots or more than ``PLAN_MAX_SLOTS``)."""
    num_tokens, top_k = topk_ids_TK.shape
    num_slots = num_tokens * top_k
    if not available() or (topk_ids_TK.device.type != "cuda" and not interpreting()):
        return None
    if not 0 < num_slots <= PLAN_MAX_SLOTS or topk_ids_TK.dtype not in (torch.int64, torch.int32):
        return None
    ids_S = topk_ids_TK.reshape(-1).contiguous()
    device = ids_S.device
    order_S, token_idx_S, expert_ids_S, position_S = (
        torch.empty(num_slots, dtype=torch.int64, device=device) for _ in range(4))  # fmt: skip
    counts_E = torch.empty(num_experts, dtype=torch.int64, device=device)
    # Small blocks of slots, long chunks: many programs, few serial steps each (on an H200,
    # 128-slot blocks took ~50 us at 4096 slots: 32 programs of 128 steps).
    chunk = min(128, max(16, pow2(num_slots)))
    block_s = 16 if num_slots > 256 else chunk
    rank_programs, count_programs = -(-num_slots // block_s), -(-num_experts // _PLAN_BLOCK_E)
    jit_kernels().plan_slots[(rank_programs + count_programs,)](
        ids_S, order_S, token_idx_S, expert_ids_S, position_S, counts_E, num_slots, num_experts, top_k, rank_programs,
        BLOCK_S=block_s, BLOCK_E=_PLAN_BLOCK_E, CHUNK=chunk,
    )  # fmt: skip
    return order_S, token_idx_S, expert_ids_S.to(topk_ids_TK.dtype), position_S, counts_E
