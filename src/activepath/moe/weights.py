# route → dispatch → [experts: the stores] → combine
"""Expert stores: the stacked expert parameters of one MoE layer, behind ``ExpertStore``.

A store says what it holds (``format``: ``"float"`` here, ``"int8"`` in ``weights_int8``;
``layout``: ``"nk"`` for nn.Linear's [E, 2I, H] / [E, H, I], ``"kn"`` for GPT-OSS's transposed
[E, H, 2I] / [E, I, H]) and runs its experts; backends branch on ``format`` and ``layout``,
never on the store's class, so a new store (int4, offloaded) fits without touching the layer.

Float weights stay stacked and colocated, exactly as the source model holds them; nothing is
copied per token or per call.

Shape legend: S slots (sorted by expert), H hidden, I expert intermediate size, E experts,
2I fused gate+up width.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from activepath.kernels.policy import grad_mode
from activepath.moe.activation import ActivationConfig, gated_activation
from activepath.validation import as_parameter

Segments = Iterable[tuple[int, int, int]]


class ExpertStore(Protocol):
    """What the experts backends need of a layer's expert weights."""

    format: str  # "float" | "int8" (later "int4", "offloaded")
    layout: str  # "nk" (nn.Linear, [E, 2I, H]) | "kn" (GPT-OSS, [E, H, 2I])
    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: ActivationConfig

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def run_segments(self, x_SH: torch.Tensor, segments: Segments, out_SH: torch.Tensor | None = None) -> torch.Tensor:
        """Expert ``e``'s gated MLP on rows ``lo:hi`` of ``x_SH`` for each ``(e, lo, hi)``."""
        ...

    def mlp(self, x_SH: torch.Tensor, e: int, out_SH: torch.Tensor | None = None) -> torch.Tensor: ...

    def matrices(self, e: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def biases(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...


class ExpertWeights(nn.Module):
    """The stacked float expert parameters of one MoE layer (shared with the source model)."""

    format = "float"

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

    @property
    def layout(self) -> str:
        """``"kn"`` for GPT-OSS's transposed [E, H, 2I] / [E, I, H], else ``"nk"`` (nn.Linear)."""
        return "kn" if self.transposed else "nk"

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype this layer computes in."""
        return self.w_gate_up.dtype

    @property
    def device(self) -> torch.device:
        return self.w_gate_up.device

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

    def run_segments(self, x_SH: torch.Tensor, segments: Segments, out_SH: torch.Tensor | None = None) -> torch.Tensor:
        """Expert ``e`` on sorted rows ``lo:hi`` for each ``(e, lo, hi)``, one torch GEMM pair each."""
        return run_segments_loop(self, x_SH, segments, out_SH)

    def matrices(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s gate/up [2I, H] and down [H, I] weights in nn.Linear layout (views)."""
        w_gu, w_dn = self.w_gate_up[e], self.w_down[e]
        return (w_gu.t(), w_dn.t()) if self.transposed else (w_gu, w_dn)

    def biases(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Expert ``e``'s gate/up [2I] and down [H] biases, if any."""
        return (None if self.b_gate_up is None else self.b_gate_up[e], None if self.b_down is None else self.b_down[e])


def run_segments_loop(
    store: ExpertStore, x_SH: torch.Tensor, segments: Segments, out_SH: torch.Tensor | None = None
) -> torch.Tensor:
    """``store.mlp`` on sorted rows ``lo:hi`` for each ``(e, lo, hi)``, into ``out_SH``; rows in
    no segment are left as they were (uninitialised in a fresh output)."""
    out_SH = torch.empty_like(x_SH) if out_SH is None else out_SH
    # Writing straight into the output slice saves a copy, but out= has no autograd.
    in_place = not grad_mode()
    for e, lo, hi in segments:
        if in_place:
            store.mlp(x_SH[lo:hi], e, out_SH[lo:hi])
        else:
            out_SH[lo:hi] = store.mlp(x_SH[lo:hi], e)
    return out_SH


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
