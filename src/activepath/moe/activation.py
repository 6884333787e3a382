# route → dispatch → experts [gate/up → activation → down] → combine
"""The gated activation between an expert's gate/up and down projections.

Shape legend: S slots, I expert intermediate size, 2I the fused gate+up width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from activepath.validation import check_choice

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


def activate_into(config: ActivationConfig, gate_up_S2I: torch.Tensor, out_SI: torch.Tensor) -> None:
    """``out = gated_activation(gate_up)``, clobbering ``gate_up`` (scratch here) so that
    SiLU — every family but GPT-OSS — allocates no temporary. Same values, same bits."""
    if config.kind == "silu" and not config.interleaved:
        gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
        torch.mul(F.silu(gate_SI, inplace=True), up_SI, out=out_SI)
    else:
        out_SI.copy_(gated_activation(config, gate_up_S2I))
