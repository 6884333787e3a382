# route → dispatch → [experts] → combine
"""Experts: run each active expert's gated MLP on the slots dispatched to it.

Shape legend: S slots (sorted by expert), H hidden, I expert intermediate size,
E experts, 2I fused gate+up width.

Weights stay stacked and colocated, exactly as the source model holds them:
``w_gate_up`` is ``[E, 2I, H]`` (or ``[E, H, 2I]`` when ``transposed``, as GPT-OSS stores
it), ``w_down`` is ``[E, H, I]`` (or ``[E, I, H]``). Nothing is copied per token or per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from activepath.kernels import cpu as native
from activepath.validation import as_parameter
from activepath.validation import check_choice
from activepath.moe.dispatch import DispatchPlan
from activepath.runtime.workspace import FRESH, Workspace

ActivationKind = Literal["silu", "gelu", "gelu_tanh", "clamped_swiglu"]
_HF_ACTIVATIONS: dict[str, ActivationKind] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


@dataclass(frozen=True, kw_only=True)
class ActivationConfig:
    """The gate nonlinearity. ``clamped_swiglu`` is GPT-OSS: ``(up + 1) * g * sigmoid(alpha g)``
    with gate clamped above at ``limit`` and up clamped to ``[-limit, limit]``.
    ``interleaved`` means gate/up alternate along 2I (GPT-OSS) instead of [gate | up]."""

    kind: ActivationKind = "silu"
    alpha: float = 1.702
    limit: float = 7.0
    interleaved: bool = False

    def __post_init__(self) -> None:
        check_choice("activation", self.kind, ("silu", "gelu", "gelu_tanh", "clamped_swiglu"))
        if not self.limit > 0:
            raise ValueError(f"activation limit must be > 0, got {self.limit}")

    @staticmethod
    def from_hf(hidden_act: str) -> ActivationConfig:
        """Map a transformers ``hidden_act`` name onto a gated activation."""
        if hidden_act not in _HF_ACTIVATIONS:
            raise ValueError(f"hidden_act={hidden_act!r} is not supported; expected one of {sorted(_HF_ACTIVATIONS)}")
        return ActivationConfig(kind=_HF_ACTIVATIONS[hidden_act])


def gated_activation(config: ActivationConfig, gate_up_S2I: torch.Tensor) -> torch.Tensor:
    """[S, 2I] fused projections → [S, I] activated product."""
    if config.interleaved:
        gate_SI, up_SI = gate_up_S2I[..., ::2], gate_up_S2I[..., 1::2]
    else:
        gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
    if config.kind == "silu":
        return F.silu(gate_SI) * up_SI
    if config.kind == "gelu":
        return F.gelu(gate_SI) * up_SI
    if config.kind == "gelu_tanh":
        return F.gelu(gate_SI, approximate="tanh") * up_SI
    gate_SI = gate_SI.clamp(max=config.limit)
    up_SI = up_SI.clamp(min=-config.limit, max=config.limit)
    return (up_SI + 1) * (gate_SI * torch.sigmoid(gate_SI * config.alpha))


class ExpertWeights(nn.Module):
    """The stacked expert parameters of one MoE layer (shared with the source model)."""

    def __init__(
        self,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        activation: ActivationConfig,
        *,
        transposed: bool = False,
        b_gate_up_E2I: torch.Tensor | None = None,
        b_down_EH: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        num_experts, hidden, inter = _check_shapes(w_gate_up, w_down, transposed, b_gate_up_E2I, b_down_EH)
        self.w_gate_up = as_parameter(w_gate_up)
        self.w_down = as_parameter(w_down)
        self.b_gate_up = None if b_gate_up_E2I is None else as_parameter(b_gate_up_E2I)
        self.b_down = None if b_down_EH is None else as_parameter(b_down_EH)
        self.activation = activation
        self.transposed = transposed
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden, inter

    def gate_up(self, x_SH: torch.Tensor, e: int) -> torch.Tensor:
        """Fused gate/up projection of expert ``e``: [S, H] → [S, 2I]."""
        return _linear(x_SH, self.w_gate_up[e], None if self.b_gate_up is None else self.b_gate_up[e], self.transposed)

    def down(self, h_SI: torch.Tensor, e: int, out_SH: torch.Tensor | None = None) -> torch.Tensor:
        """Down projection of expert ``e``: [S, I] → [S, H], written into ``out_SH`` when given."""
        bias = None if self.b_down is None else self.b_down[e]
        return _linear(h_SI, self.w_down[e], bias, self.transposed, out_SH)

    def mlp(self, x_SH: torch.Tensor, e: int, out_SH: torch.Tensor | None = None) -> torch.Tensor:
        """Expert ``e``'s whole gated MLP on ``x_SH``."""
        return self.down(gated_activation(self.activation, self.gate_up(x_SH, e)), e, out_SH)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype this layer computes in."""
        return self.w_gate_up.dtype

    def matrices(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s gate/up [2I, H] and down [H, I] weights in nn.Linear layout (views)."""
        w_gu, w_dn = self.w_gate_up[e], self.w_down[e]
        return (w_gu.t(), w_dn.t()) if self.transposed else (w_gu, w_dn)

    def biases(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Expert ``e``'s gate/up [2I] and down [H] biases, if any."""
        return (None if self.b_gate_up is None else self.b_gate_up[e], None if self.b_down is None else self.b_down[e])


def _linear(
    x_SK: torch.Tensor,
    w: torch.Tensor,
    bias_N: torch.Tensor | None,
    transposed: bool,
    out_SN: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W`` for ``w`` stored as [K, N] (transposed) or [N, K] (the nn.Linear layout)."""
    w_KN = w if transposed else w.t()
    if bias_N is not None:
        return torch.addmm(bias_N, x_SK, w_KN, out=out_SN) if out_SN is not None else torch.addmm(bias_N, x_SK, w_KN)
    return torch.mm(x_SK, w_KN, out=out_SN) if out_SN is not None else torch.mm(x_SK, w_KN)


ExpertsBackend = Callable[[ExpertWeights, torch.Tensor, DispatchPlan], torch.Tensor]
"""(weights, x_TH, plan) → expert outputs in dispatch order, [S, H], dtype of x_TH.
Backends registered with ``uses_workspace`` also take ``workspace=`` (a ``Workspace`` or
None): scratch for their intermediates, and for the output, which is then valid only until
the workspace's next use (the layer combines it straight away)."""

_BACKENDS: dict[str, ExpertsBackend] = {}
_BATCH_INVARIANT: set[str] = set()
_USES_WORKSPACE: set[str] = set()
_FUSES_COMBINE: set[str] = set()
_DIFFERENTIABLE: set[str] = set()

# What a layer whose backend has no backward computes with when autograd is on: torch ops
# only there (the native kernels, the workspace and torch's CPU grouped GEMM step aside).
DIFFERENTIABLE_FALLBACK = "grouped"


def register_backend(
    name: str, fn: ExpertsBackend, *, batch_invariant: bool = False, uses_workspace: bool = False,
    fuses_combine: bool = False, differentiable: bool = False,
) -> None:
    """Make ``fn`` selectable as ``backend=name``. ``reference`` cannot be replaced.

    ``batch_invariant``: each slot's output is bitwise independent of the other slots in
    the call (so a sequence gives the same result alone or batched). ``uses_workspace``:
    ``fn`` accepts a ``workspace=`` keyword (see ``ExpertsBackend``). ``fuses_combine``:
    ``fn`` also takes ``topk_weights_TK=`` and returns the combined output y_TH [T, H]
    (the layer then skips its own combine stage). ``differentiable``: with autograd on,
    ``fn`` builds a graph through which gradients reach ``x_TH`` and the expert weights
    (and through the routing weights, the router); a layer whose backend is not takes
    ``DIFFERENTIABLE_FALLBACK`` for calls that need gradients.
    """
    if name == "reference" and "reference" in _BACKENDS:
        raise ValueError("the 'reference' backend is fixed; register yours under another name")
    if fuses_combine and uses_workspace:
        raise ValueError("a backend that fuses the combine returns y_TH itself; it cannot also use a workspace")
    _BACKENDS[name] = fn
    for flag, names in ((batch_invariant, _BATCH_INVARIANT), (uses_workspace, _USES_WORKSPACE),
                        (fuses_combine, _FUSES_COMBINE), (differentiable, _DIFFERENTIABLE)):  # fmt: skip
        names.discard(name)
        if flag:
            names.add(name)


def is_batch_invariant(name: str) -> bool:
    get_backend(name)
    return name in _BATCH_INVARIANT


def uses_workspace(name: str) -> bool:
    get_backend(name)
    return name in _USES_WORKSPACE


def fuses_combine(name: str) -> bool:
    get_backend(name)
    return name in _FUSES_COMBINE


def is_differentiable(name: str) -> bool:
    get_backend(name)
    return name in _DIFFERENTIABLE


def get_backend(name: str) -> ExpertsBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown experts backend {name!r}; registered: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def backend_names() -> tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


def reference_experts(weights: ExpertWeights, x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Obviously correct: every expert, one slot at a time, in fp32 (or wider), then cast."""
    acc = torch.promote_types(x_TH.dtype, torch.float32)
    out_SH = torch.zeros(len(plan.order_S), weights.hidden_size, dtype=acc, device=x_TH.device)
    token_idx = plan.token_idx_S.tolist()
    for e in range(weights.num_experts):
        for j in range(plan.offsets[e], plan.offsets[e + 1]):
            out_SH[j] = _wide_mlp(weights, x_TH[token_idx[j]].unsqueeze(0).to(acc), e)[0]
    return out_SH.to(x_TH.dtype)


def _wide_mlp(weights: ExpertWeights, x_1H: torch.Tensor, e: int) -> torch.Tensor:
    acc = x_1H.dtype
    w_gu, w_dn = (w.to(acc) for w in weights.matrices(e))
    b_gu, b_dn = weights.biases(e)
    gate_up = x_1H @ w_gu.t()
    if b_gu is not None:
        gate_up = gate_up + b_gu.to(acc)
    y = gated_activation(weights.activation, gate_up) @ w_dn.t()
    return y if b_dn is None else y + b_dn.to(acc)


def grouped_experts(
    weights: ExpertWeights, x_TH: torch.Tensor, plan: DispatchPlan, *, workspace: Workspace | None = None
) -> torch.Tensor:
    """Fast path: one gathered activation matrix, one GEMM pair per *active* expert.

    Idle experts are never touched; expert weights are read in place (views of the
    stacked tensors), only activations are gathered. Experts with up to
    ``NATIVE_MAX_ROWS`` tokens run in the native kernels (one call for all of them) where
    they apply; the rest use torch's grouped GEMM (one call for all experts) when many
    experts are active, else a loop over the active experts.
    """
    x_SH = _gather(x_TH, plan, workspace)
    if _native_applies(weights, x_SH):
        return _native_experts(weights, x_SH, plan, batch_invariant=False, workspace=workspace)
    if x_SH.device.type != "cpu" and _grouped_mm_applies(weights, x_SH):
        return _grouped_mm_experts(weights, x_SH, plan)  # on a GPU: no read back of the counts
    # torch's CPU grouped GEMM visits every expert (an empty matmul and a host sync each),
    # so when few experts are active (decode) the loop over the active ones is cheaper.
    few_active = len(plan.active_experts) * 8 <= weights.num_experts
    if not few_active and _grouped_mm_applies(weights, x_SH):
        return _grouped_mm_experts(weights, x_SH, plan)
    return _loop_experts(weights, x_SH, plan)


# Above this many tokens per expert BLAS's blocked GEMM catches up with the native kernels
# (fp32, Qwen3-30B-A3B experts, benchmarks/native_gemm.py: the panel kernel 1.2-1.5x BLAS at
# 64-256 rows, 0.95-1.1x at 512), so ``grouped`` hands such experts to it.
NATIVE_MAX_ROWS = 512
# With bf16 weights BLAS has the CPU's bf16 dot-product instructions (twice the fp32 FLOP
# rate) while the native kernel widens to fp32, so BLAS wins sooner. Measured on Zen 4,
# Qwen3-30B-A3B experts, native vs torch bf16: 2.4-2.6x at 1 row, 1.3-1.6x at 8, 1.0x at 16,
# 0.7-0.8x at 32 rows per expert.
NATIVE_MAX_ROWS_BF16 = 12


def native_experts(
    weights: ExpertWeights, x_TH: torch.Tensor, plan: DispatchPlan, *, workspace: Workspace | None = None
) -> torch.Tensor:
    """Every active expert in the native kernels: batch-invariant (each output element is
    summed in a fixed order) and fast at any batch. Falls back to ``rowwise`` (also
    batch-invariant) where the kernels do not apply (no compiler, non-fp32, transposed weights)."""
    x_SH = _gather(x_TH, plan, workspace)
    if _native_applies(weights, x_SH):
        return _native_experts(weights, x_SH, plan, batch_invariant=True, workspace=workspace)
    return rowwise_experts(weights, x_TH, plan)


def _gather(x_TH: torch.Tensor, plan: DispatchPlan, workspace: Workspace | None) -> torch.Tensor:
    """Each slot's token row, in dispatch order: [S, H]."""
    # out= has no autograd, and a reused buffer saved for the backward would be overwritten.
    if workspace is None or torch.is_grad_enabled():
        return x_TH.index_select(0, plan.token_idx_S)
    x_SH = workspace.empty("x", (plan.token_idx_S.shape[0], x_TH.shape[1]), x_TH.dtype, x_TH.device)
    return torch.index_select(x_TH, 0, plan.token_idx_S, out=x_SH)


def _native_applies(weights: ExpertWeights, x_SH: torch.Tensor) -> bool:
    if hasattr(weights, "run_segments"):  # int8 (its run_segments takes torch ops under autograd)
        return native.available() and x_SH.device.type == "cpu"
    if type(weights) is not ExpertWeights or weights.transposed:
        return False  # GPT-OSS's [E, H, 2I] rows are not contiguous along K
    if x_SH.dtype != weights.w_gate_up.dtype or x_SH.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x_SH, weights.b_gate_up, weights.b_down)):  # fmt: skip
        return False  # the kernels have no backward (supports_weight checks the weights)
    return native.supports_weight(weights.w_gate_up) and native.supports_weight(weights.w_down)


def _native_experts(
    weights: ExpertWeights,
    x_SH: torch.Tensor,
    plan: DispatchPlan,
    *,
    batch_invariant: bool,
    workspace: Workspace | None,
) -> torch.Tensor:
    """``batch_invariant``: every expert in the dot kernel (fixed summation order per row).
    Otherwise fp32 experts with at least ``native.PANEL_ROWS`` rows take the faster panel
    kernel, and experts past ``NATIVE_MAX_ROWS`` (``NATIVE_MAX_ROWS_BF16``) rows BLAS."""
    x_SH = x_SH.contiguous()
    if hasattr(weights, "run_segments"):
        # int8 experts bring their own kernel, which keeps up with BLAS at any row count.
        return weights.run_segments(x_SH, plan.segments)
    fp32 = x_SH.dtype == torch.float32
    max_rows = None if batch_invariant else NATIVE_MAX_ROWS if fp32 else NATIVE_MAX_ROWS_BF16
    small, large = [], []
    for e, lo, hi in plan.segments:
        (small if max_rows is None or hi - lo <= max_rows else large).append((e, lo, hi))
    panel = fp32 and not batch_invariant and any(hi - lo >= native.PANEL_ROWS for _, lo, hi in small)
    scratch = workspace or FRESH
    # The kernels take fp32 activations (bf16 weights are widened in registers).
    x32_SH = x_SH.float()
    b_gate_up, b_down = (None if b is None else b.float() for b in (weights.b_gate_up, weights.b_down))
    slots, device = x_SH.shape[0], x_SH.device
    out_SH = scratch.empty("out", (slots, weights.hidden_size), torch.float32, device)
    gate_up_S2I = scratch.empty("gate_up", (slots, 2 * weights.intermediate_size), torch.float32, device)
    _gemm(x32_SH, weights.w_gate_up, small, gate_up_S2I, b_gate_up, panel, scratch)
    # Rows of large experts hold garbage until the loop below; the activation is row-local.
    h_SI = scratch.empty("h", (slots, weights.intermediate_size), torch.float32, device)
    activate_into(weights.activation, gate_up_S2I, h_SI)
    _gemm(h_SI, weights.w_down, small, out_SH, b_down, panel, scratch)
    out_SH = out_SH.to(x_SH.dtype)
    return _run_segments(weights, x_SH, large, out_SH) if large else out_SH


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


def activate_into(config: ActivationConfig, gate_up_S2I: torch.Tensor, out_SI: torch.Tensor) -> None:
    """``out = gated_activation(gate_up)``, clobbering ``gate_up`` (scratch here) so that
    SiLU — every family but GPT-OSS — allocates no temporary. Same values, same bits."""
    if config.kind == "silu" and not config.interleaved:
        gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
        torch.mul(F.silu(gate_SI, inplace=True), up_SI, out=out_SI)
    else:
        out_SI.copy_(gated_activation(config, gate_up_S2I))


def grouped_loop_experts(weights: ExpertWeights, x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``grouped`` without torch's grouped GEMM: a Python loop over the active experts."""
    return _loop_experts(weights, x_TH.index_select(0, plan.token_idx_S), plan)


def _loop_experts(weights: ExpertWeights, x_SH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    return _run_segments(weights, x_SH, plan.segments)


def _run_segments(
    weights: ExpertWeights,
    x_SH: torch.Tensor,
    segments: Iterable[tuple[int, int, int]],
    out_SH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run expert ``e`` on sorted rows ``lo:hi`` for each ``(e, lo, hi)``, into ``out_SH``."""
    out_SH = torch.empty_like(x_SH) if out_SH is None else out_SH
    # Writing straight into the output slice saves a copy, but out= has no autograd.
    in_place = not torch.is_grad_enabled()
    for e, lo, hi in segments:
        if in_place:
            weights.mlp(x_SH[lo:hi], e, out_SH[lo:hi])
        else:
            out_SH[lo:hi] = weights.mlp(x_SH[lo:hi], e)
    return out_SH


def _grouped_mm_experts(weights: ExpertWeights, x_SH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    ends_E = plan.counts_E.cumsum(0).to(torch.int32)  # on the device: no host ints needed
    w_gu_EHN = weights.w_gate_up if weights.transposed else weights.w_gate_up.transpose(-2, -1)
    w_dn_EIH = weights.w_down if weights.transposed else weights.w_down.transpose(-2, -1)
    gate_up_S2I = F.grouped_mm(x_SH, w_gu_EHN, offs=ends_E)
    if weights.b_gate_up is not None:
        gate_up_S2I += weights.b_gate_up.index_select(0, plan.expert_ids_S)
    out_SH = F.grouped_mm(gated_activation(weights.activation, gate_up_S2I), w_dn_EIH, offs=ends_E)
    if weights.b_down is not None:
        out_SH += weights.b_down.index_select(0, plan.expert_ids_S)
    return out_SH


def _grouped_mm_applies(weights: ExpertWeights, x_SH: torch.Tensor) -> bool:
    """torch's grouped GEMM: plain stacked weights, no autograd, fp32/bf16/fp16 on the CPU and
    bf16 elsewhere, 16-byte aligned rows."""
    if type(weights) is not ExpertWeights or not hasattr(F, "grouped_mm"):
        return False
    if torch.is_grad_enabled() or x_SH.shape[0] == 0:
        return False
    if x_SH.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x_SH.device.type != "cpu" and x_SH.dtype != torch.bfloat16:
        return False  # torch's CUDA grouped GEMM takes bf16 only (its meta kernel checks the same)
    row_bytes = (weights.hidden_size * x_SH.element_size(), weights.intermediate_size * x_SH.element_size())
    pointers = (x_SH.data_ptr(), weights.w_gate_up.data_ptr(), weights.w_down.data_ptr())
    return all(n % 16 == 0 for n in row_bytes + pointers)


def rowwise_experts(weights: ExpertWeights, x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Batch-invariant path: one matrix-vector product per slot.

    BLAS picks a different kernel (and summation order) for a 1-row product than for a
    many-row one, so the grouped path's result for a token moves in the last bits with
    the size of its expert's group. Here every slot takes the 1-row kernel, whatever the
    batch. Same speed as ``grouped`` at one token per expert (decode), slower when experts
    get many tokens (prefill), since each slot re-reads the expert's weights.
    """
    segments = ((e, j, j + 1) for e in plan.active_experts for j in range(plan.offsets[e], plan.offsets[e + 1]))
    return _run_segments(weights, x_TH.index_select(0, plan.token_idx_S), segments)


# With autograd on, these take torch ops only (see ``_native_applies``, ``_grouped_mm_applies``,
# ``_run_segments``, ``_gather``): the same values, with a backward.
register_backend("reference", reference_experts, batch_invariant=True, differentiable=True)
register_backend("grouped", grouped_experts, uses_workspace=True, differentiable=True)
register_backend("grouped_loop", grouped_loop_experts, differentiable=True)
register_backend("rowwise", rowwise_experts, batch_invariant=True, differentiable=True)
register_backend("native", native_experts, batch_invariant=True, uses_workspace=True, differentiable=True)


def _triton_experts(weights: ExpertWeights, x_TH: torch.Tensor, plan: DispatchPlan, *,
                    topk_weights_TK: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Fused Triton kernels (``triton_moe``), imported on first use: triton is optional."""
    from activepath.kernels.triton.moe import triton_experts

    return triton_experts(weights, x_TH, plan, topk_weights_TK=topk_weights_TK)


register_backend("triton", _triton_experts, fuses_combine=True)


def _check_shapes(
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    transposed: bool,
    b_gate_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
) -> tuple[int, int, int]:
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"expert weights must be 3-D, got {tuple(w_gate_up.shape)} and {tuple(w_down.shape)}")
    if w_gate_up.dtype != w_down.dtype:
        raise TypeError(f"expert weight dtypes differ: gate_up {w_gate_up.dtype}, down {w_down.dtype}")
    if transposed:
        (e, h, i2), want_down = w_gate_up.shape, (w_gate_up.shape[0], w_gate_up.shape[2] // 2, w_gate_up.shape[1])
    else:
        (e, i2, h), want_down = w_gate_up.shape, (w_gate_up.shape[0], w_gate_up.shape[2], w_gate_up.shape[1] // 2)
    if i2 % 2 or tuple(w_down.shape) != want_down:
        layout = "[E, H, 2I] / [E, I, H]" if transposed else "[E, 2I, H] / [E, H, I]"
        raise ValueError(
            f"expert weights must be {layout}; got gate_up {tuple(w_gate_up.shape)}, down {tuple(w_down.shape)}"
        )
    if b_gate_up is not None and tuple(b_gate_up.shape) != (e, i2):
        raise ValueError(f"gate_up bias must be [{e}, {i2}], got {tuple(b_gate_up.shape)}")
    if b_down is not None and tuple(b_down.shape) != (e, h):
        raise ValueError(f"down bias must be [{e}, {h}], got {tuple(b_down.shape)}")
    return e, h, i2 // 2

