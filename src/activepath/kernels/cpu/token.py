"""One token through a whole MoE layer in two native calls around the activation
(``moe_glue.cpp``: ``ap_token_route_gate_up[_i8]``, ``ap_token_down_combine[_i8]``), for
``activepath.moe.decode_path``.

At decode (one token) the layer's Python around its native calls costs ~300 us per layer
on caches the expert weights just flushed: building the plan's segments, gathering the
token K times, checks and wrappers (benchmarks/results/issue6_performance.md). These calls
run the same native steps with the same arguments, so the results are the same bits as the
general path; only the activation stays in torch between them, so that it is the very op
the general path runs. The caller checks every condition first (fp32 CPU tensors with
contiguous rows; fp32 experts without biases, or int8 ones), so nothing is checked here.

Shape legend: H hidden, E experts, K experts per token, I expert intermediate.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

from activepath.kernels.cpu.build import call, threads_for
from activepath.kernels.cpu.gemm import M_BLOCK, N_BLOCK
from activepath.kernels.cpu.int8 import M_BLOCK_I8, N_BLOCK_I8


@dataclass(frozen=True)
class TokenGateUp:
    """What ``token_route_gate_up`` returns: the routing (ids/weights [1, K], logits
    [1, E]), the plan of the K slots (order, token_idx, sorted_ids [K], counts_E [E],
    offsets_E1 [E + 1]), the gate/up rows [K, 2I] in sorted-slot order, and the seconds
    spent in the router, the plan and the GEMM. ``empty`` allocates them fresh (callers
    keep the routing and the counts); the native call fills them in."""

    ids_1K: torch.Tensor
    weights_1K: torch.Tensor
    logits_1E: torch.Tensor
    order_K: torch.Tensor
    token_idx_K: torch.Tensor
    sorted_ids_K: torch.Tensor
    counts_E: torch.Tensor
    offsets_E1: torch.Tensor
    gate_up_K2I: torch.Tensor
    seconds: ctypes.Array = field(repr=False)

    @classmethod
    def empty(cls, num_experts: int, k: int, two_i: int) -> TokenGateUp:
        return cls(
            torch.empty(1, k, dtype=torch.int64), torch.empty(1, k, dtype=torch.float32),
            torch.empty(1, num_experts, dtype=torch.float32), torch.empty(k, dtype=torch.int64),
            torch.empty(k, dtype=torch.int64), torch.empty(k, dtype=torch.int64),
            torch.empty(num_experts, dtype=torch.int64), torch.empty(num_experts + 1, dtype=torch.int64),
            torch.empty(k, two_i, dtype=torch.float32), (ctypes.c_double * 3)(),
        )  # fmt: skip

    def outputs(self) -> tuple:
        """The output pointers in the C functions' order."""
        return (self.logits_1E.data_ptr(), self.ids_1K.data_ptr(), self.weights_1K.data_ptr(),
                self.order_K.data_ptr(), self.token_idx_K.data_ptr(), self.sorted_ids_K.data_ptr(),
                self.counts_E.data_ptr(), self.offsets_E1.data_ptr(), self.gate_up_K2I.data_ptr(), self.seconds)

    def plan(self) -> tuple[int, int, int]:
        """The plan's pointers the down-and-combine calls read: sorted_ids, order, token_idx."""
        return self.sorted_ids_K.data_ptr(), self.order_K.data_ptr(), self.token_idx_K.data_ptr()


def token_route_gate_up(
    x_1H: torch.Tensor, w_router_EH: torch.Tensor, b_router_E: torch.Tensor | None, k: int, *, normalize: bool,
    scale: float, w_gate_up_E2IH: torch.Tensor,
) -> TokenGateUp:
    """Router (softmax top-k, as ``native.route_softmax_topk``), dispatch plan (as
    ``native.plan_dispatch``) and the gate/up GEMM of one token's K experts, in one call.
    Inputs are not checked here (see the module docstring)."""
    two_i = w_gate_up_E2IH.shape[1]
    out = TokenGateUp.empty(w_router_EH.shape[0], k, two_i)
    call("ap_token_route_gate_up", *_route_args(x_1H, w_router_EH, b_router_E, k, normalize, scale),
         w_gate_up_E2IH.data_ptr(), w_gate_up_E2IH.stride(0), w_gate_up_E2IH.stride(1), two_i,
         *out.outputs(), N_BLOCK, M_BLOCK, threads_for(4 * w_router_EH.numel()),
         threads_for(4 * k * two_i * x_1H.shape[1]))  # fmt: skip
    return out


