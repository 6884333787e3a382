# route → dispatch → [experts: native CPU kernels] → combine
"""The ``native`` backend and the native part of ``grouped``: every active expert in the
C++ kernels (``kernels.cpu``), one call for all gate/up projections and one for all downs.

``native`` is batch-invariant: every expert in the dot kernel, each output element summed in
a fixed order, fast at any batch. ``grouped`` lets fp32 experts with ``PANEL_ROWS`` rows take
the faster panel kernel and experts past ``NATIVE_MAX_ROWS`` rows BLAS (``kernels.policy``).

Shape legend: T tokens, S slots (sorted by expert), H hidden, I expert intermediate, 2I the
fused gate+up width, E experts, M/N/K a GEMM's rows, outputs and reduction.
"""

from __future__ import annotations

import torch

from activepath.backends.registry import register_backend
from activepath.kernels import cpu as native
from activepath.kernels.policy import Choice, native_max_rows, needs_autograd, select_experts, use_panel
from activepath.moe.activation import activate_into
from activepath.moe.dispatch import gather_slots
from activepath.moe.types import DispatchPlan
from activepath.moe.weights import ExpertStore, run_segments_loop
from activepath.runtime.workspace import FRESH, Workspace


def native_fits(store: ExpertStore, x_SH: torch.Tensor) -> bool:
    """Whether the native kernels take this store and these activations (built, CPU, no graph)."""
    if store.format == "int8":  # its run_segments takes torch ops under autograd itself
        return native.available() and x_SH.device.type == "cpu"
    if store.format != "float" or store.layout != "nk":
        return False  # GPT-OSS's [E, H, 2I] rows are not contiguous along K
    if x_SH.dtype != store.dtype or x_SH.device.type != "cpu":
        return False
    if needs_autograd(x_SH, store.b_gate_up, store.b_down):
        return False  # the kernels have no backward (supports_weight checks the weights)
    return native.supports_weight(store.w_gate_up) and native.supports_weight(store.w_down)


def segment_rows(plan: DispatchPlan, device_type: str) -> list[int]:
    """Rows per active expert, on the CPU only: off it reading the counts would be a sync."""
    return [hi - lo for _, lo, hi in plan.segments] if device_type == "cpu" else []


def select_native(store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan) -> Choice:
    """The kernel path of the ``native`` backend."""
    return select_experts(store_format=store.format, dtype=x_TH.dtype, device_type=x_TH.device.type,
                          native_fits=native_fits(store, x_TH), grouped_mm_fits=False,
                          segment_rows=segment_rows(plan, x_TH.device.type), num_experts=store.num_experts,
                          batch_invariant=True)  # fmt: skip


def native_experts(
    store: ExpertStore, x_TH: torch.Tensor, plan: DispatchPlan, *, workspace: Workspace | None = None
) -> torch.Tensor:
    """Every active expert in the native kernels: batch-invariant and fast at any batch. Falls
    back to row-wise torch products (also batch-invariant) where the kernels do not apply (no
    compiler, non-fp32, transposed weights, autograd)."""
    x_SH = gather_slots(x_TH, plan, workspace)
    if native_fits(store, x_SH):
        return run_native(store, x_SH, plan, batch_invariant=True, workspace=workspace)
    return run_segments_loop(store, x_TH.index_select(0, plan.token_idx_S), plan.slot_segments)


def run_native(
    store: ExpertStore, x_SH: torch.Tensor, plan: DispatchPlan, *, batch_invariant: bool, workspace: Workspace | None
) -> torch.Tensor:
    """Every active expert of ``plan`` on the gathered ``x_SH`` [S, H], where ``native_fits``.
    ``batch_invariant``: every expert in the dot kernel (fixed summation order per row)."""
    x_SH = x_SH.contiguous()
    if store.format == "int8":
        # int8 experts bring their own kernel, which keeps up with BLAS at any row count.
        return store.run_segments(x_SH, plan.segments)
    max_rows = native_max_rows(x_SH.dtype, batch_invariant=batch_invariant)
    small, large = [], []
    for e, lo, hi in plan.segments:
        (small if max_rows is None or hi - lo <= max_rows else large).append((e, lo, hi))
    panel = use_panel(x_SH.dtype, [hi - lo for _, lo, hi in small], batch_invariant=batch_invariant)
    scratch = workspace or FRESH
    # The kernels take fp32 activations (bf16 weights are widened in registers).
    x32_SH = x_SH.float()
    b_gate_up, b_down = (None if b is None else b.float() for b in (store.b_gate_up, store.b_down))
    slots, device = x_SH.shape[0], x_SH.device
    out_SH = scratch.empty("out", (slots, store.hidden_size), torch.float32, device)
    gate_up_S2I = scratch.empty("gate_up", (slots, 2 * store.intermediate_size), torch.float32, device)
    _gemm(x32_SH, store.w_gate_up, small, gate_up_S2I, b_gate_up, panel, scratch)
    # Rows of large experts hold garbage until the loop below; the activation is row-local.
    h_SI = scratch.empty("h", (slots, store.intermediate_size), torch.float32, device)
    activate_into(store.activation, gate_up_S2I, h_SI)
    _gemm(h_SI, store.w_down, small, out_SH, b_down, panel, scratch)
    out_SH = out_SH.to(x_SH.dtype)
    return store.run_segments(x_SH, large, out_SH) if large else out_SH


def _gemm(
    x_MK: torch.Tensor,
    w_ENK: torch.Tensor,
    segments: list[tuple[int, int, int]],
    out_MN: torch.Tensor,
    bias_EN: torch.Tensor | None,
    panel: bool,
    scratch: Workspace,
) -> None:
    if not panel:
        native.grouped_nk_gemm(x_MK, w_ENK, segments, out_MN, bias_EN)
        return
    packed = scratch.empty("panels", (native.panel_scratch_numel(segments, x_MK.shape[1]),), torch.float32,
                           x_MK.device)  # fmt: skip
    native.grouped_nk_gemm_panel(x_MK, w_ENK, segments, out_MN, bias_EN, scratch=packed)


# With autograd on it takes torch ops only (see ``native_fits``): the same values, with a backward.
NATIVE = register_backend("native", native_experts, batch_invariant=True, uses_workspace=True, differentiable=True,
                          one_token_path=True, select=select_native)  # fmt: skip
