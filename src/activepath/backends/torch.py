# route → dispatch → [experts: torch ops] → combine
"""The torch experts backends: ``grouped`` (the default), ``grouped_loop`` and ``rowwise``.

``grouped``: one gathered activation matrix, one GEMM pair per *active* expert. Idle experts
are never touched; expert weights are read in place (views of the stacked tensors), only
activations are gathered. Where the native kernels apply, experts up to ``NATIVE_MAX_ROWS``
rows run there (``cpu_native``); the rest use torch's grouped GEMM (one call for all experts)
when many experts are active, else a loop over the active experts (``kernels.policy``).

Shape legend: T tokens, S slots (sorted by expert), H hidden, I expert intermediate, 2I the
fused gate+up width, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from activepath.backends.cpu_native import native_fits, run_native, segment_rows
from activepath.backends.registry import register_backend
from activepath.kernels.policy import Choice, grouped_mm_fits, select_experts
from activepath.moe.activation import gated_activation
from activepath.moe.dispatch import gather_slots
from activepath.moe.types import DispatchPlan
from activepath.moe.weights import ExpertStore, run_segments_loop
from activepath.runtime.workspace import Workspace


def grouped_experts(
    store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan, *, workspace: Workspace | None = None
) -> torch.Tensor:
    """The fast path: see the module docstring. Output [S, H] in dispatch order."""
    x_SH = gather_slots(x_TH, plan, workspace)
    path = select_grouped(store, x_SH, plan).path
    if path.startswith("native"):
        return run_native(store, x_SH, plan, batch_invariant=False, workspace=workspace)
    if path == "torch_grouped_mm":
        return _grouped_mm_experts(store, x_SH, plan)
    return run_segments_loop(store, x_SH, plan.segments)


def select_grouped(store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan) -> Choice:
    """The kernel path of the ``grouped`` backend (``x_TH`` or the gathered ``x_SH``: only its
    dtype, device, size and alignment matter). Reads no counts back off the CPU."""
    fits = native_fits(store, x_TH)
    device_type = x_TH.device.type
    return select_experts(store_format=store.format, dtype=x_TH.dtype, device_type=device_type, native_fits=fits,
                          grouped_mm_fits=not fits and _grouped_mm_fits(store, x_TH),
                          segment_rows=segment_rows(plan, device_type), num_experts=store.num_experts,
                          batch_invariant=False)  # fmt: skip


def _grouped_mm_fits(store: ExpertStore, x_SH: torch.Tensor) -> bool:
    """torch's grouped GEMM takes plain stacked float weights (see ``policy.grouped_mm_fits``)."""
    if store.format != "float":
        return False
    size = x_SH.element_size()
    alignments = (store.hidden_size * size, store.intermediate_size * size, x_SH.data_ptr(),
                  store.w_gate_up.data_ptr(), store.w_down.data_ptr())  # fmt: skip
    return grouped_mm_fits(available=hasattr(F, "grouped_mm"), dtype=x_SH.dtype, device_type=x_SH.device.type,
                           num_rows=x_SH.shape[0], alignments=alignments)  # fmt: skip


def _grouped_mm_experts(store: ExpertStore, x_SH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    ends_E = plan.counts_E.cumsum(0).to(torch.int32)  # on the device: no host ints needed
    transposed = store.layout == "kn"
    w_gu_EHN = store.w_gate_up if transposed else store.w_gate_up.transpose(-2, -1)
    w_dn_EIH = store.w_down if transposed else store.w_down.transpose(-2, -1)
    gate_up_S2I = F.grouped_mm(x_SH, w_gu_EHN, offs=ends_E)
    if store.b_gate_up is not None:
        gate_up_S2I += store.b_gate_up.index_select(0, plan.expert_ids_S)
    out_SH = F.grouped_mm(gated_activation(store.activation, gate_up_S2I), w_dn_EIH, offs=ends_E)
    if store.b_down is not None:
        out_SH += store.b_down.index_select(0, plan.expert_ids_S)
    return out_SH


def grouped_loop_experts(store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``grouped`` without torch's grouped GEMM: a Python loop over the active experts."""
    return run_segments_loop(store, x_TH.index_select(0, plan.token_idx_S), plan.segments)


def rowwise_experts(store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Batch-invariant path: one matrix-vector product per slot.

    BLAS picks a different kernel (and summation order) for a 1-row product than for a
    many-row one, so the grouped path's result for a token moves in the last bits with
    the size of its expert's group. Here every slot takes the 1-row kernel, whatever the
    batch. Same speed as ``grouped`` at one token per expert (decode), slower when experts
    get many tokens (prefill), since each slot re-reads the expert's weights.
    """
    return run_segments_loop(store, x_TH.index_select(0, plan.token_idx_S), plan.slot_segments)


def _fixed(path: str, reason: str):  # type: ignore[no-untyped-def]
    choice = Choice(path=path, reason=reason)
    return lambda store, x_TH, plan: choice


# With autograd on, these take torch ops only (see ``native_fits``, ``policy.grouped_mm_fits``,
# ``run_segments_loop``, ``gather_slots``): the same values, with a backward.
GROUPED = register_backend("grouped", grouped_experts, uses_workspace=True, differentiable=True, one_token_path=True,
                           select=select_grouped)  # fmt: skip
GROUPED_LOOP = register_backend("grouped_loop", grouped_loop_experts, differentiable=True,
                                select=_fixed("torch_loop", "a loop over the active experts"))  # fmt: skip
ROWWISE = register_backend("rowwise", rowwise_experts, batch_invariant=True, differentiable=True,
                           select=_fixed("torch_rowwise", "one 1-row product per slot"))  # fmt: skip