def _route_args(
    x_1H: torch.Tensor, w_router_EH: torch.Tensor, b_router_E: torch.Tensor | None, k: int, normalize: bool,
    scale: float,
) -> tuple:
    return (x_1H.data_ptr(), x_1H.shape[1], w_router_EH.data_ptr(),
            None if b_router_E is None else b_router_E.data_ptr(), w_router_EH.shape[0], k, int(normalize), scale)


def token_down_combine(
    h_KI: torch.Tensor, w_down_EHI: torch.Tensor, gate_up: TokenGateUp
) -> tuple[torch.Tensor, tuple[float, float]]:
    """The down GEMM of the K slots of ``gate_up``'s plan and the weighted combine, in one
    call: (y [1, H] fp32, seconds in the GEMM and the combine)."""
    k, inter = h_KI.shape
    hidden = w_down_EHI.shape[1]
    out_KH = torch.empty(k, hidden, dtype=torch.float32)
    y_1H = torch.empty(1, hidden, dtype=torch.float32)
    seconds = (ctypes.c_double * 2)()
    call("ap_token_down_combine", h_KI.data_ptr(), inter, w_down_EHI.data_ptr(), w_down_EHI.stride(0),
         w_down_EHI.stride(1), hidden, *gate_up.plan(), k, gate_up.weights_1K.data_ptr(), out_KH.data_ptr(),
         y_1H.data_ptr(), seconds, N_BLOCK, M_BLOCK, threads_for(4 * k * hidden * inter),
         threads_for(4 * out_KH.numel()))  # fmt: skip
    return y_1H, (seconds[0], seconds[1])


def token_route_gate_up_i8(
    x_1H: torch.Tensor, w_router_EH: torch.Tensor, b_router_E: torch.Tensor | None, k: int, *, normalize: bool,
    scale: float, q_E2IH: torch.Tensor, scale_E2I: torch.Tensor, bias_E2I: torch.Tensor | None,
) -> TokenGateUp:
    """``token_route_gate_up`` with int8 gate/up weights (per-row scales, fp32 bias):
    what ``Int8ExpertWeights.run_segments`` computes for one token. Inputs not checked."""
    two_i = q_E2IH.shape[1]
    out = TokenGateUp.empty(w_router_EH.shape[0], k, two_i)
    call("ap_token_route_gate_up_i8", *_route_args(x_1H, w_router_EH, b_router_E, k, normalize, scale),
         q_E2IH.data_ptr(), q_E2IH.stride(0), q_E2IH.stride(1), scale_E2I.data_ptr(), scale_E2I.stride(0),
         *_bias_args(bias_E2I), two_i, *out.outputs(), N_BLOCK, M_BLOCK, N_BLOCK_I8, M_BLOCK_I8,
         threads_for(4 * w_router_EH.numel()), threads_for(k * two_i * x_1H.shape[1]))  # fmt: skip
    return out


def token_down_combine_i8(
    h_KI: torch.Tensor, q_EHI: torch.Tensor, scale_EH: torch.Tensor, bias_EH: torch.Tensor | None,
    gate_up: TokenGateUp,
) -> tuple[torch.Tensor, tuple[float, float]]:
    """``token_down_combine`` with int8 down weights."""
    k, inter = h_KI.shape
    hidden = q_EHI.shape[1]
    out_KH = torch.empty(k, hidden, dtype=torch.float32)
    y_1H = torch.empty(1, hidden, dtype=torch.float32)
    seconds = (ctypes.c_double * 2)()
    call("ap_token_down_combine_i8", h_KI.data_ptr(), inter, q_EHI.data_ptr(), q_EHI.stride(0), q_EHI.stride(1),
         scale_EH.data_ptr(), scale_EH.stride(0), *_bias_args(bias_EH), hidden, *gate_up.plan(), k,
         gate_up.weights_1K.data_ptr(), out_KH.data_ptr(), y_1H.data_ptr(), seconds, N_BLOCK_I8, M_BLOCK_I8,
         threads_for(k * hidden * inter), threads_for(4 * out_KH.numel()))  # fmt: skip
    return y_1H, (seconds[0], seconds[1])


def _bias_args(bias_EN: torch.Tensor | None) -> tuple:
    return (None, 0) if bias_EN is None else (bias_EN.data_ptr(), bias_EN.stride(0))
