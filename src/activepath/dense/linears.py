"""The model's dense projections (attention, shared experts, lm_head) through the native
small-batch kernel.

At decode a model reads every dense weight once per token; BLAS's one-row product leaves a
third of the memory bandwidth unused on the CPUs we measured, the native kernel does not.
Patching is per module instance (``forward`` replaced), so the model keeps its classes,
parameters and state dict. From 16 rows (prefill) wide fp32 layers take the native panel
kernel, which beats BLAS's blocked GEMM up to a few hundred rows; the original path is used
past that, for autograd, and for anything not fp32 or bf16 on CPU.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from activepath.kernels import cpu as native
from activepath.kernels.cpu import int8 as native_int8
from activepath.kernels.policy import (
    LINEAR_MAX_ROWS,
    LINEAR_MAX_ROWS_BF16,
    LINEAR_MIN_WEIGHT_BYTES,
    PANEL_MIN_OUT_FEATURES,
    linear_max_rows,
    needs_autograd,
    select_linear,
)

# The thresholds are the kernel policy's (measurements in kernels/policy.py); re-exported here.
__all__ = ["LINEAR_MAX_ROWS", "LINEAR_MAX_ROWS_BF16", "LINEAR_MIN_WEIGHT_BYTES", "PANEL_MIN_OUT_FEATURES",
           "Int8Linear", "patch_linears", "quantize_linears", "unpatch_linears"]  # fmt: skip


def patch_linears(
    model: nn.Module, *, max_rows: int = LINEAR_MAX_ROWS, min_weight_bytes: int = LINEAR_MIN_WEIGHT_BYTES
) -> int:
    """Route every fp32 or bf16 CPU ``nn.Linear`` of ``model`` with at least
    ``min_weight_bytes`` of weights through the native kernel when the input has at most
    ``max_rows`` rows (``LINEAR_MAX_ROWS_BF16`` for bf16, where BLAS catches up sooner).
    Returns how many modules were patched (0 when the native kernels are unavailable)."""
    if not native.available():
        return 0
    patched = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is nn.Linear
            and weight.dtype in native.WEIGHT_DTYPES
            and weight.device.type == "cpu"
            and weight.numel() * weight.element_size() >= min_weight_bytes
        ):
            rows = linear_max_rows(weight.dtype, max_rows)
            module.forward = types.MethodType(_make_forward(rows), module)
            module._activepath_patched = True
            patched += 1
    return patched


def unpatch_linears(model: nn.Module) -> int:
    """Undo ``patch_linears``: the modules' class ``forward`` is used again. Returns how
    many modules were restored."""
    restored = 0
    for module in model.modules():
        if module.__dict__.pop("_activepath_patched", False):
            del module.forward
            restored += 1
    return restored


def _make_forward(max_rows: int):
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        rows = x_MK.shape[0]
        if 0 < rows <= max_rows:  # the cheap exit first: past it the layer is BLAS's
            choice = select_linear(rows=rows, max_rows=max_rows, same_dtype=x.dtype == self.weight.dtype,
                                   autograd=needs_autograd(x), weight_fits=native.supports_weight(self.weight),
                                   weight_dtype=self.weight.dtype, out_features=self.weight.shape[0])  # fmt: skip
            if choice.path != "torch":
                bias = None if self.bias is None else self.bias.float()
                panel = choice.path == "native_panel"
                y_MN = native.linear(x_MK.float().contiguous(), self.weight, bias, panel=panel).to(x.dtype)
                return y_MN.reshape(*x.shape[:-1], y_MN.shape[-1])
        return F.linear(x, self.weight, self.bias)

    return forward


class Int8Linear(nn.Module):
    """A weight-only int8 ``nn.Linear``: int8 weights per output channel (scale = max|w|/127),
    fp32 activations, fp32 bias. Runs in the native int8 kernel; without it (no compiler,
    ``ACTIVEPATH_NATIVE=0``) the weights are dequantized per call (correct, slow)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q_NK, scale_N = native_int8.quantize_rows(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("q_weight", q_NK)
        self.register_buffer("scale", scale_N)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self._dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer expects {self.in_features}")
        x_MK = x.reshape(-1, self.in_features).float()
        if x_MK.shape[0] and native_int8.available() and x_MK.device.type == "cpu" and not needs_autograd(x_MK):
            y_MN = native_int8.linear_i8(x_MK.contiguous(), self.q_weight, self.scale, self.bias)
        else:
            y_MN = F.linear(x_MK, self.q_weight.float() * self.scale.unsqueeze(1), self.bias)
        return y_MN.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_linears(model: nn.Module) -> int:
    """Replace every float ``nn.Linear`` of ``model`` with an ``Int8Linear``, in place
    (the float weights are dropped unless something else, e.g. a tied embedding, holds
    them). Returns how many were replaced."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
                setattr(module, name, Int8Linear(child))
                replaced += 1
    return replaced
