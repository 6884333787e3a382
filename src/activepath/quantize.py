# route → dispatch → [experts] → combine, with int8 expert weights
"""Int8 expert weights: a transform applied to an optimized model's ``SparseMoE`` layers.

Each expert matrix is quantized symmetrically per output channel (scale = max|w| / 127)
and packed once for fbgemm. The matmul is PyTorch's native dynamic-int8 linear: it also
quantizes the activations, per call, with one scale per matrix product. We measured
PyTorch's weight-only int8 kernel (``torch._weight_int8pack_mm``) on this CPU class first:
3.7x *slower* than fp32 at one token, while the dynamic kernel reads 4x fewer bytes and
is ~4.5x faster at one token per expert (see ``benchmarks/results``).

Because activations share a scale within one product, the result for a token depends on
the other tokens that share its expert in that call; the ``rowwise`` backend (one product
per slot) keeps it batch-invariant.

Shape legend: S slots, H hidden, I expert intermediate size, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import ActivationConfig, ExpertWeights

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Int8ExpertWeights(ExpertWeights):
    """Per-expert packed int8 matrices with the ``ExpertWeights`` interface.

    Built with ``from_weights``; the float weights are not kept. It shares no storage with
    the float parameters, so nn.Module's float-parameter ``__init__`` is deliberately skipped.
    """

    def __init__(self, source: ExpertWeights) -> None:  # noqa: D107 - see class docstring
        nn.Module.__init__(self)
        self.activation: ActivationConfig = source.activation
        self.transposed = False  # packed matrices are always in nn.Linear layout
        self.num_experts, self.hidden_size = source.num_experts, source.hidden_size
        self.intermediate_size = source.intermediate_size
        self.b_gate_up = self.b_down = None  # biases live inside the packed params
        self._dtype = source.dtype
        self._gate_up = [_pack(*_pair(source, e, 0)) for e in range(source.num_experts)]
        self._down = [_pack(*_pair(source, e, 1)) for e in range(source.num_experts)]

    @classmethod
    def from_weights(cls, source: ExpertWeights) -> Int8ExpertWeights:
        if source.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"int8 experts need float weights, got {source.dtype}")
        return cls(source)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def weight_bytes_per_expert(self) -> int:
        """int8 values plus one fp32 scale per output channel, both matrices."""
        h, i = self.hidden_size, self.intermediate_size
        return 3 * h * i + 4 * (2 * i + h)

    def gate_up(self, x_SH: torch.Tensor, e: int) -> torch.Tensor:
        return _qlinear(x_SH, self._gate_up[e])

    def down(self, h_SI: torch.Tensor, e: int, out_SH: torch.Tensor | None = None) -> torch.Tensor:
        y_SH = _qlinear(h_SI, self._down[e])
        return y_SH if out_SH is None else out_SH.copy_(y_SH)

    def matrices(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized fp32 copies (for the reference backend and tests)."""
        return _unpack(self._gate_up[e])[0], _unpack(self._down[e])[0]

    def biases(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return _unpack(self._gate_up[e])[1], _unpack(self._down[e])[1]


def quantize_experts(layer_experts: ExpertWeights, expert_dtype: str) -> ExpertWeights:
    """The transform: ``"native"`` returns the weights as they are, ``"int8"`` packs them."""
    if expert_dtype == "native":
        return layer_experts
    if expert_dtype == "int8":
        return Int8ExpertWeights.from_weights(layer_experts)
    raise ValueError(f"expert_dtype={expert_dtype!r} is not supported; expected 'native' or 'int8'")


def _pair(source: ExpertWeights, e: int, which: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    return source.matrices(e)[which], source.biases(e)[which]


def _pack(w_NK: torch.Tensor, bias_N: torch.Tensor | None) -> torch.ScriptObject:
    w_NK = w_NK.detach().float()
    scale_N = (w_NK.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    zero_N = torch.zeros(w_NK.shape[0], dtype=torch.long)
    q_NK = torch.quantize_per_channel(w_NK.contiguous(), scale_N, zero_N, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q_NK, None if bias_N is None else bias_N.detach().float())


def _unpack(packed: torch.ScriptObject) -> tuple[torch.Tensor, torch.Tensor | None]:
    q_NK, bias_N = torch.ops.quantized.linear_unpack(packed)
    return q_NK.dequantize(), bias_N


def _qlinear(x_SK: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    # fbgemm's dynamic linear takes fp32 activations. reduce_range=True (7-bit activations)
    # because without AVX512-VNNI fbgemm sums u8*s8 pairs in int16, which full-range
    # activations can saturate; we cannot know the deployment CPU at pack time.
    y_SN = torch.ops.quantized.linear_dynamic(x_SK.float().contiguous(), packed, True)
    return y_SN.to(x_SK.dtype)
